"""Forget users or interactions exactly: mask, delete, retrain the affected shards from their last
clean slice checkpoint, register, swap, purge, scan, and (with --verify) prove the result equals a
model trained from scratch without the data.

    python -m ray_jobs.forget --config configs/tiny.yaml --workdir runs/tiny --request-file ticket-991.json
    echo '{"users": ["13"], "interactions": ["42:250"]}' | python -m ray_jobs.forget ... --request-file - --request-id ticket-991 --verify
    python -m ray_jobs.forget ... --request-id ticket-991      # resume / process a recorded request
    python -m ray_jobs.forget ... --request-id ticket-991 --retry      # a failed request, its cause fixed
    python -m ray_jobs.forget ... --request-id ticket-991 --abandon    # one that has deleted nothing yet
    python -m ray_jobs.forget ... --scan-for u-3kq9x7 [--scan-path DIR]   # after "done": is the id anywhere? (exit 1 if so)

A request file is JSON {"users": [...], "interactions": ["USER:ITEM", ...]}; the job deletes it once
the request is recorded. Ids never go on the command line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from components.config import Config
from components.proof import files_holding, stored_files_holding
from components.registry import Registry, default_tracking_uri
from components.store import Workdir, write_json
from components.unlearn import (
    RequestError,
    abandon_request,
    current_round,
    hold_new_requests,
    load_request,
    masked_by_pending,
    new_request,
    retry_request,
    round_lock,
    round_path,
)
from ray_jobs.common import (
    SharedStorageError,
    connect_ray,
    delete_subject,
    fail,
    job_parser,
    load_job,
    read_subject,
)
from ray_jobs.rounds import process


def retry(workdir: Workdir, request_id: str) -> None:
    """Put a failed request, and every request of its failed round, back where it failed."""
    with round_lock(workdir, job=f"retry by pid {os.getpid()}") as held:
        if not held:
            raise RequestError("a forget round is running on this work dir: try again when it ends")
        round_ = current_round(workdir)
        ids = round_["request_ids"] if round_ and request_id in round_["request_ids"] else [request_id]
        if load_request(workdir, request_id)["state"] != "failed":
            raise RequestError(f"request {request_id} is {load_request(workdir, request_id)['state']}, not failed: nothing to retry")
        for rid in ids:
            if (record := load_request(workdir, rid))["state"] == "failed":
                retry_request(workdir, record)
        if round_ and round_.pop("failed", None):
            write_json(round_path(workdir), round_)
        print(f"retrying request(s) {', '.join(ids)}", flush=True)


def abandon(config: Config, workdir: Workdir, request_id: str) -> None:
    """Drop a request that has deleted nothing: its round (if any) is dissolved, the other requests
    of that round go back to the queue, and shards no pending request needs are unmasked."""
    with round_lock(workdir, job=f"abandon by pid {os.getpid()}") as held:
        if not held:
            raise RequestError("a forget round is running on this work dir: try again when it ends")
        record = abandon_request(workdir, load_request(workdir, request_id))
        round_ = current_round(workdir)
        if round_ and request_id in round_["request_ids"]:
            round_path(workdir).unlink()  # it deleted nothing (abandon_request checked): the others are re-planned
        registry = Registry(config.experiment, workdir.root)
        registry.set_masked_shards(masked_by_pending(workdir))
        write_json(workdir.path("audit", f"{request_id}.json"), {
            "request_id": request_id, "subject_hash": record["subject_hash"], "source": record["source"],
            "state": "abandoned", "abandoned_at": record["abandoned_at"], "history": record["history"]})
        print(f"request {request_id} abandoned in state {record['abandoned_at']}; masked shards now "
              f"{sorted(registry.masked_shards())}", flush=True)


def trace_scan(config: Config, workdir: Workdir, needle: str, extra: list[Path]) -> tuple[list[str], list[str]]:
    """Everywhere the system wrote or reported something, searched for `needle` (a subject's id):
    the work dir (sample store, trunk states, checkpoints, request log, audit, a sqlite MLflow store
    and its artifacts), its checkpoints under train.storage, `extra` (an MLflow server's database and artifact store, rendered manifests,
    logs kept elsewhere), the logs of every Ray session on this machine (Serve's, the jobs'), the
    Ray cluster's job list, and the MLflow runs and models of the experiment. Returns (findings,
    places searched)."""
    import ray
    from ray._common.utils import get_default_system_temp_dir

    sessions = sorted(Path(get_default_system_temp_dir(), "ray").glob("session_*/logs"))
    roots = [workdir.root, *extra, *sessions]
    findings = [f"file {path}" for path in files_holding(needle, roots)]
    searched = [str(workdir.root), *map(str, extra), f"{len(sessions)} Ray session log folder(s)"]
    if workdir.storage_binding():  # the slice checkpoints, kept under train.storage
        findings += [f"file {name}" for name in stored_files_holding(needle, workdir.shard_runs())]
        searched.append(workdir.shard_runs())
    findings += Registry(config.experiment, workdir.root).mentions(needle)
    searched.append(f"MLflow runs and models of {config.experiment} at {default_tracking_uri(workdir.root)}")
    try:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(ray.get_runtime_context().gcs_address if ray.is_initialized() else None)
        jobs = client.list_jobs()
        findings += [f"Ray job {job.submission_id or job.job_id}: entrypoint, metadata or message"
                     for job in jobs if needle in json.dumps(job.dict(), default=str)]
        searched.append(f"{len(jobs)} Ray job(s) of the cluster")
    except (ConnectionError, RuntimeError, ValueError) as err:
        searched.append(f"no Ray job list ({type(err).__name__}: no cluster answers)")
    return findings, searched


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("ray_jobs.forget", "Forget users or interactions exactly, and prove it.")
    parser.add_argument("--request-file", metavar="FILE",
                        help='JSON {"users": [...], "interactions": ["USER:ITEM", ...]}, deleted once recorded; - reads standard input')
    parser.add_argument("--request-id", help="idempotency key; alone, it resumes a recorded request")
    parser.add_argument("--verify", action="store_true", help="also train from scratch without the data and compare bit for bit")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--retry", action="store_true", help="with --request-id: retry a failed request (and its round) now")
    action.add_argument("--abandon", action="store_true",
                        help="with --request-id: drop a request that has deleted nothing yet, and unmask its shards")
    action.add_argument("--scan-for", metavar="ID",
                        help="search everything the system wrote or reported for this id (- reads it from standard input); "
                             "exit 1 when found")
    parser.add_argument("--scan-path", action="append", type=Path, default=[], metavar="PATH",
                        help="with --scan-for: another file or folder to search (an MLflow server's store, manifests)")
    args, config, workdir = load_job(parser, argv)
    if args.scan_for:
        needle = sys.stdin.readline().strip() if args.scan_for == "-" else args.scan_for.strip()
        if len(needle) < 3:
            fail("--scan-for needs an id of at least 3 characters (a shorter one matches by chance)")
        findings, searched = trace_scan(config, workdir, needle, args.scan_path)
        print("searched: " + "; ".join(searched))
        print("\n".join(["found in:", *findings]) if findings else "not found anywhere searched", flush=True)
        return 1 if findings else 0
    if workdir.num_shards() == 0:
        fail(f"{workdir.root} holds no trained shards: run ray_jobs.train first")
    users, interactions = read_subject(args.request_file, "--request-file") if args.request_file else ([], [])
    try:
        if args.retry or args.abandon:
            if not args.request_id or args.request_file:
                fail("--retry and --abandon take a --request-id and nothing to forget")
            if load_request(workdir, args.request_id) is None:
                fail(f"unknown request id {args.request_id!r}")
            if args.abandon:
                abandon(config, workdir, args.request_id)
                return 0
            retry(workdir, args.request_id)
        elif args.request_file:
            registry = Registry(config.experiment, workdir.root)
            hold = hold_new_requests(workdir, registry.masked_shards(), config.forget.max_masked_share)
            request = new_request(workdir, users, interactions, args.request_id, hold=hold)
            delete_subject(args.request_file)  # the request log holds the ids until done, then only their hash
            print(f"request {request.request_id}: affects shard(s) {request.affected_shards} (state {request.state})")
            # Mask at once (within forget.max_masked_share), even if another job's round is running.
            registry.set_masked_shards(registry.masked_shards() | masked_by_pending(workdir))
        elif args.request_id:
            if load_request(workdir, args.request_id) is None:
                fail(f"unknown request id {args.request_id!r}")
        else:
            fail("give a --request-file, or the --request-id of a recorded request")
        connect_ray(config, workdir)
    except (RequestError, SharedStorageError) as err:
        fail(str(err))
    for audit in process(config, workdir, verify=args.verify):
        print(f"audit: {workdir.path('audit', audit['request_id'] + '.json')}")
        print(json.dumps({k: audit[k] for k in ("request_id", "affected_shards", "new_versions", "seconds", "scan", "verification")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
