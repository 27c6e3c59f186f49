"""The work dir on disk: the sample store (Parquet), public state, shard files and their layout.

    DIR/data/{train,valid,test}.parquet   samples with their frozen-model embeddings
    DIR/trunk/<xx>/<hash>.safetensors     a sample's trunk states (model.trunk_layers > 0), nothing else
    DIR/public/partitioner.npz            fitted on catalogue prompts only
    DIR/shards/shard-<k>/samples.parquet  a shard's training samples with their slice
    DIR/shards/shard-<k>/checkpoints/     slice checkpoints (components.checkpoints), unless
                                          train.storage puts them under a URI: DIR/storage.json says where
    DIR/shards/shard-<k>/adapter/         the latest trained adapter
    DIR/reports/  DIR/audit/  DIR/requests/  DIR/mlflow.db  DIR/mlartifacts/
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from components.checkpoints import SliceCheckpoints, delete
from components.config import Config
from components.data import (
    SPLITS,
    DataError,
    build_samples,
    load_interactions_and_items,
    read_parquet,
    samples_touching,
    split_by_time,
    write_parquet,
)
from components.model import (
    STATE_DTYPES,
    answer_token_ids,
    load_tokenizer,
    tokenize,
    trunk_pass,
    trunk_pass_by_length,
)
from components.partition import Partitioner, reference_prompts, shard_sizes_report, slice_of
from components.progress import progress

STORAGE_FILE = "storage.json"


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

    def shard_runs(self) -> str:
        """Where the shards' Ray Train runs keep their checkpoints (RunConfig.storage_path): DIR/shards,
        or this work dir's own folder under train.storage, given at its first training."""
        bound = self.storage_binding()
        return bound["shard_runs"] if bound else str(self.root / "shards")

    def checkpoints(self, shard: int) -> SliceCheckpoints:
        return SliceCheckpoints(f"{self.shard_runs()}/shard-{shard}/checkpoints")

    def storage_binding(self) -> dict | None:
        path = self.root / STORAGE_FILE
        return json.loads(path.read_text()) if path.exists() else None

    def bind_storage(self, storage: str | None) -> None:
        """Give the work dir a folder of its own under `storage` (train.storage; None: the work dir
        itself), once: its checkpoints stay there (check_inputs refuses a config naming another)."""
        if storage and not self.storage_binding():
            name = f"{self.root.name}-{uuid.uuid4().hex[:8]}"  # work dirs of one name never share a folder
            write_json(self.root / STORAGE_FILE, {"storage": storage, "shard_runs": f"{storage}/{name}"})

    def adapter(self, shard: int) -> Path:
        return self.shard_dir(shard) / "adapter"

    def progress(self, shard: int) -> Path:
        return self.shard_dir(shard) / "progress.jsonl"

    def remove(self) -> None:
        """The work dir and, where train.storage holds its checkpoints, its folder there."""
        bound = self.storage_binding()
        if bound:
            delete(bound["shard_runs"])
        shutil.rmtree(self.root, ignore_errors=True)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def trunk(self) -> TrunkStore:
        return TrunkStore(self.root / "trunk")

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


class TrunkStore:
    """Per-sample trunk states: one safetensors file per sample (its states [tokens, hidden] in the
    stored dtype and its embedding), named by a hash of the sample id, with the sample's user and
    interactions in the header so a scan can prove a subject's states gone. Written atomically;
    a shard reads only its own samples' files; forgetting unlinks the files."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, sample_id: str) -> Path:
        digest = hashlib.sha256(str(sample_id).encode()).hexdigest()
        return self.root / digest[:2] / f"{digest[2:34]}.safetensors"

    def has(self, sample_id: str) -> bool:
        return self.path(sample_id).exists()

    def write(self, sample: dict, states: torch.Tensor, embedding: torch.Tensor) -> None:
        path = self.path(sample["sample_id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
        os.close(fd)
        # One header key: safetensors writes several in no fixed order, and the file must be the
        # same bytes whenever the same sample is stored.
        header = {"sample": json.dumps({"sample_id": str(sample["sample_id"]), "user_id": str(sample["user_id"]),
                                        "interactions": [str(i) for i in sample["interactions"]]}, sort_keys=True)}
        try:
            save_file({"states": states.contiguous(), "embedding": embedding.contiguous()}, tmp, metadata=header)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read(self, sample_ids: Iterable[str], name: str = "states") -> list[torch.Tensor]:
        tensors = []
        for sample_id in sample_ids:
            path = self.path(sample_id)
            if not path.exists():
                raise FileNotFoundError(f"no stored trunk state for sample {sample_id} ({path}): prepare the store again")
            with safe_open(path, framework="pt") as f:
                tensors.append(f.get_tensor(name))
        return tensors

    def remove(self, sample_ids: Iterable[str]) -> int:
        removed = 0
        for sample_id in sample_ids:
            path = self.path(sample_id)
            if path.exists():
                path.unlink()
                removed += 1
        return removed

    def headers(self) -> Iterator[tuple[Path, dict]]:
        """Every stored state file with its header (sample id, user, interactions)."""
        for path in sorted(self.root.glob("*/*.safetensors")):
            with safe_open(path, framework="pt") as f:
                yield path, json.loads(f.metadata()["sample"])

    def link_from(self, source: TrunkStore, sample_ids: Iterable[str]) -> None:
        """Share another store's files (hard links: unlinking one copy never touches the other)."""
        for sample_id in sample_ids:
            target = self.path(sample_id)
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source.path(sample_id), target)
            except OSError:  # another file system: copy
                tmp = target.with_suffix(".tmp")
                tmp.write_bytes(source.path(sample_id).read_bytes())
                os.replace(tmp, target)


