"""Scoring for the evaluation: a work dir's live adapter set, downloaded, and its test samples
scored one method at a time as a Ray Data job (ray_jobs.passes.score_pass)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from components.aggregate import AggregatorState
from components.config import Config
from components.metrics import auc
from components.partition import Partitioner
from components.registry import Registry
from components.store import Workdir
from components.train import ADAPTER_FILE
from ray_jobs.evaluation import EvaluationError, Log
from ray_jobs.passes import score_pass

PREDICT_BATCH = 16


class LiveSet:
    """The live adapter set of a work dir, downloaded into DIR/reports/.live-set-<pid>-*/ (inside the
    work dir, so that the scoring actors on every node see the files), removed on exit."""

    def __init__(self, config: Config, workdir: Workdir):
        self.registry = Registry(config.experiment, workdir.root)
        workdir.path("reports").mkdir(parents=True, exist_ok=True)
        self._tmp = tempfile.TemporaryDirectory(prefix=f".live-set-{os.getpid()}-", dir=workdir.path("reports"))
        self.masked, live, _ = self.registry.mask_and_live_set()
        self.set = self.registry.load_adapter_set(Path(self._tmp.name), live) if live else None
        if self.set is None:
            self._tmp.cleanup()
            raise EvaluationError(f"{workdir.root} has no live adapter set ({config.experiment}.adapter-set@live)")
        self.aggregator = self.set.folder / "aggregator"
        self.state = AggregatorState.load(self.aggregator)
        self.partitioner = Partitioner.load(self.aggregator / "partitioner.npz")
        self.files = {k: Path(v["local"]) / ADAPTER_FILE for k, v in sorted(self.set.shards.items())}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._tmp.cleanup()


class Scorer:
    """Scores DIR's stored test samples, one method at a time, as a Ray Data job
    (ray_jobs.passes.score_pass): the head runs over the samples' stored trunk states in the pool's
    actors; the driver puts the scores in test order, stores them and takes the AUC."""

    def __init__(self, workdir: Workdir, test, out: Path, threads: int, log: Log):
        self.workdir, self.out, self.threads, self.log = workdir, out, threads, log
        self.labels = test["label"].to_numpy().astype(int)
        self.rows = test[["sample_id", "prompt", "embedding"]]

    def score(self, name: str, config: Config, live: LiveSet, method: str, masked=frozenset(),
              shards: list[int] | None = None) -> dict:
        """`method` over the live set's adapters (only `shards`, where given). Latency: each batch's
        compute time inside its Ray Data worker, after that worker's warm-up batch; the median batch
        is reported, robust to other work on a shared machine, and the mean too."""
        files = {k: v for k, v in live.files.items() if shards is None or k in shards}
        out = score_pass(config, self.workdir, self.rows, files, live.aggregator, method, masked, self.threads,
                         PREDICT_BATCH)
        scores = out["score"].to_numpy()
        per_batch = out.groupby("batch")["seconds_per_sample"].first() * 1000
        latency = float(np.median(per_batch))
        path = self.out / f"{name}.npy"
        np.save(path, scores)
        value = auc(self.labels, scores)
        self.log(f"{name:<16} AUC {value:.4f}   {latency:8.2f} ms/sample   ({method}, {len(files)} adapter(s))")
        return {"auc": value, "n_test": len(self.labels), "latency_ms": round(latency, 3),
                "latency_ms_mean": round(float(out["seconds_per_sample"].sum()) * 1000 / len(self.labels), 3),
                "aggregate": method, "adapters": len(files), "predictions": str(path.relative_to(self.out.parents[1])),
                "adapter_set_version": live.set.version}
