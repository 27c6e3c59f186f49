"""The MLflow model registry: the only module that talks to MLflow.

Every shard training becomes an MLflow run (params, loss curve, adapter and slice checkpoints as
artifacts) and a version of the registered model `<experiment>.shard-<k>`; alias `live` marks the
version in use. An *adapter set* (`<experiment>.adapter-set`) pins one version of every shard plus
the aggregator state; serving loads `models:/<experiment>.adapter-set@live`.

The names a deployment serves belong to its work dir alone: a registered model carries the work
dir that created it (tag `workdir`) and no other work dir may add versions, move aliases or masks
on it. Runs that are not the deployment (reference trainings, the evaluation's and benchmarks' own
trainings) keep a registry of their own inside their work dir (`keep_own_registry`), whatever
MLFLOW_TRACKING_URI says.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.store.db.utils import _initialize_tables, create_sqlalchemy_engine_with_retry

from components.config import cache_dir

LIVE = "live"
MASK_TAG = "masked_shards"  # on the adapter-set model: shards serving must not use right now
OWNER_TAG = "workdir"  # on every registered model: the work dir whose names these are
OWN_REGISTRY = "registry.json"  # in a work dir that keeps its own MLflow store


class RegistryConflict(RuntimeError):
    """A write to registered models that belong to another work dir."""


def default_tracking_uri(workdir: Path) -> str:
    """The store of the work dir, or of a folder above it, that keeps its own (DIR/registry.json);
    else MLFLOW_TRACKING_URI; else sqlite in the work dir."""
    workdir = Path(workdir).resolve()
    for folder in (workdir, *workdir.parents):
        if (folder / OWN_REGISTRY).is_file():
            return json.loads((folder / OWN_REGISTRY).read_text())["tracking_uri"]
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir / 'mlflow.db'}"


def keep_own_registry(workdir: Path, why: str) -> str:
    """Give a work dir (and the work dirs inside it) an MLflow store of its own, sqlite inside it,
    whatever MLFLOW_TRACKING_URI says: a run that is not the deployment never writes to the
    deployment's registry. Returns the store's URI."""
    workdir = Path(workdir).resolve()
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    workdir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=workdir, prefix=f".{OWN_REGISTRY}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"tracking_uri": uri, "why": why}, f)
    os.replace(tmp, workdir / OWN_REGISTRY)
    return uri


@dataclass(frozen=True)
class AdapterSet:
    version: str
    shards: dict[int, dict]  # shard -> {"name", "version", "source", "adapter_sha256", "local": folder}
    folder: Path  # downloaded: adapter_set.json, aggregator/ (state + partitioner), shards/


def start_sqlite_store(uri: str) -> None:
    """A new sqlite store starts as a copy of an empty one already migrated (cached per MLflow
    version): MLflow otherwise runs every schema migration on each new file, seconds each time, and
    every work dir, baseline and reference has one. The copy is linked into place, so a store
    another process created first is never replaced."""
    path = Path(uri.removeprefix("sqlite:///"))
    if not uri.startswith("sqlite:///") or path.exists():
        return
    template = cache_dir() / f"mlflow-{mlflow.__version__}-empty.db"
    if not template.exists():
        template.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=template.parent, prefix=f".{template.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
        engine = create_sqlalchemy_engine_with_retry(f"sqlite:///{tmp}")
        _initialize_tables(engine)  # what MLflow does to a new file: the tables, then every migration
        engine.dispose()
        os.replace(tmp, template)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.copyfile(template, tmp)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


class Registry:
    def __init__(self, experiment: str, workdir: Path, tracking_uri: str | None = None):
        self.experiment = experiment
        self.workdir = Path(workdir).resolve()
        self.tracking_uri = tracking_uri or default_tracking_uri(self.workdir)
        start_sqlite_store(self.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self.experiment_id = self._experiment_id()
        self._owned: set[str] = set()  # registered models checked to be this work dir's

    # --- names -----------------------------------------------------------------------------------
    def shard_model(self, shard: int) -> str:
        return f"{self.experiment}.shard-{shard}"

    @property
    def set_model(self) -> str:
        return f"{self.experiment}.adapter-set"

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        # A local tracking store keeps artifacts under the work dir; a server decides for itself.
        location = (self.workdir / "mlartifacts").as_uri() if self.tracking_uri.startswith("sqlite:") else None
        try:
            return self.client.create_experiment(self.experiment, artifact_location=location)
        except MlflowException:  # created concurrently
            return self.client.get_experiment_by_name(self.experiment).experiment_id

    def _ensure_model(self, name: str, description: str) -> None:
        """The registered model `name`, created if new; a RegistryConflict if another work dir owns it."""
        if name in self._owned:
            return
        try:
            self.client.create_registered_model(name, tags={OWNER_TAG: str(self.workdir)}, description=description)
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise
            owner = self.client.get_registered_model(name).tags.get(OWNER_TAG)
            if owner is None:  # registered before models carried their owner: the first writer claims it
                self.client.set_registered_model_tag(name, OWNER_TAG, str(self.workdir))
            elif owner != str(self.workdir):
                raise RegistryConflict(
                    f"registered model {name!r} on {self.tracking_uri} belongs to the work dir {owner}, not {self.workdir}: "
                    f"give this run another experiment name, or its own registry (MLFLOW_TRACKING_URI)") from None
        self._owned.add(name)

    # --- writing ----------------------------------------------------------------------------------
    def claim(self) -> None:
        """Make sure this work dir may write its names (before hours of training, not after)."""
        self._ensure_model(self.set_model, f"The shard adapters and aggregator state that serving loads ({self.experiment})")

    def log_shard_version(
        self,
        shard: int,
        adapter_dir: Path,
        checkpoint_dir: Path | None,
        params: dict,
        losses: list[float],
        tags: dict[str, str],
        figures: dict[str, object] | None = None,
    ) -> str:
        """One run + one registered version for a trained shard, its slice checkpoints (a local
        folder, or None) logged beside the adapter; returns the version (not yet live)."""
        name = self.shard_model(shard)
        self._ensure_model(name, f"LoRA/prompt adapter of shard {shard} of experiment {self.experiment}")
        parent = self.live_version(name)
        tags = {**tags, "shard": str(shard), "parent_version": parent.version if parent else ""}
        run = self.client.create_run(self.experiment_id, run_name=f"shard-{shard}", tags=tags)
        run_id = run.info.run_id
        try:
            self.client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
            metrics = [mlflow.entities.Metric("train_loss", loss, 0, step) for step, loss in enumerate(losses)]
            for start in range(0, len(metrics), 900):
                self.client.log_batch(run_id, metrics=metrics[start : start + 900])
            self.client.log_artifacts(run_id, str(adapter_dir), "adapter")
            if checkpoint_dir is not None:
                self.client.log_artifacts(run_id, str(checkpoint_dir), "checkpoints")
            for artifact_file, figure in (figures or {}).items():
                self.client.log_figure(run_id, figure, artifact_file)
            self.client.set_terminated(run_id)
        except BaseException:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        source = f"{run.info.artifact_uri}/adapter"
        version = self.client.create_model_version(name, source, run_id, tags=tags)
        return version.version

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        self.client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), 0, 0) for k, v in metrics.items()])

    def set_live(self, name: str, version: str) -> None:
        self._ensure_model(name, "")
        self.client.set_registered_model_alias(name, LIVE, version)

    def register_adapter_set(self, shard_versions: dict[int, str], aggregator_dir: Path, tags: dict[str, str],
                             figures: dict[str, object] | None = None) -> str:
        """A new adapter-set version pinning `shard_versions` and the aggregator state in `aggregator_dir`."""
        self._ensure_model(self.set_model, f"The shard adapters and aggregator state that serving loads ({self.experiment})")
        pinned = {}
        for shard, version in sorted(shard_versions.items()):
            mv = self.client.get_model_version(self.shard_model(shard), version)
            pinned[str(shard)] = {"name": mv.name, "version": mv.version, "source": mv.source, "run_id": mv.run_id,
                                  "adapter_sha256": mv.tags.get("adapter_sha256", "")}
        parent = self.live_version(self.set_model)
        tags = {**tags, "shards": json.dumps({k: v["version"] for k, v in pinned.items()}),
                "parent_version": parent.version if parent else ""}
        run = self.client.create_run(self.experiment_id, run_name="adapter-set", tags=tags)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "adapter_set.json").write_text(json.dumps({"experiment": self.experiment, "shards": pinned}, indent=1))
            self.client.log_artifacts(run.info.run_id, tmp, "adapter_set")
        self.client.log_artifacts(run.info.run_id, str(aggregator_dir), "adapter_set/aggregator")
        for artifact_file, figure in (figures or {}).items():
            self.client.log_figure(run.info.run_id, figure, artifact_file)
        self.client.set_terminated(run.info.run_id)
        version = self.client.create_model_version(self.set_model, f"{run.info.artifact_uri}/adapter_set", run.info.run_id, tags=tags)
        return version.version

    # --- reading ----------------------------------------------------------------------------------
    def live_version(self, name: str):
        try:
            return self.client.get_model_version_by_alias(name, LIVE)
        except MlflowException:
            return None

    def versions(self, name: str) -> list:
        try:
            return sorted(self.client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
        except MlflowException:
            return []

    def download(self, source: str, dst: Path) -> Path:
        dst.mkdir(parents=True, exist_ok=True)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=self.tracking_uri))

    def load_adapter_set(self, dst: Path, version: str | None = None) -> AdapterSet | None:
        """Download an adapter set (default: the live one) with its shard adapters under `dst`."""
        mv = self.client.get_model_version(self.set_model, version) if version else self.live_version(self.set_model)
        if mv is None:
            return None
        folder = self.download(mv.source, dst / f"set-{mv.version}")
        shards = {int(k): v for k, v in json.loads((folder / "adapter_set.json").read_text())["shards"].items()}
        for shard, info in shards.items():
            info["local"] = str(self.download(info["source"], folder / "shards" / str(shard)))
        return AdapterSet(mv.version, shards, folder)

    def live_set_version(self) -> str | None:
        mv = self.live_version(self.set_model)
        return mv.version if mv else None

    # --- masking: a flag serving polls, so a forget takes effect before any retraining ---------
    def masked_shards(self) -> set[int]:
        try:
            tag = self.client.get_registered_model(self.set_model).tags.get(MASK_TAG, "")
        except MlflowException:
            return set()
        return {int(s) for s in tag.split(",") if s}

    def set_masked_shards(self, shards: set[int]) -> None:
        self._ensure_model(self.set_model, "")
        self.client.set_registered_model_tag(self.set_model, MASK_TAG, ",".join(map(str, sorted(shards))))

    def mask_and_live_set(self) -> tuple[set[int], str | None, dict[int, str] | None]:
        """The masked shards, then the live adapter-set version and the shard versions it pins (None
        where unknown), read in that order: a forget job moves the alias before it unmasks, so a mask
        read first is never paired with an alias older than the unmasking."""
        masked = self.masked_shards()
        live = self.live_version(self.set_model)
        if live is None:
            return masked, None, None
        try:
            pins = {int(k): str(v) for k, v in json.loads(live.tags["shards"]).items()}
        except (KeyError, TypeError, ValueError):
            pins = None
        return masked, str(live.version), pins

    def mentions(self, needle: str) -> list[str]:
        """Where the experiment's runs and registered models name `needle`: run names, params,
        tags and metric names, and the tags and descriptions of models and versions (deleted runs
        included). Artifacts are files: scan their store as files."""
        places = []
        runs = self.client.search_runs([self.experiment_id], run_view_type=mlflow.entities.ViewType.ALL, max_results=50000)
        for run in runs:
            fields = {"run name": run.info.run_name or "", **{f"param {k}": f"{k}={v}" for k, v in run.data.params.items()},
                      **{f"tag {k}": f"{k}={v}" for k, v in run.data.tags.items()}, **{f"metric {k}": k for k in run.data.metrics}}
            places += [f"MLflow run {run.info.run_id}: {field}" for field, text in fields.items() if needle in text]
        for model in self.client.search_registered_models(f"name LIKE '{self.experiment}.%'"):
            texts = [model.description or "", *(f"{k}={v}" for k, v in model.tags.items())]
            places += [f"MLflow model {model.name}: tags or description" for text in texts if needle in text][:1]
            for version in self.versions(model.name):
                texts = [version.description or "", *(f"{k}={v}" for k, v in version.tags.items())]
                places += [f"MLflow model {model.name} v{version.version}: tags or description" for text in texts if needle in text][:1]
        return places

    def run_artifacts(self, run_id: str) -> list[str]:
        """The files a run's artifact store still holds (deleted runs included)."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return []
        return _list_files(get_artifact_repository(run.info.artifact_uri))

    # --- purge ------------------------------------------------------------------------------------
    def purge_version(self, name: str, version: str) -> dict:
        """Delete a version, its run and every artifact of that run; check the artifacts are gone."""
        mv = self.client.get_model_version(name, version)
        run = self.client.get_run(mv.run_id) if mv.run_id else None
        removed = {"model": name, "version": version, "run_id": mv.run_id, "artifacts": []}
        if run is not None:
            repo = get_artifact_repository(run.info.artifact_uri)
            removed["artifacts"] = _list_files(repo)
            repo.delete_artifacts()
            if _list_files(get_artifact_repository(run.info.artifact_uri)):
                raise RuntimeError(f"artifacts of {name} v{version} still present after delete: {run.info.artifact_uri}")
            self.client.delete_run(mv.run_id)
        self.client.delete_model_version(name, version)
        return removed


def _list_files(repo, path: str | None = None) -> list[str]:
    try:
        entries = repo.list_artifacts(path)
    except (OSError, MlflowException, RestException):
        return []
    files = []
    for entry in entries:
        files.extend(_list_files(repo, entry.path) if entry.is_dir else [entry.path])
    return files
