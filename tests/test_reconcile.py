"""Issue 14: an accepted forget request always reaches "done" (or a visible "failed"): the round
lease, the reconciler (a detached Ray actor submitting Ray jobs), jobs killed in every state,
the reconciler killed, twenty requests over HTTP, failures that an operator retries or abandons.

Real Ray (the session's local cluster, with its job server), real Ray jobs, real MLflow (sqlite),
real Serve on 127.0.0.1 (a free port), the tiny model.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from components.data import read_parquet
from components.lease import Lease
from components.reconcile import request_status, summary
from components.registry import Registry
from components.store import Workdir
from components.unlearn import STATES, all_requests, load_request, new_request

from .conftest import ROOT, free_port, tiny_config_file

TOKEN = "reconcile-test-token"
pytestmark = pytest.mark.timeout(900)


def _wait(condition, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def _users_by_shard(workdir: Workdir) -> dict[str, set[int]]:
    owners = {}
    for shard in range(workdir.num_shards()):
        for user in read_parquet(workdir.shard_samples(shard))["user_id"]:
            owners.setdefault(user, set()).add(shard)
    return owners


def _jobs(ray_session, workdir: Workdir) -> dict[str, str]:
    """submission id -> status of the Ray jobs submitted for this work dir (what `ray job list` shows)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_session.get_runtime_context().gcs_address)
    return {j.submission_id: j.status.value for j in client.list_jobs() if (j.metadata or {}).get("workdir") == str(workdir.root)}


def _request_to_forget(config, workdir: Workdir, user: str, request_id: str):
    """What POST /v1/forget does before answering 202: record the request, mask its shards."""
    from components.unlearn import masked_by_pending

    request = new_request(workdir, [user], [], request_id, source="test")
    registry = Registry(config.experiment, workdir.root)
    registry.set_masked_shards(registry.masked_shards() | masked_by_pending(workdir))
    return request


@pytest.fixture(scope="module")
def work(trained_tiny, tiny_config, tmp_path_factory):
    """A trained tiny work dir and a config file of its own (the failure test moves it away)."""
    from ray_jobs.reconcile import stop_reconciler
    from ray_jobs.train import run as train

    root = tmp_path_factory.mktemp("reconcile")
    # Coalescing and retries: every request masked at once (the bound: test_serving).
    config_path = tiny_config_file(root / "tiny.yaml", serving={"forget_token": TOKEN}, forget={"max_masked_share": 1.0})
    workdir = Workdir(root / "work")
    train(tiny_config, workdir, states_from=trained_tiny[0])  # the session's trunk states, linked
    yield config_path, workdir
    stop_reconciler(workdir.root)


def _start_reconciler(config_path: Path, workdir: Workdir, **env):
    import ray

    from ray_jobs.reconcile import ensure_reconciler, stop_reconciler

    stop_reconciler(workdir.root)  # a fresh one with this test's environment
    handle = ensure_reconciler(config_path, workdir.root, {k: str(v) for k, v in env.items()})
    assert ray.get(handle.status.remote(), timeout=60)["running"]
    return handle


# --- the lease ---------------------------------------------------------------------------------------


