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
