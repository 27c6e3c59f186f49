"""Scoring for the evaluation: a work dir's live adapter set, downloaded, and its test samples
scored under every method in one Ray Data job (ray_jobs.passes.score_pass)."""

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
from ray_jobs.passes import Scoring, score_pass

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
    """Scores DIR's stored test samples under every method added to it, in one Ray Data job
    (ray_jobs.passes.score_pass): the head runs over the samples' stored trunk states in the pool's
    actors; the driver puts the scores in test order, stores them and takes the AUCs. The live
    sets added must stay open until `run`."""

    def __init__(self, config: Config, workdir: Workdir, test, out: Path, threads: int, log: Log):
        self.config, self.workdir, self.out, self.threads, self.log = config, workdir, out, threads, log
        self.labels = test["label"].to_numpy().astype(int)
        self.rows = test[["sample_id", "prompt", "embedding"]]
        self.pending: list[tuple[Scoring, dict]] = []

    def add(self, name: str, config: Config, live: LiveSet, method: str, masked=frozenset(),
            shards: list[int] | None = None, **row) -> None:
        """`method` over the live set's adapters (only `shards`, where given); `row`: extra fields of its report row."""
        files = {k: v for k, v in live.files.items() if shards is None or k in shards}
        self.pending.append((Scoring(name, config, files, live.aggregator, method, frozenset(masked)),
                             {"adapters": len(files), "adapter_set_version": live.set.version, **row}))

    def run(self) -> dict[str, dict]:
        """Each method's report row. Latency: each batch's compute time inside its Ray Data worker,
        after that worker's warm-up batch; the median batch is reported, robust to other work on
        a shared machine, and the mean too."""
        if not self.pending:
            return {}
        self.log(f"scoring {len(self.pending)} method(s) in one Ray Data job: {', '.join(s.name for s, _ in self.pending)}")
        out = score_pass(self.config, self.workdir, self.rows, [s for s, _ in self.pending], self.threads, PREDICT_BATCH)
        results = {}
        for scoring, extra in self.pending:
            mine = out[out["name"] == scoring.name]
            scores = mine["score"].to_numpy()
            latency = float(np.median(mine.groupby("batch")["seconds_per_sample"].first() * 1000))
            path = self.out / f"{scoring.name}.npy"
            np.save(path, scores)
            value = auc(self.labels, scores)
            self.log(f"{scoring.name:<16} AUC {value:.4f}   {latency:8.2f} ms/sample   ({scoring.method}, {extra['adapters']} adapter(s))")
            results[scoring.name] = {
                "auc": value, "n_test": len(self.labels), "latency_ms": round(latency, 3),
                "latency_ms_mean": round(float(mine["seconds_per_sample"].sum()) * 1000 / len(self.labels), 3),
                "aggregate": scoring.method, "predictions": str(path.relative_to(self.out.parents[1])), **extra}
        self.pending = []
        return results
