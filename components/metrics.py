"""Metrics and the plots people would rather look at than read."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure  # not pyplot: no global figure state, so threads may plot at once, and no display
from sklearn.metrics import roc_auc_score


def auc(labels, scores) -> float:
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")  # undefined with one class
    return float(roc_auc_score(labels, np.asarray(scores)))


# --- bootstrap intervals ------------------------------------------------------------------------


def bootstrap_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n]: how often each of n test samples is drawn in each resample (n draws with
    replacement, seeded): the same seed resamples the same test samples for every method."""
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    offsets = (np.arange(resamples) * n)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=resamples * n).reshape(resamples, n)


def resampled_aucs(labels, scores, counts: np.ndarray) -> np.ndarray:
    """The AUC of every resample (NaN where a resample holds one class). Exact, without drawing
    the rows: the AUC of a multiset is its weighted Mann-Whitney statistic, counts as weights."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=float)
    pos, neg = scores[labels], scores[~labels]
    # wins[i, j]: positive i against negative j, ties count half (as roc_auc_score's).
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    w_pos, w_neg = counts[:, labels].astype(float), counts[:, ~labels].astype(float)
    pairs = w_pos.sum(axis=1) * w_neg.sum(axis=1)
    won = ((w_pos @ wins) * w_neg).sum(axis=1)
    return np.divide(won, pairs, out=np.full(len(counts), np.nan), where=pairs > 0)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """The percentile interval of the finite values (resamples with one class are skipped)."""
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def auc_interval(labels, scores, seed: int, resamples: int = 1000, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the AUC over test samples (None: no resample has both classes)."""
    counts = bootstrap_counts(len(labels), resamples, seed)
    return percentile_interval(resampled_aucs(labels, scores, counts), level)


def paired_difference_interval(labels, scores_a, scores_b, seed: int, resamples: int = 1000,
                               level: float = 0.95) -> tuple[float, float] | None:
    """Interval of AUC(a) - AUC(b), both taken on the same resampled test samples."""
    counts = bootstrap_counts(len(labels), resamples, seed)
    return percentile_interval(resampled_aucs(labels, scores_a, counts) - resampled_aucs(labels, scores_b, counts), level)


def loss_curve_figure(losses: list[float], title: str):
    fig = Figure(figsize=(5, 3))
    ax = fig.subplots()
    ax.plot(range(len(losses)), losses, lw=1)
    ax.set(xlabel="step", ylabel="loss", title=title)
    fig.tight_layout()
    return fig


def bar_figure(values: dict[str, float], ylabel: str, title: str, intervals: dict[str, tuple | None] | None = None):
    """Bars, with error bars where `intervals` gives a (low, high) for the bar."""
    fig = Figure(figsize=(max(4, 0.7 * len(values) + 2), 3.2))
    ax = fig.subplots()
    ax.bar(list(values), list(values.values()), color="#4c72b0")
    if intervals:
        bounds = [intervals.get(m) or (v, v) for m, v in values.items()]
        # A percentile interval need not contain the point estimate: clip, matplotlib wants yerr >= 0.
        below = [max(0.0, v - low) for v, (low, _) in zip(values.values(), bounds)]
        above = [max(0.0, high - v) for v, (_, high) in zip(values.values(), bounds)]
        ax.errorbar(list(values), list(values.values()), yerr=[below, above], fmt="none", ecolor="black", lw=1, capsize=3)
    ax.set(ylabel=ylabel, title=title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def grouped_bar_figure(groups: dict[str, dict[str, float]], ylabel: str, title: str, log: bool = False):
    """Bars side by side per group: {group: {series: value}} (series in the order first seen)."""
    series = list(dict.fromkeys(s for values in groups.values() for s in values))
    fig = Figure(figsize=(max(4, 1.1 * len(groups) + 2), 3.4))
    ax = fig.subplots()
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
