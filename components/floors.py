"""Scores that need no model: the floors a recommender must beat to have learned anything.

    history  the share of liked titles in the sample's history (stored counts, not prompt text)
    item     the target item's mean label over a training split; unseen items get the split's mean
Their sum ranks better than either alone on MovieLens-100K (DESIGN 4a: AUC 0.745 against 0.703
and 0.691 on 512 test samples).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

HISTORY_COLUMNS = ("n_liked", "n_history")


class FloorError(ValueError):
    """A floor that cannot be computed from the frames given; the message says why."""


def history_floor(samples: pd.DataFrame) -> np.ndarray:
    """n_liked / n_history per sample (0.5 for an empty history: no evidence either way)."""
    missing = [c for c in HISTORY_COLUMNS if c not in samples.columns]
    if missing:
        raise FloorError(f"the samples have no {' / '.join(missing)} column(s): a store prepared before they existed")
    liked = samples["n_liked"].to_numpy(dtype=float)
    history = samples["n_history"].to_numpy(dtype=float)
    return np.divide(liked, history, out=np.full(len(samples), 0.5), where=history > 0)


def item_floor(train: pd.DataFrame, samples: pd.DataFrame) -> np.ndarray:
    """Each sample's target item's mean label over `train`; items `train` lacks get its overall mean."""
    if len(train) == 0:
        raise FloorError("the training split holds no samples: no item means to score with")
    means = train.groupby(train["item_id"].astype(str))["label"].mean()
    fallback = float(train["label"].mean())
    return samples["item_id"].astype(str).map(means).fillna(fallback).to_numpy(dtype=float)
