"""The per-sample model passes on the cluster: Ray Data batch inference over an actor pool.

`StorePass` is what the jobs hand to components.store.prepare as its `compute`: the samples to
compute, sorted by token count, cut into batches of `inference.batch_size`, and mapped over
`inference.workers` actors that each load the tokenizer and the base model once, run the frozen
trunk (components.store.store_states) and write every sample's states into the store themselves
(atomic files: an interrupted pass resumes with the samples still missing). Only the embeddings
come back to the driver, with the Ray node and process that computed them.

`score_pass` is the evaluation's scoring of one method: the test samples, in the driver's order,
cut into batches of a fixed size and mapped over actors that each load the head-only base model
and the method's adapter mixture once, read each batch's stored trunk states and run
components.aggregate.predict on it, timing every batch themselves.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray

from components.aggregate import AggregatorState, load_mixture, predict, stored_inputs
from components.config import ALLOCATOR_ENV, Config
from components.model import load_base_model, load_tokenizer, make_deterministic
from components.partition import Partitioner
from components.store import Workdir, by_token_count, sample_states, store_states


class StoreWorker:
    """One actor of the pool: the base model loaded once, on its GPU where it was given one."""

    def __init__(self, config: dict, workdir: str):
        self.config = Config.model_validate(config)
        self.workdir = Workdir(workdir)
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

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        embeddings = store_states(self.config, self.workdir, self.model, self.tokenizer, batch)
        return pd.DataFrame({"sample_id": batch["sample_id"].to_numpy(), "embedding": embeddings,
                             "node_id": self.node_id, "pid": os.getpid()})


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
        # One block per batch, and one batch at a time per actor: an actor that is ready first
        # (loading the model takes a while) must not queue every block before the others start.
        blocks = [rows.iloc[i : i + inference.batch_size] for i in range(0, len(rows), inference.batch_size)]
        pool = ray.data.ActorPoolStrategy(size=min(inference.workers, len(blocks)), max_tasks_in_flight_per_actor=1)
        out = ray.data.from_pandas(blocks).map_batches(
            StoreWorker, fn_constructor_args=(self.config.model_dump(mode="json"), str(self.workdir.root)),
            batch_size=inference.batch_size, batch_format="pandas", compute=pool,
            num_cpus=inference.cpus_per_worker, num_gpus=inference.gpus_per_worker,
            runtime_env={"env_vars": ALLOCATOR_ENV},
        ).to_pandas()
        self.samples_computed += len(out)
        self.nodes.update(out["node_id"])
        self.pids.update(int(p) for p in out["pid"])
        self.seconds += time.time() - started
        return out.assign(embedding=[np.asarray(e, dtype=np.float32) for e in out["embedding"]])

    def report(self) -> dict:
        """For DIR/reports/train.json: how many samples the pass computed, on which Ray nodes, in how long."""
        return {"samples_computed": self.samples_computed, "nodes": sorted(self.nodes), "seconds": round(self.seconds, 2)}


def check_fits(config: Config, gpus: bool = True) -> None:
    """A pool the cluster can never hold would wait forever: say so instead (`gpus`: the pool asks
    for inference.gpus_per_worker)."""
    inference, total = config.inference, ray.cluster_resources()
    for resource, each in (("CPU", inference.cpus_per_worker), ("GPU", inference.gpus_per_worker if gpus else 0)):
        if each and inference.workers * each > total.get(resource, 0):
            raise ValueError(f"inference.workers ({inference.workers}) x {resource.lower()}s_per_worker ({each:g}) "
                             f"needs {inference.workers * each:g} {resource}s; the Ray cluster has "
                             f"{total.get(resource, 0):g}: lower them in the config")


class ScoreWorker:
    """One actor of a scoring pool: the head-only base model and one method's mixture, loaded once.
    Adapter files and the aggregator folder are paths every node sees (under the work dir)."""

    def __init__(self, config: dict, workdir: str, adapter_files: dict[int, str], aggregator: str, method: str,
                 masked: list[int], threads: int):
        self.config = Config.model_validate(config)
        self.workdir = Workdir(workdir)
        self.method, self.masked = method, set(masked)
        make_deterministic(threads)  # the scores' bits can depend on the thread count
        self.tokenizer = load_tokenizer(self.config.model)  # trunk_layers 0: the states come from the prompt
        self.base = load_base_model(self.config.model, self.config.seed, self.tokenizer, head_only=True)
        self.mixture = load_mixture(self.config, {int(k): Path(v) for k, v in adapter_files.items()}, self.tokenizer,
                                    self.base)
        self.state = AggregatorState.load(Path(aggregator))
        self.partitioner = Partitioner.load(Path(aggregator) / "partitioner.npz")
        self.warm = False

    def _predict(self, inputs) -> np.ndarray:
        return predict(self.config, self.mixture, [inputs], self.state, self.partitioner, self.masked, self.method)[0]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        states = sample_states(self.config, self.workdir, batch, self.base, self.tokenizer)
        inputs = stored_inputs(states, batch["embedding"])
        if not self.warm:  # untimed: an actor's first-call allocations are not latency
            self._predict(inputs)
            self.warm = True
        started = time.perf_counter()
        scores = self._predict(inputs)
        seconds = time.perf_counter() - started
        return pd.DataFrame({"sample_id": batch["sample_id"].to_numpy(), "score": scores,
                             "seconds_per_sample": seconds / len(batch), "batch": batch["batch"].to_numpy()})


def score_pass(config: Config, workdir: Workdir, rows: pd.DataFrame, adapter_files: dict[int, Path], aggregator: Path,
               method: str, masked, threads: int, batch_size: int) -> pd.DataFrame:
    """P(yes) of `rows` (sample_id, prompt, embedding) under one method, as a Ray Data job over
    `inference.workers` ScoreWorkers; back in `rows`' order with each row's batch and that batch's
    compute seconds per sample, measured inside the worker around `predict`. Batches are cut from
    `rows` as they are ordered, so a batch holds the same samples (and padding) as the same cut
    scored in one process: the same bits. The head runs on CPU, cheap next to the trunk: the pool
    reserves no GPU."""
    check_fits(config, gpus=False)
    rows = rows[["sample_id", "prompt", "embedding"]].reset_index(drop=True)
    rows["batch"] = rows.index // batch_size
    rows["embedding"] = [np.asarray(e, dtype=np.float32) for e in rows["embedding"]]
    # One block per batch, as in StorePass: a Ray Data batch is exactly one of these.
    blocks = [rows.iloc[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    args = (config.model_dump(mode="json"), str(workdir.root), {k: str(v) for k, v in adapter_files.items()},
            str(aggregator), method, sorted(masked), threads)
    out = ray.data.from_pandas(blocks).map_batches(
        ScoreWorker, fn_constructor_args=args, batch_size=batch_size, batch_format="pandas",
        concurrency=min(config.inference.workers, len(blocks)), num_cpus=config.inference.cpus_per_worker,
        runtime_env={"env_vars": ALLOCATOR_ENV},
    ).to_pandas()
    # Ray Data does not keep the order of blocks across actors: put the rows back in `rows`' order.
    return out.set_index("sample_id").loc[rows["sample_id"]].reset_index()
