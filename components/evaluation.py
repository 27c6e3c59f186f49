"""The evaluation's numbers that need no Ray and no MLflow: the no-model floors as rows of the
comparison table (components.floors computes them) and the bootstrap intervals over the stored
predictions of every method (components.metrics)."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from components.data import read_parquet
from components.floors import FloorError, history_floor, item_floor
from components.metrics import auc, auc_interval, paired_difference_interval
from components.store import Workdir

FLOORS = ("floor-history", "floor-item", "floor-sum")
BOOTSTRAP_RESAMPLES = 1000
PAIRS = (("apa", "retrain"), ("apa", "sisa"), ("retrain", "floor-history"), ("retrain", "floor-item"))


def score_floors(workdir: Workdir, test, out: Path) -> tuple[dict[str, dict], str | None]:
    """The floors' rows, their scores stored like a method's; and why the history floor is
    missing, if it is (a store prepared before the counts existed: rebuilding it from the source
    data would bring back what it has forgotten, so the evaluation goes on without that floor)."""
    train = read_parquet(workdir.split("train"))  # as it is now: forgotten users' labels are gone
    labels = test["label"].to_numpy().astype(int)
    seen = int(test["item_id"].astype(str).isin(set(train["item_id"].astype(str))).sum())
    scores = {"floor-item": item_floor(train, test)}
    notes = {"floor-item": f"no model: the item's mean label over the {len(train)} current training samples "
                           f"({seen} of {len(test)} test items seen there, the others get the mean "
                           f"{train['label'].mean():.3f})"}
    skipped = None
    try:
        scores["floor-history"] = history_floor(test)
    except FloorError as err:
        skipped = f"floor-history and floor-sum not computed: {err}"
    else:
        scores["floor-sum"] = scores["floor-history"] + scores["floor-item"]
        notes["floor-history"] = "no model: the share of liked titles in the sample's history"
        notes["floor-sum"] = "no model: floor-history + floor-item"
    rows = {}
    for name in (f for f in FLOORS if f in scores):
        path = out / f"{name}.npy"
        np.save(path, scores[name])
        rows[name] = {"auc": auc(labels, scores[name]), "n_test": len(labels), "latency_ms": None,
                      "predictions": str(path.relative_to(workdir.root)), "notes": notes[name]}
    return rows, skipped


def _interval(bounds) -> list[float] | None:
    return None if bounds is None else [round(b, 6) for b in bounds]


def add_intervals(workdir: Workdir, results: dict[str, dict], seed: int) -> dict[str, dict]:
    """A post-pass over the stored predictions and labels: each row's `auc_ci95`, and the paired
    differences of PAIRS (every method resampled with the same seed, so the same test samples)."""
    labels = np.load(workdir.path("reports", "predictions", "labels.npy"))
    scores = {name: np.load(workdir.path(row["predictions"])) for name, row in results.items()}
    for name, row in results.items():
        row["auc_ci95"] = _interval(auc_interval(labels, scores[name], seed, BOOTSTRAP_RESAMPLES))
    paired = {}
    for a, b in PAIRS:
        if a in scores and b in scores:
            bounds = paired_difference_interval(labels, scores[a], scores[b], seed, BOOTSTRAP_RESAMPLES)
            paired[f"{a} - {b}"] = {"a": a, "b": b, "difference": results[a]["auc"] - results[b]["auc"],
                                    "ci95": _interval(bounds), "n": len(labels)}
    return paired


def cpu_description() -> str:
    """The CPU a figure came from, with the vector extension that sets the model's speed here
    (the frozen trunk's pass is ~2.5x slower on AVX2-only CPUs than with AVX-512)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({vector})"
