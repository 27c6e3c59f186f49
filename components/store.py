"""The work dir on disk: the sample store (Parquet), public state, shard files and their layout.

    DIR/data/{train,valid,test}.parquet   samples with their frozen-model embeddings
    DIR/public/partitioner.npz            fitted on catalogue prompts only
    DIR/shards/shard-<k>/samples.parquet  a shard's training samples with their slice
    DIR/shards/shard-<k>/checkpoints/     slice checkpoints
    DIR/shards/shard-<k>/adapter/         the latest trained adapter
    DIR/reports/  DIR/audit/  DIR/requests/  DIR/mlflow.db  DIR/mlartifacts/
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import Config
from components.data import (
    SPLITS,
    build_samples,
    load_interactions_and_items,
    read_parquet,
    samples_touching,
    split_by_time,
    write_parquet,
)
from components.model import embed
from components.partition import Partitioner, reference_prompts, shard_sizes_report, slice_of


@dataclass(frozen=True)
class Workdir:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).resolve())

    def split(self, name: str) -> Path:
        return self.root / "data" / f"{name}.parquet"

    @property
    def partitioner(self) -> Path:
        return self.root / "public" / "partitioner.npz"

    def shard_dir(self, shard: int) -> Path:
        return self.root / "shards" / f"shard-{shard}"

    def shard_samples(self, shard: int) -> Path:
        return self.shard_dir(shard) / "samples.parquet"

    def checkpoints(self, shard: int) -> Path:
        return self.shard_dir(shard) / "checkpoints"

    def adapter(self, shard: int) -> Path:
        return self.shard_dir(shard) / "adapter"

    def progress(self, shard: int) -> Path:
        return self.shard_dir(shard) / "progress.jsonl"

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def num_shards(self) -> int:
        return len(list((self.root / "shards").glob("shard-*/samples.parquet")))


def write_json(path: Path, payload) -> None:
    """Atomic JSON write (reports, audit records, request log)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, path)


def load_splits(workdir: Workdir) -> dict[str, pd.DataFrame]:
    return {name: read_parquet(workdir.split(name)) for name in SPLITS}


def prepare(config: Config, workdir: Workdir, model, tokenizer, log=print) -> dict[str, pd.DataFrame]:
    """Build the sample store once (samples + embeddings); later runs reuse it as it is now,
    i.e. with every forgotten sample already gone."""
    if all(workdir.split(name).exists() for name in SPLITS):
        return load_splits(workdir)
    inter, _ = load_interactions_and_items(config.data)
    splits = split_by_time(build_samples(inter, _, config.data), config.data, config.seed)
    for name, frame in splits.items():
        log(f"embedding {len(frame)} {name} samples with the frozen model")
        vectors = embed(model, tokenizer, frame["prompt"].tolist(), config.model.max_length, config.model.embedding_layers)
        frame["embedding"] = list(vectors.astype(np.float32))
        write_parquet(frame, workdir.split(name))
    return splits


def remove_samples(workdir: Workdir, users: set[str], interactions: set[str]) -> dict[str, list[str]]:
    """Delete every sample of `users` or containing one of `interactions` from the store and the
    shard files (atomic rewrites). Returns the removed sample ids per split / shard file."""
    removed: dict[str, list[str]] = {}
    files = {name: workdir.split(name) for name in SPLITS}
    files.update({f"shard-{k}": workdir.shard_samples(k) for k in range(workdir.num_shards())})
    for label, path in files.items():
        if not path.exists():
            continue
        frame = read_parquet(path)
        hit = samples_touching(frame, users, interactions)
        if hit.any():
            removed[label] = frame.loc[hit, "sample_id"].tolist()
            write_parquet(frame.loc[~hit].reset_index(drop=True), path)
    return removed


def fit_partitioner(config: Config, workdir: Workdir, model, tokenizer) -> Partitioner:
    """The public partitioner, fitted once on catalogue prompts (no user data) and cached."""
    if workdir.partitioner.exists():
        return Partitioner.load(workdir.partitioner)
    reference = None
    if config.partition.method in ("semantic", "adaptive"):
        _, items = load_interactions_and_items(config.data)
        prompts = reference_prompts(items, config.partition.reference_size, config.data.history_len, config.seed)
        reference = embed(model, tokenizer, prompts, config.model.max_length, config.model.embedding_layers)
    partitioner = Partitioner.fit(config.partition, config.seed, reference)
    workdir.partitioner.parent.mkdir(parents=True, exist_ok=True)
    partitioner.save(workdir.partitioner)
    return partitioner


def write_shards(config: Config, workdir: Workdir, train: pd.DataFrame, partitioner: Partitioner) -> dict[int, int]:
    """Assign every training sample to its shard and slice and write one Parquet file per shard."""
    embeddings = np.stack(train["embedding"].to_numpy()) if len(train) else None
    train = train.assign(
        shard=partitioner.assign(train, embeddings),
        slice=slice_of(train["sample_id"], config.partition.num_slices, config.seed),
    )
    for shard in range(partitioner.num_shards):
        write_parquet(train[train["shard"] == shard].reset_index(drop=True), workdir.shard_samples(shard))
    return shard_sizes_report(train["shard"].to_numpy(), partitioner.num_shards)
