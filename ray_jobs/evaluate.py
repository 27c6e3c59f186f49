"""Evaluate every method on the test split: the APA paper's comparison table, on our data.

    python -m ray_jobs.evaluate --config configs/tiny.yaml --workdir runs/tiny
    python -m ray_jobs.evaluate ... --methods apa,sisa,retrain,shard-0
    python -m ray_jobs.evaluate ... --forget-cost existing   # read audit records, forget nothing

Methods, all scored on the test split of DIR:
    retrain         one adapter on all the training data               DIR/baselines/retrain
    sisa            K random shards, average of the K models' P(yes)   DIR/baselines/sisa
    user            K user-based shards, average of the K outputs      DIR/baselines/user
    apa             K semantic shards (DIR itself), attention, non-decomposed merge
    apa-decomposed  the same adapters, decomposed merge
    uniform         the same adapters, uniform parameter averaging
    lmeraser        adaptive clusters, prompt tuning, routing          DIR/baselines/lmeraser
    shard-<k>       APA shard k alone ("shards": every shard)
Always, with no model (components.floors), the floors every method must beat:
    floor-history   the share of liked titles in the sample's history
    floor-item      the item's mean label over DIR's current training split (forgotten labels gone)
    floor-sum       floor-history + floor-item
Every AUC gets a 95% percentile bootstrap interval over the test samples (seeded by the config's
seed), and APA - retrain, APA - SISA and retrain - each floor a paired one (the same resamples).
A baseline is a derived config with its own experiment name (`<experiment>-<name>`), trained into
its folder on a copy of DIR's *current* sample store, so it never sees what DIR has forgotten (a
baseline that still holds samples DIR has since forgotten forgets them first); it is reused when
present.

Forget cost, per partitioning: the seconds of forgetting one user against the full train job of
the same work dir, read from audit records (DIR/audit for APA). Only when asked (`--forget-cost
measure`), a partitioning without one is measured by forgetting one training user (the same one
everywhere) in the baseline's own work dir before its AUC is taken, so every run scores the same
state, and for APA in a dedicated DIR/baselines/forget-cost, an extra APA training (DIR itself is
never changed here). For `retrain`, forgetting is retraining from scratch.

Writes DIR/reports/eval.json, eval.md, predictions/<method>.npy (+ labels.npy), auc.png and
cost.png, and logs the reports and metrics (auc_<method>, ...) to an MLflow run named "evaluate".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from components.baselines import BASELINE_AGGREGATE, BASELINES, baseline_config
from components.config import Config
from components.eval_report import apa_note, baseline_note
from components.evaluation import BOOTSTRAP_RESAMPLES, FLOORS, add_intervals, cpu_description, score_floors
from components.model import head_dtype
from components.store import Workdir, load_splits
from ray_jobs.common import SharedStorageError, connect_ray, fail, id_list, job_parser, load_job
from ray_jobs.evaluation import EvaluationError, Log
from ray_jobs.evaluation.baselines import ensure_baseline, ensure_main
from ray_jobs.evaluation.forget_cost import (
    FORGET_COST_MODES,
    FORGET_COST_REQUEST,
    apa_forget_cost,
    audits,
    forget_cost,
    forget_user_order,
    retrain_cost,
)
from ray_jobs.evaluation.publish import publish
from ray_jobs.evaluation.scoring import PREDICT_BATCH, LiveSet, Scorer

METHODS = ("retrain", "sisa", "user", "apa", "apa-decomposed", "uniform", "lmeraser")
SHARDS = "shards"  # every shard-<k> of the APA set
DEFAULT_METHODS = METHODS + (SHARDS,)
# No baseline to train; shard-0 alone is the single adapter APA's one-pass latency is held against.
DEMO_METHODS = ("apa", "uniform", "shard-0")
APA_METHODS = {"apa": "attention", "apa-decomposed": "decomposed", "uniform": "uniform"}  # row -> aggregation
SHARD_METHOD = re.compile(r"shard-(\d+)")


# --- what to evaluate -------------------------------------------------------------------------------


def parse_methods(names) -> list[str]:
    """Validate method names (a comma-separated string or a list); unknown names raise."""
    names = id_list(names) if isinstance(names, str) else [str(n).strip() for n in (names or []) if str(n).strip()]
    if not names:
        raise EvaluationError(f"no method named; choose from {', '.join(DEFAULT_METHODS)} or shard-<k>")
    bad = [n for n in names if n not in DEFAULT_METHODS and not SHARD_METHOD.fullmatch(n)]
    if bad:
        raise EvaluationError(f"unknown method {bad[0]!r} in --methods; choose from {', '.join(DEFAULT_METHODS)} or shard-<k>")
    return list(dict.fromkeys(names))


def methods_argument(text: str) -> list[str]:
    """--methods, checked while the command line is parsed: before the data is read."""
    try:
        return parse_methods(text)
    except EvaluationError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _expand_shards(methods: list[str], shards: list[int]) -> list[str]:
    names = []
    for name in methods:
        if name == SHARDS:
            names += [f"shard-{k}" for k in shards]
        elif (match := SHARD_METHOD.fullmatch(name)) and int(match.group(1)) not in shards:
            raise EvaluationError(f"method {name!r}: the APA adapter set has shards {shards}")
        else:
            names.append(name)
    return list(dict.fromkeys(names))


# --- the run ------------------------------------------------------------------------------------------


def run(config: Config, workdir: Workdir, methods=None, forget_cost_mode: str = "existing",
        config_file: str | None = None, threads: int | None = None, states_from: Workdir | None = None) -> dict:
    """Evaluate `methods` (default: all) and write, plot and log the reports; returns eval.json."""
    log = Log()
    methods = parse_methods(methods if methods is not None else list(DEFAULT_METHODS))
    if forget_cost_mode not in FORGET_COST_MODES:
        raise EvaluationError(f"forget cost mode {forget_cost_mode!r}: choose from {', '.join(FORGET_COST_MODES)}")
    threads = threads or max(1, int(config.inference.cpus_per_worker))  # per scoring worker: its CPU reservation
    apa_family = [m for m in methods if m in APA_METHODS or m == SHARDS or SHARD_METHOD.fullmatch(m)]
    log(f"methods: {', '.join(methods)}; work dir {workdir.root}")
    connect_ray(config, workdir)

    train_report = ensure_main(config, workdir, bool(apa_family), log, states_from)
    test = load_splits(workdir)["test"]
    if len(test) == 0:
        raise EvaluationError(f"{workdir.split('test')} holds no test samples")
    labels = test["label"].to_numpy().astype(int)
    out = workdir.path("reports", "predictions")
    shutil.rmtree(out, ignore_errors=True)  # predictions of an earlier run may be of another split
    out.mkdir(parents=True)
    np.save(out / "labels.npy", labels)
    log(f"test split: {len(test)} samples ({int(labels.sum())} positive); scoring at batch {PREDICT_BATCH} as a Ray Data job, "
        f"{config.inference.workers} worker(s) of {threads} torch thread(s)")
    users = forget_user_order(config, workdir)
    scorer = Scorer(config, workdir, test, out, threads, log)
    costs: dict[str, dict] = {}
    with contextlib.ExitStack() as open_sets:  # every live set stays downloaded until the one scoring job is done
        if apa_family:
            _add_apa(config, workdir, methods, scorer, train_report, open_sets, log)
            found = apa_forget_cost(config, workdir, forget_cost_mode, users, log) if forget_cost_mode != "none" else None
            if found is not None:
                costs["apa"] = found
        baselines = _ensure_baselines(config, workdir, [m for m in BASELINES if m in methods], forget_cost_mode, users, log)
        for name, (derived, folder, report, cost) in baselines.items():
            if cost is not None:
                costs[name] = cost
            live = open_sets.enter_context(LiveSet(derived, folder))
            scorer.add(name, derived, live, BASELINE_AGGREGATE[name], live.masked, workdir=str(folder.root),
                       notes=baseline_note(derived, name, len(live.files), report, len(audits(folder))))
        results = scorer.run()
    floors, floors_skipped = score_floors(workdir, test, out)
    if floors_skipped:
        log(floors_skipped)
    for name, row in floors.items():
        log(f"{name:<16} AUC {row['auc']:.4f}")
    results.update(floors)
    paired = add_intervals(workdir, results, config.seed)
    retrain_seconds = costs.get("retrain", {}).get("full_retrain_seconds")
    for cost in costs.values():
        if retrain_seconds and cost["forget_seconds"]:
            cost["ratio_vs_retrain_baseline"] = round(retrain_seconds / cost["forget_seconds"], 3)
    report = _report(config, workdir, test, results, threads, config_file)
    report.update(paired=paired, floors_skipped=floors_skipped, forget_cost=costs, seconds=None, mlflow_run_id=None)
    return publish(config, workdir, report, log)


def _add_apa(config: Config, workdir: Workdir, methods: list[str], scorer: Scorer, train_report: dict | None,
             open_sets: contextlib.ExitStack, log: Log) -> None:
    """The rows of APA's own adapter set: its mixtures, and shards alone."""
    live = open_sets.enter_context(LiveSet(config, workdir))
    samples = {int(k): v["samples"] for k, v in (train_report or {}).get("shards", {}).items()}
    if live.masked:
        log(f"note: shards {sorted(live.masked)} are masked (a forget is pending): mixtures leave them out")
    for name in _expand_shards(methods, list(live.files)):
        if name in APA_METHODS:
            scorer.add(name, config, live, APA_METHODS[name], live.masked,
                       notes=apa_note(config, name, len(live.files), len(audits(workdir))))
        elif match := SHARD_METHOD.fullmatch(name):
            shard = int(match.group(1))
            scorer.add(name, config, live, "uniform", shards=[shard],
                       notes=(f"APA shard {shard} alone ({samples.get(shard, '?')} training samples)"
                              + (", masked: forget pending" if shard in live.masked else "")))


