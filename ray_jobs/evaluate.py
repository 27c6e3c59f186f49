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
the same work dir. Read from audit records where there are some (DIR/audit for APA); otherwise
measured by forgetting one training user (the same one everywhere) in the baseline's own work dir
before its AUC is taken, so every run scores the same state, and for APA in a dedicated
DIR/baselines/forget-cost (DIR itself is never changed here). For `retrain`, forgetting is
retraining from scratch.

Writes DIR/reports/eval.json, eval.md, predictions/<method>.npy (+ labels.npy), auc.png and
cost.png, and logs the reports and metrics (auc_<method>, ...) to an MLflow run named "evaluate".
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from components.aggregate import AggregatorState
from components.baselines import BASELINE_AGGREGATE, BASELINES, baseline_config, baseline_sha256
from components.config import Config
from components.data import SPLITS, read_parquet, stable_hash
from components.floors import FloorError, history_floor, item_floor
from components.metrics import auc, auc_interval, bar_figure, close, grouped_bar_figure, paired_difference_interval
from components.model import head_dtype, load_tokenizer
from components.partition import Partitioner
from components.registry import Registry, keep_own_registry
from components.store import Workdir, copy_store, load_splits, prepare, write_json
from components.train import ADAPTER_FILE, learning_rate
from components.unlearn import new_request
from ray_jobs.common import SharedStorageError, connect_ray, fail, id_list, job_parser, load_job
from ray_jobs.passes import StorePass, score_pass

METHODS = ("retrain", "sisa", "user", "apa", "apa-decomposed", "uniform", "lmeraser")
SHARDS = "shards"  # every shard-<k> of the APA set
DEFAULT_METHODS = METHODS + (SHARDS,)
DEMO_METHODS = ("apa", "apa-decomposed", "uniform")  # no baseline to train; shards alone are `--methods shards`
APA_METHODS = {"apa": "attention", "apa-decomposed": "decomposed", "uniform": "uniform"}
FORGET_COST_MODES = ("measure", "existing", "none")
FORGET_COST_REQUEST = "eval-forget-cost"  # the request id of a measuring forget in a baseline
PREDICT_BATCH = 16
FLOORS = ("floor-history", "floor-item", "floor-sum")
BOOTSTRAP_RESAMPLES = 1000
PAIRS = (("apa", "retrain"), ("apa", "sisa"), ("retrain", "floor-history"), ("retrain", "floor-item"))
SHARD_METHOD = re.compile(r"shard-(\d+)")


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked; the message says why."""


_STARTED = time.time()


def log(message: str) -> None:
    print(f"[evaluate {time.time() - _STARTED:6.1f}s] {message}", flush=True)


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


# --- the work dirs: train what is missing, reuse what is there ---------------------------------


def _train_report(workdir: Workdir) -> dict | None:
    path = workdir.path("reports", "train.json")
    return json.loads(path.read_text()) if path.exists() else None


def ensure_main(config: Config, workdir: Workdir, train: bool, states_from: Workdir | None = None) -> dict | None:
    """DIR trained with the config as given (when `train`), or at least its sample store prepared;
    `states_from`: a store of the same model whose trunk states are linked, not computed."""
    from ray_jobs.train import run as train_run

    report = _train_report(workdir)
    if report is not None:
        if report.get("config_sha256") != config.sha256():
            log(f"note: {workdir.root} was trained with a different configuration (sha256 {report.get('config_sha256', '?')[:12]})")
        return report
    if train:
        uri = keep_own_registry(workdir.root, "the evaluation's own training")
        log(f"{workdir.root} has no reports/train.json: training the APA shards first, registered in the work dir's "
            f"own MLflow store {uri} (never in a deployment's)")
        return train_run(config, workdir, states_from=states_from)
    if not all(workdir.split(name).exists() for name in SPLITS):
        log(f"preparing the sample store of {workdir.root}")
        tokenizer = load_tokenizer(config.model)
        prepare(config, workdir, None, tokenizer, states_from=states_from, compute=StorePass(config, workdir, tokenizer))
    return None


def _sample_users(workdir: Workdir) -> dict[str, set[str]]:
    return {name: set(read_parquet(workdir.split(name))[["sample_id", "user_id"]].itertuples(index=False, name=None))
            for name in SPLITS if workdir.split(name).exists()}


def _forget_in(config: Config, workdir: Workdir, users: list[str], request_id: str) -> list[dict]:
    from ray_jobs.forget import process

    new_request(workdir, users, [], request_id, source="evaluate")
    return process(config, workdir)


def ensure_baseline(config: Config, workdir: Workdir, source: Workdir, label: str) -> dict:
    """A baseline work dir trained on a copy of `source`'s current store, reused when present."""
    from ray_jobs.train import run as train_run

    report = _train_report(workdir)
    marker = workdir.path("baseline.json")
    if report is not None:
        trained_as = json.loads(marker.read_text()) if marker.exists() else {"config_sha256": report.get("config_sha256")}
        if trained_as.get("baseline_sha256") != baseline_sha256(config) and trained_as.get("config_sha256") != config.sha256():
            raise EvaluationError(f"baseline {label} in {workdir.root} was trained with another configuration: "
                                  f"delete that folder to train it again")
        # Samples the source has forgotten since the baseline was built must go from the baseline too.
        ours, theirs = _sample_users(workdir), _sample_users(source)
        extra = {user for name, pairs in ours.items() for _, user in pairs - theirs.get(name, set())}
        if extra:
            log(f"baseline {label}: {len(extra)} user(s) forgotten in {source.root} since it was trained; forgetting them here too")
            _forget_in(config, workdir, sorted(extra), f"sync-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}")
        log(f"baseline {label}: reusing {workdir.root} (adapter set v{report['adapter_set_version']})")
        return report
    copy_store(source, workdir)  # as it is now (also over a half-trained copy): forgotten samples are gone
    log(f"baseline {label}: training {config.partition.method} partition, {config.adapter.kind} adapters into {workdir.root}")
    report = train_run(config, workdir)
    write_json(marker, {"baseline": label, "baseline_sha256": baseline_sha256(config), "config_sha256": config.sha256()})
    return report


