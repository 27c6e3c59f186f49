"""The per-sample model passes on the cluster: Ray Data batch inference over an actor pool.

`StorePass` is what the jobs hand to components.store.prepare as its `compute`: the samples to
compute, sorted by token count, cut into batches of `inference.batch_size`, and mapped over
`inference.workers` actors that each load the tokenizer and the base model once, run the frozen
trunk (components.store.store_states) and write every sample's states into the store themselves
(atomic files: an interrupted pass resumes with the samples still missing). Only the embeddings
come back to the driver, with the Ray node and process that computed them.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd
import ray

from components.config import ALLOCATOR_ENV, Config
from components.model import load_base_model, load_tokenizer, make_deterministic
from components.store import Workdir, by_token_count, store_states


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
        self._check_fits()
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

    def _check_fits(self) -> None:
        """A pool the cluster can never hold would wait forever: say so instead."""
        inference, total = self.config.inference, ray.cluster_resources()
        for resource, each in (("CPU", inference.cpus_per_worker), ("GPU", inference.gpus_per_worker)):
            if each and inference.workers * each > total.get(resource, 0):
                raise ValueError(f"inference.workers ({inference.workers}) x {resource.lower()}s_per_worker ({each:g}) "
                                 f"needs {inference.workers * each:g} {resource}s; the Ray cluster has "
                                 f"{total.get(resource, 0):g}: lower them in the config")

    def report(self) -> dict:
        """For DIR/reports/train.json: how many samples the pass computed, on which Ray nodes, in how long."""
        return {"samples_computed": self.samples_computed, "nodes": sorted(self.nodes), "seconds": round(self.seconds, 2)}
