"""Several Ray nodes on this machine (Ray's own harness, ray.cluster_utils.Cluster: a raylet and an
object store each, on 127.0.0.1), driven as an operator would, through the job's command line with
RAY_ADDRESS: a training's store pass and shards spread over the nodes, loses a node mid-training with nobody calling
anything, and ends bit for bit where a one-node training ends; a node that does not see the work
dir stops a job at start, named."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from components.config import load_config
from components.store import Workdir
from tests.conftest import ROOT, TINY, free_port, tiny_config_file, two_node_cluster


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node, 1 CPU each."""
    with two_node_cluster() as (cluster, _):
        yield cluster


def job(cluster, *args, **popen) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def progress_events(workdir: Workdir) -> list[dict]:
    events = []
    for shard in range(workdir.num_shards()):
        path = workdir.progress(shard)
        lines = path.read_text().splitlines() if path.exists() else []
        events += [json.loads(line) | {"shard": shard} for line in lines if line.strip()]
    return events


def test_a_training_spreads_over_two_nodes_survives_losing_one_and_matches_one_node_bit_for_bit(cluster, trained_tiny, tmp_path):
    one_node, one_node_report = trained_tiny
    workdir = Workdir(tmp_path / "two-nodes")
    worker = cluster.worker_nodes.copy().pop()
    # The tiny config's two shards at a whole CPU each: one node each (a CPU count is no part of the bits).
    config = tiny_config_file(tmp_path / "tiny.yaml", train={"cpus_per_actor": 1})
    training = job(cluster, "ray_jobs.train", "--config", str(config), "--workdir", str(workdir.root))
    try:
        # Remove the worker node as soon as a shard running there has written a slice checkpoint.
        deadline = time.time() + 600
        while time.time() < deadline and training.poll() is None:
            if any(e.get("checkpoint") and e["node"] == worker.node_id for e in progress_events(workdir)):
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"no shard checkpointed on the worker node: {training.communicate()[0][-3000:]}")
        cluster.remove_node(worker, allow_graceful=False)
        output, _ = training.communicate(timeout=600)
    finally:
        if training.poll() is None:
            training.kill()
    assert training.returncode == 0, output[-4000:]
    started_on = {e["shard"]: e["node"] for e in reversed(progress_events(workdir))}  # each shard's first event
    assert set(started_on.values()) == {cluster.head_node.node_id, worker.node_id}, "the shards did not spread over both nodes"

    report = json.loads(workdir.path("reports", "train.json").read_text())
    # The store's trunk pass (Ray Data, two actors of 1 CPU) ran on both nodes too.
    assert set(report["store"]["nodes"]) == {cluster.head_node.node_id, worker.node_id}, report["store"]
    moved = [k for k, node in started_on.items() if node == worker.node_id]
    for shard in moved:  # finished on the head node, from the checkpoint written on the lost one
        assert report["shards"][str(shard)]["nodes"] == [cluster.head_node.node_id]
    assert any(report["shards"][str(k)]["restarted_from"] > 0 for k in moved), report["shards"]
    assert {k: s["adapter_sha256"] for k, s in report["shards"].items()} == \
           {k: s["adapter_sha256"] for k, s in one_node_report["shards"].items()}
    for shard in range(one_node.num_shards()):
        ours, theirs = (torch.load(w.adapter(shard) / "adapter.pt", weights_only=True) for w in (workdir, one_node))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), f"shard {shard} differs"