def test_the_lease_has_one_holder_and_a_dead_holder_frees_it_at_once(tmp_path):
    a, b = Lease(tmp_path, ttl_s=30, who="a"), Lease(tmp_path, ttl_s=30, who="b")
    assert a.acquire() and not b.acquire() and b.holder()["who"] == "a"
    assert a.renew() and a.held()
    a.release()
    assert b.acquire() and not a.acquire() and not a.held()
    b.release()
    # A process that takes the lease and is SIGKILLed: on this host its lease is free at once.
    code = (f"import sys,time; sys.path.insert(0, {str(ROOT)!r}); from components.lease import Lease; "
            f"assert Lease({str(tmp_path)!r}, ttl_s=3600).acquire(); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert not a.acquire() and a.holder()["pid"] == holder.pid
    holder.kill()
    holder.wait()
    assert a.holder() is None and a.acquire()
    # Another node's holder (a host name that is not ours) counts until its lease expires.
    a.release()
    record = {"token": "x", "host": "another-node", "pid": 1, "pid_start": "0", "expires": time.time() + 30}
    (tmp_path / f"{999:012d}.json").write_text(json.dumps(record))
    assert not b.acquire() and b.holder()["host"] == "another-node"
    (tmp_path / f"{999:012d}.json").write_text(json.dumps({**record, "expires": time.time() - 1}))
    assert b.acquire() and b.gen == 1000
    # Two takers of the same generation: the second link() fails, and only one holds the lease.
    b.release()
    c, d = Lease(tmp_path, ttl_s=30), Lease(tmp_path, ttl_s=30)
    assert [c.acquire(), d.acquire()].count(True) == 1


# --- jobs killed in every state ---------------------------------------------------------------------


@pytest.mark.slow  # a job killed in each of eight states, then a training from scratch: make test-slow
def test_a_job_killed_in_every_state_is_resubmitted_until_done_and_equals_training_from_scratch(ray_session, tiny_config, work):
    """One request, and its forget job SIGKILLs itself right after recording each state from
    "received" to "purged" (8 kills). Nobody calls anything: the reconciler resubmits a Ray job each
    time, the request reaches done, the shard is unmasked, and the live models equal a from-scratch
    training on the data without the user, bit for bit."""
    from ray_jobs.rounds import verify_from_scratch

    config_path, workdir = work
    owners = _users_by_shard(workdir)
    user = sorted(u for u, s in owners.items() if len(s) == 1)[0]
    kills = [s for s in STATES if s != "done"]
    request = _request_to_forget(tiny_config, workdir, user, "killed-everywhere")
    registry = Registry(tiny_config.experiment, workdir.root)
    assert registry.masked_shards() == set(request.affected_shards) == owners[user]

    started = time.time()
    _start_reconciler(config_path, workdir, UNLEARN_FORGET_KILL_AT=",".join(kills), UNLEARN_FORGET_BACKOFF_S=0.5)
    _wait(lambda: load_request(workdir, "killed-everywhere")["state"] == "done", timeout=600, what="the request to be done")
    print(f"{len(kills)} kills, done after {time.time() - started:.1f}s")

    jobs = json.loads(workdir.path("jobs", "killed-everywhere.json").read_text())
    assert [f["state"] for f in jobs["failures"]] == kills  # killed once in each state, in order
    assert all("exit code" in f["error"] and "SIGKILL" in f["error"] for f in jobs["failures"])
    assert jobs["attempts"] == len(kills) + 1
    # Each attempt is a Ray job of its own; the last one ends right after writing "done".
    listed = _wait(lambda: (j := _jobs(ray_session, workdir)) and "RUNNING" not in j.values() and j, timeout=60, what="the last job to end")
    assert sorted(listed.values()) == ["FAILED"] * len(kills) + ["SUCCEEDED"], listed
    assert jobs["job"]["submission_id"] in listed and listed[jobs["job"]["submission_id"]] == "SUCCEEDED"
    audit = json.loads(workdir.path("audit", "killed-everywhere.json").read_text())
    assert audit["scan"]["clean"] and audit["affected_shards"] == sorted(owners[user])
    assert registry.masked_shards() == set()
    assert not workdir.path("rounds", "current.json").exists()
    result = verify_from_scratch(tiny_config, workdir, registry, "after-kills")
    assert result["identical"], result


# --- the reconciler killed ---------------------------------------------------------------------------


@pytest.mark.slow  # a training and a forget job of its own: make test-slow; make test keeps the reconciler's path in test_serving
def test_killing_the_reconciler_while_a_request_is_pending_another_one_finishes_it(ray_session, tiny_config, work):
    import ray

    config_path, workdir = work
    owners = _users_by_shard(workdir)
    user = sorted(u for u, s in owners.items() if len(s) == 1)[1]
    handle = _start_reconciler(config_path, workdir, UNLEARN_FORGET_BACKOFF_S=0.5)
    first = ray.get(handle.status.remote())
    _request_to_forget(tiny_config, workdir, user, "reconciler-killed")
    # Kill the reconciler's process once its job runs: the job goes on, unowned for a while.
    job = _wait(lambda: "RUNNING" in _jobs(ray_session, workdir).values() and _jobs(ray_session, workdir),
                timeout=120, interval=0.2, what="a running job")
    os.kill(first["pid"], signal.SIGKILL)
    # Ray restarts the detached actor in a new process; the new reconciler takes over the lease
    # (its holder's process is gone), follows the job and finishes the request.
    second = _wait(lambda: _status(handle), timeout=120, what="the restarted reconciler")
    assert second["pid"] != first["pid"]
    _wait(lambda: load_request(workdir, "reconciler-killed")["state"] == "done", timeout=600, what="the request to be done")
    assert Registry(tiny_config.experiment, workdir.root).masked_shards() == set()
    # The new reconciler followed the job the old one had submitted (read from DIR/jobs/current.json).
    jobs = json.loads(workdir.path("jobs", "reconciler-killed.json").read_text())
    assert jobs["attempts"] == 1 and jobs["job"]["submission_id"] in job and not jobs["failures"], jobs
    assert json.loads(workdir.path("audit", "reconciler-killed.json").read_text())["scan"]["clean"]


def _status(handle):
    import ray

    try:
        status = ray.get(handle.status.remote(), timeout=10)
    except Exception:  # noqa: BLE001 - restarting
        return None
    return status if status["running"] else None


# --- repeated failures: failed, visible, retried or abandoned ----------------------------------------------


@pytest.mark.slow  # ~2 minutes of repeated jobs: make test-slow
def test_a_request_failing_the_same_way_is_failed_visibly_then_abandoned_or_retried(ray_session, tiny_config, work):
    config_path, workdir = work
    owners = _users_by_shard(workdir)
    user_a, user_b = sorted(u for u, s in owners.items() if len(s) == 1)[2:4]
    moved = config_path.with_suffix(".away")
    config_path.rename(moved)  # every job now exits 2 at once: "config file not found"
    try:
        _start_reconciler(config_path, workdir, UNLEARN_FORGET_MAX_FAILURES=2, UNLEARN_FORGET_BACKOFF_S=0.5)
        _request_to_forget(tiny_config, workdir, user_a, "fails-a")
        _wait(lambda: load_request(workdir, "fails-a")["state"] == "failed", timeout=300, what="the request to fail")
        _request_to_forget(tiny_config, workdir, user_b, "fails-b")
        _wait(lambda: load_request(workdir, "fails-b")["state"] == "failed", timeout=300, what="the second request to fail")
    finally:
        moved.rename(config_path)
    from ray_jobs.reconcile import stop_reconciler

    stop_reconciler(workdir.root)
    registry = Registry(tiny_config.experiment, workdir.root)
    failed = load_request(workdir, "fails-a")
    assert failed["failed_at"] == "received" and "exit code 2" in failed["error"]
    jobs = json.loads(workdir.path("jobs", "fails-a.json").read_text())
    assert jobs["attempts"] == 2 and len({f["signature"] for f in jobs["failures"]}) == 1
    audit = json.loads(workdir.path("audit", "fails-a.json").read_text())
    assert audit["state"] == "failed" and "exit code 2" in audit["error"]
    assert registry.masked_shards() == owners[user_a] | owners[user_b]  # failed: the shards stay masked
    # What GET /v1/forget/{id} and /healthz report (serving returns exactly these).
    status = request_status(workdir, "fails-a")
    assert status["state"] == "failed" and "exit code 2" in status["last_error"] and status["next_retry_at"] is None
    assert status["attempts"] == 2 and status["job"]["status"] == "FAILED" and "users" not in status
    assert set(summary(workdir, all_requests(workdir))["failed"]) == {"fails-a", "fails-b"}

    forget = [sys.executable, "-m", "ray_jobs.forget", "--config", str(config_path), "--workdir", str(workdir.root)]
    run = lambda *args: subprocess.run(forget + list(args), cwd=ROOT, capture_output=True, text=True, timeout=600)  # noqa: E731
    # Abandon: allowed, nothing was deleted; its shards are unmasked, its ids gone.
    abandoned = run("--request-id", "fails-a", "--abandon")
    assert abandoned.returncode == 0, abandoned.stderr
    record = load_request(workdir, "fails-a")
    assert record["state"] == "abandoned" and "users" not in record
    assert registry.masked_shards() == owners[user_b]
    again = run("--request-id", "fails-a", "--abandon")
    assert again.returncode == 2 and "already abandoned" in again.stderr
    # Retry: the cause is fixed (the config is back); the round runs to the end.
    retried = run("--request-id", "fails-b", "--retry")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert load_request(workdir, "fails-b")["state"] == "done"
    assert registry.masked_shards() == set()
    assert run("--request-id", "fails-b", "--retry").returncode == 2  # done: nothing to retry


# --- twenty requests over HTTP ------------------------------------------------------------------------


@pytest.mark.slow  # ~2 minutes of rounds: make test-slow
def test_twenty_requests_posted_within_a_second_all_reach_done_in_at_most_two_rounds_per_shard(ray_session, tiny_config, work):
    from ray import serve

    from serving.app import build_app

    config_path, workdir = work
    owners = _users_by_shard(workdir)
    users = sorted(owners)[:20]
    assert len(users) == 20
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"config": str(config_path), "workdir": str(workdir.root)}), name="reconcile-test", route_prefix="/")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            _wait(lambda: http.get("/healthz").status_code == 200, timeout=120, what="serving")

            async def post_all():
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                    await client.get("/healthz")  # a connection open before the burst
                    started = time.time()
                    responses = await asyncio.gather(*(client.post("/v1/forget", json={"users": [u], "request_id": f"twenty-{i}"},
                                                                   headers=auth) for i, u in enumerate(users)))
                    print(f"20 requests posted in {time.time() - started:.2f}s")
                    return responses

            responses = asyncio.run(post_all())
            assert [r.status_code for r in responses] == [202] * 20, [r.text for r in responses if r.status_code != 202]

            def all_done():
                states = [http.get(f"/v1/forget/twenty-{i}", headers=auth).json()["state"] for i in range(20)]
                return states if set(states) == {"done"} else None

            _wait(all_done, timeout=600, interval=2, what="twenty requests to be done")
            health = http.get("/healthz").json()
            assert health["forget"]["pending"] == 0 and health["masked_shards"] == []
            status = _wait(lambda: (r := http.get("/v1/forget/twenty-0", headers=auth).json())["job"]["status"] == "SUCCEEDED" and r,
                           timeout=60, what="the job to be seen as succeeded")
            assert status["attempts"] >= 1 and status["next_retry_at"] is None and status["last_error"] is None
    finally:
        serve.delete("reconcile-test")
        serve.shutdown()
    from ray_jobs.reconcile import stop_reconciler

    stop_reconciler(workdir.root)
    rounds_per_shard = {}
    for i in range(20):
        audit = json.loads(workdir.path("audit", f"twenty-{i}.json").read_text())
        assert audit["scan"]["clean"] and owners[users[i]] <= set(audit["affected_shards"])  # the round's shards
        for shard in owners[users[i]]:
            rounds_per_shard.setdefault(shard, set()).add(audit["round_id"])
    print("rounds per shard:", {k: len(v) for k, v in sorted(rounds_per_shard.items())})
    assert rounds_per_shard and all(len(r) <= 2 for r in rounds_per_shard.values()), rounds_per_shard
    registry = Registry(tiny_config.experiment, workdir.root)
    assert all(len(registry.versions(registry.shard_model(s))) == 1 for s in range(workdir.num_shards()))  # older versions purged
