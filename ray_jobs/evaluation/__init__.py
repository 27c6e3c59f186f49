"""The evaluation's wiring, one concern a module: scoring (a live adapter set, Ray Data scoring),
baselines (the work dirs to compare, trained or reused), forget_cost (timing one forget), publish
(the report's files and its MLflow run). The job itself is ray_jobs.evaluate; the math without
Ray or MLflow is components.evaluation and components.eval_report."""

from __future__ import annotations

import time


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked; the message says why."""


class Log:
    """The evaluation's progress lines, each stamped with the seconds since this run started."""

    def __init__(self) -> None:
        self.started = time.time()

    def __call__(self, message: str) -> None:
        print(f"[evaluate {time.time() - self.started:6.1f}s] {message}", flush=True)