@pytest.mark.slow  # a third node and a job's start-up (~20 s here): the check at every job's start, not an exactness path
def test_a_job_stops_at_start_naming_a_node_that_does_not_see_the_work_dir_or_the_storage(cluster, tmp_path):
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs mount namespaces (unshare -m) to give one node a different view of the file system")
    hidden = tmp_path / "shared"
    hidden.mkdir()
    ports = {name: free_port() for name in ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                                            "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")}
    ray_start = [sys.executable, "-m", "ray.scripts.scripts", "start", "--address", cluster.address, "--num-cpus", "1",
                 "--node-ip-address", "127.0.0.1", "--object-store-memory", str(100 * 2**20), "--block",
                 *(f"--{k}={v}" for k, v in ports.items())]
    # This node's processes see an empty folder where the others see the work dir: a volume not mounted there.
    blind = subprocess.Popen(["unshare", "-m", "sh", "-c", f'mount -t tmpfs tmpfs "{hidden}" && exec "$@"', "sh", *ray_start],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        known = {cluster.head_node.node_id, *(n.node_id for n in cluster.worker_nodes)}
        deadline = time.time() + 120
        while len(alive_nodes(cluster)) <= len(known):
            assert time.time() < deadline and blind.poll() is None, "the third node did not join"
            time.sleep(1)
        [blind_id] = set(alive_nodes(cluster)) - known

        workdir, storage = hidden / "run", f"file://{hidden}/checkpoints"
        config = tiny_config_file(tmp_path / "tiny.yaml", train={"storage": storage})
        training = job(cluster, "ray_jobs.train", "--config", str(config), "--workdir", str(workdir))
        output, _ = training.communicate(timeout=300)
        assert training.returncode == 2 and f"({blind_id[:12]}) does not see the work dir {workdir}" in output, output[-3000:]
        assert f"({blind_id[:12]}) does not reach train.storage {storage}" in output, output[-3000:]
        assert not any(node[:12] in output for node in known), "a node that sees the work dir was named"
        assert not workdir.exists(), "a job stopped at start left its work dir behind"
    finally:
        os.killpg(blind.pid, signal.SIGTERM)
        try:
            blind.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(blind.pid, signal.SIGKILL)
        shutil.rmtree(hidden, ignore_errors=True)


def alive_nodes(cluster) -> list[str]:
    """The node ids the cluster's GCS lists as alive (asked from a subprocess: this one holds no Ray connection)."""
    code = "import ray, json; ray.init(); print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "RAY_ADDRESS": cluster.address},
                         capture_output=True, text=True, timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])


# Run where the cluster is the current Ray: reserve, as each shard trainer's controller does (one
# bundle of its resources per worker), what the trainers of shards 0-4 ask for (argv[1], JSON).
RESERVE_AS_RAY_TRAIN = """
import json, sys, ray
from ray.util.placement_group import placement_group, remove_placement_group

ray.init()
groups = {g.ready(): g for g in (placement_group(bundles, strategy=strategy) for bundles, strategy in json.loads(sys.argv[1]))}
ready, waiting = ray.wait(list(groups), num_returns=4, timeout=60)
late, waiting = ray.wait(waiting, timeout=3)
print(json.dumps({"ready": len(ready + late), "waiting": len(waiting)}), flush=True)
remove_placement_group(groups[ready[0]])  # a shard finishes: the one that waited starts
late, _ = ray.wait(waiting, timeout=60)
print(json.dumps({"ready_after_one_finished": len(late)}))
"""


def test_shards_at_a_quarter_gpu_run_four_to_a_gpu_and_a_fifth_waits(cluster, tmp_path):
    """Ray's logical GPUs on a node of this machine (no CUDA needed to schedule): the shard
    trainers' resource requests at train.gpus_per_actor 0.25 fit four to a GPU."""
    from ray_jobs.shard_training import shard_trainer

    config = load_config(TINY, train={"cpus_per_actor": 0.25, "gpus_per_actor": 0.25})
    scalings = [shard_trainer(config, Workdir(tmp_path), shard, None).scaling_config for shard in range(5)]
    assert scalings[0].resources_per_worker == {"CPU": 0.25, "GPU": 0.25} and scalings[0].use_gpu
    requests = [([s.resources_per_worker] * s.num_workers, s.placement_strategy) for s in scalings]
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=100 * 2**20)
    try:
        cluster.wait_for_nodes()
        run = subprocess.run([sys.executable, "-c", RESERVE_AS_RAY_TRAIN, json.dumps(requests)], cwd=ROOT,
                             env={**os.environ, "RAY_ADDRESS": cluster.address}, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        first, after = (json.loads(line) for line in run.stdout.strip().splitlines()[-2:])
        assert first == {"ready": 4, "waiting": 1}
        assert after == {"ready_after_one_finished": 1}
    finally:
        cluster.remove_node(gpu_node, allow_graceful=False)
