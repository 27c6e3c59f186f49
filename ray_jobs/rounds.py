"""The forget round: what every forget runs, whoever starts it (the forget job, the reconciler's
jobs, an evaluation forwarding a forget to its baselines). A round takes the pending requests
(within the masked-share bound), masks the shards they touch, deletes the data, serves interim
versions from clean slice checkpoints, retrains the affected shards from their last clean slice
checkpoint, registers and publishes, unmasks, purges what the data touched and scans for traces;
each step is recorded first, so a round killed anywhere resumes where it stopped.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from components.aggregate import AggregatorState
from components.baselines import baseline_config
from components.config import Config
from components.data import SPLITS, read_parquet, samples_touching
from components.model import load_base_model, load_tokenizer, make_deterministic
from components.proof import compare_states, compare_tensors, scan_workdir
from components.registry import Registry, keep_own_registry
from components.store import Workdir, copy_store, load_splits, remove_samples, sample_states, write_json
from components.train import ADAPTER_FILE, ShardResult, checkpoint_result, save_shard_result
from components.unlearn import (
    admit_round,
    advance,
    current_round,
    deferred_shards,
    load_request,
    masked_by_pending,
    new_request,
    plan_round,
    round_lock,
    round_path,
    save_request,
    scrub,
    shard_sizes,
    state_index,
)
from ray_jobs.common import (
    connect_ray,
    id_list,
)
from ray_jobs.orchestration import publish_adapter_set, register_shards
from ray_jobs.orchestration import train_workdir as train_from_scratch
from ray_jobs.passes import Scoring, score_pass
from ray_jobs.shard_training import train_shards


def process(config: Config, workdir: Workdir, verify: bool = False) -> list[dict]:
    """Process every pending request, round by round; returns the audit records written.
    If another process is running a round, the requests stay queued for it and nothing is done."""
    audits = []
    with round_lock(workdir, job=os.environ.get("UNLEARN_FORGET_SUBMISSION_ID") or f"pid {os.getpid()}") as held:
        if not held:
            print("another forget job is running a round: the request is queued and will be coalesced into its next round")
            return audits
        while True:
            round_ = current_round(workdir)
            if round_ is not None and round_.get("failed"):
                print(f"error: round {round_['round_id']} failed ({round_['failed']}); requests wait until an operator retries "
                      f"or abandons {', '.join(round_['request_ids'])}", flush=True)
                return audits
            if round_ is None:
                batch = admit_round(workdir)
                if not batch:
                    return audits
                round_ = {"round_id": uuid.uuid4().hex[:12], "request_ids": [r["request_id"] for r in batch],
                          "users": sorted({u for r in batch for u in r["users"]}),
                          "interactions": sorted({i for r in batch for i in r["interactions"]}),
                          "state": "received", "seconds": {}}
                write_json(round_path(workdir), round_)
                _fault_injection("received")
            audits += run_round(config, workdir, round_, verify)


def _set_state(workdir: Workdir, round_: dict, state: str, started: float, **fields) -> None:
    entered = round_["state"] != state  # a resumed job records "retrained" again: no second kill there
    round_.update(fields, state=state)
    round_["seconds"][state] = round(time.time() - started, 3)
    write_json(round_path(workdir), round_)
    for request_id in round_["request_ids"]:
        advance(workdir, load_request(workdir, request_id), state)
    print(f"[{round_['round_id']}] {state} ({round_['seconds'][state]}s)", flush=True)
    if entered:
        _fault_injection(state)


def _fault_injection(state: str) -> None:
    """Tests: UNLEARN_FORGET_KILL_AT=masked,retrained,... makes the job SIGKILL itself right after
    entering one of those states (once per state and round: a resumed job does not enter it again)."""
    if state in id_list(os.environ.get("UNLEARN_FORGET_KILL_AT")):
        print(f"fault injection: SIGKILL at {state}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def run_round(config: Config, workdir: Workdir, round_: dict, verify: bool) -> list[dict]:
    """Take the round from its recorded state to done, one recorded step at a time."""
    registry = Registry(config.experiment, workdir.root)
    users, interactions = set(round_["users"]), set(round_["interactions"])
    round_.setdefault("deferred", [])  # a round recorded before forget.max_masked_share existed
    print(f"[{round_['round_id']}] forgetting for request(s) {', '.join(round_['request_ids'])} (state {round_['state']})", flush=True)
    if round_["state"] == "received":
        mask_round(config, workdir, registry, round_, users, interactions)
    if round_["state"] == "masked":
        delete_data(config, workdir, round_, users, interactions)
    if round_["state"] == "deleted":
        start_interim(config, workdir, registry, round_)
    if state_index(round_["state"]) < state_index("registered"):
        retrain_and_publish(config, workdir, registry, round_)
    if round_["state"] == "registered":
        t = time.time()
        registry.set_masked_shards(masked_by_pending(workdir, exclude=round_["request_ids"]))
        _set_state(workdir, round_, "unmasked", t)
    if round_["state"] == "unmasked":
        purge_round(workdir, registry, round_)
    return finish_round(config, workdir, registry, round_, users, interactions, verify)


def round_shards(round_: dict) -> list[int]:
    return sorted(int(k) for k in round_["plan"]["shards"])


def delete_data(config: Config, workdir: Workdir, round_: dict, users: set[str], interactions: set[str]) -> None:
    """The samples go, and with them what was trained on them: the affected shards' checkpoints
    from their first touched slice on, their adapters, the cached per-sample scores."""
    t = time.time()
    remove_samples(workdir, users, interactions)
    for shard in round_shards(round_):
        restart = round_["plan"]["shards"][str(shard)]["restart_slice"]
        for stage in range(restart, config.partition.num_slices):
            workdir.checkpoints(shard).remove(stage)
        shutil.rmtree(workdir.adapter(shard), ignore_errors=True)
        workdir.progress(shard).unlink(missing_ok=True)
    shutil.rmtree(workdir.path("reports", "predictions"), ignore_errors=True)
    _set_state(workdir, round_, "deleted", t)


def start_interim(config: Config, workdir: Workdir, registry: Registry, round_: dict) -> None:
    """Affected shards with a clean checkpoint serve from it; only the others stay masked."""
    t = time.time()
    interim, interim_set = serve_interim(config, workdir, registry, round_)
    # The alias moved first: a replica keeps a shard masked until it has loaded its interim version.
    registry.set_masked_shards(masked_by_pending(workdir, exclude=round_["request_ids"])
                               | (set(round_shards(round_)) - set(round_["deferred"]) - set(interim)))
    _set_state(workdir, round_, "interim", t, interim_versions={str(k): v for k, v in interim.items()}, interim_set=interim_set)


def retrain_and_publish(config: Config, workdir: Workdir, registry: Registry, round_: dict) -> None:
    """Retrain the affected shards from their clean checkpoints, register them, and publish the
    round's adapter set: the old set's other shards, the new versions, validation predictions
    without the removed samples."""
    t = time.time()
    results = {}
    if shards := round_shards(round_):
        connect_ray()
        results = train_shards(config, workdir, shards)  # resumes from the clean checkpoints
        _set_state(workdir, round_, "retrained", t, restarted_from={str(k): r["restarted_from"] for k, r in results.items()})
    t = time.time()
    new_versions = register_shards(config, workdir, registry, results, {"forget_request": round_["round_id"]})
    with tempfile.TemporaryDirectory() as tmp:
        live = registry.load_adapter_set(Path(tmp), round_["old_set"])
        state = AggregatorState.load(live.folder / "aggregator").without(set(round_["removed_valid"]))
        pinned = {k: str(v["version"]) for k, v in live.shards.items()}
    for shard, result in results.items():
        state.predictions[shard] = torch.tensor(result["valid_predictions"])
    pinned.update({k: str(v) for k, v in new_versions.items()})
    set_version = publish_adapter_set(config, workdir, registry, state, pinned, {"forget_request": round_["round_id"]})
    _set_state(workdir, round_, "registered", t, new_versions={str(k): v for k, v in new_versions.items()}, new_set=set_version)


def purge_round(workdir: Workdir, registry: Registry, round_: dict) -> None:
    """Every version of an affected shard but the new one (interim ones included), every older set."""
    t = time.time()
    purged = []
    for shard in round_shards(round_):
        name = registry.shard_model(shard)
        purged += [registry.purge_version(name, str(v.version)) for v in registry.versions(name)
                   if str(v.version) != str(round_["new_versions"][str(shard)])]
    purged += [registry.purge_version(registry.set_model, str(v.version)) for v in registry.versions(registry.set_model)
               if str(v.version) != str(round_["new_set"])]
    _set_state(workdir, round_, "purged", t, purged=purged)


def finish_round(config: Config, workdir: Workdir, registry: Registry, round_: dict, users: set[str], interactions: set[str],
                 verify: bool) -> list[dict]:
    """Forward to the baselines, scan for traces, (verify,) write each request's audit record, and
    only then drop the plain ids: the request records keep the salted hash."""
    t = time.time()
    forwarded = forward_to_baselines(config, workdir, users, interactions, round_["round_id"])
    findings = scan_workdir(workdir, config, users, interactions) + scan_registry(registry, round_)
    verification = verify_from_scratch(config, workdir, registry, round_["round_id"]) if verify else None
    audits = []
    for request_id in round_["request_ids"]:
        record = load_request(workdir, request_id)
        audit = {
            "request_id": request_id, "subject_hash": record["subject_hash"], "source": record["source"],
            "coalesced_with": [r for r in round_["request_ids"] if r != request_id], "round_id": round_["round_id"],
            "affected_shards": round_shards(round_),
            "slice_restarted_from": {k: v["restart_slice"] for k, v in round_["plan"]["shards"].items()},
            "samples_removed": round_["plan"]["samples_removed"], "unknown_users": round_["plan"]["unknown_users"],
            "old_versions": round_["old_versions"], "new_versions": round_["new_versions"],
            "old_adapter_set": round_["old_set"], "new_adapter_set": round_["new_set"],
            "interim_versions": round_.get("interim_versions", {}), "interim_adapter_set": round_.get("interim_set"),
            "deferred_shards": round_["deferred"],
            "purged": round_["purged"], "seconds": round_["seconds"], "forwarded_to_baselines": forwarded,
            "scan": {"clean": not findings, "findings": findings}, "verification": verification,
        }
        write_json(workdir.path("audit", f"{request_id}.json"), audit)
        audits.append(audit)
    for request_id in round_["request_ids"]:
        advance(workdir, scrub(load_request(workdir, request_id)), "done")
    round_path(workdir).unlink()
    print(f"[{round_['round_id']}] done in {sum(round_['seconds'].values()) + time.time() - t:.1f}s; "
          f"scan {'clean' if not findings else findings}", flush=True)
    return audits


def mask_round(config: Config, workdir: Workdir, registry: Registry, round_: dict, users: set[str], interactions: set[str]) -> None:
    """Plan the round and mask its shards, within forget.max_masked_share: past the bound, some
    shards keep serving until their clean versions are live (recorded on each request)."""
    t = time.time()
    plan = plan_round(workdir, users, interactions)
    shards = sorted(int(k) for k in plan["shards"])
    old = {str(k): registry.live_version(registry.shard_model(k)).version for k in shards}
    valid = read_parquet(workdir.split("valid"))
    removed_valid = valid.loc[samples_touching(valid, users, interactions), "sample_id"].tolist()
    others = masked_by_pending(workdir, exclude=round_["request_ids"])
    deferred = deferred_shards(shard_sizes(workdir), plan["shards"], others, config.forget.max_masked_share)
    for request_id in round_["request_ids"] if deferred else ():  # its status says which shards still serve
        save_request(workdir, {**load_request(workdir, request_id), "deferred_shards": deferred})
    # Serving stops using the shards now, before any data is touched.
    registry.set_masked_shards(others | (set(shards) - set(deferred)))
    _set_state(workdir, round_, "masked", t, plan=plan, old_versions=old, old_set=registry.live_set_version(),
               removed_valid=removed_valid, deferred=deferred)
    if not any(plan["samples_removed"].values()):  # nothing of the subject is here: nothing to redo
        _set_state(workdir, round_, "purged", t, new_versions={}, new_set=round_["old_set"], purged=[], interim_versions={})


def serve_interim(config: Config, workdir: Workdir, registry: Registry, round_: dict) -> tuple[dict[int, str], str | None]:
    """While the round's shards retrain, each serves from its last clean slice checkpoint (trained
    only on slices before the subject's first one: it never saw the data), registered as a version
    of its shard with its lineage; a shard without one stays masked, out of the interim adapter set.
    Returns the interim versions and the set's version (None: no shard has one, nothing changes)."""
    results = checkpoint_results(config, workdir, [int(k) for k, v in round_["plan"]["shards"].items() if v["restart_slice"] > 0])
    versions = {}
    for shard, result in results.items():
        save_shard_result(result, workdir.adapter(shard), config)  # training overwrites it with the retrained adapter
        tags = {"forget_request": round_["round_id"], "interim": "true", "from_checkpoint": f"slice-{result.restarted_from - 1}",
                "restarted_from": ""}
        versions.update(register_shards(config, workdir, registry, {shard: vars(result)}, tags))
    if not versions:
        return {}, None
    with tempfile.TemporaryDirectory() as tmp:
        live = registry.load_adapter_set(Path(tmp), round_["old_set"])
        # The tainted versions' predictions go with them; the forgotten validation samples' rows too.
        state = AggregatorState.load(live.folder / "aggregator").without(set(round_["removed_valid"]))
        pinned = {k: str(v["version"]) for k, v in live.shards.items()}
    for shard in set(map(int, round_["plan"]["shards"])) - set(round_["deferred"]):
        pinned.pop(shard, None)
        state.predictions.pop(shard, None)
    for shard, result in results.items():
        pinned[shard] = versions[shard]
        state.predictions[shard] = torch.tensor(result.valid_predictions)
    return versions, publish_adapter_set(config, workdir, registry, state, pinned,
                                         {"forget_request": round_["round_id"], "interim": "true"})