def check_inputs(config: Config, workdir: Workdir, builds_store: bool = False) -> None:
    """What a job will read, checked before it starts anything or writes a byte: the data files
    (and, for a job that builds the sample store where there is none yet, the samples and split
    sizes they give) and the model's tokenizer with its answer tokens. A DataError or ValueError
    names what is wrong."""
    inter, items = load_interactions_and_items(config.data)
    if builds_store and not all(workdir.split(name).exists() for name in SPLITS):
        try:
            split_by_time(build_samples(inter, items, config.data), config.data, config.seed)
        except DataError as err:
            raise DataError(f"{config.data.interactions_path or config.data.source}: {err}") from None
    answer_token_ids(load_tokenizer(config.model), config.model)
    bound = workdir.storage_binding()
    trained_here = bound is None and any((workdir.root / "shards").glob("shard-*/checkpoints"))
    if (bound and bound["storage"] != config.train.storage) or (trained_here and config.train.storage):
        where = f"under {bound['shard_runs']} ({workdir.root / STORAGE_FILE})" if bound else "in the work dir"
        raise ValueError(f"{workdir.root} keeps its slice checkpoints {where}, but the config's train.storage is "
                         f"{config.train.storage!r}: set it back, or train in a new work dir")


def sample_states(config: Config, workdir: Workdir, samples: pd.DataFrame, model=None, tokenizer=None) -> list[torch.Tensor]:
    """The trunk states of stored samples: read from DIR/trunk/, or (trunk_layers 0) the token
    embeddings, computed from the prompt with `model`."""
    if config.model.trunk_layers:
        return workdir.trunk.read(samples["sample_id"])
    return [trunk_pass(model, tokenize(tokenizer, [p], config.model.max_length), config.model, embedding=False).states[0]
            for p in samples["prompt"]]


# A per-sample pass as prepare runs it: the samples to compute (sample_id, user_id, interactions,
# prompt) in, their states stored by the pass itself, their embeddings out (sample_id, embedding).
Compute = Callable[[pd.DataFrame], pd.DataFrame]
PASS_COLUMNS = ["sample_id", "user_id", "interactions", "prompt"]


def by_token_count(rows: pd.DataFrame, tokenizer, config: Config) -> pd.DataFrame:
    """`rows` sorted by their prompt's token count, so that batches cut from it hold few lengths."""
    counts = [len(tokenize(tokenizer, [p], config.model.max_length)["input_ids"][0]) for p in rows["prompt"]]
    return rows.assign(tokens=counts).sort_values(["tokens", "sample_id"], kind="stable").drop(columns="tokens")


def store_states(config: Config, workdir: Workdir, model, tokenizer, rows: pd.DataFrame) -> list[np.ndarray]:
    """The frozen trunk over `rows`' prompts (components.model.trunk_pass_by_length): each sample's
    states stored atomically as soon as its batch is done (trunk_layers > 0), its embedding
    returned, in row order. What every pass runs on a batch, in a Ray worker or in this process."""
    outputs = trunk_pass_by_length(model, tokenizer, rows["prompt"].tolist(), config.model, config.inference.batch_size)
    if config.model.trunk_layers:
        dtype = STATE_DTYPES[config.model.trunk_dtype]
        for (_, row), (states, embedding) in zip(rows.iterrows(), outputs):
            workdir.trunk.write(row, states.to(dtype), embedding)
    return [embedding.numpy() for _, embedding in outputs]


