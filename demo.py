"""The whole story on the embedded defaults: `make demo` (or `python demo.py [--config FILE]`).

MovieLens-100K + SmolLM2-135M: the untuned model's AUC, K LoRA shards trained in parallel Ray
actors and registered in MLflow, a Ray Serve endpoint on 127.0.0.1, a prediction with its shard
weights, one user forgotten exactly (audit record and speedup against the full retrain), the
evaluation table, and a summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

from components.config import load_config
from components.metrics import auc
from components.model import load_base_model, load_tokenizer, make_deterministic, score_states
from components.store import Workdir, prepare, sample_states
from ray_jobs.common import connect_ray


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    config = load_config(args.config)
    workdir = Workdir(Path(args.workdir))
    shutil.rmtree(workdir.root, ignore_errors=True)  # the demo always starts from nothing
    summary = {}

    banner("1. Data, the frozen trunk's states, and the untuned base model")
    make_deterministic(2)
    tokenizer = load_tokenizer(config.model)
    model = load_base_model(config.model, config.seed, tokenizer)
    started = time.time()
    splits = prepare(config, workdir, model, tokenizer)
    test = splits["test"]
    base_scores = score_states(model, tokenizer, sample_states(config, workdir, test, model, tokenizer), config.model)
    summary["untuned_auc"] = auc(test["label"], base_scores)
    print(f"samples: train {len(splits['train'])}, valid {len(splits['valid'])}, test {len(test)} "
          f"(from {config.data.source}); prepared in {time.time() - started:.0f}s, trunk states in {workdir.trunk.root}")
    print(f"untuned {config.model.label} AUC on the test split: {summary['untuned_auc']:.4f}")
    del model

    banner("2. Train one LoRA adapter per shard in parallel Ray actors")
    from ray_jobs import train as train_job

    connect_ray()
    report = train_job.run(config, workdir)
    summary["train_seconds"] = report["seconds"]
    for shard, info in report["shards"].items():
        print(f"shard {shard}: {info['samples']} samples, {info['seconds']}s, registered as "
              f"{config.experiment}.shard-{shard} v{info['version']}")
    print(f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri sqlite:///{workdir.root / 'mlflow.db'} --port 5000")

    banner("3. Serve: per-request attention over the shard adapters, one forward pass")
    from ray import serve

    from serving.app import build_app
    from serving.client import RecommenderClient

    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app({"config": args.config, "workdir": str(workdir.root)}), blocking=False)
    client = RecommenderClient(f"http://127.0.0.1:{args.port}")
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if client.health().get("status") == "ok":
                break
        except Exception:  # noqa: BLE001 - the replica is still loading
            time.sleep(1)
    answer = client.predict(liked=["Star Wars (1977)", "Raiders of the Lost Ark (1981)", "Return of the Jedi (1983)"],
                            disliked=["Sleepless in Seattle (1993)"], candidates=[172, 181, 88])
    print(json.dumps(dataclasses.asdict(answer), indent=1, default=str))

    banner("4. Forget a user, exactly")
    from components.data import read_parquet
    from components.unlearn import new_request
    from ray_jobs import forget as forget_job

    user = read_parquet(workdir.shard_samples(0))["user_id"].iloc[0]
    request = new_request(workdir, [user], [], "demo-forget")
    print(f"request {request.request_id}: user's samples sit in shard(s) {request.affected_shards}")
    [audit] = forget_job.process(config, workdir)
    forget_seconds = sum(audit["seconds"].values())
    summary.update(forget_seconds=round(forget_seconds, 1), forget_speedup=round(report["seconds"] / forget_seconds, 2))
    print(json.dumps({k: audit[k] for k in ("request_id", "subject_hash", "affected_shards", "slice_restarted_from",
                                            "old_versions", "new_versions", "seconds", "scan")}, indent=1))
    print(f"forgetting took {forget_seconds:.1f}s against {report['seconds']:.1f}s for the full train job: "
          f"{summary['forget_speedup']}x faster")
    time.sleep(2 * config.serving.poll_interval_s + 1)
    print(f"serving now uses adapter set v{client.adapters()['adapter_set_version']}")

    banner("5. Evaluate")
    from ray_jobs import evaluate as evaluate_job

    evaluation = evaluate_job.run(config, workdir, evaluate_job.DEMO_METHODS)
    print((workdir.root / "reports" / "eval.md").read_text())
    serve.shutdown()

    banner("Summary")
    summary["eval"] = {m: {"auc": round(r["auc"], 4), "ci95": [round(x, 4) for x in r["auc_ci95"] or ()]}
                       for m, r in evaluation["methods"].items()}
    print(json.dumps(summary, indent=1))
    apa, floor = evaluation["methods"]["apa"], evaluation["methods"]["floor-history"]
    verdict = "above" if apa["auc"] > floor["auc"] else "NOT above"
    print(f"APA: AUC {apa['auc']:.4f} {_interval(apa)} on {evaluation['n_test']} test samples, {verdict} the history floor "
          f"(no model: the share of liked titles in the history) {floor['auc']:.4f} {_interval(floor)}; "
          f"untuned model {summary['untuned_auc']:.4f}")
    return 0


def _interval(row: dict) -> str:
    return "[{:.3f}, {:.3f}]".format(*row["auc_ci95"]) if row.get("auc_ci95") else ""


if __name__ == "__main__":
    raise SystemExit(main())