def checkpoint_results(config: Config, workdir: Workdir, shards: list[int]) -> dict[int, ShardResult]:
    """Each shard's last clean slice checkpoint with its predictions of the validation samples left
    after deletion (components.train.checkpoint_result); shards without one are left out."""
    make_deterministic(max(1, int(config.train.cpus_per_actor)))
    tokenizer = load_tokenizer(config.model)
    valid = read_parquet(workdir.split("valid"))
    results, valid_states = {}, None
    for shard in shards:
        base = load_base_model(config.model, config.seed, tokenizer, head_only=True)
        if valid_states is None:
            valid_states = sample_states(config, workdir, valid, base, tokenizer)
        result = checkpoint_result(config, shard, read_parquet(workdir.shard_samples(shard)), valid_states,
                                   workdir.checkpoints(shard), base, tokenizer)
        if result is not None:
            results[shard] = result
    return results


def forward_to_baselines(config: Config, workdir: Workdir, users: set[str], interactions: set[str], round_id: str) -> dict:
    """Baselines built by the evaluation (DIR/baselines/<name>) were trained on a copy of this
    store: the subject is forgotten there too, each by its own forget round and audit."""

    forwarded = {}
    for folder in sorted(p for p in workdir.path("baselines").glob("*") if p.is_dir()):
        baseline = Workdir(folder)
        if not baseline.path("reports", "train.json").exists():
            continue
        splits = [baseline.split(name) for name in SPLITS if baseline.split(name).exists()]
        if not any(samples_touching(read_parquet(path), users, interactions).any() for path in splits):
            continue
        new_request(baseline, sorted(users), sorted(interactions), f"{round_id}-{folder.name}", source=f"forwarded:{round_id}")
        forwarded[folder.name] = [a["request_id"] for a in process(baseline_config(config, folder.name), baseline)]
    return forwarded


