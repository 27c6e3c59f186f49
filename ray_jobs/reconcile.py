"""The forget reconciler: it owns every accepted forget request of a work dir until the request is
done (or visibly failed), with nobody watching.

It runs as a detached Ray actor (one per work dir and cluster, restarted by Ray if its process or
node dies; the Serve replicas re-create it if it is gone) and ticks every second:

- a request not done whose job is not running (never submitted, failed, stopped, killed, its node
  lost) gets a new Ray job `python -m ray_jobs.forget --request-id ...` (the entrypoint a KubeRay
  RayJob uses), visible in `ray job list` with its logs, after a backoff that grows with identical
  failures; the job resumes the round from its recorded state and coalesces every pending request;
- after `max_identical_failures` identical failures the request (and its round) is `failed`, its
  shards stay masked, and the error goes to the request log, the audit record and the log here.

Only one reconciler acts on a work dir at a time (a lease in DIR/jobs/lease; others stand by), and
it submits nothing while another process holds the round lease: jobs started elsewhere (a RayJob,
the CLI) are left to finish, and their requests are taken over if they die.

    python -m ray_jobs.reconcile --config FILE --workdir DIR     # start it on the cluster (RAY_ADDRESS)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import sys
import threading
import time
import uuid
from pathlib import Path

import ray

from components.config import OFFLINE_ENV
from components.lease import Lease
from components.reconcile import JOB_TERMINAL, RetryPolicy, error_summary, load_job_record, record_failure, save_job_record
from components.store import Workdir, write_json
from components.unlearn import (
    all_requests,
    current_round,
    fail_request,
    load_request,
    pending_requests,
    round_holder,
    round_lock,
    round_path,
)

logger = logging.getLogger("ray.serve")  # Serve's logger: the lines land in the actor's log either way
NAMESPACE = "exact-unlearning"
ROOT = Path(__file__).resolve().parents[1]
# What the forget jobs need from the environment the reconciler was started in.
FORWARDED_ENV = (*OFFLINE_ENV, "UNLEARN_CACHE", "MLFLOW_TRACKING_URI", "UNLEARN_FORGET_KILL_AT",
                 "UNLEARN_FORGET_MAX_FAILURES", "UNLEARN_FORGET_BACKOFF_S", "UNLEARN_FORGET_BACKOFF_MAX_S")
LEASE_TTL_S = 30.0


class Reconciler:
    def __init__(self, config_path: str, workdir: str, policy: RetryPolicy | None = None):
        self.config_path, self.workdir = str(config_path), Workdir(Path(workdir))
        self.policy = policy or RetryPolicy.from_env()
        self.lease = Lease(self.workdir.path("jobs", "lease"), LEASE_TTL_S, role="forget reconciler")
        self._client = None
        self.last_tick: float | None = None
        self.last_error: str | None = None

    # --- Ray's job API ---------------------------------------------------------------------------
    def client(self):
        if self._client is None:  # the dashboard may still be starting: the next tick tries again
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(os.environ.get("RAY_ADDRESS") or ray.get_runtime_context().gcs_address)
        return self._client

    def _job(self, submission_id: str) -> tuple[str, str | None, int | None]:
        """(status, message, driver exit code); LOST if the cluster no longer knows the job."""
        try:
            info = self.client().get_job_info(submission_id)
        except RuntimeError as err:  # the job server answers 404 for a job it does not know
            if "404" in str(err) or "does not exist" in str(err):
                return "LOST", "the job is unknown to the cluster (head restarted?)", None
            raise
        return str(info.status.value if hasattr(info.status, "value") else info.status), info.message, info.driver_exit_code

    def _submit(self, submission_id: str, request_ids: list[str]) -> None:
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env["UNLEARN_FORGET_SUBMISSION_ID"] = submission_id
        entrypoint = " ".join(map(shlex.quote, [sys.executable, "-m", "ray_jobs.forget", "--config", self.config_path,
                                                "--workdir", str(self.workdir.root), "--request-id", request_ids[0]]))
        self.client().submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env={"env_vars": env},
                                 metadata={"workdir": str(self.workdir.root)[:200], "requests": ",".join(request_ids)[:200]})

    # --- one pass -----------------------------------------------------------------------------------
    def tick(self) -> None:
        if not self.lease.acquire():
            return  # another reconciler owns this work dir
        current_path = self.workdir.path("jobs", "current.json")
        current = json.loads(current_path.read_text()) if current_path.exists() else None
        if current and not current.get("settled"):
            status, message, exit_code = self._job(current["submission_id"])
            if status != current["status"]:
                current["status"] = status
                self._update_job_status(current)
                write_json(current_path, current)
            if status not in JOB_TERMINAL and status != "LOST":
                self._join(current)
                return  # pending or running: it carries every pending request
            self._settle(current, status, message, exit_code)
            current["settled"] = True
            write_json(current_path, current)

        pending = pending_requests(self.workdir)
        if not pending:
            return
        round_ = current_round(self.workdir)
        if round_ and round_.get("failed"):
            return self._note(pending, f"waiting: round {round_['round_id']} of request(s) {', '.join(round_['request_ids'])} "
                                       f"failed; an operator retries or abandons it")
        if (holder := round_holder(self.workdir)) is not None:
            return self._note(pending, f"waiting: a round is running ({holder.get('job')} on {holder.get('host')})")
        records = [load_job_record(self.workdir, r["request_id"]) for r in pending]
        if max((j["next_retry_at"] or 0) for j in records) > time.time():
            return
        ids = [r["request_id"] for r in pending]
        submission_id, now = f"forget-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}", time.time()
        # Recorded before submitting: if this process dies in between, the next tick finds the id
        # unknown to the cluster (LOST) and submits again; it never loses track of a running job.
        write_json(current_path, {"submission_id": submission_id, "request_ids": ids, "submitted_at": now,
                                  "status": "PENDING", "settled": False})
        for jobs in records:
            jobs.update(attempts=jobs["attempts"] + 1, note=None, next_retry_at=None,
                        job={"submission_id": submission_id, "status": "PENDING", "submitted_at": now})
            save_job_record(self.workdir, jobs)
        try:
            self._submit(submission_id, ids)
        except Exception:
            self._client = None  # job server down or refusing: the next tick settles this as LOST and backs off
            raise
        logger.info("forget: submitted Ray job %s for request(s) %s", submission_id, ", ".join(ids))

    def _join(self, current: dict) -> None:
        """Requests recorded while the job runs: it coalesces them into its next round, so show them its job."""
        late = [r["request_id"] for r in pending_requests(self.workdir) if r["request_id"] not in current["request_ids"]]
        for request_id in late:
            jobs = load_job_record(self.workdir, request_id)
            jobs.update(attempts=jobs["attempts"] + 1, note=None,
                        job={"submission_id": current["submission_id"], "status": current["status"],
                             "submitted_at": current["submitted_at"]})
            save_job_record(self.workdir, jobs)
        if late:
            current["request_ids"] += late
            current["joined"] = current.get("joined", []) + late
            write_json(self.workdir.path("jobs", "current.json"), current)

    def _note(self, pending: list[dict], note: str) -> None:
        for request in pending:
            jobs = load_job_record(self.workdir, request["request_id"])
            if jobs["note"] != note:
                jobs["note"] = note
                save_job_record(self.workdir, jobs)

    def _update_job_status(self, current: dict) -> None:
        for request_id in current["request_ids"]:
            jobs = load_job_record(self.workdir, request_id)
            if jobs["job"] and jobs["job"]["submission_id"] == current["submission_id"]:
                jobs["job"]["status"] = current["status"]
                save_job_record(self.workdir, jobs)

    def _settle(self, current: dict, status: str, message: str | None, exit_code: int | None) -> None:
        """The job ended: every request it was to carry that is not done has failed once more."""
        now, to_fail = time.time(), {}
        for request_id in current["request_ids"]:
            request = load_request(self.workdir, request_id)
            if request is None or request["state"] in ("done", "failed", "abandoned"):
                continue
            if status == "SUCCEEDED" and request_id in current.get("joined", []):
                continue  # recorded after the job's last look at the queue: the next job takes it, no failure
            jobs = load_job_record(self.workdir, request_id)
            error = "the job ended without finishing the request" if status == "SUCCEEDED" else error_summary(message, exit_code)
            identical = record_failure(jobs, request["state"], error, now, self.policy, request.get("retried_at", 0))
            jobs["last_error"] = f"in state {request['state']}: job {current['submission_id']} {status}: {error}"
            save_job_record(self.workdir, jobs)
            logger.warning("forget request %s: %s (in state %s; %d identical failure(s); retry at %s)", request_id, error,
                           request["state"], identical, time.strftime("%H:%M:%S", time.localtime(jobs["next_retry_at"])))
            if identical >= self.policy.max_identical_failures:
                to_fail[request_id] = jobs["last_error"]
        if to_fail:
            self._fail(to_fail)

    def _fail(self, errors: dict[str, str]) -> None:
        """Mark requests (and the rest of their round) failed, under the round lock so no job is mid-round."""
        with round_lock(self.workdir, job="forget reconciler") as held:
            if not held:
                return  # someone is running a round right now: not stuck after all
            round_ = current_round(self.workdir)
            ids = dict(errors)
            if round_ and set(errors) & set(round_["request_ids"]):
                reason = next(iter(errors.values()))
                ids.update({r: f"its round {round_['round_id']} failed: {reason}" for r in round_["request_ids"] if r not in ids})
                round_["failed"] = reason
                write_json(round_path(self.workdir), round_)
            for request_id, error in ids.items():
                request = load_request(self.workdir, request_id)
                if request is None or request["state"] in ("done", "failed", "abandoned"):
                    continue
                record = fail_request(self.workdir, request, error)
                jobs = load_job_record(self.workdir, request_id)
                jobs.update(next_retry_at=None, last_error=error)
                save_job_record(self.workdir, jobs)
                write_json(self.workdir.path("audit", f"{request_id}.json"), {
                    "request_id": request_id, "subject_hash": record["subject_hash"], "source": record["source"],
                    "state": "failed", "failed_at": record["failed_at"], "error": error, "affected_shards": record["affected_shards"],
                    "attempts": jobs["attempts"], "failures": jobs["failures"], "history": record["history"]})
                logger.error("forget request %s FAILED in state %s after %d attempt(s): %s. Its shards %s stay masked. "
                             "Retry: python -m ray_jobs.forget --config ... --workdir %s --request-id %s --retry",
                             request_id, record["failed_at"], jobs["attempts"], error, record["affected_shards"],
                             self.workdir.root, request_id)

    def run_forever(self, interval_s: float = 1.0) -> None:
        while True:
            try:
                self.tick()
                self.last_error = None
            except Exception as err:  # noqa: BLE001 - keep owning the requests; the next tick tries again
                if str(err) != self.last_error:
                    logger.exception("forget reconciler tick failed")
                self.last_error = str(err)
            self.last_tick = time.time()
            time.sleep(interval_s)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class ReconcilerActor:
    """The reconciler's home: detached and restarted by Ray, so no request depends on one process."""

    def __init__(self, config_path: str, workdir: str):
        self.reconciler = Reconciler(config_path, workdir)
        self.thread = threading.Thread(target=self.reconciler.run_forever, daemon=True, name="forget-reconciler")
        self.thread.start()

    def status(self) -> dict:
        r = self.reconciler
        return {"pid": os.getpid(), "running": self.thread.is_alive(), "active": r.lease.held(),
                "last_tick_age_s": round(time.time() - r.last_tick, 1) if r.last_tick else None, "last_error": r.last_error}


