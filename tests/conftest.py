"""Shared fixtures: the offline environment, one in-process Ray for the session, a trained tiny work dir."""

import os

for _key, _value in {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)
os.environ.pop("MLFLOW_TRACKING_URI", None)  # each test's work dir has its own sqlite store

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from components.config import load_config  # noqa: E402
from components.store import Workdir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def ray_session():
    """One real Ray (2 CPUs) for every test that needs it; started once, stopped at the end."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}})
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_config():
    return load_config(TINY)


@pytest.fixture(scope="session")
def trained_tiny(ray_session, tiny_config, tmp_path_factory):
    """A work dir with the tiny config trained once (K=4, registered, adapter set live).
    Tests that change it must use their own work dir instead."""
    from ray_jobs.train import run

    workdir = Workdir(tmp_path_factory.mktemp("trained-tiny"))
    report = run(tiny_config, workdir)
    return workdir, report
