"""What every job shares: the command line, the offline environment, and connecting to Ray."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import ray

from components.config import OFFLINE_ENV, Config, ConfigError, load_config
from components.data import DataError
from components.store import Workdir, check_inputs


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


def connect_ray() -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS) or the one running on this machine,
    or start a local one; pass the offline environment and model cache to every worker."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in (*OFFLINE_ENV, "UNLEARN_CACHE", "MLFLOW_TRACKING_URI") if k in os.environ}
    # A submitted job (ray job submit, a RayJob, the forget reconciler) already gives its workers the
    # job's env_vars, and Ray refuses a driver that names one of them again.
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {}).get("env_vars", {})
    ray.init(ray_address(), runtime_env={"env_vars": {k: v for k, v in env.items() if k not in job_env}}, log_to_driver=True)


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