def _ensure_baselines(config: Config, workdir: Workdir, names: list[str], forget_cost_mode: str, users: list[str],
                      log: Log) -> dict[str, tuple]:
    """Each baseline's (config, work dir, train report, forget cost), trained or reused, all at
    once: their Ray Train runs share the cluster. A baseline's forget cost is measured before it
    is scored, so every run scores the same state."""

    def ensure(name: str) -> tuple:
        derived, folder = baseline_config(config, name), Workdir(workdir.path("baselines", name))
        report = ensure_baseline(derived, folder, workdir, name, log)
        if name == "retrain":
            return derived, folder, report, retrain_cost(report, folder)
        if forget_cost_mode == "none":
            return derived, folder, report, None
        return derived, folder, report, forget_cost(derived, folder, forget_cost_mode, users, FORGET_COST_REQUEST, name, log)

    with ThreadPoolExecutor(max_workers=max(1, len(names)), thread_name_prefix="baseline") as pool:
        futures = {name: pool.submit(ensure, name) for name in names}
    return {name: future.result() for name, future in futures.items()}


def _sha256_file(path) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).is_file() else None


def _report(config: Config, workdir: Workdir, test, results: dict[str, dict], threads: int,
            config_file: str | None) -> dict:
    """eval.json's header and rows, in the table's order: methods, shards, floors."""
    shards = sorted((m for m in results if m.startswith("shard-")), key=lambda m: int(m[6:]))
    order = [m for m in (*METHODS, *shards, *FLOORS) if m in results]
    return {
        "experiment": config.experiment, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu": cpu_description(), "cpu_count": os.cpu_count(), "torch_threads": threads,
                    "python": platform.python_version(), "torch": torch.__version__,
                    "head_dtype": str(head_dtype(config.model, torch.device("cpu"))).removeprefix("torch.")},
        "config_file": str(config_file) if config_file else None, "config_file_sha256": _sha256_file(config_file),
        "config_sha256": config.sha256(), "workdir": str(workdir.root),
        "n_test": len(test), "n_positive": int(test["label"].to_numpy().astype(int).sum()),
        "labels": "reports/predictions/labels.npy",
        "batch_size": PREDICT_BATCH, "methods": {m: results[m] for m in order},
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": config.seed, "level": 0.95,
                      "kind": "percentile, over test samples; resamples with one class skipped"},
    }


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("ray_jobs.evaluate", "Evaluate APA, its variants and the baselines on the test split.")
    parser.add_argument("--methods", type=methods_argument, default=list(DEFAULT_METHODS),
                        help=f"comma-separated subset of {','.join(DEFAULT_METHODS)} or shard-<k> (default: all)")
    parser.add_argument("--forget-cost", choices=FORGET_COST_MODES, default="existing",
                        help="existing: read audit records (default); measure: also forget one user where no audit "
                             "record exists yet (for APA an extra training of DIR's config); none: skip")
    parser.add_argument("--threads", type=int, help="torch threads of each scoring worker "
                        "(default: inference.cpus_per_worker, rounded down, at least 1)")
    parser.add_argument("--states-from", help="a work dir of the same model and data whose stored trunk states are "
                        "linked into a new work dir's store instead of computed (make bench: runs/store/<experiment>)")
    args, config, workdir = load_job(parser, argv, builds_store=True)
    try:
        if args.threads is not None and args.threads < 1:
            raise EvaluationError("--threads must be at least 1")
        if args.states_from and not Path(args.states_from, "trunk").is_dir():
            raise EvaluationError(f"--states-from {args.states_from}: no stored trunk states there (no trunk/ folder)")
        report = run(config, workdir, args.methods, args.forget_cost, args.config, args.threads,
                     Workdir(Path(args.states_from)) if args.states_from else None)
    except (EvaluationError, SharedStorageError) as err:
        fail(str(err))
    print((workdir.path("reports", "eval.md")).read_text())
    print(json.dumps({m: round(r["auc"], 4) for m, r in report["methods"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
