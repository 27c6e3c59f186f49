"""The cost of forgetting one user against the full train job of the same work dir: read from
audit records where there are some, else measured by forgetting one training user (the same one
everywhere). For APA, DIR itself is never changed: the measure runs in a copy, DIR/baselines/forget-cost."""

from __future__ import annotations

import json
import time

import numpy as np

from components.baselines import baseline_config
from components.config import Config
from components.data import read_parquet, stable_hash
from components.store import Workdir
from ray_jobs.evaluation import Log
from ray_jobs.evaluation.baselines import ensure_baseline, forget_in, train_report

FORGET_COST_MODES = ("measure", "existing", "none")
FORGET_COST_REQUEST = "eval-forget-cost"  # the request id of a measuring forget in a baseline


def audits(workdir: Workdir, request_prefix: str = "") -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted(workdir.path("audit").glob("*.json"))]
    return [r for r in records if r.get("request_id", "").startswith(request_prefix)]


def forget_user_order(config: Config, workdir: Workdir) -> list[str]:
    """Training users in a seeded order: the first one a work dir still holds is the one to forget."""
    users = sorted(set(read_parquet(workdir.split("train"))["user_id"].astype(str)))
    return sorted(users, key=lambda u: stable_hash("forget-cost", config.seed, u))


def forget_cost(config: Config, workdir: Workdir, mode: str, users: list[str], request_prefix: str, label: str,
                log: Log) -> dict | None:
    """Seconds of forgetting one user in `workdir` (audit records, or one measured forget) against
    its full train job."""
    found = audits(workdir, request_prefix)
    if not found and mode == "measure":
        held = set(read_parquet(workdir.split("train"))["user_id"].astype(str))
        user = next((u for u in users if u in held), None)
        if user is None:
            log(f"{label}: no training user left to forget; forget cost not measured")
            return None
        log(f"{label}: measuring the cost of forgetting one training user in {workdir.root}")
        started = time.time()
        forget_in(config, workdir, [user], FORGET_COST_REQUEST)
        log(f"{label}: forgot one user in {time.time() - started:.1f}s")
        found = audits(workdir, request_prefix)
    report = train_report(workdir)
    if not found or report is None:
        return None
    seconds = [sum(a["seconds"].values()) for a in found]
    forget_seconds = float(np.mean(seconds))
    full = float(report["seconds"])
    return {
        "forget_seconds": round(forget_seconds, 3), "full_retrain_seconds": round(full, 3),
        "ratio": round(full / forget_seconds, 3) if forget_seconds > 0 else None,
        "requests": len(found), "shards": len(report["shards"]),
        "shards_retrained": float(np.mean([len(a["affected_shards"]) for a in found])),
        "source": str(workdir.path("audit")), "train_report": str(workdir.path("reports", "train.json")),
    }


def apa_forget_cost(config: Config, workdir: Workdir, mode: str, users: list[str], log: Log) -> dict | None:
    """APA's: the real requests DIR has served, else measured on a copy trained the same way."""
    found = forget_cost(config, workdir, "existing", users, "", "apa", log)
    if found is None:  # DIR itself stays as it is
        copy_config = baseline_config(config, "forget-cost")
        copy_dir = Workdir(workdir.path("baselines", "forget-cost"))
        if mode == "measure":
            ensure_baseline(copy_config, copy_dir, workdir, "forget-cost (APA)", log)
        if train_report(copy_dir) is not None:
            found = forget_cost(copy_config, copy_dir, mode, users, FORGET_COST_REQUEST, "apa", log)
    return found


def retrain_cost(report: dict, folder: Workdir) -> dict:
    """The retrain baseline's: forgetting is retraining from scratch."""
    return {"forget_seconds": report["seconds"], "full_retrain_seconds": report["seconds"], "ratio": 1.0,
            "requests": 0, "shards": 1, "shards_retrained": 1.0,
            "source": "forgetting is retraining from scratch", "train_report": str(folder.path("reports", "train.json"))}