def in_process(config: Config, workdir: Workdir, model, tokenizer) -> Compute:
    """prepare's pass without Ray (the demo, benchmarks, tests): this process, a batch at a time, by
    token count, with a progress bar (components.progress)."""
    def compute(rows: pd.DataFrame) -> pd.DataFrame:
        rows, size = by_token_count(rows, tokenizer, config), config.inference.batch_size
        embeddings: list[np.ndarray] = []
        with progress(len(rows), "frozen trunk", unit="prompt") as bar:
            for start in range(0, len(rows), size):
                embeddings += store_states(config, workdir, model, tokenizer, rows.iloc[start : start + size])
                bar.update(len(embeddings) - start)
        return pd.DataFrame({"sample_id": rows["sample_id"].to_numpy(), "embedding": embeddings})
    return compute


def prepare(config: Config, workdir: Workdir, model, tokenizer, log=print, states_from: Workdir | None = None,
            compute: Compute | None = None) -> dict[str, pd.DataFrame]:
    """Build the sample store once: samples, their embeddings and (trunk_layers > 0) their trunk
    states, computed in one pass by `compute` (the jobs hand in Ray Data's, ray_jobs.passes;
    without it this process runs the pass with `model`); later runs reuse the store as it is now,
    i.e. with every forgotten sample already gone. States already stored (an interrupted run, or
    `states_from`, a store of the same model whose files are linked; with trunk_layers 0, whose
    embeddings are copied) are not computed again: each value is computed once, so a reference
    built this way has the store's bits whatever the batching."""
    if all(workdir.split(name).exists() for name in SPLITS):
        return load_splits(workdir)
    inter, items = load_interactions_and_items(config.data)
    splits = split_by_time(build_samples(inter, items, config.data), config.data, config.seed)
    trunk = config.model.trunk_layers > 0
    reused = {} if trunk or states_from is None else split_embeddings(states_from)
    todo = []
    for name, frame in splits.items():
        if trunk and states_from is not None:
            workdir.trunk.link_from(states_from.trunk, [s for s in frame["sample_id"] if states_from.trunk.has(s)])
        todo.append(frame[[not (workdir.trunk.has(s) if trunk else s in reused) for s in frame["sample_id"]]])
        log(f"{name}: {len(frame)} samples, {len(todo[-1])} to run through the frozen trunk "
            f"({config.model.trunk_layers or config.model.embedding_depth or 'all'} layers)")
    todo = pd.concat(todo, ignore_index=True)[PASS_COLUMNS]
    embeddings = dict(reused)
    if len(todo):
        computed = (compute or in_process(config, workdir, model, tokenizer))(todo)
        embeddings.update(zip(computed["sample_id"], computed["embedding"]))
    for name, frame in splits.items():
        stored = [s for s in frame["sample_id"] if s not in embeddings]  # linked, or from an interrupted run
        embeddings.update(zip(stored, (t.numpy() for t in workdir.trunk.read(stored, "embedding"))))
        frame["embedding"] = [np.asarray(embeddings[s], dtype=np.float32) for s in frame["sample_id"]]
        write_parquet(frame, workdir.split(name))
    return splits


def split_embeddings(workdir: Workdir) -> dict[str, np.ndarray]:
    """Every sample's embedding in a store's split files (those that exist)."""
    frames = [read_parquet(workdir.split(name)) for name in SPLITS if workdir.split(name).exists()]
    return {s: e for frame in frames for s, e in zip(frame["sample_id"], frame["embedding"])}


def copy_store(source: Workdir, target: Workdir) -> None:
    """The source's sample store as it is now (forgotten samples are gone): split files copied,
    trunk states linked."""
    for name in SPLITS:
        target.split(name).parent.mkdir(parents=True, exist_ok=True)
        frame = read_parquet(source.split(name))
        target.trunk.link_from(source.trunk, [s for s in frame["sample_id"] if source.trunk.has(s)])
        write_parquet(frame, target.split(name))