# --- scoring -----------------------------------------------------------------------------------------


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

    def __init__(self, config: Config, workdir: Workdir, test, out: Path, threads: int):
        self.workdir, self.out, self.threads = workdir, out, threads
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
        log(f"{name:<16} AUC {value:.4f}   {latency:8.2f} ms/sample   ({method}, {len(files)} adapter(s))")
        return {"auc": value, "n_test": len(self.labels), "latency_ms": round(latency, 3),
                "latency_ms_mean": round(float(out["seconds_per_sample"].sum()) * 1000 / len(self.labels), 3),
                "aggregate": method, "adapters": len(files), "predictions": str(path.relative_to(self.out.parents[1])),
                "adapter_set_version": live.set.version}


# --- forget cost ------------------------------------------------------------------------------------


def _audits(workdir: Workdir, request_prefix: str = "") -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted(workdir.path("audit").glob("*.json"))]
    return [r for r in records if r.get("request_id", "").startswith(request_prefix)]


def forget_user_order(config: Config, workdir: Workdir) -> list[str]:
    """Training users in a seeded order: the first one a work dir still holds is the one to forget."""
    users = sorted(set(read_parquet(workdir.split("train"))["user_id"].astype(str)))
    return sorted(users, key=lambda u: stable_hash("forget-cost", config.seed, u))


def forget_cost(config: Config, workdir: Workdir, mode: str, users: list[str], request_prefix: str, label: str) -> dict | None:
    """Seconds of forgetting one user in `workdir` (audit records, or one measured forget) against
    its full train job."""
    audits = _audits(workdir, request_prefix)
    if not audits and mode == "measure":
        held = set(read_parquet(workdir.split("train"))["user_id"].astype(str))
        user = next((u for u in users if u in held), None)
        if user is None:
            log(f"{label}: no training user left to forget; forget cost not measured")
            return None
        log(f"{label}: measuring the cost of forgetting one training user in {workdir.root}")
        started = time.time()
        _forget_in(config, workdir, [user], FORGET_COST_REQUEST)
        log(f"{label}: forgot one user in {time.time() - started:.1f}s")
        audits = _audits(workdir, request_prefix)
    report = _train_report(workdir)
    if not audits or report is None:
        return None
    seconds = [sum(a["seconds"].values()) for a in audits]
    forget_seconds = float(np.mean(seconds))
    full = float(report["seconds"])
    return {
        "forget_seconds": round(forget_seconds, 3), "full_retrain_seconds": round(full, 3),
        "ratio": round(full / forget_seconds, 3) if forget_seconds > 0 else None,
        "requests": len(audits), "shards": len(report["shards"]),
        "shards_retrained": float(np.mean([len(a["affected_shards"]) for a in audits])),
        "source": str(workdir.path("audit")), "train_report": str(workdir.path("reports", "train.json")),
    }


