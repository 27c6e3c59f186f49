"""The work dirs an evaluation compares: DIR itself (trained, or at least its store prepared) and
each baseline's DIR/baselines/<name>, trained on a copy of DIR's current store and reused when
present (a baseline that still holds samples DIR has since forgotten forgets them first)."""

from __future__ import annotations

import json
import os
import time

from components.baselines import baseline_sha256
from components.config import Config
from components.data import SPLITS, read_parquet
from components.model import load_tokenizer
from components.registry import keep_own_registry
from components.store import Workdir, copy_store, prepare, write_json
from components.unlearn import new_request
from ray_jobs.evaluation import EvaluationError, Log
from ray_jobs.orchestration import train_workdir
from ray_jobs.passes import StorePass
from ray_jobs.rounds import process


def train_report(workdir: Workdir) -> dict | None:
    path = workdir.path("reports", "train.json")
    return json.loads(path.read_text()) if path.exists() else None


def ensure_main(config: Config, workdir: Workdir, train: bool, log: Log, states_from: Workdir | None = None) -> dict | None:
    """DIR trained with the config as given (when `train`), or at least its sample store prepared;
    `states_from`: a store of the same model whose trunk states are linked, not computed."""
    report = train_report(workdir)
    if report is not None:
        if report.get("config_sha256") != config.sha256():
            log(f"note: {workdir.root} was trained with a different configuration (sha256 {report.get('config_sha256', '?')[:12]})")
        return report
    if train:
        uri = keep_own_registry(workdir.root, "the evaluation's own training")
        log(f"{workdir.root} has no reports/train.json: training the APA shards first, registered in the work dir's "
            f"own MLflow store {uri} (never in a deployment's)")
        return train_workdir(config, workdir, states_from=states_from)
    if not all(workdir.split(name).exists() for name in SPLITS):
        log(f"preparing the sample store of {workdir.root}")
        tokenizer = load_tokenizer(config.model)
        prepare(config, workdir, None, tokenizer, states_from=states_from, compute=StorePass(config, workdir, tokenizer))
    return None


def _sample_users(workdir: Workdir) -> dict[str, set[str]]:
    return {name: set(read_parquet(workdir.split(name))[["sample_id", "user_id"]].itertuples(index=False, name=None))
            for name in SPLITS if workdir.split(name).exists()}


def forget_in(config: Config, workdir: Workdir, users: list[str], request_id: str) -> list[dict]:
    """Forget `users` in `workdir` as the forget job would: a recorded request, processed now."""
    new_request(workdir, users, [], request_id, source="evaluate")
    return process(config, workdir)


def ensure_baseline(config: Config, workdir: Workdir, source: Workdir, label: str, log: Log) -> dict:
    """A baseline work dir trained on a copy of `source`'s current store, reused when present."""
    report = train_report(workdir)
    marker = workdir.path("baseline.json")
    if report is not None:
        trained_as = json.loads(marker.read_text()) if marker.exists() else {"config_sha256": report.get("config_sha256")}
        if trained_as.get("baseline_sha256") != baseline_sha256(config) and trained_as.get("config_sha256") != config.sha256():
            raise EvaluationError(f"baseline {label} in {workdir.root} was trained with another configuration: "
                                  f"delete that folder to train it again")
        # Samples the source has forgotten since the baseline was built must go from the baseline too.
        ours, theirs = _sample_users(workdir), _sample_users(source)
        extra = {user for name, pairs in ours.items() for _, user in pairs - theirs.get(name, set())}
        if extra:
            log(f"baseline {label}: {len(extra)} user(s) forgotten in {source.root} since it was trained; forgetting them here too")
            forget_in(config, workdir, sorted(extra), f"sync-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}")
        log(f"baseline {label}: reusing {workdir.root} (adapter set v{report['adapter_set_version']})")
        return report
    copy_store(source, workdir)  # as it is now (also over a half-trained copy): forgotten samples are gone
    log(f"baseline {label}: training {config.partition.method} partition, {config.adapter.kind} adapters into {workdir.root}")
    report = train_workdir(config, workdir)
    write_json(marker, {"baseline": label, "baseline_sha256": baseline_sha256(config), "config_sha256": config.sha256()})
    return report
