"""Issue 13: the no-model floors and the bootstrap intervals, on hand-made data whose answers are known."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from components.config import DataConfig
from components.data import build_samples
from components.floors import FloorError, history_floor, item_floor
from components.metrics import (
    auc_interval,
    bootstrap_counts,
    paired_difference_interval,
    percentile_interval,
    resampled_aucs,
)


def test_samples_carry_the_counts_of_liked_and_of_history_interactions():
    ratings = [5, 5, 4, 4, 2, 3, 5, 5, 1, 4, 1, 2, 4]  # liked: > 3
    inter = pd.DataFrame({"user_id": 1, "item_id": range(len(ratings)), "rating": ratings,
                          "timestamp": np.arange(len(ratings)) * 10})
    items = pd.DataFrame({"item_id": range(len(ratings)), "title": [f"Film {i}" for i in range(len(ratings))]})
    samples = build_samples(inter, items, DataConfig(history_len=10))
    assert len(samples) == 3
    for i, row in enumerate(samples.itertuples()):
        history = ratings[i:i + 10]
        assert row.n_history == 10 and row.n_liked == sum(r > 3 for r in history), row.sample_id
    assert samples["n_liked"].tolist() == [7, 6, 5]  # counted by hand


def test_history_floor_is_the_share_of_liked_titles():
    frame = pd.DataFrame({"n_liked": [3, 0, 10, 0], "n_history": [10, 10, 10, 0]})
    assert history_floor(frame).tolist() == [0.3, 0.0, 1.0, 0.5]  # an empty history says nothing: 0.5
    with pytest.raises(FloorError, match="n_liked"):
        history_floor(frame.drop(columns="n_liked"))


def test_item_floor_is_the_mean_training_label_and_the_overall_mean_for_unseen_items():
    train = pd.DataFrame({"item_id": ["a", "a", "a", "b"], "label": [1, 0, 1, 0]})
    test = pd.DataFrame({"item_id": ["b", "a", "c"]})
    assert item_floor(train, test) == pytest.approx([0.0, 2 / 3, 0.5])
    # Item ids compare as text, whatever dtype a file gave them.
    assert item_floor(train.assign(item_id=[7, 7, 7, 8]), pd.DataFrame({"item_id": ["8", "7"]})) == pytest.approx([0.0, 2 / 3])
    with pytest.raises(FloorError, match="no samples"):
        item_floor(train.iloc[:0], test)


def test_bootstrap_counts_are_seeded_draws_of_n_with_replacement():
    counts = bootstrap_counts(50, 200, seed=3)
    assert counts.shape == (200, 50) and (counts.sum(axis=1) == 50).all()
    assert np.array_equal(counts, bootstrap_counts(50, 200, seed=3))
    assert not np.array_equal(counts, bootstrap_counts(50, 200, seed=4))
    assert (counts.max(axis=1) > 1).all()  # with replacement


def test_resampled_aucs_equal_sklearn_on_the_drawn_rows_ties_included():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 40)
    scores = np.round(rng.random(40) + 0.3 * labels, 1)  # rounded: many ties
    counts = bootstrap_counts(40, 50, seed=1)
    aucs = resampled_aucs(labels, scores, counts)
    for row, value in zip(counts, aucs):
        rows = np.repeat(np.arange(40), row)
        assert value == pytest.approx(roc_auc_score(labels[rows], scores[rows]), abs=1e-12)
    assert resampled_aucs(labels, scores, np.ones((1, 40), int))[0] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_a_perfect_score_has_interval_one_and_a_reversed_one_zero():
    labels = np.array([0, 1] * 30)
    assert auc_interval(labels, labels * 0.8 + 0.1, seed=0) == (1.0, 1.0)
    assert auc_interval(labels, 1 - labels, seed=0) == (0.0, 0.0)
    assert auc_interval(np.ones(10), np.arange(10), seed=0) is None  # one class: no AUC anywhere


def test_resamples_with_one_class_are_skipped():
    labels = np.array([1, 0, 0, 0, 0, 0])
    scores = np.array([0.9, 0.1, 0.2, 0.95, 0.3, 0.4])
    counts = bootstrap_counts(len(labels), 1000, seed=5)
    aucs = resampled_aucs(labels, scores, counts)
    one_class = counts[:, 0] == 0  # the only positive not drawn
    assert one_class.any() and np.isnan(aucs[one_class]).all() and np.isfinite(aucs[~one_class]).all()
    expected = tuple(np.percentile(aucs[~one_class], [2.5, 97.5]))
    assert auc_interval(labels, scores, seed=5) == pytest.approx(expected)
    assert percentile_interval(np.array([np.nan, np.nan])) is None


def test_an_interval_holds_the_auc_of_a_noisy_score_and_narrows_with_more_samples():
    rng = np.random.default_rng(2)
    widths = []
    for n in (100, 2000):
        labels = rng.integers(0, 2, n)
        scores = rng.random(n) + 0.5 * labels
        low, high = auc_interval(labels, scores, seed=0)
        assert low < roc_auc_score(labels, scores) < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 4.5x narrower


def test_paired_differences_resample_both_methods_together():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    a = rng.random(200) + 0.4 * labels
    b = a + rng.normal(0, 0.05, 200)  # nearly the same ranking
    assert paired_difference_interval(labels, a, a, seed=9) == (0.0, 0.0)
    # A perfect and a reversed score differ by exactly 1 on every resample.
    assert paired_difference_interval(labels, labels.astype(float), 1.0 - labels, seed=9) == (1.0, 1.0)
    # Paired: far narrower than the difference of two independently resampled AUCs.
    low, high = paired_difference_interval(labels, a, b, seed=9)
    independent = resampled_aucs(labels, a, bootstrap_counts(200, 1000, 9)) - resampled_aucs(labels, b, bootstrap_counts(200, 1000, 10))
    assert high - low < (np.percentile(independent, 97.5) - np.percentile(independent, 2.5)) / 3
