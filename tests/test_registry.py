"""Issue 4: every shard adapter versioned in a real MLflow registry, with lineage; adapter sets; purge."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import pytest

from benchmarks.common import fresh_workdir
from components.data import read_parquet
from components.registry import Registry, RegistryConflict, start_sqlite_store
from components.store import Workdir
from ray_jobs import evaluate as evaluate_job
from ray_jobs import rounds
from ray_jobs import train as train_job

LINEAGE_TAGS = {"shard", "samples", "manifest_sha256", "adapter_sha256", "config_sha256", "seed", "restarted_from", "parent_version"}


def check_trained_registry(registry: Registry, report: dict, config) -> None:
    shards = range(config.partition.num_shards)
    for shard in shards:
        name = registry.shard_model(shard)
        versions = registry.versions(name)
        assert [str(v.version) for v in versions] == ["1"]
        live = registry.live_version(name)
        assert str(live.version) == "1"
        assert LINEAGE_TAGS <= set(live.tags), set(live.tags)
        assert live.tags["adapter_sha256"] == report["shards"][str(shard)]["adapter_sha256"]
        assert live.tags["manifest_sha256"] == report["shards"][str(shard)]["manifest_sha256"]
        assert live.tags["config_sha256"] == config.sha256()
        run = registry.client.get_run(live.run_id)
        assert run.data.params["shard"] == str(shard)
        assert len(registry.client.get_metric_history(live.run_id, "train_loss")) == len(json.loads(
            (Path(registry.download(live.source, Path(os.environ["TMPDIR_TEST"]) / f"s{shard}")) / "meta.json").read_text())["losses"])
        files = registry.run_artifacts(live.run_id)
        assert "adapter/adapter.pt" in files and "loss_curve.png" in files
        assert any(f.startswith("checkpoints/slice-") for f in files)
    adapter_set = registry.live_version(registry.set_model)
    assert str(adapter_set.version) == "1"
    assert json.loads(adapter_set.tags["shards"]) == {str(k): "1" for k in shards} or \
           json.loads(adapter_set.tags["shards"]) == {str(k): 1 for k in shards}


@pytest.fixture(autouse=True)
def _download_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR_TEST", str(tmp_path))


def test_train_registers_every_shard_with_lineage_and_an_adapter_set(trained_tiny, tiny_config, tmp_path):
    workdir, report = trained_tiny
    registry = Registry(tiny_config.experiment, workdir.root)
    assert registry.tracking_uri == f"sqlite:///{workdir.root / 'mlflow.db'}"
    check_trained_registry(registry, report, tiny_config)
    loaded = registry.load_adapter_set(tmp_path)
    assert sorted(loaded.shards) == list(range(tiny_config.partition.num_shards))
    assert (loaded.folder / "aggregator" / "state.pt").exists() and (loaded.folder / "aggregator" / "partitioner.npz").exists()
    assert all((Path(info["local"]) / "adapter.pt").exists() for info in loaded.shards.values())


def test_a_new_sqlite_store_starts_from_the_migrated_template_and_an_existing_one_is_kept(tmp_path, monkeypatch):
    from mlflow.store.db.utils import _get_latest_schema_revision, _get_schema_version, create_sqlalchemy_engine

    monkeypatch.setenv("UNLEARN_CACHE", str(tmp_path / "cache"))
    first = Registry("template-a", tmp_path / "a")
    template = tmp_path / "cache" / f"mlflow-{mlflow.__version__}-empty.db"
    assert template.exists() and (tmp_path / "a" / "mlflow.db").exists()
    assert _get_schema_version(create_sqlalchemy_engine(f"sqlite:///{template}")) == _get_latest_schema_revision()
    first.client.create_registered_model("kept")
    start_sqlite_store(first.tracking_uri)  # a store that exists is never replaced
    second = Registry("template-b", tmp_path / "b")  # from the cached template
    assert [m.name for m in Registry("template-a", tmp_path / "a").client.search_registered_models()] == ["kept"]
    assert second.client.search_registered_models() == [] and second.experiment_id != "0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        server.kill()
        pytest.fail("mlflow server did not start")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    yield url, tmp_path / "server-artifacts"
    os.killpg(server.pid, 15)
    server.wait(timeout=30)


def test_a_shard_version_is_stored_served_and_purged_through_a_real_mlflow_server(trained_tiny, tmp_path, mlflow_server):
    """The server's side of what a forget does to the registry, on a trained shard's files: a new
    version with its lineage, the artifacts held by the server and downloaded back, the old
    version purged there: its run and every file."""
    url, artifact_root = mlflow_server
    trained, _ = trained_tiny
    registry = Registry("tiny-on-a-server", tmp_path / "work")
    assert registry.tracking_uri == url

    def log(losses):
        with trained.checkpoints(0).local_folder() as checkpoints:
            return registry.log_shard_version(0, trained.adapter(0), checkpoints, {"shard": 0}, losses, {"samples": "1"})

    first = log([0.7, 0.6])
    registry.set_live(registry.shard_model(0), first)
    second = log([0.5])
    registry.set_live(registry.shard_model(0), second)
    live = registry.live_version(registry.shard_model(0))
    assert (live.version, live.tags["parent_version"]) == (second, first)
    old = registry.client.get_model_version(registry.shard_model(0), first)
    assert any(old.run_id in str(p) for p in artifact_root.rglob("adapter.pt"))  # the server holds the files
    downloaded = Path(registry.download(live.source, tmp_path / "download")) / "adapter.pt"
    assert downloaded.read_bytes() == (trained.adapter(0) / "adapter.pt").read_bytes()

    removed = registry.purge_version(registry.shard_model(0), first)
    assert "adapter/adapter.pt" in removed["artifacts"] and any(f.startswith("checkpoints/slice-") for f in removed["artifacts"])
    assert registry.run_artifacts(old.run_id) == []
    assert not [p for p in artifact_root.rglob("*") if p.is_file() and old.run_id in str(p)]
    assert [v.version for v in registry.versions(registry.shard_model(0))] == [second]


@pytest.mark.slow  # three trainings: make test-slow; make test keeps the server's side of a forget (above)
def test_retrain_purge_and_lineage_against_a_real_mlflow_server(ray_session, tiny_config, tmp_path, mlflow_server):
    url, artifact_root = mlflow_server
    workdir = Workdir(tmp_path / "work")
    report = train_job.run(tiny_config, workdir)
    registry = Registry(tiny_config.experiment, workdir.root)
    assert registry.tracking_uri == url and not (workdir.root / "mlflow.db").exists()
    check_trained_registry(registry, report, tiny_config)
    assert any(artifact_root.rglob("adapter.pt"))  # the server stores the artifacts

    # Forget a user who lives in exactly one shard: only that shard gets a new version, after an interim
    # one (its clean slice checkpoint, served while it retrained) where the shard has one.
    owners = {}
    for shard in range(workdir.num_shards()):
        for user in read_parquet(workdir.shard_samples(shard))["user_id"]:
            owners.setdefault(user, set()).add(shard)
    user, [shard] = next((u, sorted(s)) for u, s in sorted(owners.items()) if len(s) == 1)
    old = registry.live_version(registry.shard_model(shard))
    old_files = registry.run_artifacts(old.run_id)
    assert old_files
    from components.unlearn import new_request

    new_request(workdir, [user], [], "server-forget")
    [audit] = rounds.process(tiny_config, workdir)
    assert audit["scan"]["clean"], audit

    interim = audit["interim_versions"].get(str(shard))
    new = "3" if interim else "2"
    live = registry.live_version(registry.shard_model(shard))
    assert str(live.version) == new and live.tags["forget_request"] == audit["round_id"]
    assert live.tags["parent_version"] == (interim or "1")  # the version live when it was registered
    for other in set(range(workdir.num_shards())) - {shard}:
        assert str(registry.live_version(registry.shard_model(other)).version) == "1"
    adapter_set = registry.live_version(registry.set_model)
    assert str(adapter_set.version) == new and str(json.loads(adapter_set.tags["shards"])[str(shard)]) == new
    # The replaced versions are gone from the registry and their files from the artifact store.
    assert [str(v.version) for v in registry.versions(registry.shard_model(shard))] == [new]
    assert registry.run_artifacts(old.run_id) == []
    assert not [p for p in artifact_root.rglob("*") if p.is_file() and old.run_id in str(p)]
    assert {p["version"] for p in audit["purged"] if p["model"] == registry.shard_model(shard)} == {"1", *([interim] if interim else [])}

    # Issue 29: runs that are not the deployment, with its config and its tracking server, never
    # move its aliases. A reference training, an evaluation's own training and a benchmark's keep
    # registries of their own; anything else that would write the deployment's names is refused.
    names = [registry.set_model, *map(registry.shard_model, range(workdir.num_shards()))]
    live = {name: registry.live_version(name).version for name in names}
    train_job.run(tiny_config, Workdir(tmp_path / "reference"), [user], [])
    evaluate_job.run(tiny_config, Workdir(tmp_path / "evaluation"), ["apa"], "none")
    bench = fresh_workdir(str(tmp_path / "bench"), "bench-x")
    train_job.run(tiny_config, Workdir(bench.path("sharded")))
    for other in ("reference", "evaluation", "bench/sharded"):
        expected = f"sqlite:///{tmp_path / other.split('/')[0] / 'mlflow.db'}"
        assert Registry(tiny_config.experiment, tmp_path / other).tracking_uri == expected
    with pytest.raises(RegistryConflict, match=rf"belongs to the work dir {workdir.root}"):
        train_job.run(tiny_config, Workdir(tmp_path / "another"))
    assert {name: registry.live_version(name).version for name in live} == live
    assert registry.client.get_registered_model(registry.set_model).tags["workdir"] == str(workdir.root)


class ForgetJobBetweenReads(Registry):
    """A real registry on which a forget job finishes its last two writes (the alias moves to the
    clean set, then the shard is unmasked) right after the first read of the reader."""

    def __init__(self, *args, job_writes):
        super().__init__(*args)
        self.job_writes, self.reads = job_writes, []

    def _after_read(self, what: str) -> None:
        self.reads.append(what)
        if len(self.reads) == 1:
            self.job_writes(self)

    def masked_shards(self) -> set[int]:
        masked = super().masked_shards()
        self._after_read("mask")
        return masked

    def live_version(self, name: str):
        live = super().live_version(name)
        self._after_read("alias")
        return live


def test_a_forget_job_between_the_two_reads_never_unmasks_the_old_set(tmp_path):
    """What serving reads per poll: if the job's writes fall between the reads, the pair must not be
    (empty mask, old alias), which would serve the old adapter of a forgotten shard."""
    writer = Registry("race", tmp_path)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter.pt").write_bytes(b"weights")
    (tmp_path / "aggregator").mkdir()
    (tmp_path / "aggregator" / "state.pt").write_bytes(b"state")
    sets = []
    for _ in range(2):  # the set with the forgotten user's data, then the clean one
        shard_version = writer.log_shard_version(0, tmp_path / "adapter", tmp_path / "none", {}, [0.5], {})
        sets.append(writer.register_adapter_set({0: shard_version}, tmp_path / "aggregator", {}))
    writer.set_live(writer.set_model, sets[0])
    writer.set_masked_shards({0})

    def job_writes(registry):
        registry.set_live(registry.set_model, sets[1])
        registry.set_masked_shards(set())

    reader = ForgetJobBetweenReads("race", tmp_path, job_writes=job_writes)
    masked, live, pins = reader.mask_and_live_set()
    assert (masked, live, pins) == ({0}, str(sets[1]), {0: "2"})  # still masked, and the alias already clean
    assert reader.reads[:2] == ["mask", "alias"]
    assert writer.mask_and_live_set() == (set(), str(sets[1]), {0: "2"})
