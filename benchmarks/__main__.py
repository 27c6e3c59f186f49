"""Every benchmark in sequence (`make bench`, `make bench-full`), then one summary of ratios.

Every figure of the summary is a ratio to its baseline measured in the same run.

    python -m benchmarks                       # quick (make bench): configs/demo.yaml's size, under an hour on 2 cores
    python -m benchmarks --size full           # make bench-full: configs/movielens.yaml, the paper's scale
    python -m benchmarks --only bench_forget   # a subset (names below, "eval" for the evaluation)
    python -m benchmarks --skip eval

Order: simulate, bench_data, bench_pass, bench_train, bench_serving, bench_forget, bench_forget_load,
eval, bench_embedding. SIZES below says what each size passes to each benchmark:
- quick: every benchmark and the evaluation at configs/demo.yaml (384 / 128 / 256 samples, one
  epoch, the 4-layer head, K=4, R=4), the evaluation without the user-partition and LMEraser baselines (two
  more trainings), three users forgotten, a smaller load test (120 forget posts to K=4 shards of
  512 samples) and a 200,000-row data log. The ratios hold at this size (each is against a baseline
  of the same run); the AUCs are the demo's, level with the floors (docs/results.md). 2026-12-08,
  2-core AVX-512 Xeon, fresh store: 22.6 minutes (the evaluation 5.4 of them, the load test 4.2).
- full: configs/movielens.yaml (4096 / 500 / 1000 samples, the 8-layer head), bench_train and
  bench_forget on 512-sample subsets of the same draw, the thousand-request load test at K=16. On
  an idle 2-core AVX-512 machine (2026-12-03): the store 25 minutes, the evaluation's five
  trainings 30-39 minutes each, about 260 minutes in all (docs/results.md).

First the shared sample store runs/store/<experiment> (benchmarks/common.shared_store) is prepared
once: every sample's trunk state, computed a single time and linked by every benchmark and the
evaluation. Each benchmark runs as its own process (`python -m benchmarks.<name>`, its own local
Ray, its memory freed when it ends); one that is missing is skipped with a message. A benchmark
reports its figures by writing {"figures": [...]} to the file named by $BENCH_RESULT
(benchmarks/common.py). The evaluation is `python -m ray_jobs.evaluate --config C --states-from
runs/store/<experiment>` into runs/bench/<experiment> (trained once, reused by later runs); its
AUCs are shown against the `retrain` baseline's and its latencies against the single adapter's.
The summary ends with the trunk stage's share of a train job before and after the pass batched by
token count, derived from bench_pass's and bench_train's measurements (`trunk_share`).
bench_embedding runs last, on the evaluation's trained work dir. bench_forget_load posts forget
requests over HTTP to the served tiny model (its own config: configs/tiny.yaml). `--only
bench_shards` runs the K sweep (K = 4, 16, 64 on the tiny model, docs/scale.md), which neither size
runs for its time. `simulate` runs first (15 s of CPU): the internet-scale simulation of
docs/scale.md at its recommended plan against SISA and full retraining (no model, no store; its
figures are simulated).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ENV, MOVIELENS, ROOT, bench_dir, figure, shared_store, table
from components.config import load_config

EVAL = "eval"
# bench_embedding reads eval's work dir
ORDER = ("simulate", "bench_data", "bench_pass", "bench_train", "bench_serving", "bench_forget", "bench_forget_load", EVAL,
         "bench_embedding")
# Run only when named in --only: the K sweep (K = 4, 16, 64 trained, served and forgotten on the tiny model)
# takes longer than a benchmark of the default run should (docs/scale.md, The K sweep).
OPTIONAL = ("bench_shards",)
# Each size: its default config and what it passes to each benchmark beside --config.
SIZES = {
    "quick": {"config": ROOT / "configs" / "demo.yaml",
              "args": {"bench_data": ["--rows", "200000"], "bench_forget": ["--users", "3"],
                       "bench_forget_load": ["--requests", "120", "--seconds", "20", "--shards", "4", "--n-train", "512",
                                             "--idle-seconds", "10"]},
              "eval_methods": "retrain,sisa,apa,apa-decomposed,uniform,shards"},
    "full": {"config": MOVIELENS,
             "args": {"bench_train": ["--n-train", "512"], "bench_forget": ["--n-train", "512", "--n-valid", "64"]},
             "eval_methods": None},
}
# They get no --config: simulate reads none, the load test and the K sweep run the tiny model
NO_CONFIG = ("simulate", "bench_forget_load", "bench_shards")


def run_module(name: str, config: Path, extra: list[str]) -> tuple[int, dict | None, float]:
    path = Path(__file__).with_name(f"{name}.py")
    if not path.exists():
        print(f"\n### {name}: skipped ({path.relative_to(ROOT)} does not exist yet)", flush=True)
        return 0, None, 0.0
    result_file = bench_dir() / "results" / f"{name}.json"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.unlink(missing_ok=True)
    options = ([] if name in NO_CONFIG else ["--config", str(config)]) + extra
    print(f"\n### {name}: python -m benchmarks.{name} {' '.join(options)}", flush=True)
    started = time.time()
    rc = subprocess.call([sys.executable, "-m", f"benchmarks.{name}", *options], cwd=ROOT,
                         env={**os.environ, **ENV, "BENCH_RESULT": str(result_file), "BENCH_DIR": str(bench_dir())})
    result = json.loads(result_file.read_text()) if result_file.exists() else None
    if rc == 0 and result is None:
        print(f"### {name}: finished without a result file ($BENCH_RESULT); its figures are in its output above")
    return rc, result, time.time() - started


def run_evaluation(config: Path, methods: str | None, forget_cost: str, store: Path) -> tuple[int, dict | None, float]:
    workdir = bench_dir() / load_config(config).experiment
    command = [sys.executable, "-m", "ray_jobs.evaluate", "--config", str(config), "--workdir", str(workdir),
               "--forget-cost", forget_cost, "--states-from", str(store)]
    if methods:
        command += ["--methods", methods]
    print(f"\n### evaluation: {' '.join(command[1:])}", flush=True)
    started = time.time()
    rc = subprocess.call(command, cwd=ROOT, env={**os.environ, **ENV})
    report_file = workdir / "reports" / "eval.json"
    if rc != 0 or not report_file.exists():
        return rc or 1, None, time.time() - started
    return rc, {"figures": evaluation_figures(json.loads(report_file.read_text()))}, time.time() - started


def evaluation_figures(report: dict) -> list[dict]:
    """AUC of every method against the retrain baseline's, latency against one adapter's, and the
    forget cost of every partitioning against its full retrain."""
    methods = report["methods"]
    figures = []
    reference = "retrain" if "retrain" in methods else next(iter(methods))
    base_auc, base_latency = methods[reference]["auc"], methods[reference]["latency_ms"]
    for name, row in methods.items():
        if math.isfinite(row["auc"]):
            figures.append(figure(f"AUC {name}", row["auc"], "", f"AUC {reference}", base_auc))
    for name, row in methods.items():
        figures.append(figure(f"latency {name}", row["latency_ms"], "ms/sample", f"latency {reference}", base_latency,
                              higher_is_better=False))
    for name, cost in report.get("forget_cost", {}).items():
        figures.append(figure(f"forget one user, {name}", cost["forget_seconds"], "s", "its full train job",
                              cost["full_retrain_seconds"], higher_is_better=False))
    return figures


def trunk_share(outcomes: dict) -> list[dict]:
    """The trunk stage's share of a train job's wall time, before (the store's pass one prompt at a
    time, as the driver ran it before the Ray Data pass) and after (prompts batched by token count,
    as each Ray Data actor runs them): bench_pass's prompts/s in one process on model.trunk_threads
    (what the configs' one actor on both cores of a 2-core machine does, less its start-up) applied to
    every prompt of bench_train's job (all three splits go through the trunk), beside that job's
    measured wall time (its trunk states linked)."""
    results = {name: outcomes[name][1] for name in ("bench_pass", "bench_train") if name in outcomes}
    if len(results) < 2 or None in results.values():
        return []
    batched = next(f for f in results["bench_pass"]["figures"] if f["name"] == "trunk pass, batched by token count")
    job = next(f for f in results["bench_train"]["figures"] if f["name"].startswith("train job wall time"))
    data = results["bench_train"]["config"]["data"]
    prompts = data["n_train"] + data["n_valid"] + data["n_test"]

    def share(prompts_per_second: float) -> float:
        return prompts / prompts_per_second / (prompts / prompts_per_second + job["value"])

    return [figure(f"trunk share of a train job ({prompts} prompts), batched by token count", share(batched["value"]), "",
                   "one prompt at a time", share(batched["baseline_value"]), higher_is_better=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    names = ORDER + OPTIONAL
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(names)} ({', '.join(OPTIONAL)} only when named)")
    parser.add_argument("--skip", help="comma-separated benchmarks to leave out")
    parser.add_argument("--size", choices=tuple(SIZES), default="quick",
                        help="quick (default, make bench: under an hour on 2 cores) or full (make bench-full: the paper's scale)")
    parser.add_argument("--config", help="config of every benchmark and the evaluation (default: the size's)")
    parser.add_argument("--eval-methods", help="--methods for the evaluation (default: the size's; full: all)")
    parser.add_argument("--eval-forget-cost", default="none", choices=("measure", "existing", "none"),
                        help="--forget-cost of the evaluation (default none: bench_forget measures forgetting; "
                             "measure adds a forget per partitioning and an extra APA train job)")
    args = parser.parse_args(argv)
    chosen = [n.strip() for n in args.only.split(",")] if args.only else list(ORDER)
    skipped = [n.strip() for n in args.skip.split(",")] if args.skip else []
    unknown = [n for n in chosen + skipped if n not in names]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}: choose from {', '.join(names)}")
    chosen = [n for n in names if n in chosen and n not in skipped]
    for key, value in ENV.items():
        os.environ.setdefault(key, value)

    started = time.time()
    size = SIZES[args.size]
    config = Path(args.config or size["config"])
    store = None
    if set(chosen) - {"bench_serving", "bench_data", *NO_CONFIG}:  # they make up their own prompts and data
        store = shared_store(load_config(config)).root
        print(f"shared sample store {store} ready ({time.time() - started:.0f}s)", flush=True)
    outcomes = {}
    for name in chosen:
        if name == EVAL:
            outcomes[name] = run_evaluation(config, args.eval_methods or size["eval_methods"], args.eval_forget_cost, store)
        else:
            outcomes[name] = run_module(name, config, size["args"].get(name, []))

    print(f"\n\n######## summary ({time.time() - started:.0f}s; every ratio is against a baseline measured in this run,"
          f" oriented so that bigger is better)", flush=True)
    failed = []
    for name, (rc, result, seconds) in outcomes.items():
        if rc != 0:
            failed.append(name)
            print(f"\n== {name}: FAILED (exit code {rc}) after {seconds:.0f}s")
        elif result is not None:
            print("\n" + table(f"{name} ({seconds:.0f}s)", result["figures"]))
    if derived := trunk_share(outcomes):
        outcomes["derived"] = 0, {"figures": derived}, 0.0
        print("\n" + table("derived from bench_pass and bench_train", derived))
    missed = [f"{n}: {f['name']}" for n, (_, r, _) in outcomes.items() if r for f in r["figures"] if f.get("ok") is False]
    if missed:
        print("\ntargets missed:\n  " + "\n  ".join(missed))
    summary = {n: {"rc": rc, "seconds": round(s, 1), "figures": r["figures"] if r else None} for n, (rc, r, s) in outcomes.items()}
    (bench_dir() / "results").mkdir(parents=True, exist_ok=True)
    (bench_dir() / "results" / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\nresults: {bench_dir() / 'results'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