def actor_name(workdir: str | Path) -> str:
    return "forget-reconciler-" + hashlib.sha256(str(Path(workdir).resolve()).encode()).hexdigest()[:12]


def ensure_reconciler(config_path: str | Path, workdir: str | Path, env: dict | None = None):
    """The work dir's reconciler on this cluster: the running one, or a new one (Ray must be initialized)."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ} | (env or {})
    # On the head node: it lives as long as the cluster, unlike workers the autoscaler removes when idle.
    return ReconcilerActor.options(name=actor_name(workdir), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                                   resources={"node:__internal_head__": 0.001},
                                   runtime_env={"env_vars": env}).remote(str(config_path), str(Path(workdir).resolve()))


def stop_reconciler(workdir: str | Path, timeout_s: float = 30) -> None:
    """Kill the work dir's reconciler for good (its requests wait for the next one) and wait until its name is free."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            ray.kill(ray.get_actor(actor_name(workdir), namespace=NAMESPACE), no_restart=True)
        except ValueError:
            return  # none (left)
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    from ray_jobs.common import connect_ray, job_parser, load_job

    args, config, workdir = load_job(job_parser("ray_jobs.reconcile", "Start the forget reconciler of a work dir on this cluster."), argv)
    connect_ray(config, workdir)
    handle = ensure_reconciler(Path(args.config).resolve(), workdir.root)
    print(json.dumps({"actor": actor_name(workdir.root), "namespace": NAMESPACE, **ray.get(handle.status.remote())}))
    print("requests:", {r["request_id"]: r["state"] for r in all_requests(workdir)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
