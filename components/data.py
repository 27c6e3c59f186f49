"""Interactions and items in, TALLRec-style samples out, stored as Parquet.

A sample asks whether a user will like a target item given the previous `history_len`
interactions (split into liked and disliked titles). It carries a stable `sample_id` (the target
interaction), its `user_id`, and the ids of *every* interaction it contains, so forgetting an
interaction can remove it from targets and from other samples' histories alike.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from components.config import DataConfig

INTERACTION_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
ITEM_COLUMNS = ("item_id", "title")
SPLITS = ("train", "valid", "test")
PROMPT = (
    "Given the user's preference and unpreference, identify whether the user will like the target "
    'movie by answering "Yes." or "No.".\n'
    "User Preference: {liked}\n"
    "User Unpreference: {disliked}\n"
    'Whether the user will like the target movie "{target}"?\n'
    "Answer:"
)


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and what is wrong."""


def build_prompt(liked: list[str], disliked: list[str], target: str) -> str:
    quote = lambda titles: ", ".join(f'"{t}"' for t in titles)  # noqa: E731
    return PROMPT.format(liked=quote(liked), disliked=quote(disliked), target=target)


def interaction_id(user_id, item_id) -> str:
    return f"{user_id}:{item_id}"


def stable_hash(*parts) -> int:
    """A hash that is the same in every process and on every machine (unlike hash())."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big")


# --- loading ------------------------------------------------------------------------------------


def movielens_dir() -> Path:
    spec = importlib.util.find_spec("recbole")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DataError("MovieLens-100K comes with recbole: pip install --no-deps recbole==1.2.1")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"


def _read_table(path: str | Path, required: tuple[str, ...]) -> pd.DataFrame:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise DataError(f"{path}: unknown file format {suffix!r} (use .csv or .parquet)")
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if suffix == ".csv":
        frame = pd.read_csv(path)
    else:
        frame = pd.read_parquet(path)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(map(str, frame.columns))})")
    if frame.empty:
        raise DataError(f"{path}: no rows")
    return frame


def load_movielens() -> tuple[pd.DataFrame, pd.DataFrame]:
    folder = movielens_dir()
    inter = pd.read_csv(folder / "ml-100k.inter", sep="\t")
    inter.columns = [c.split(":")[0] for c in inter.columns]
    items = pd.read_csv(folder / "ml-100k.item", sep="\t", dtype=str, keep_default_na=False)
    items.columns = [c.split(":")[0] for c in items.columns]
    year = items["release_year"].where(items["release_year"] != "", None)
    items = pd.DataFrame(
        {
            "item_id": items["item_id"].astype(int),
            "title": [f"{t} ({y})" if y else t for t, y in zip(items["movie_title"], year)],
            "genres": items["class"],
        }
    )
    return inter[list(INTERACTION_COLUMNS)], items


def load_interactions_and_items(config: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    if config.source == "movielens-100k":
        inter, items = load_movielens()
    else:
        inter = _read_table(config.interactions_path, INTERACTION_COLUMNS)[list(INTERACTION_COLUMNS)]
        items = _read_table(config.items_path, ITEM_COLUMNS)
        if "genres" not in items.columns:
            items["genres"] = ""
        items = items[["item_id", "title", "genres"]]
    unknown = set(inter["item_id"]) - set(items["item_id"])
    if unknown:
        raise DataError(f"{len(unknown)} interacted item id(s) are not in the items table, e.g. {sorted(unknown)[:5]}")
    # A user rates an item once: keep the latest rating if a file repeats a pair.
    inter = inter.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    inter = inter.drop_duplicates(["user_id", "item_id"], keep="last").reset_index(drop=True)
    return inter, items.reset_index(drop=True)


# --- samples ------------------------------------------------------------------------------------


def build_samples(inter: pd.DataFrame, items: pd.DataFrame, config: DataConfig) -> pd.DataFrame:
    """Every interaction with `history_len` strictly earlier interactions of its user becomes a sample."""
    inter = inter.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(drop=True)
    users = inter["user_id"]
    position = users.groupby(users).cumcount().to_numpy()
    # Same-second ratings are not history: a row's history ends at the first row of its second.
    earlier = position - inter.groupby(["user_id", "timestamp"]).cumcount().to_numpy()
    target = np.flatnonzero(earlier >= config.history_len)
    if not len(target):
        raise DataError(f"no samples: no user has {config.history_len} interactions before another (data.history_len)")
    # Row numbers of each sample's history, oldest first [samples, history_len]; rows are grouped by user.
    history = (target - position[target] + earlier[target] - config.history_len)[:, None] + np.arange(config.history_len)
    ids = np.array([interaction_id(u, i) for u, i in zip(users, inter["item_id"])])
    titles = inter["item_id"].map(dict(zip(items["item_id"], items["title"]))).to_numpy()
    likes = inter["rating"].to_numpy() > config.like_threshold
    liked = likes[history]
    return pd.DataFrame(
        {
            "sample_id": ids[target],
            "user_id": users.astype(str).to_numpy()[target],
            "item_id": inter["item_id"].astype(str).to_numpy()[target],
            "timestamp": inter["timestamp"].to_numpy()[target].astype(int),
            "interactions": np.concatenate([ids[history], ids[target, None]], axis=1).tolist(),
            "prompt": [build_prompt(seen[like], seen[~like], title)
                       for seen, like, title in zip(titles[history], liked, titles[target])],
            # Counts kept beside the prompt so a no-model floor scores without parsing text.
            "n_liked": liked.sum(axis=1).astype(int),
            "n_history": np.full(len(target), config.history_len),
            "label": likes[target].astype(int),
        }
    )


def split_by_time(samples: pd.DataFrame, config: DataConfig, seed: int) -> dict[str, pd.DataFrame]:
    """Cut the timeline into train / valid / test periods (the last `test_period` and the
    `valid_period` before it, as fractions of the samples), then draw a seeded subsample of each
    split's size from its period. No split sees the future of a later one."""
    ordered = samples.sort_values(["timestamp", "sample_id"], kind="stable").reset_index(drop=True)
    stamps = ordered["timestamp"].to_numpy()
    valid_from = stamps[int(len(ordered) * (1 - config.test_period - config.valid_period))]
    test_from = stamps[int(len(ordered) * (1 - config.test_period))]
    periods = {
        "train": ordered[stamps < valid_from],
        "valid": ordered[(stamps >= valid_from) & (stamps < test_from)],
        "test": ordered[stamps >= test_from],
    }
    splits = {}
    for name, size in zip(SPLITS, (config.n_train, config.n_valid, config.n_test)):
        period = periods[name]
        if len(period) < size:
            raise DataError(f"the {name} period holds {len(period)} samples, fewer than data.n_{name} = {size}")
        rank = period["sample_id"].map(lambda s: stable_hash("subsample", name, seed, s))
        chosen = period.loc[rank.sort_values(kind="stable").index[:size]]
        splits[name] = chosen.sort_values("sample_id").reset_index(drop=True)
    return splits


# --- the Parquet store ----------------------------------------------------------------------------


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    """Write a table atomically: readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_parquet(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def samples_touching(frame: pd.DataFrame, users: set[str], interactions: set[str]) -> pd.Series:
    """Rows whose user is forgotten or that contain a forgotten interaction (as target or history)."""
    by_user = frame["user_id"].isin(users)
    if not interactions:
        return by_user
    return by_user | frame["interactions"].map(lambda ids: not interactions.isdisjoint(ids))