# --- the run ------------------------------------------------------------------------------------------


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


def _sha256_file(path) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).is_file() else None


def run(config: Config, workdir: Workdir, methods=None, forget_cost_mode: str = "measure",
        config_file: str | None = None, threads: int | None = None, states_from: Workdir | None = None) -> dict:
    """Evaluate `methods` (default: all) and write, plot and log the reports; returns eval.json."""
    global _STARTED
    started = _STARTED = time.time()
    methods = parse_methods(methods if methods is not None else list(DEFAULT_METHODS))
    if forget_cost_mode not in FORGET_COST_MODES:
        raise EvaluationError(f"forget cost mode {forget_cost_mode!r}: choose from {', '.join(FORGET_COST_MODES)}")
    threads = threads or max(1, int(config.inference.cpus_per_worker))  # per scoring worker: its CPU reservation
    apa_family = [m for m in methods if m in APA_METHODS or m == SHARDS or SHARD_METHOD.fullmatch(m)]
    baselines = [m for m in BASELINES if m in methods]
    log(f"methods: {', '.join(methods)}; work dir {workdir.root}")
    connect_ray(config, workdir)

    train_report = ensure_main(config, workdir, bool(apa_family), states_from)
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
    scorer = Scorer(config, workdir, test, out, threads)
    results: dict[str, dict] = {}
    costs: dict[str, dict] = {}

    if apa_family:
        with LiveSet(config, workdir) as live:
            names = _expand_shards(methods, list(live.files))
            samples = {int(k): v["samples"] for k, v in (train_report or {}).get("shards", {}).items()}
            if live.masked:
                log(f"note: shards {sorted(live.masked)} are masked (a forget is pending): mixtures leave them out")
            for name in (m for m in names if m in APA_METHODS):
                results[name] = scorer.score(name, config, live, APA_METHODS[name], live.masked)
                results[name]["notes"] = _apa_note(config, name, len(live.files), len(_audits(workdir)))
            for name in names:
                if match := SHARD_METHOD.fullmatch(name):
                    shard = int(match.group(1))
                    results[name] = scorer.score(name, config, live, "uniform", shards=[shard])
                    results[name]["notes"] = (f"APA shard {shard} alone ({samples.get(shard, '?')} training samples)"
                                              + (", masked: forget pending" if shard in live.masked else ""))
        if forget_cost_mode != "none":
            found = forget_cost(config, workdir, "existing", users, "", "apa")  # real requests DIR has served
            if found is None:  # else measured on a copy trained the same way: DIR itself stays as it is
                copy_config = baseline_config(config, "forget-cost")
                copy_dir = Workdir(workdir.path("baselines", "forget-cost"))
                if forget_cost_mode == "measure":
                    ensure_baseline(copy_config, copy_dir, workdir, "forget-cost (APA)")
                if _train_report(copy_dir) is not None:
                    found = forget_cost(copy_config, copy_dir, forget_cost_mode, users, FORGET_COST_REQUEST, "apa")
            if found is not None:
                costs["apa"] = found

    for name in baselines:
        derived = baseline_config(config, name)
        folder = Workdir(workdir.path("baselines", name))
        report = ensure_baseline(derived, folder, workdir, name)
        if name == "retrain":
            costs["retrain"] = {"forget_seconds": report["seconds"], "full_retrain_seconds": report["seconds"], "ratio": 1.0,
                                "requests": 0, "shards": 1, "shards_retrained": 1.0,
                                "source": "forgetting is retraining from scratch", "train_report": str(folder.path("reports", "train.json"))}
        elif forget_cost_mode != "none":
            # Before scoring, so that the AUC is that of the same state on every run.
            found = forget_cost(derived, folder, forget_cost_mode, users, FORGET_COST_REQUEST, name)
            if found is not None:
                costs[name] = found
        with LiveSet(derived, folder) as live:
            results[name] = scorer.score(name, derived, live, BASELINE_AGGREGATE[name], live.masked)
            results[name]["notes"] = _baseline_note(derived, name, len(live.files), report, len(_audits(folder)))
            results[name]["workdir"] = str(folder.root)
    floors, floors_skipped = score_floors(workdir, test, out)
    results.update(floors)
    paired = add_intervals(workdir, results, config.seed)

    retrain_seconds = costs.get("retrain", {}).get("full_retrain_seconds")
    for cost in costs.values():
        if retrain_seconds and cost["forget_seconds"]:
            cost["ratio_vs_retrain_baseline"] = round(retrain_seconds / cost["forget_seconds"], 3)
    order = [m for m in (*METHODS, *sorted((m for m in results if m.startswith("shard-")), key=lambda m: int(m[6:])), *FLOORS)
             if m in results]
    report = {
        "experiment": config.experiment, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": threads,
                    "python": platform.python_version(), "torch": torch.__version__,
                    "head_dtype": str(head_dtype(config.model, torch.device("cpu"))).removeprefix("torch.")},
        "config_file": str(config_file) if config_file else None, "config_file_sha256": _sha256_file(config_file),
        "config_sha256": config.sha256(), "workdir": str(workdir.root),
        "n_test": len(test), "n_positive": int(labels.sum()), "labels": "reports/predictions/labels.npy",
        "batch_size": PREDICT_BATCH, "methods": {m: results[m] for m in order},
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": config.seed, "level": 0.95,
                      "kind": "percentile, over test samples; resamples with one class skipped"},
        "paired": paired, "floors_skipped": floors_skipped,
        "forget_cost": costs, "seconds": None, "mlflow_run_id": None,
    }
    return _publish(config, workdir, report, started)


