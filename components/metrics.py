"""Metrics and the plots people would rather look at than read."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on clusters or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402


def auc(labels, scores) -> float:
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")  # undefined with one class
    return float(roc_auc_score(labels, np.asarray(scores)))


def loss_curve_figure(losses: list[float], title: str):
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(len(losses)), losses, lw=1)
    ax.set(xlabel="step", ylabel="loss", title=title)
    fig.tight_layout()
    return fig


def bar_figure(values: dict[str, float], ylabel: str, title: str):
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(values) + 2), 3.2))
    ax.bar(list(values), list(values.values()), color="#4c72b0")
    ax.set(ylabel=ylabel, title=title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)


def grouped_bar_figure(groups: dict[str, dict[str, float]], ylabel: str, title: str, log: bool = False):
    """Bars side by side per group: {group: {series: value}} (series in the order first seen)."""
    series = list(dict.fromkeys(s for values in groups.values() for s in values))
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(groups) + 2), 3.4))
    width = 0.8 / max(1, len(series))
    positions = np.arange(len(groups))
    for i, name in enumerate(series):
        heights = [groups[g].get(name, np.nan) for g in groups]
        ax.bar(positions + (i - (len(series) - 1) / 2) * width, heights, width, label=name)
    ax.set_xticks(positions, list(groups), rotation=30)
    ax.set(ylabel=ylabel, title=title)
    if log:
        ax.set_yscale("log")
    if series:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "nothing measured", transform=ax.transAxes, ha="center", va="center", color="grey")
    fig.tight_layout()
    return fig
