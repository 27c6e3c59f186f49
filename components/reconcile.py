"""What the forget reconciler records and decides, without Ray (ray_jobs/reconcile.py runs it).

Per request the reconciler keeps `DIR/jobs/<request_id>.json`: attempts, the current job (its
submission id and status), every failure (when, in which state, why), the last error and the time
of the next retry. It is the only writer of these files; the forget job writes the request log
(`DIR/requests/`), so the two never overwrite each other's fields.

A failure's signature is the state the request was in and the job's error (its exception line,
or its exit code). Identical consecutive failures back off exponentially and, after
`max_identical_failures`, fail the request; a failure in a later state means the job made
progress, so the count starts again.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from components.store import Workdir, write_json
from components.unlearn import load_request, request_path, scrub

JOB_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass(frozen=True)
class RetryPolicy:
    max_identical_failures: int = 3
    backoff_s: float = 5.0
    backoff_max_s: float = 300.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """UNLEARN_FORGET_MAX_FAILURES, UNLEARN_FORGET_BACKOFF_S, UNLEARN_FORGET_BACKOFF_MAX_S override the defaults."""
        env = os.environ
        return cls(int(env.get("UNLEARN_FORGET_MAX_FAILURES", cls.max_identical_failures)),
                   float(env.get("UNLEARN_FORGET_BACKOFF_S", cls.backoff_s)),
                   float(env.get("UNLEARN_FORGET_BACKOFF_MAX_S", cls.backoff_max_s)))

    def delay(self, identical: int) -> float:
        return min(self.backoff_max_s, self.backoff_s * 2 ** max(0, identical - 1))


def job_record_path(workdir: Workdir, request_id: str) -> Path:
    return workdir.path("jobs", request_path(workdir, request_id).name)


def load_job_record(workdir: Workdir, request_id: str) -> dict:
    path = job_record_path(workdir, request_id)
    if path.exists():
        return json.loads(path.read_text())
    return {"request_id": request_id, "attempts": 0, "job": None, "failures": [], "last_error": None,
            "next_retry_at": None, "note": None}


def save_job_record(workdir: Workdir, record: dict) -> None:
    write_json(job_record_path(workdir, record["request_id"]), record)


def error_summary(message: str | None, exit_code: int | None) -> str:
    """One stable line for a failed job: its last exception line, else its exit code."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    exceptions = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*", line)]
    if exceptions:
        return exceptions[-1][:500]
    if exit_code is not None:
        return f"exit code {exit_code}" + (" (killed by SIGKILL: out of memory, node lost or killed)" if exit_code in (-9, 137) else "")
    return (lines[0] if lines else "unknown error")[:500]


def record_failure(record: dict, state: str, error: str, now: float, policy: RetryPolicy, retried_at: float) -> int:
    """Add a failure; set last_error and next_retry_at; returns the number of identical failures in a row."""
    # Ids, times and numbers differ between attempts of the same failure: they are not part of it.
    signature = f"{state}|" + re.sub(r"[0-9a-f]*[0-9][0-9a-f]*", "#", error)
    record["failures"] = (record["failures"] + [{"at": now, "state": state, "signature": signature, "error": error}])[-50:]
    identical = 0
    for failure in reversed(record["failures"]):
        if failure["signature"] != signature or failure["at"] <= retried_at:
            break
        identical += 1
    record["last_error"] = f"in state {state}: {error}"
    record["next_retry_at"] = now + policy.delay(identical)
    return identical


def request_status(workdir: Workdir, request_id: str) -> dict | None:
    """A request as GET /v1/forget/{id} shows it: its record (no plain ids) and the reconciler's view."""
    record = load_request(workdir, request_id)
    if record is None:
        return None
    jobs = load_job_record(workdir, request_id)
    job = jobs["job"]
    return {**scrub(record), "attempts": jobs["attempts"], "last_error": jobs["last_error"] or record.get("error"),
            "next_retry_at": jobs["next_retry_at"] if record["state"] not in ("done", "failed", "abandoned") else None,
            "job": {"submission_id": job["submission_id"], "status": job["status"]} if job else None,
            "note": jobs["note"] if record["state"] not in ("done", "abandoned") else None}


def summary(workdir: Workdir, requests: list[dict]) -> dict:
    """For /healthz: how many requests wait, and which failed (with their errors)."""
    failed = {r["request_id"]: r.get("error") for r in requests if r["state"] == "failed"}
    pending = [r["request_id"] for r in requests if r["state"] not in ("done", "failed", "abandoned")]
    oldest = min((r["created"] for r in requests if r["request_id"] in pending), default=None)
    return {"pending": len(pending), "oldest_pending_age_s": round(time.time() - oldest, 1) if oldest else None,
            "failed": failed}