# --- no-model floors and bootstrap intervals --------------------------------------------------------


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
        log(skipped)
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
        log(f"{name:<16} AUC {rows[name]['auc']:.4f}")
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


def floor_verdict(report: dict) -> str:
    """One plain sentence: does one adapter on all the data beat both no-model floors?"""
    methods = report["methods"]
    if "retrain" not in methods:
        return "Retrain against the no-model floors: retrain was not evaluated in this run."
    floors = [f for f in ("floor-history", "floor-item") if f in methods]
    retrain = methods["retrain"]["auc"]
    against = " and ".join(f"{f} {_fmt(methods[f]['auc'])}" for f in floors)
    if len(floors) < 2:
        return f"Retrain against the no-model floors: only {against} could be computed ({report['floors_skipped']})."
    above = [f for f in floors if retrain > methods[f]["auc"]]
    clear = [f for f in floors if (p := report["paired"].get(f"retrain - {f}")) and p["ci95"] and p["ci95"][0] > 0]
    verdict = "yes" if len(above) == len(floors) else "no"
    return (f"**Does retrain beat both no-model floors? {verdict}.** Retrain AUC {_fmt(retrain)} against {against}"
            + (f", below {' and '.join(f for f in floors if f not in above)}" if verdict == "no" else "")
            + f". Beyond the noise (the paired 95% interval of retrain - floor above 0): {len(clear)} of {len(floors)} floors.")


def _apa_note(config: Config, name: str, shards: int, forgets: int) -> str:
    merge = {"apa": "attention, non-decomposed merge", "apa-decomposed": "attention, decomposed merge",
             "uniform": "uniform parameter averaging"}[name]
    attention = f" (tau {config.aggregate.tau:g}, {config.aggregate.neighbours} neighbours)" if name != "uniform" else ""
    note = f"K={shards} {config.partition.method} shards, {config.adapter.kind}; {merge}{attention}"
    return note + (f"; after {forgets} forget request(s) in its work dir" if forgets else "")


