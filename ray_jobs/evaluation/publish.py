"""The evaluation's report published: eval.json, eval.md, the AUC and cost plots in DIR/reports,
and the MLflow run named "evaluate" that carries them with one metric per number."""

from __future__ import annotations

import math
import time
from pathlib import Path

from components.config import Config
from components.eval_report import markdown
from components.evaluation import BOOTSTRAP_RESAMPLES
from components.metrics import bar_figure, grouped_bar_figure
from components.registry import Registry
from components.store import Workdir, write_json
from ray_jobs.evaluation import Log


def publish(config: Config, workdir: Workdir, report: dict, log: Log) -> dict:
    """eval.json, eval.md, the plots, and the MLflow run that carries them."""
    reports = workdir.path("reports")
    registry = Registry(config.experiment, workdir.root)
    run = registry.client.create_run(registry.experiment_id, run_name="evaluate",
                                     tags={"config_sha256": config.sha256(), "methods": ",".join(report["methods"])})
    run_id = report["mlflow_run_id"] = run.info.run_id
    try:
        _plots(config, report, reports)
        report["seconds"] = round(time.time() - log.started, 2)
        write_json(reports / "eval.json", report)
        (reports / "eval.md").write_text(markdown(report))
        registry.log_metrics(run_id, {k: v for k, v in _metrics(report).items() if v is not None and math.isfinite(v)})
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


def _plots(config: Config, report: dict, reports: Path) -> None:
    """auc.png (each AUC with its interval) and cost.png (forgetting one user against the full train job)."""
    figure = bar_figure({m: (r["auc"] if math.isfinite(r["auc"]) else 0.0) for m, r in report["methods"].items()}, "AUC",
                        f"{config.experiment}: test AUC, 95% bootstrap intervals",
                        intervals={m: r["auc_ci95"] for m, r in report["methods"].items()})
    figure.axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
    figure.savefig(reports / "auc.png")
    figure = grouped_bar_figure(
        {name: {"forget one user": c["forget_seconds"], "full train job": c["full_retrain_seconds"]}
         for name, c in report["forget_cost"].items()}
        or {"(no forget cost)": {}}, "seconds", f"{config.experiment}: forgetting vs full retrain")
    figure.savefig(reports / "cost.png")


def _metrics(report: dict) -> dict[str, float | None]:
    """The report's numbers under MLflow metric names: auc_<method>, its interval, the paired
    differences, the forget cost."""
    metrics = {f"auc_{m}": r["auc"] for m, r in report["methods"].items()}
    metrics.update({f"latency_ms_{m}": r["latency_ms"] for m, r in report["methods"].items()})
    for m, r in report["methods"].items():
        if r["auc_ci95"]:
            metrics.update({f"auc_ci95_low_{m}": r["auc_ci95"][0], f"auc_ci95_high_{m}": r["auc_ci95"][1]})
    for pair in report["paired"].values():
        key = f"{pair['a']}_vs_{pair['b']}"
        metrics[f"auc_diff_{key}"] = pair["difference"]
        if pair["ci95"]:
            metrics.update({f"auc_diff_ci95_low_{key}": pair["ci95"][0], f"auc_diff_ci95_high_{key}": pair["ci95"][1]})
    for name, cost in report["forget_cost"].items():
        metrics.update({f"forget_seconds_{name}": cost["forget_seconds"], f"full_retrain_seconds_{name}": cost["full_retrain_seconds"]})
        if cost["ratio"]:
            metrics[f"forget_speedup_{name}"] = cost["ratio"]
    return metrics