def remove_samples(workdir: Workdir, users: set[str], interactions: set[str]) -> dict[str, list[str]]:
    """Delete every sample of `users` or containing one of `interactions` from the store, the
    shard files (atomic rewrites) and the trunk states, then move the samples a semantic-user
    partition regroups. Returns the removed sample ids per split / shard file."""
    removed: dict[str, list[str]] = {}
    files = {name: workdir.split(name) for name in SPLITS}
    files.update({f"shard-{k}": workdir.shard_samples(k) for k in range(workdir.num_shards())})
    frames = {label: read_parquet(path) for label, path in files.items() if path.exists()}
    hits = {label: samples_touching(frame, users, interactions) for label, frame in frames.items()}
    for label, hit in hits.items():
        if hit.any():
            removed[label] = frames[label].loc[hit, "sample_id"].tolist()
    # States first: a crash before the rewrites leaves the samples listed, so a rerun finds them again.
    workdir.trunk.remove({s for ids in removed.values() for s in ids})
    for label in removed:
        write_parquet(frames[label].loc[~hits[label]].reset_index(drop=True), files[label])
    move_samples(workdir, user_moves(workdir, users, interactions))
    return removed


def user_moves(workdir: Workdir, users: set[str], interactions: set[str]) -> pd.DataFrame:
    """The training samples that forgetting `users` and `interactions` moves to another shard, with
    their shard now (`from_shard`) and after (`shard`). Only a semantic-user partition moves
    samples: a user's shard follows the mean of their samples, so forgetting some of a user's
    interactions can move the rest of that user's samples; never anyone else's."""
    owners = {i.split(":")[0] for i in interactions} - users
    if not owners or not workdir.partitioner.exists():
        return pd.DataFrame()
    partitioner = Partitioner.load(workdir.partitioner)
    if partitioner.method != "semantic-user":
        return pd.DataFrame()
    frames = [read_parquet(workdir.shard_samples(k)).assign(from_shard=k) for k in range(workdir.num_shards())]
    rows = pd.concat(frames, ignore_index=True)
    rows = rows[rows["user_id"].astype(str).isin(owners) & ~samples_touching(rows, users, interactions)]
    if rows.empty:
        return pd.DataFrame()
    rows = rows.assign(shard=partitioner.assign(rows, np.stack(rows["embedding"].to_numpy())))
    return rows[rows["shard"] != rows["from_shard"]]


def move_samples(workdir: Workdir, moves: pd.DataFrame) -> None:
    """Carry out `user_moves`: copy each row into its new shard's file, then drop it from the old
    one (atomic rewrites; a crash in between leaves a copy that a rerun finds and finishes)."""
    if moves.empty:
        return
    rows = moves.drop(columns=["from_shard", "shard"])
    for shard in sorted(set(moves["shard"])):
        frame = read_parquet(workdir.shard_samples(shard))
        incoming = rows[(moves["shard"] == shard).to_numpy() & ~rows["sample_id"].isin(frame["sample_id"]).to_numpy()]
        write_parquet(pd.concat([frame, incoming], ignore_index=True), workdir.shard_samples(shard))
    for shard in sorted(set(moves["from_shard"])):
        frame = read_parquet(workdir.shard_samples(shard))
        leaving = moves.loc[moves["from_shard"] == shard, "sample_id"]
        write_parquet(frame[~frame["sample_id"].isin(leaving)].reset_index(drop=True), workdir.shard_samples(shard))


def fit_partitioner(config: Config, workdir: Workdir, embed_prompts: Callable[[list[str]], np.ndarray]) -> Partitioner:
    """The public partitioner, fitted once on catalogue prompts (no user data) and cached.
    `embed_prompts` (prompts to their embeddings, components.model.embed's bits) is called only if
    the partition method fits on embeddings."""
    if workdir.partitioner.exists():
        return Partitioner.load(workdir.partitioner)
    reference = None
    if config.partition.method in ("semantic", "semantic-user", "adaptive"):
        _, items = load_interactions_and_items(config.data)
        reference = embed_prompts(reference_prompts(items, config.partition.reference_size, config.data.history_len,
                                                    config.seed, config.data.prompt))
    partitioner = Partitioner.fit(config.partition, config.seed, reference)
    workdir.partitioner.parent.mkdir(parents=True, exist_ok=True)
    partitioner.save(workdir.partitioner)
    return partitioner


def write_shards(config: Config, workdir: Workdir, train: pd.DataFrame, partitioner: Partitioner) -> dict[int, int]:
    """Assign every training sample to its shard and slice and write one Parquet file per shard."""
    embeddings = np.stack(train["embedding"].to_numpy()) if len(train) else None
    train = train.assign(
        shard=partitioner.assign(train, embeddings),
        slice=slice_of(train["user_id"], config.partition.num_slices, config.seed),
    )
    for shard in range(partitioner.num_shards):
        write_parquet(train[train["shard"] == shard].reset_index(drop=True), workdir.shard_samples(shard))
    return shard_sizes_report(train["shard"].to_numpy(), partitioner.num_shards)
