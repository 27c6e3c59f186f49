"""The per-sample model passes on the cluster: Ray Data batch inference over an actor pool.

`StorePass` is what the jobs hand to components.store.prepare as its `compute`: the samples to
compute, sorted by token count, cut into batches of `inference.batch_size`, and mapped over
`inference.workers` actors that each load the tokenizer and the base model once, run the frozen
trunk (components.store.store_states) and write every sample's states into the store themselves
(atomic files: an interrupted pass resumes with the samples still missing). Only the embeddings
come back to the driver, with the Ray node and process that computed them. `embed_pass` is the
partitioner's reference (catalogue prompts only) through the same kind of pool.

`score_pass` is the evaluation's scoring of every method in one job: the test samples, in the
driver's order, cut into batches of a fixed size and mapped over actors that each load the
head-only base model and every method's adapter mixture once, read each batch's stored trunk
states once and run components.aggregate.predict on it per method, timing every batch themselves;
`make recipe` scores its APA temperatures on the validation samples the same way, leave-one-out.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import ray
import torch

from components.aggregate import AggregatorState, aggregation, apa_weights, load_mixture, predict, stored_inputs
from components.config import ALLOCATOR_ENV, Config
from components.model import embed, load_base_model, load_tokenizer, make_deterministic
from components.partition import Partitioner
from components.store import Workdir, by_token_count, sample_states, store_states


class ModelWorker:
    """One actor of a pool: the base model loaded once, on its GPU where it was given one."""

    def __init__(self, config: dict):
        self.config = Config.model_validate(config)
        make_deterministic(self.config.model.trunk_threads)  # a state's bits can depend on the thread count
        self.tokenizer = load_tokenizer(self.config.model)
        self.model = load_base_model(self.config.model, self.config.seed, self.tokenizer)
        if self.config.inference.gpus_per_worker > 0:
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError(f"inference.gpus_per_worker is {self.config.inference.gpus_per_worker:g} but torch "
                                   f"{torch.__version__} sees no CUDA device on this node: run the CUDA image there, "
                                   "or set inference.gpus_per_worker: 0")
            self.model.to("cuda")
        self.node_id = ray.get_runtime_context().get_node_id()


class StoreWorker(ModelWorker):
    """The frozen trunk over a batch of samples, their states written into the store."""

    def __init__(self, config: dict, workdir: str):
        super().__init__(config)
        self.workdir = Workdir(workdir)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        embeddings = store_states(self.config, self.workdir, self.model, self.tokenizer, batch)
        return pd.DataFrame({"sample_id": batch["sample_id"].to_numpy(), "embedding": embeddings,
                             "node_id": self.node_id, "pid": os.getpid()})


class EmbedWorker(ModelWorker):
    """Catalogue prompts (the partitioner's reference, no user data) to their embeddings."""

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        embeddings = embed(self.model, self.tokenizer, batch["prompt"].tolist(), self.config.model)
        return pd.DataFrame({"position": batch["position"].to_numpy(), "embedding": list(embeddings)})


def embed_pass(config: Config, prompts: list[str]) -> np.ndarray:
    """components.model.embed over `prompts` as a Ray Data job (one prompt at a time inside each
    batch: the same bits as in one process), in `prompts`' order."""
    check_fits(config)
    rows, size = pd.DataFrame({"position": range(len(prompts)), "prompt": prompts}), config.inference.batch_size
    blocks = [rows.iloc[i : i + size] for i in range(0, len(rows), size)]
    out = map_blocks(EmbedWorker, (config.model_dump(mode="json"),), blocks, config.inference.workers,
                     config.inference.cpus_per_worker, config.inference.gpus_per_worker)
    return np.stack(out.sort_values("position")["embedding"].to_numpy())


class StorePass:
    """prepare's `compute` as a Ray Data job; it records what it computed, where and how long."""

    def __init__(self, config: Config, workdir: Workdir, tokenizer):
        self.config, self.workdir, self.tokenizer = config, workdir, tokenizer  # token counts, to sort the samples
        self.samples_computed, self.seconds = 0, 0.0
        self.nodes: set[str] = set()
        self.pids: set[int] = set()

    def __call__(self, rows: pd.DataFrame) -> pd.DataFrame:
        started = time.time()
        inference = self.config.inference
        check_fits(self.config)
        rows = by_token_count(rows, self.tokenizer, self.config)
        blocks = [rows.iloc[i : i + inference.batch_size] for i in range(0, len(rows), inference.batch_size)]
        out = map_blocks(StoreWorker, (self.config.model_dump(mode="json"), str(self.workdir.root)), blocks,
                         inference.workers, inference.cpus_per_worker, inference.gpus_per_worker)
        self.samples_computed += len(out)
        self.nodes.update(out["node_id"])
        self.pids.update(int(p) for p in out["pid"])
        self.seconds += time.time() - started
        return out.assign(embedding=[np.asarray(e, dtype=np.float32) for e in out["embedding"]])

    def report(self) -> dict:
        """For DIR/reports/train.json: how many samples the pass computed, on which Ray nodes, in how long."""
        return {"samples_computed": self.samples_computed, "nodes": sorted(self.nodes), "seconds": round(self.seconds, 2)}


POOL_START_TIMEOUT_S = 1800  # an autoscaler may have to add the nodes first


def map_blocks(worker: type, args: tuple, blocks: list[pd.DataFrame], workers: int, cpus: float, gpus: float = 0) -> pd.DataFrame:
    """`worker(*args)` called on each block (one Ray Data batch) by a pool of up to `workers` actors
    of `cpus` and `gpus` each, one batch at a time per actor. The pool starts with as many actors as
    the cluster has room for now and grows as room appears; work starts once those first actors are
    all up. Ray Data's default starts with whichever is up first, and it would take every batch
    while an actor on a node that has to start a worker process is still loading the model."""
    most = min(workers, len(blocks))
    free = ray.available_resources()
    room = min([int(free.get(name, 0) // each) for name, each in (("CPU", cpus), ("GPU", gpus)) if each] or [most])
    pool = ray.data.ActorPoolStrategy(min_size=max(1, min(most, room)), max_size=most, max_tasks_in_flight_per_actor=1)
    context = ray.data.DataContext.get_current()  # a dataset copies it when created
    before, context.wait_for_min_actors_s = context.wait_for_min_actors_s, POOL_START_TIMEOUT_S
    try:
        return ray.data.from_pandas(blocks).map_batches(
            worker, fn_constructor_args=args, batch_size=max(map(len, blocks)), batch_format="pandas", compute=pool,
            num_cpus=cpus, num_gpus=gpus, runtime_env={"env_vars": ALLOCATOR_ENV}).to_pandas()
    finally:
        context.wait_for_min_actors_s = before


def check_fits(config: Config, gpus: bool = True) -> None:
    """A pool the cluster can never hold would wait forever: say so instead (`gpus`: the pool asks
    for inference.gpus_per_worker)."""
    inference, total = config.inference, ray.cluster_resources()
    for resource, each in (("CPU", inference.cpus_per_worker), ("GPU", inference.gpus_per_worker if gpus else 0)):
        if each and inference.workers * each > total.get(resource, 0):
            raise ValueError(f"inference.workers ({inference.workers}) x {resource.lower()}s_per_worker ({each:g}) "
                             f"needs {inference.workers * each:g} {resource}s; the Ray cluster has "
                             f"{total.get(resource, 0):g}: lower them in the config")


@dataclass(frozen=True)
class Scoring:
    """One row of an evaluation: `method` over the adapters at `adapter_files` (paths every node
    sees), with its aggregator folder; `config` is the one the adapters were trained with."""

    name: str
    config: Config
    adapter_files: dict[int, Path]
    aggregator: Path
    method: str
    masked: frozenset[int] = frozenset()
    # The rows are the aggregator's own validation samples: each is weighed by the others only
    # (APA's attention without its own label: make recipe's choice of tau).
    leave_one_out: bool = False

    def to_json(self) -> dict:
        return {"name": self.name, "config": self.config.model_dump(mode="json"), "method": self.method,
                "adapter_files": {k: str(v) for k, v in self.adapter_files.items()}, "aggregator": str(self.aggregator),
                "masked": sorted(self.masked), "leave_one_out": self.leave_one_out}


class ScoreWorker:
    """One actor of a scoring pool: the head-only base model loaded once per (model, seed), and
    every scoring's mixture on a copy of it that shares the base's weights (a mixture replaces the
    adapted layers of the module tree it is given, so each needs a tree of its own)."""

    def __init__(self, workdir: str, scorings: list[dict], threads: int):
        self.workdir = Workdir(workdir)
        make_deterministic(threads)  # the scores' bits can depend on the thread count
        self.scorings, bases = [], {}
        for scoring in scorings:
            config = Config.model_validate(scoring["config"])
            key = (config.model.model_dump_json(), config.seed)
            if key not in bases:
                tokenizer = load_tokenizer(config.model)  # trunk_layers 0: the states come from the prompt
                bases[key] = (load_base_model(config.model, config.seed, tokenizer, head_only=True), tokenizer)
            base, tokenizer = bases[key]
            tree = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})
            files = {int(k): Path(v) for k, v in scoring["adapter_files"].items()}
            aggregator = Path(scoring["aggregator"])
            self.scorings.append(SimpleNamespace(
                name=scoring["name"], config=config, method=scoring["method"], masked=set(scoring["masked"]),
                leave_one_out=scoring["leave_one_out"],
                base=tree, tokenizer=tokenizer, mixture=load_mixture(config, files, tokenizer, tree),
                state=AggregatorState.load(aggregator), partitioner=Partitioner.load(aggregator / "partitioner.npz")))
        self.warm = False

    @staticmethod
    def _predict(scoring, inputs, sample_ids) -> np.ndarray:
        if not scoring.leave_one_out:
            return predict(scoring.config, scoring.mixture, [inputs], scoring.state, scoring.partitioner, scoring.masked,
                           scoring.method)[0]
        aggregate = scoring.config.aggregate
        weights = torch.cat([apa_weights(inputs.embedding[row : row + 1], scoring.state.without({sample_id}),
                                         aggregate.neighbours, aggregate.tau, scoring.masked)
                             for row, sample_id in enumerate(sample_ids)])
        return scoring.mixture.p_yes(inputs, weights, decomposed=aggregation(scoring.method).decomposed).numpy()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        first = self.scorings[0]
        inputs = stored_inputs(sample_states(first.config, self.workdir, batch, first.base, first.tokenizer), batch["embedding"])
        frames = []
        for scoring in self.scorings:
            if not self.warm:  # untimed: an actor's first-call allocations are not latency
                self._predict(scoring, inputs, batch["sample_id"])
            started = time.perf_counter()
            scores = self._predict(scoring, inputs, batch["sample_id"])
            seconds = time.perf_counter() - started
            frames.append(pd.DataFrame({"name": scoring.name, "sample_id": batch["sample_id"].to_numpy(), "score": scores,
                                        "seconds_per_sample": seconds / len(batch), "batch": batch["batch"].to_numpy()}))
        self.warm = True
        return pd.concat(frames, ignore_index=True)


def score_pass(config: Config, workdir: Workdir, rows: pd.DataFrame, scorings: list[Scoring], threads: int,
               batch_size: int) -> pd.DataFrame:
    """P(yes) of `rows` (sample_id, prompt, embedding) under every scoring, as one Ray Data job over
    `config.inference.workers` ScoreWorkers (each loads the models once for all scorings); per
    scoring (column `name`, in `scorings`' order) back in `rows`' order, with each row's batch and
    that batch's compute seconds per sample for that scoring, measured inside the worker around
    `predict`. Batches are cut from `rows` as they are ordered, so a batch holds the same samples
    (and padding) as the same cut scored in one process: the same bits. The head runs on CPU,
    cheap next to the trunk: the pool reserves no GPU. Every scoring reads the stored states of
    `workdir`, so all must share its trunk (model and trunk layers)."""
    check_fits(config, gpus=False)
    trunks = {(s.config.model.label, s.config.model.trunk_layers) for s in scorings}
    if len(trunks) != 1:
        raise ValueError(f"one scoring pass reads one store's trunk states: the scorings have trunks {sorted(trunks)}")
    rows = rows[["sample_id", "prompt", "embedding"]].reset_index(drop=True)
    rows["batch"] = rows.index // batch_size
    rows["embedding"] = [np.asarray(e, dtype=np.float32) for e in rows["embedding"]]
    # One block per batch, as in StorePass: a Ray Data batch is exactly one of these.
    blocks = [rows.iloc[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    out = map_blocks(ScoreWorker, (str(workdir.root), [s.to_json() for s in scorings], threads), blocks,
                     config.inference.workers, config.inference.cpus_per_worker)
    # Ray Data does not keep the order of blocks across actors: put the rows back in `rows`' order.
    order = {name: i for i, name in enumerate(s.name for s in scorings)}
    position = pd.Series(range(len(rows)), index=rows["sample_id"])
    out = out.assign(_scoring=out["name"].map(order), _row=out["sample_id"].map(position))
    return out.sort_values(["_scoring", "_row"]).drop(columns=["_scoring", "_row"]).reset_index(drop=True)