def scan_registry(registry: Registry, round_: dict) -> list[str]:
    """No version other than the new one survives for an affected shard, and no purged artifact remains."""
    findings = []
    for shard, version in round_["new_versions"].items():
        others = [v.version for v in registry.versions(registry.shard_model(int(shard))) if str(v.version) != str(version)]
        if others:
            findings.append(f"registry: {registry.shard_model(int(shard))} keeps versions {others}")
    for item in round_["purged"]:
        if registry.run_artifacts(item["run_id"]):
            findings.append(f"artifacts of {item['model']} v{item['version']} still present")
    return findings


def verify_from_scratch(config: Config, workdir: Workdir, registry: Registry, round_id: str) -> dict:
    """Train every shard from scratch on the current store (which no longer holds the subject) and
    compare every live adapter tensor, the aggregator state and the test predictions."""
    started = time.time()
    reference_dir = Workdir(workdir.path("verify", round_id))
    reference_dir.remove()
    copy_store(workdir, reference_dir)  # per-sample data (embeddings, trunk states) as stored
    keep_own_registry(reference_dir.root, "a forget's verification")  # never the deployment's registry
    reference_config = config.model_copy(update={"experiment": f"{config.experiment}-verify"})
    train_from_scratch(reference_config, reference_dir)
    result = compare_live(config, workdir, registry, Registry(reference_config.experiment, reference_dir.root))
    reference_dir.remove()
    return {**result, "seconds": round(time.time() - started, 2)}


