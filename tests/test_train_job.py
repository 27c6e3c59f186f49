"""Shards train at once as Ray Train runs; a killed worker resumes from its slice checkpoint, identical results."""

import json
import os
import signal
import threading
import time

import pytest
import torch

from components.store import Workdir
from ray_jobs import train as train_job


def slower(config):
    """More steps per shard, so there is time to kill an actor mid-training."""
    return config.model_copy(update={"train": config.train.model_copy(update={"epochs": 6, "batch_size": 2})})


def adapters(workdir):
    return {k: torch.load(workdir.adapter(k) / "adapter.pt", weights_only=True) for k in range(workdir.num_shards())}


@pytest.mark.slow  # two slowed trainings; make test keeps tests/test_multinode.py's node loss, which covers the restart
def test_shards_train_at_once_and_a_killed_worker_resumes_to_the_same_adapter(ray_session, tiny_config, tmp_path):
    config = slower(tiny_config)
    straight = Workdir(tmp_path / "straight")
    report = train_job.run(config, straight)
    assert json.loads((straight.root / "reports" / "train.json").read_text()) == report
    assert set(report["shards"]) == {str(k) for k in range(config.partition.num_shards)}
    for shard in report["shards"].values():
        assert len(shard["manifest_sha256"]) == 64 and len(shard["adapter_sha256"]) == 64
        assert shard["samples"] > 0 and shard["seconds"] > 0 and shard["restarted_from"] == 0
        assert shard["workers"] == 1 and len(shard["nodes"]) == 1
    intervals = sorted((s["started_at"], s["finished_at"]) for s in report["shards"].values())
    assert any(a[0] < b[1] and b[0] < a[1] for a in intervals for b in intervals if a != b), \
        f"no two shards trained at the same time: {intervals}"

    killed = Workdir(tmp_path / "killed")
    outcome = {}
    job = threading.Thread(target=lambda: outcome.update(report=train_job.run(config, killed)))
    job.start()
    victim = max(report["shards"], key=lambda k: report["shards"][k]["samples"])  # the longest shard
    progress, deadline = killed.progress(int(victim)), time.time() + 120
    while time.time() < deadline and not any(json.loads(line).get("checkpoint") for line in
                                             (progress.read_text().splitlines() if progress.exists() else [])):
        time.sleep(0.05)
    assert killed.checkpoints(int(victim)).read(0) is not None, "no first slice checkpoint"
    worker = json.loads(progress.read_text().splitlines()[-1])["pid"]
    os.kill(worker, signal.SIGKILL)  # the Ray Train worker dies as in an OOM kill; nobody calls anything
    job.join(timeout=300)
    assert "report" in outcome, "the train job did not complete after the actor was killed"

    # The restarted actor resumed from a slice checkpoint, and every adapter is bit-identical.
    assert outcome["report"]["shards"][victim]["restarted_from"] > 0
    ours, theirs = adapters(straight), adapters(killed)
    for shard in ours:
        assert all(torch.equal(ours[shard][k], theirs[shard][k]) for k in ours[shard]), f"shard {shard} differs"
    assert {k: v["adapter_sha256"] for k, v in report["shards"].items()} == \
           {k: v["adapter_sha256"] for k, v in outcome["report"]["shards"].items()}


@pytest.mark.slow  # two trainings of two workers: make test-slow; make test trains one worker per shard
def test_two_workers_per_shard_train_data_parallel_and_twice_give_the_same_bits(trained_tiny, tiny_config, tmp_path):
    """train.workers_per_shard 2: one Ray Train run of two workers, each taking half of every batch,
    their gradients summed; the same bits run after run (not necessarily one worker's: sums in another order)."""
    from components.store import copy_store
    from ray_jobs.shard_training import train_shards

    source, report = trained_tiny
    shard = min(report["shards"], key=lambda k: report["shards"][k]["samples"])
    config = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"workers_per_shard": 2})})
    results = []
    for run in ("first", "second"):
        workdir = Workdir(tmp_path / run)
        copy_store(source, workdir)
        (workdir.shard_samples(int(shard))).parent.mkdir(parents=True)
        workdir.shard_samples(int(shard)).write_bytes(source.shard_samples(int(shard)).read_bytes())
        results.append(train_shards(config, workdir, [int(shard)])[int(shard)])
    assert results[0]["workers"] == results[1]["workers"] == 2
    assert results[0]["adapter_sha256"] == results[1]["adapter_sha256"]
    assert results[0]["losses"] == results[1]["losses"] and len(results[0]["losses"]) > 1


def test_jobs_start_a_local_ray_when_the_recorded_cluster_is_gone(tmp_path, monkeypatch):
    """`ray start` records its address in RAY_TMPDIR/ray/ray_current_cluster and nothing removes it when
    the cluster dies; a job must then start its own Ray, not hang trying to join the dead one."""
    import socket

    from ray_jobs.common import ray_address

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address() == "local"  # nothing recorded
    recorded = tmp_path / "ray" / "ray_current_cluster"
    recorded.parent.mkdir()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        recorded.write_text(f"127.0.0.1:{listener.getsockname()[1]}")
        assert ray_address() is None  # a cluster answers there: ray.init joins it
    assert ray_address() == "local"  # the same address, nobody listening any more
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert ray_address() is None  # ray.init takes RAY_ADDRESS itself
