"""What every job shares: the command line, the offline environment, and connecting to Ray."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from components.checkpoints import delete, write_bytes
from components.config import OFFLINE_ENV, Config, ConfigError, load_config, model_folder
from components.data import DataError
from components.store import Workdir, check_inputs
from ray_jobs.node_probe import folder_digest, what_this_node_sees


def job_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=description)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--workdir", help="work dir (default runs/<experiment>)")
    return parser


def load_job(parser: argparse.ArgumentParser, argv: list[str] | None, builds_store: bool = False
             ) -> tuple[argparse.Namespace, Config, Workdir]:
    """Parse arguments, load the config and check the data and model it names (`builds_store`:
    also the samples, for a job that may build the store); bad input exits with code 2 and a
    message, before Ray starts and before anything is written."""
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        workdir = Workdir(Path(args.workdir or Path("runs") / config.experiment))
        check_inputs(config, workdir, builds_store)
    except (ConfigError, DataError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    return args, config, workdir


def id_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def read_subject(path: str, flag: str) -> tuple[list[str], list[str]]:
    """The users and interactions named by a request file, JSON {"users": [...], "interactions":
    ["USER:ITEM", ...]}, or by standard input for '-'. A subject's ids travel in such a file, never
    on a command line (process lists, job entrypoints and Kubernetes objects keep those); the caller
    deletes the file once the ids are recorded. Bad input exits 2, without echoing the file."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as err:
        fail(f"{flag} {path}: {err.strerror}")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as err:
        fail(f"{flag} {path}: not JSON ({err.msg}, line {err.lineno})")
    if not isinstance(payload, dict) or not payload or set(payload) - {"users", "interactions"}:
        fail(f'{flag} {path}: expected {{"users": [...], "interactions": ["USER:ITEM", ...]}} (either or both)')
    lists = [payload.get("users", []), payload.get("interactions", [])]
    if not all(isinstance(ids, list) and all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in ids) for ids in lists):
        fail(f"{flag} {path}: users and interactions are lists of ids (strings or integers)")
    return [str(u).strip() for u in lists[0]], [str(i).strip() for i in lists[1]]


def delete_subject(path: str) -> None:
    """Remove a request file once its ids are recorded (standard input leaves nothing behind)."""
    if path != "-":
        Path(path).unlink(missing_ok=True)


def ray_address() -> str | None:
    """Where `ray.init` goes: None lets it take RAY_ADDRESS, or the cluster `ray start` recorded on
    this machine (/tmp/ray/ray_current_cluster) if that cluster still answers; "local" starts a
    new one. Ray alone would try a recorded cluster that has died and hang (ray-project/ray#45771)."""
    if os.environ.get("RAY_ADDRESS"):
        return None
    from ray._private.utils import read_ray_address

    recorded = read_ray_address()
    if not recorded:
        return "local"
    host, _, port = recorded.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        return None
    except (OSError, ValueError):
        print(f"note: nothing answers at {recorded}, the Ray cluster an earlier `ray start` recorded: starting a local Ray",
              flush=True)
        return "local"


def connect_ray(config: Config | None = None, workdir: Workdir | None = None, address: str | None = None,
                log_to_driver: bool = True):
    """Join the cluster a job was submitted to (RAY_ADDRESS) or the one running on this machine,
    or start a local one (`address` "local": always a Ray of its own); pass the offline environment
    and model cache to every worker. With a work dir, check that every node sees it and the model
    (`check_nodes`). `log_to_driver` False leaves the workers' output in Ray's log files only.
    Returns ray.init's context, None where this process was connected already."""
    context = _connect(address, log_to_driver)
    if workdir is not None:
        check_nodes(config, workdir)
    return context


class SharedStorageError(RuntimeError):
    """A node of the cluster does not see what the job's work reads and writes."""


def check_nodes(config: Config, workdir: Workdir) -> None:
    """The shared-storage contract, checked at start: every alive node of the cluster sees the
    work dir at the same path (a probe file the driver writes, read by a task on each node),
    reaches train.storage where the config names one (a probe file there too), sees the same model
    folder, and, where shards ask for GPUs, has a torch that sees CUDA. Raises SharedStorageError
    naming each node that does not."""
    created = not workdir.root.exists()
    workdir.root.mkdir(parents=True, exist_ok=True)
    probe = workdir.root / f".node-probe-{uuid.uuid4().hex}"
    storage_probe = f"{config.train.storage}/.node-probe-{uuid.uuid4().hex}" if config.train.storage else None
    token = uuid.uuid4().hex
    digest = folder_digest(model_folder(config.model.path))
    problems = []
    try:
        probe.write_text(token)
        if storage_probe:
            try:
                write_bytes(storage_probe, token.encode())
            except OSError as err:
                raise SharedStorageError(f"train.storage {config.train.storage}: the driver cannot write there ({err})") from None
        nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) + n["Resources"].get("GPU", 0) > 0]
        answers = ray.get([
            what_this_node_sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                str(probe), storage_probe, token, config.model.path, digest,
                config.train.gpus_per_actor > 0 and n["Resources"].get("GPU", 0) > 0)
            for n in nodes], timeout=300)
        problems = [f"node {n['NodeManagerAddress']} ({n['NodeID'][:12]}) {p}" for n, found in zip(nodes, answers) for p in found]
        if problems:
            raise SharedStorageError("; ".join(problems) + ". Every node must mount the work dir (and UNLEARN_CACHE, where "
                                     "the converted model lives) at the same path, shared storage (NFS, a ReadWriteMany "
                                     "volume), and reach train.storage where the config names one")
    except SharedStorageError:
        if created:
            shutil.rmtree(workdir.root, ignore_errors=True)
        raise
    finally:
        probe.unlink(missing_ok=True)
        if storage_probe:
            delete(storage_probe)


def _connect(address: str | None, log_to_driver: bool):
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return None
    env = {k: os.environ[k] for k in (*OFFLINE_ENV, "UNLEARN_CACHE", "MLFLOW_TRACKING_URI") if k in os.environ}
    # A submitted job (ray job submit, a RayJob, the forget reconciler) already gives its workers the
    # job's env_vars, and Ray refuses a driver that names one of them again.
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {}).get("env_vars", {})
    return ray.init(address or ray_address(), runtime_env={"env_vars": {k: v for k, v in env.items() if k not in job_env}},
                    log_to_driver=log_to_driver)


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