def compare_live(config: Config, workdir: Workdir, ours: Registry, theirs: Registry) -> dict:
    """Bit-for-bit comparison of two live adapter sets: adapters, aggregator state, and their
    predictions of the test samples stored in `workdir` (one Ray Data scoring job, both sets on the
    same actors and batches)."""
    test = load_splits(workdir)["test"]
    # Downloaded inside the work dir: the scoring actors on every node read them.
    with tempfile.TemporaryDirectory(prefix=".compare-", dir=workdir.root) as tmp:
        sets = [ours.load_adapter_set(Path(tmp) / "a"), theirs.load_adapter_set(Path(tmp) / "b")]
        files = [{k: Path(v["local"]) / ADAPTER_FILE for k, v in s.shards.items()} for s in sets]
        adapter_diffs = {}
        for shard in sorted(set(files[0]) | set(files[1])):
            if shard not in files[0] or shard not in files[1]:
                adapter_diffs[shard] = ["missing in one set"]
            elif diff := compare_tensors(*(torch.load(f[shard], weights_only=True) for f in files)):
                adapter_diffs[shard] = diff
        states = [AggregatorState.load(s.folder / "aggregator") for s in sets]
        scorings = [Scoring(name, config, f, s.folder / "aggregator", config.aggregate.method)
                    for name, f, s in zip(("ours", "theirs"), files, sets)]
        scored = score_pass(config, workdir, test, scorings, threads=1, batch_size=16) if len(test) else None
    predictions = [scored[scored["name"] == s.name]["score"].to_numpy() if scored is not None else np.zeros(0) for s in scorings]
    state_diffs = compare_states(*states)
    identical_predictions = bool(len(predictions[0]) == len(predictions[1]) and (predictions[0] == predictions[1]).all())
    return {
        "identical": not adapter_diffs and not state_diffs and identical_predictions,
        "adapter_differences": adapter_diffs, "aggregator_differences": state_diffs,
        "identical_test_predictions": identical_predictions, "test_samples": len(test),
    }