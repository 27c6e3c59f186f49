"""Issue 28: a Serve replica on each of two Ray nodes, one node removed under a request loop: no request
lost, and the service goes on answering from the node left.

A real multi-node cluster on this machine (Ray's own harness `ray.cluster_utils.Cluster`: a head and a
worker node, each with its own raylet and object store), the service started as an operator would
(`python -m serving` with RAY_ADDRESS), requests over HTTP through the product's client. This process
never joins the cluster (it may hold the session's connection to another Ray): the replicas and their
nodes come from the cluster's GCS actor table (what `ray list actors` shows), what each replica
answered from its Serve log.
"""

import contextlib
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from serving.client import RecommenderClient

from .conftest import ROOT, TINY, free_port, two_node_cluster

HISTORY = [(1, 5), (50, 4), ("100", 2), (181, 1)]
CANDIDATES = [258, 286, 294, "300", 302]
LOOPS = 3  # concurrent request loops: the worker's replica has requests in flight when its node goes

pytestmark = pytest.mark.timeout(600)


def serving(cluster, config: Path, workdir: Path, port: int) -> dict:
    """`python -m serving` on the cluster, as an operator starts it: subprocess arguments."""
    return dict(args=[sys.executable, "-m", "serving", "--config", str(config), "--workdir", str(workdir), "--port", str(port)],
                cwd=ROOT, env={**os.environ, "RAY_ADDRESS": cluster.address})


@contextlib.contextmanager
def service(cluster, config: Path, workdir: Path, log: Path):
    """The service on the cluster, until it says where it serves; stopped at the end."""
    port = free_port()
    with log.open("w") as out:
        process = subprocess.Popen(**serving(cluster, config, workdir, port), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.time() + 300
        while "serving tiny adapter set" not in log.read_text():
            assert process.poll() is None and time.time() < deadline, f"the service did not start:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()  # SIGTERM: the CLI shuts Serve down and leaves the cluster
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def replica_nodes(cluster) -> dict[str, str]:
    """The recommender's live replicas (Serve's replica id -> node id), from the GCS actor table."""
    actors = cluster.global_state.actor_table(None).values()
    return {actor["Name"].rsplit("#", 1)[1]: actor["Address"]["NodeID"] for actor in actors
            if actor["ActorClassName"] == "ServeReplica:recommender:Recommender" and actor["State"] == "ALIVE"}


def answered(cluster, replica_id: str) -> int:
    """How many predictions a replica answered, from its Serve log (every node of the cluster writes
    into the head's session directory: one machine)."""
    log = Path(cluster.head_node.get_session_dir_path()) / "logs" / "serve" / f"replica_recommender_Recommender_{replica_id}.log"
    return log.read_text().count("POST /v1/predict 200") if log.exists() else 0


class RequestLoop:
    """LOOPS threads predicting the same body over and over through RecommenderClient; every outcome kept."""

    def __init__(self, base_url: str):
        self.base_url, self.stop = base_url, threading.Event()
        self.results: list[tuple[float, object]] = []  # (finish time, PredictResult or the exception)
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(LOOPS)]

    def _run(self) -> None:
        with RecommenderClient(self.base_url) as client:
            while not self.stop.is_set():
                try:
                    outcome = client.predict(candidates=CANDIDATES, history=HISTORY)
                except Exception as err:  # noqa: BLE001 - a lost request: the test reports it
                    outcome = err
                self.results.append((time.time(), outcome))

    def __enter__(self) -> "RequestLoop":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)


def replicas_config(tmp_path: Path, replicas: int) -> Path:
    config = tmp_path / f"tiny-{replicas}-replicas.yaml"
    config.write_text(TINY.read_text() + f"serving:\n  replicas: {replicas}\n")
    return config


@pytest.mark.slow  # a second two-node cluster and a minute of requests: make test-slow; make test keeps
# the two-node training (tests/test_multinode.py)
def test_a_node_removed_under_a_request_loop_loses_no_request(trained_tiny, tmp_path, caplog):
    workdir, _ = trained_tiny
    caplog.set_level(logging.WARNING, logger="serving.client")
    started = time.time()
    with two_node_cluster() as (cluster, worker):
        # More replicas than nodes would wait forever for a node: refused at once instead.
        refused = subprocess.run(**serving(cluster, replicas_config(tmp_path, 3), workdir.root, free_port()),
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and "serving.replicas is 3" in refused.stderr, refused.stderr[-3000:]
        assert "the cluster has 2 node(s)" in refused.stderr

        with service(cluster, replicas_config(tmp_path, 2), workdir.root, tmp_path / "serve.log") as url:
            _serve_two_nodes_and_lose_one(cluster, worker, url, caplog, started)


def _serve_two_nodes_and_lose_one(cluster, worker, url: str, caplog, started: float) -> None:
    """A replica on each node; the worker node removed under LOOPS request loops; every answer checked."""
    head_id, worker_id = cluster.head_node.node_id, worker.node_id
    placed = {node: replica for replica, node in replica_nodes(cluster).items()}
    assert placed.keys() == {head_id, worker_id}, f"one replica per node expected: {replica_nodes(cluster)}"

    with RequestLoop(url) as loop:
        time.sleep(4)
        assert answered(cluster, placed[worker_id]) > 0, "the worker node's replica got no request to lose"
        removed_at = time.time()
        cluster.remove_node(worker)
        time.sleep(6)

    lost = [outcome for _, outcome in loop.results if isinstance(outcome, Exception)]
    assert not lost, f"{len(lost)} of {len(loop.results)} requests lost, e.g. {lost[0]!r}"
    after = [outcome for at, outcome in loop.results if at > removed_at + 1]
    assert len(after) >= 10, f"the service did not go on answering: {len(after)} answers after the node went"
    first = loop.results[0][1]
    for _, result in loop.results:  # one adapter set, the same P(yes) whichever replica answered
        assert [p.item_id for p in result.predictions] == CANDIDATES
        assert result.adapter_set_version == first.adapter_set_version
        for p, q in zip(result.predictions, first.predictions):
            assert math.isfinite(p.p_yes) and 0.0 <= p.p_yes <= 1.0 and abs(p.p_yes - q.p_yes) < 1e-4

    # Serve starts a replacement, which waits for a node (at most one replica per node).
    assert replica_nodes(cluster) == {placed[head_id]: head_id}, f"the head's replica alone: {replica_nodes(cluster)}"
    with RecommenderClient(url) as client:
        assert client.predict(candidates=CANDIDATES, history=HISTORY).p_yes() == pytest.approx(first.p_yes(), abs=1e-4)
    # Serve fails a request whose replica dies under it (a plain-text 500) and does not resend it:
    # the client did, and says so.
    retries = [r.getMessage() for r in caplog.records if r.name == "serving.client"]
    assert all("from Ray Serve" in message for message in retries), retries
    print(f"\n{len(loop.results)} predictions, {len(after)} after the worker node was removed, "
          f"{len(retries)} resent by the client: {retries[:3]}; {time.time() - started:.0f} s with the cluster")