def _baseline_note(config: Config, name: str, shards: int, report: dict, forgets: int) -> str:
    samples = sum(s["samples"] for s in report["shards"].values())
    if name == "retrain":
        note = f"1 {config.adapter.kind} adapter on all {samples} training samples"
    elif name == "lmeraser":
        note = f"K={shards} adaptive clusters, prompt tuning ({config.adapter.num_virtual_tokens} tokens, lr {learning_rate(config):g}), routing to the nearest prototype"
    else:
        note = f"K={shards} {config.partition.method}-based shards, average of the K models' P(yes)"
    return note + (f"; after {forgets} forget request(s) in its work dir" if forgets else "")


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _fmt_interval(bounds, signed: bool = False) -> str:
    if not bounds:
        return "n/a"
    sign = "+" if signed else ""
    return f"[{bounds[0]:{sign}.4f}, {bounds[1]:{sign}.4f}]"


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        f"# Evaluation: {report['experiment']}",
        "",
        f"- date: {report['date']}",
        f"- machine: {machine['platform']}, {machine['cpu_count']} CPU(s), torch {machine['torch']} with "
        f"{machine['torch_threads']} thread(s) per scoring worker, Python {machine['python']}",
        f"- config: {report['config_file'] or '(in-process)'}"
        + (f" (file sha256 {report['config_file_sha256']})" if report["config_file_sha256"] else "")
        + f"; resolved config sha256 {report['config_sha256']}",
        f"- test split: {report['n_test']} samples, {report['n_positive']} positive; latency = wall time of "
        f"`components.aggregate.predict` per sample, measured inside the Ray Data scoring worker, median over batches "
        f"of {report['batch_size']} after each worker's warm-up batch",
        f"- work dir: {report['workdir']}; MLflow run {report['mlflow_run_id']} (\"evaluate\")",
        f"- intervals: 95% percentile bootstrap over the test samples, {report['bootstrap']['resamples']} resamples "
        f"(seed {report['bootstrap']['seed']}), the same resamples for every method",
        "",
        "| method | AUC | 95% interval | latency (ms/sample) | notes |",
        "|---|---:|---:|---:|---|",
    ]
    for name, row in report["methods"].items():
        lines.append(f"| {name} | {_fmt(row['auc'])} | {_fmt_interval(row['auc_ci95'])} | "
                     f"{_fmt(row['latency_ms'], 2)} | {row['notes']} |")
    lines += ["", floor_verdict(report)]
    if report["paired"]:
        lines += ["", "## Paired differences (same resampled test samples)", "",
                  "| difference | AUC difference | 95% interval | n |", "|---|---:|---:|---:|"]
        for name, pair in report["paired"].items():
            lines.append(f"| {name} | {pair['difference']:+.4f} | {_fmt_interval(pair['ci95'], signed=True)} | {pair['n']} |")
    if report["forget_cost"]:
        lines += [
            "",
            "## Forgetting one user against the full retrain",
            "",
            "| partition | forget (s) | full train job (s) | speedup | vs retrain baseline | shards retrained | source |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for name, cost in report["forget_cost"].items():
            lines.append(
                f"| {name} | {_fmt(cost['forget_seconds'], 1)} | {_fmt(cost['full_retrain_seconds'], 1)} | "
                f"{_fmt(cost['ratio'], 2)}x | {_fmt(cost.get('ratio_vs_retrain_baseline'), 2)}"
                f"{'x' if cost.get('ratio_vs_retrain_baseline') else ''} | "
                f"{cost['shards_retrained']:g} of {cost['shards']} | {cost['source']} |")
    return "\n".join(lines) + "\n"


def _publish(config: Config, workdir: Workdir, report: dict, started: float) -> dict:
    """eval.json, eval.md, the plots, and the MLflow run that carries them."""
    reports = workdir.path("reports")
    registry = Registry(config.experiment, workdir.root)
    run = registry.client.create_run(registry.experiment_id, run_name="evaluate",
                                     tags={"config_sha256": config.sha256(), "methods": ",".join(report["methods"])})
    run_id = report["mlflow_run_id"] = run.info.run_id
    try:
        aucs = {m: r["auc"] for m, r in report["methods"].items()}
        figure = bar_figure({m: (v if math.isfinite(v) else 0.0) for m, v in aucs.items()}, "AUC",
                            f"{config.experiment}: test AUC, 95% bootstrap intervals",
                            intervals={m: r["auc_ci95"] for m, r in report["methods"].items()})
        figure.axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
        figure.savefig(reports / "auc.png")
        close(figure)
        costs = report["forget_cost"]
        figure = grouped_bar_figure(
            {name: {"forget one user": c["forget_seconds"], "full train job": c["full_retrain_seconds"]} for name, c in costs.items()}
            or {"(no forget cost)": {}}, "seconds", f"{config.experiment}: forgetting vs full retrain")
        figure.savefig(reports / "cost.png")
        close(figure)
        report["seconds"] = round(time.time() - started, 2)
        write_json(reports / "eval.json", report)
        (reports / "eval.md").write_text(markdown(report))

        metrics = {f"auc_{m}": v for m, v in aucs.items()}
        metrics.update({f"latency_ms_{m}": r["latency_ms"] for m, r in report["methods"].items()})
        for m, r in report["methods"].items():
            if r["auc_ci95"]:
                metrics.update({f"auc_ci95_low_{m}": r["auc_ci95"][0], f"auc_ci95_high_{m}": r["auc_ci95"][1]})
        for pair in report["paired"].values():
            key = f"{pair['a']}_vs_{pair['b']}"
            metrics[f"auc_diff_{key}"] = pair["difference"]
            if pair["ci95"]:
                metrics.update({f"auc_diff_ci95_low_{key}": pair["ci95"][0], f"auc_diff_ci95_high_{key}": pair["ci95"][1]})
        for name, cost in costs.items():
            metrics.update({f"forget_seconds_{name}": cost["forget_seconds"], f"full_retrain_seconds_{name}": cost["full_retrain_seconds"]})
            if cost["ratio"]:
                metrics[f"forget_speedup_{name}"] = cost["ratio"]
        registry.log_metrics(run_id, {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)})
        registry.client.log_param(run_id, "n_test", report["n_test"])
        registry.client.log_param(run_id, "bootstrap", f"{BOOTSTRAP_RESAMPLES} resamples, seed {config.seed}")
        registry.client.log_param(run_id, "config_file", report["config_file"] or "(in-process)")
        for name in ("eval.json", "eval.md", "auc.png", "cost.png"):
            registry.client.log_artifact(run_id, str(reports / name), "evaluation")
        registry.client.set_terminated(run_id)
    except BaseException:
        registry.client.set_terminated(run_id, status="FAILED")
        raise
    log(f"report: {reports / 'eval.md'} (MLflow run {run_id}, {report['seconds']:.0f}s)")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("ray_jobs.evaluate", "Evaluate APA, its variants and the baselines on the test split.")
    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(DEFAULT_METHODS)} or shard-<k> (default: all)")
    parser.add_argument("--forget-cost", choices=FORGET_COST_MODES, default="measure",
                        help="measure: forget one user where no audit record exists yet; existing: only read audit "
                             "records; none: skip (default: measure)")
    parser.add_argument("--threads", type=int, help="torch threads of each scoring worker "
                        "(default: inference.cpus_per_worker, rounded down, at least 1)")
    parser.add_argument("--states-from", help="a work dir of the same model and data whose stored trunk states are "
                        "linked into a new work dir's store instead of computed (make bench: runs/store/<experiment>)")
    args, config, workdir = load_job(parser, argv, builds_store=True)
    try:
        methods = parse_methods(args.methods) if args.methods is not None else list(DEFAULT_METHODS)
        if args.threads is not None and args.threads < 1:
            raise EvaluationError("--threads must be at least 1")
        if args.states_from and not Path(args.states_from, "trunk").is_dir():
            raise EvaluationError(f"--states-from {args.states_from}: no stored trunk states there (no trunk/ folder)")
        report = run(config, workdir, methods, args.forget_cost, args.config, args.threads,
                     Workdir(Path(args.states_from)) if args.states_from else None)
    except (EvaluationError, SharedStorageError) as err:
        fail(str(err))
    print((workdir.path("reports", "eval.md")).read_text())
    print(json.dumps({m: round(r["auc"], 4) for m, r in report["methods"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
