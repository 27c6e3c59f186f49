"""Serve the live adapter set of a work dir over HTTP (Ray Serve), until interrupted.

    python -m serving --config configs/tiny.yaml --workdir runs/tiny [--port 8000] [--host 127.0.0.1]

It joins the Ray cluster at $RAY_ADDRESS when that is set, else this machine's or a new local one.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from components.config import ALLOCATOR_ENV, OFFLINE_ENV


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_workdir(config, workdir: Path) -> str:
    """The live adapter-set version of `workdir`, or exit 2 saying what is missing."""
    from components.registry import Registry, default_tracking_uri

    uri = default_tracking_uri(workdir)
    if uri.startswith("sqlite:") and not (workdir / "mlflow.db").exists():
        fail(f"{workdir} has no MLflow store (mlflow.db): train first with "
             f"python -m ray_jobs.train --config ... --workdir {workdir}")
    version = Registry(config.experiment, workdir).live_set_version()
    if version is None:
        fail(f"no live adapter set '{config.experiment}.adapter-set' in {workdir} ({uri}): "
             f"train first with python -m ray_jobs.train --config ... --workdir {workdir}")
    return version


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--workdir", help="work dir with a trained, registered adapter set (default runs/<experiment>)")
    parser.add_argument("--host", help="HTTP host (default serving.host of the config, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default serving.port of the config, 8000)")
    args = parser.parse_args(argv)
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)

    from components.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as err:  # before the model's libraries load: a typo is reported in a second
        fail(str(err))
    from components.data import DataError
    from components.store import Workdir, check_inputs

    try:
        workdir = Path(args.workdir or Path("runs") / config.experiment).resolve()
        check_inputs(config, Workdir(workdir))
    except (ConfigError, DataError, ValueError) as err:
        fail(str(err))
    version = check_workdir(config, workdir)
    host, port = args.host or config.serving.host, args.port or config.serving.port
    if not 0 < port < 65536:
        fail(f"--port {port} is not a TCP port")

    import ray
    from ray import serve

    from ray_jobs.common import ray_address
    from serving.app import build_app

    env = {k: os.environ[k] for k in (*OFFLINE_ENV, "UNLEARN_CACHE", "MLFLOW_TRACKING_URI", config.serving.forget_token_env)
           if k in os.environ}
    # The dashboard hosts Ray's job server: the forget reconciler submits forget work as Ray jobs.
    ray.init(ray_address(), runtime_env={"env_vars": {**ALLOCATOR_ENV, **env}}, include_dashboard=True)
    nodes = sum(node["Alive"] for node in ray.nodes())
    if config.serving.replicas > nodes:  # serve.run would wait forever for a node to put a replica on
        ray.shutdown()
        fail(f"serving.replicas is {config.serving.replicas}, at most one per Ray node, "
             f"but the cluster has {nodes} node(s)")
    try:
        # One HTTP proxy, on the head node: the address printed below (a proxy on every node would
        # need a load balancer in front, and nodes sharing a host would fight over the port). Serve's
        # proxy prefers replicas on its own node; with a single proxy that would leave the other
        # nodes' replicas idle, so it spreads requests over all replicas instead.
        serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port},
                    controller_options={"runtime_env": {"env_vars": {"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}}})
        serve.run(build_app({"config": str(Path(args.config).resolve()), "workdir": str(workdir)}),
                  name="recommender", route_prefix="/", blocking=False)
        print(f"serving {config.experiment} adapter set v{version} ({config.aggregate.method}) on http://{host}:{port}"
              f"  (docs: http://{host}:{port}/docs; Ctrl-C stops)", flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):  # also when started in the background (SIGINT ignored)
            signal.signal(sig, _interrupt)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
