"""Shared fixtures: the offline environment, one in-process Ray for the session, a trained tiny work dir."""

import os

for _key, _value in {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "TOKENIZERS_PARALLELISM": "false",
    # Ray Train starts a process per run to watch for node drains (spot preemption): none happen here.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Nor does anything read Ray Train's Prometheus metrics; their callbacks cost seconds per run on 2 cores.
    "RAY_TRAIN_METRICS_ENABLED": "0",
}.items():
    os.environ.setdefault(_key, _value)
os.environ.pop("MLFLOW_TRACKING_URI", None)  # each test's work dir has its own sqlite store

import contextlib  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from components.config import load_config  # noqa: E402
from components.store import Workdir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def tiny_config_file(path: Path, **sections: dict) -> Path:
    """configs/tiny.yaml with the given keys of its sections replaced, written to `path`: for the
    jobs and the service, which read a config file."""
    raw = yaml.safe_load(TINY.read_text())
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    path.write_text(yaml.safe_dump(raw))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_cluster(num_cpus: int = 2):
    """A real local Ray cluster with its job server (forget work runs as Ray jobs), every port of its
    own (other Rays may run on this machine), stopped at the end: only the processes it started."""
    ports = {name: free_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                            "dashboard-agent-grpc-port", "ray-client-server-port", "runtime-env-agent-port")}
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--num-cpus", str(num_cpus), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
               "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items())]
    # `ray start` records its address for later ray.init() calls and nothing removes it: put back what was there.
    from ray._private.utils import get_ray_address_file

    address_file = Path(get_ray_address_file(None))
    recorded = address_file.read_text() if address_file.exists() else None
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address = f"127.0.0.1:{ports['port']}"
        deadline = time.time() + 120
        while True:
            assert process.poll() is None and time.time() < deadline, "the local Ray cluster did not start"
            try:
                socket.create_connection(("127.0.0.1", ports["dashboard-port"]), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        yield address, f"http://127.0.0.1:{ports['dashboard-port']}"
    finally:
        # `ray start --block` stops the processes it started one by one, gracefully; after a
        # session's tests (detached actors, finished jobs) that takes half a minute. The tests are
        # over: every process of its session group gets SIGTERM, and what is left after 1 s SIGKILL.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if recorded is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(recorded)


TEST_NODE = {"num_cpus": 1, "object_store_memory": 100 * 2**20}


@contextlib.contextmanager
def two_node_cluster():
    """A real multi-node Ray on this machine (ray.cluster_utils.Cluster: a raylet and an object store
    per node on 127.0.0.1): a head and a worker node of 1 CPU each, shut down at the end. Cluster records its address as this machine's
    current Ray (`ray.init()` with no address would join it) and its shutdown deletes that record and
    resets this process's internal KV client: both are put back for the other Rays here."""
    import ray
    from ray._private.utils import get_ray_address_file
    from ray.cluster_utils import Cluster
    from ray.experimental.internal_kv import _initialize_internal_kv

    address_file = Path(get_ray_address_file(None))
    recorded = address_file.read_text() if address_file.exists() else None

    def restore_address() -> None:
        if recorded is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(recorded)

    cluster = Cluster(connect=False)
    try:
        # The first node added is the head. No dashboard: nothing here needs it, and its processes
        # would slow the start on 2 cores. A removed node is declared dead after 3 failed health
        # checks a second apart, not Ray's 5 three seconds apart: 4 s instead of 14 here (a killed
        # raylet refuses at once; a busy one still has Ray's 10 s to answer each check).
        cluster.add_node(**TEST_NODE, include_dashboard=False, dashboard_agent_listen_port=free_port(),
                         _system_config={"health_check_period_ms": 1000, "health_check_failure_threshold": 3})
        restore_address()
        worker = cluster.add_node(**TEST_NODE)
        cluster.wait_for_nodes()
        yield cluster, worker
    finally:
        # Without the graceful stop (a SIGTERM and a wait per process, ~30 s here): the test is over.
        for node in [*cluster.worker_nodes, cluster.head_node]:
            if node is not None:
                cluster.remove_node(node, allow_graceful=False)
        cluster.shutdown()  # no node left: it forgets the cluster's address and KV client
        restore_address()
        if ray.is_initialized():
            _initialize_internal_kv(ray._private.worker.global_worker.gcs_client)


@pytest.fixture(scope="session")
def ray_session():
    """One real Ray (2 CPUs, with the job API) for every test that needs it; started once, stopped at the end."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    with local_cluster() as (address, dashboard):
        ray.init(address=address, log_to_driver=False,
                 runtime_env={"env_vars": {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                                      "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}})
        ray.dashboard_url = dashboard  # for tests that list jobs
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def tiny_config():
    return load_config(TINY)


@pytest.fixture(scope="session")
def trained_tiny(ray_session, tiny_config, tmp_path_factory):
    """A work dir with the tiny config trained once (K=2, registered, adapter set live).
    Tests that change it must use their own work dir instead."""
    from ray_jobs.train import run

    workdir = Workdir(tmp_path_factory.mktemp("trained-tiny"))
    report = run(tiny_config, workdir)
    return workdir, report
