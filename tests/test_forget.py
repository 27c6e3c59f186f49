"""Issue 6: exact forgetting, end to end, compared bit for bit with training from scratch."""

import io
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open

from components import unlearn
from components.aggregate import AggregatorState
from components.checkpoints import delete, write_bytes
from components.config import ConfigError, load_config
from components.data import read_parquet, write_parquet
from components.model import answer_token_ids, load_base_model, load_tokenizer
from components.proof import compare_tensors, scan_workdir
from components.registry import Registry
from components.store import Workdir, load_splits, sample_states, user_moves
from components.train import ADAPTER_FILE, AdaptedHead, predict_states
from components.unlearn import (
    RequestError,
    admit_round,
    all_requests,
    any_waiting,
    deferred_shards,
    hold_new_requests,
    load_request,
    masked_by_pending,
    new_request,
    pending_requests,
    save_request,
)
from ray_jobs import forget as forget_job
from ray_jobs import rounds
from ray_jobs import train as train_job

from .conftest import ROOT, TINY, tiny_config_file


def shard_of_users(workdir):
    """user -> set of shards holding that user's training samples."""
    owners = {}
    for shard in range(workdir.num_shards()):
        for user in read_parquet(workdir.shard_samples(shard))["user_id"]:
            owners.setdefault(user, set()).add(shard)
    return owners


def assert_identical_to_scratch(config, workdir, tmp_path, users, interactions):
    scratch = Workdir(tmp_path / f"scratch-{uuid.uuid4().hex[:8]}")  # never reuse a path: MLflow caches stores by URI
    # Each trunk state is stored once (DESIGN 4a): the reference links the store's, as forget --verify does;
    # only the samples forgotten there run through the trunk again, and are then excluded.
    train_job.run(config, scratch, users, interactions, states_from=workdir)
    result = rounds.compare_live(config, workdir, Registry(config.experiment, workdir.root),
                                     Registry(config.experiment, scratch.root))
    assert result["identical"], result
    assert result["test_samples"] == len(load_splits(scratch)["test"]) > 0
    assert_same_trunk_states(workdir, scratch)
    assert_no_stored_state_of(workdir, set(users), set(interactions))
    checkpoints = scratch.checkpoints(0)
    assert checkpoints.stages()
    scratch.remove()  # with its folder in the checkpoint storage
    assert not checkpoints.stages() and not scratch.root.exists()


def assert_same_trunk_states(workdir, scratch):
    ours = {p.relative_to(workdir.trunk.root): p.read_bytes() for p in workdir.trunk.root.glob("*/*.safetensors")}
    theirs = {p.relative_to(scratch.trunk.root): p.read_bytes() for p in scratch.trunk.root.glob("*/*.safetensors")}
    assert ours and sorted(ours) == sorted(theirs)
    assert all(ours[name] == theirs[name] for name in ours)  # bit for bit


def assert_no_stored_state_of(workdir, users, interactions):
    """Nowhere in the work dir (MLflow's artifact store included) a state file of the subject."""
    for path in workdir.root.rglob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            header = json.loads(f.metadata()["sample"])
        assert header["user_id"] not in users, path
        assert interactions.isdisjoint(header["interactions"]), path


@pytest.fixture
def while_retraining(monkeypatch, tmp_path):
    """Checks what serving has while each forget round retrains (when it calls train_shards);
    yields the interim versions of each round."""
    seen, train_shards = [], rounds.train_shards

    def watching(config, workdir, shards):
        seen.append(assert_interim_set(config, workdir, shards, tmp_path / uuid.uuid4().hex))
        return train_shards(config, workdir, shards)

    monkeypatch.setattr(rounds, "train_shards", watching)
    return seen


def assert_interim_set(config, workdir, shards, download):
    """Every retraining shard with a clean slice checkpoint serves that checkpoint's adapter, bit for
    bit, registered with its lineage, with validation predictions recomputed on the validation
    samples left; only the others are masked (and out of the set)."""
    round_ = json.loads(workdir.path("rounds", "current.json").read_text())
    registry = Registry(config.experiment, workdir.root)
    interim = {int(k): v for k, v in round_["interim_versions"].items()}
    assert registry.masked_shards() == set(shards) - set(interim) - set(round_["deferred"])
    live = registry.load_adapter_set(download)
    assert live.version == (round_["interim_set"] or round_["old_set"])
    assert set(shards) - set(interim) - set(round_["deferred"]) - set(live.shards) == set()
    state = AggregatorState.load(live.folder / "aggregator")
    valid = load_splits(workdir)["valid"]
    assert state.sample_ids == valid["sample_id"].tolist()  # the forgotten validation samples are gone
    tokenizer = load_tokenizer(config.model)
    for shard, version in interim.items():
        stage = round_["plan"]["shards"][str(shard)]["restart_slice"] - 1
        adapter = workdir.checkpoints(shard).read(stage)["adapter"]
        assert compare_tensors(torch.load(Path(live.shards[shard]["local"]) / ADAPTER_FILE, weights_only=True), adapter) == []
        tags = registry.client.get_model_version(registry.shard_model(shard), version).tags
        assert (tags["interim"], tags["from_checkpoint"], tags["forget_request"]) == ("true", f"slice-{stage}", round_["round_id"])
        base = load_base_model(config.model, config.seed, tokenizer, head_only=True)
        model = AdaptedHead(config, shard, base)
        model.load_adapter_state(adapter)
        expected = predict_states(model, sample_states(config, workdir, valid, base, tokenizer), *answer_token_ids(tokenizer, config.model))
        assert torch.equal(state.predictions[shard], torch.tensor(expected))
    return interim


FORGOTTEN = {"users": [], "interactions": []}  # everything the module's work dir has forgotten so far


@pytest.fixture(scope="module")
def forget_config_file(tmp_path_factory):
    """The tiny config with the slice checkpoints in a storage URI (train.storage, as s3:// would),
    outside the work dir: the module's forgets read, resume from and purge them there."""
    folder = tmp_path_factory.mktemp("forget-config")
    return tiny_config_file(folder / "tiny-storage.yaml", train={"storage": f"file://{folder}/storage"})


@pytest.fixture(scope="module")
def forget_config(forget_config_file):
    return load_config(forget_config_file)


@pytest.fixture(scope="module")
def forgetting(trained_tiny, forget_config, tmp_path_factory):
    workdir = Workdir(tmp_path_factory.mktemp("forget"))
    train_job.run(forget_config, workdir, states_from=trained_tiny[0])  # the session's trunk states, linked
    return workdir


def test_forgetting_equals_training_without_the_data(forgetting, forget_config, tmp_path, while_retraining):
    """Four requests in one round, then a comparison with training from scratch; while it retrains,
    its shards serve from their last clean slice checkpoints (interim versions) and only shards
    without one are masked. (make test-slow runs a second round on top, killed and resumed, and
    compares again.)"""
    workdir, config = forgetting, forget_config
    registry = Registry(config.experiment, workdir.root)
    owners = shard_of_users(workdir)
    forgotten_users, forgotten_interactions = FORGOTTEN["users"], FORGOTTEN["interactions"]

    # A user in one shard beside a user the store never held (counted; the rest goes on); two users in
    # different shards; a validation sample's user with one interaction that sits in other samples'
    # histories. Four requests, coalesced into one round.
    single = sorted(u for u, s in owners.items() if len(s) == 1)[0]
    a = next(u for u, s in sorted(owners.items()) if u != single and len(s) == 1)
    b = next(u for u, s in sorted(owners.items()) if u != single and not s & owners[a])
    splits = load_splits(workdir)
    in_history = splits["train"].iloc[0]["interactions"][0]  # history of this sample, target of another one or none
    valid_user = splits["valid"]["user_id"].iloc[0]
    assert sum(in_history in ids for s in ("train", "valid", "test") for ids in splits[s]["interactions"]) >= 1
    theirs = splits["train"].query("user_id == @single")["sample_id"]
    kept = {path: path.read_bytes() for path in map(workdir.trunk.path, theirs)}
    first = new_request(workdir, [single, "no-such-user"], [], "one-shard")
    assert first.affected_shards == sorted(owners[single])
    new_request(workdir, [a], [], "coalesced-a")
    new_request(workdir, [b], [], "coalesced-b")
    new_request(workdir, [valid_user], [in_history], "interaction")
    audits = rounds.process(config, workdir)
    assert len({x["round_id"] for x in audits}) == 1, "the requests ran in separate rounds"
    audit = audits[0]
    assert audit["coalesced_with"] == ["coalesced-a", "coalesced-b", "interaction"] and audit["scan"]["clean"], audit
    assert len(audit["affected_shards"]) >= 2 and audit["unknown_users"] == 1
    assert audit["samples_removed"]["valid"] >= 1
    assert registry.masked_shards() == set()
    for shard in audit["affected_shards"]:  # each affected shard retrained once: one new version
        assert len(registry.versions(registry.shard_model(shard))) == 1
    # The same request id again is the same request, done: no extra round, no new version.
    versions = {s: len(registry.versions(registry.shard_model(s))) for s in first.affected_shards}
    again = new_request(workdir, [single, "no-such-user"], [], "one-shard")
    assert again.state == "done" and rounds.process(config, workdir) == []
    assert versions == {s: len(registry.versions(registry.shard_model(s))) for s in first.affected_shards}
    assert kept and not any(path.exists() for path in kept)
    path, data = next(iter(kept.items()))  # a state left behind is what the scan is for
    path.write_bytes(data)
    assert any("trunk states" in f for f in scan_workdir(workdir, config, {single}, set()))
    path.unlink()
    after = load_splits(workdir)
    assert not any(in_history in ids for s in after.values() for ids in s["interactions"])
    assert valid_user not in set(after["valid"]["user_id"])
    forgotten_users += [single, a, b, valid_user]
    forgotten_interactions.append(in_history)
    assert_identical_to_scratch(config, workdir, tmp_path, forgotten_users, forgotten_interactions)

    # The checkpoints were read, resumed from and purged at the storage URI, none in the work dir.
    assert not list(workdir.root.glob("shards/*/checkpoints")) and not list(workdir.root.glob("shards/*/slice-*"))
    assert all(workdir.checkpoints(k).location.startswith(config.train.storage) and workdir.checkpoints(k).stages()
               for k in range(workdir.num_shards()))
    # The trace scan (forget --scan-for) reads that storage too: an id left there is found, by its URI.
    needle = f"planted-{uuid.uuid4().hex}"
    planted = f"{workdir.shard_runs()}/shard-0/{needle}.txt"
    write_bytes(planted, needle.encode())
    findings, searched = forget_job.trace_scan(config, workdir, needle, [])
    assert findings == [f"file {planted}"] and workdir.shard_runs() in searched
    delete(planted)
    # Nothing of anyone forgotten is left in plain text: request log, audit, store.
    for path in list(workdir.root.joinpath("requests").glob("*.json")) + list(workdir.root.joinpath("audit").glob("*.json")):
        record = json.loads(path.read_text())
        assert "users" not in record and "interactions" not in record and len(record["subject_hash"]) == 64
    assert pending_requests(workdir) == []
    print(f"interim versions: {while_retraining}")
    assert len(while_retraining) == 1 and any(while_retraining)
    for shard in range(workdir.num_shards()):  # purged with the old versions once the final set is live
        assert not any(v.tags.get("interim") for v in registry.versions(registry.shard_model(shard)))


def test_the_masked_share_is_bounded_and_requests_past_it_wait_in_order(tmp_path):
    """forget.max_masked_share (no Ray): a request is masked at once only within the bound, later
    ones wait behind a waiting one, the next round carries every pending request, and a round masks
    within the bound, leaving the rest of its shards serving (never masked by its requests)."""
    workdir = Workdir(tmp_path)
    for shard, rows in enumerate([40, 30, 20, 10]):  # shares 40%, 30%, 20%, 10%
        workdir.shard_samples(shard).parent.mkdir(parents=True)
        pd.DataFrame({"sample_id": [f"{shard}-{i}" for i in range(rows)]}).to_parquet(workdir.shard_samples(shard))

    def recorded(request_id, shards, masked):
        why = hold_new_requests(workdir, masked, 0.5)(shards)
        save_request(workdir, {"request_id": request_id, "created": time.time(), "state": "received", "affected_shards": shards,
                               "history": [], **({"waiting": why} if why else {})})
        return why

    assert recorded("a", [0], set()) is None  # 40%: masked at once
    assert "70% of the training data, over forget.max_masked_share 50%" in recorded("b", [1], {0})
    assert "behind older requests" in recorded("c", [3], {0})  # 50% would fit, but b came first
    assert masked_by_pending(workdir) == {0}  # waiting requests mask nothing
    assert [r["request_id"] for r in admit_round(workdir)] == ["a", "b", "c"]  # the whole queue, oldest first
    assert not any("waiting" in r for r in pending_requests(workdir))
    # The round masks within the bound: 0 and 3 (50%); 1 keeps serving, and no request masks it.
    assert deferred_shards({0: 40, 1: 30, 2: 20, 3: 10}, {"0": {"restart_slice": 0}, "1": {"restart_slice": 0},
                                                          "3": {"restart_slice": 0}}, set(), 0.5) == [1]
    save_request(workdir, {**json.loads(workdir.path("requests", "b.json").read_text()), "deferred_shards": [1]})
    assert masked_by_pending(workdir) == {0, 3}
    plan = {"0": {"restart_slice": 0}, "1": {"restart_slice": 2}, "2": {"restart_slice": 0}, "3": {"restart_slice": 1}}
    assert deferred_shards({0: 40, 1: 30, 2: 20, 3: 10}, plan, set(), 0.5) == [1, 2]  # 0 and 3 masked: 50%
    assert deferred_shards({0: 40, 1: 30, 2: 20, 3: 10}, plan, set(), 1.0) == []
    for bad in ({"max_masked_share": 0}, {"max_masked_share": 1.5}, {"max_share": 0.5}):
        with pytest.raises(ConfigError, match="forget.max_"):
            load_config(TINY, forget=bad)


def test_the_request_log_and_the_shards_are_read_as_they_are_now(tmp_path):
    """A POST reads the request log and the shards' users through caches keyed by each file's
    identity (no Ray): a request that changes state and a shard that gains a user are seen at once."""
    workdir = Workdir(tmp_path)

    def write_shard(shard, users):
        frame = pd.DataFrame({"sample_id": [f"{u}:{shard}" for u in users], "user_id": users,
                              "interactions": [[f"{u}:{shard}"] for u in users], "slice": [0] * len(users)})
        write_parquet(frame, workdir.shard_samples(shard))

    write_shard(0, ["u1", "u2"])
    write_shard(1, ["u2"])
    first = new_request(workdir, ["u1"], [], "first")
    assert first.affected_shards == [0] and [r["request_id"] for r in pending_requests(workdir)] == ["first"]
    assert new_request(workdir, [], ["u2:1"], "by-interaction").affected_shards == [1]
    record = load_request(workdir, "first")
    save_request(workdir, {**record, "state": "done"})
    assert [r["request_id"] for r in pending_requests(workdir)] == ["by-interaction"] and not any_waiting(workdir)
    save_request(workdir, {**load_request(workdir, "by-interaction"), "waiting": "past the bound"})
    assert any_waiting(workdir)
    assert masked_by_pending(workdir) == set()  # a waiting request masks nothing
    save_request(workdir, record)  # received again (an operator's retry): pending again
    assert [r["request_id"] for r in pending_requests(workdir)] == ["first", "by-interaction"]
    write_shard(1, ["u2", "u1"])  # a round moved one of u1's samples into shard 1
    assert new_request(workdir, ["u1"], [], "second").affected_shards == [0, 1]
    assert [r["request_id"] for r in all_requests(workdir)] == ["first", "by-interaction", "second"]
    # What the replica keeps of the shards' users is their salted hashes, never an id.
    held = {user for _, users in unlearn._SHARD_USERS.values() for user in users}
    assert len(held) >= 2 and all(isinstance(user, bytes) and len(user) == 16 for user in held)


def test_bad_requests_are_refused_with_a_reason(forgetting):
    with pytest.raises(RequestError, match="USER:ITEM"):
        new_request(forgetting, [], ["13-250"])
    with pytest.raises(RequestError, match="at least one"):
        new_request(forgetting, [], [])
    with pytest.raises(RequestError, match="invalid request id"):
        new_request(forgetting, ["1"], [], "../etc")


def test_cli_exits_2_with_a_message_on_bad_input(forgetting, forget_config_file, tmp_path, capsys):
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"users": ["1"]}))
    for args, message in ((["--config", str(tmp_path / "nope.yaml")], "config file not found"),
                          (["--config", str(TINY), "--workdir", str(tmp_path / "empty")], "no trained shards"),
                          (["--config", str(TINY), "--workdir", str(forgetting.root)], "keeps its slice checkpoints under")):
        with pytest.raises(SystemExit) as stopped:
            forget_job.main([*args, "--request-file", str(request)])
        assert stopped.value.code == 2 and message in capsys.readouterr().err
    # A request file that is missing, not JSON, or not {"users": [...], "interactions": [...]}: exit 2,
    # without the file's content in the message; nothing is recorded.
    for content, message in ((None, "No such file"), ("users: 1", "not JSON"), ('{"user": ["1"]}', "expected"),
                             ('{"users": "1"}', "lists of ids"), ('{"users": [["1"]]}', "lists of ids"),
                             ('{"users": []}', "at least one user")):
        request.unlink(missing_ok=True)
        if content is not None:
            request.write_text(content)
        before = sorted(forgetting.path("requests").glob("*.json"))
        with pytest.raises(SystemExit) as stopped:
            forget_job.main(["--config", str(forget_config_file), "--workdir", str(forgetting.root), "--request-file", str(request)])
        assert stopped.value.code == 2 and message in capsys.readouterr().err
        assert sorted(forgetting.path("requests").glob("*.json")) == before


@pytest.mark.slow  # make test keeps the node-loss resume (test_multinode)
def test_a_job_killed_during_retraining_resumes_to_the_same_result(forgetting, forget_config_file, forget_config, tmp_path):
    """Kill the forget process in its retraining state, run it again: it completes, and the result
    equals training from scratch without everything forgotten so far."""
    workdir = forgetting
    user = sorted(shard_of_users(workdir))[1]
    request = workdir.root / "requests" / "killed.json"
    command = [sys.executable, "-m", "ray_jobs.forget", "--config", str(forget_config_file), "--workdir", str(workdir.root)]
    process = subprocess.Popen(command + ["--request-file", "-", "--request-id", "killed"], cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process.stdin.write(json.dumps({"users": [user]}).encode())
    process.stdin.close()  # the ids go in on standard input, never on the command line
    deadline = time.time() + 120
    while time.time() < deadline and not (request.exists() and json.loads(request.read_text())["state"] == "deleted"):
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert json.loads(request.read_text())["state"] == "deleted", "the job was not killed while retraining"

    resumed = subprocess.run(command + ["--request-id", "killed"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    audit = json.loads((workdir.root / "audit" / "killed.json").read_text())
    assert audit["scan"]["clean"] and "retrained" in audit["seconds"]
    FORGOTTEN["users"].append(user)
    assert_identical_to_scratch(forget_config, workdir, tmp_path, FORGOTTEN["users"], FORGOTTEN["interactions"])


def test_train_cli_refuses_to_exclude_from_a_trained_work_dir(forgetting, forget_config_file, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO('{"users": ["1"]}'))
    with pytest.raises(SystemExit) as stopped:
        train_job.main(["--config", str(forget_config_file), "--workdir", str(forgetting.root), "--exclude-file", "-"])
    assert stopped.value.code == 2 and "already trained" in capsys.readouterr().err


@pytest.mark.slow  # two trainings from scratch: make test-slow; the main exactness test runs in make test
def test_a_shard_without_data_stays_out_of_the_adapter_set_also_when_forgetting_empties_it(ray_session, tiny_config, tmp_path):
    """User shards, more shards than users: an empty shard keeps its registered version but has no
    adapter in the set; forgetting the only user of a shard empties it, and the result still equals
    training from scratch without that user."""
    config = tiny_config.model_copy(update={
        "experiment": "tiny-empty-shards",
        "data": tiny_config.data.model_copy(update={"n_train": 12, "n_valid": 8, "n_test": 8}),
        "partition": tiny_config.partition.model_copy(update={"method": "user", "num_shards": 8, "num_slices": 2}),
    })
    workdir = Workdir(tmp_path / "work")
    report = train_job.run(config, workdir)
    sizes = {int(k): v["samples"] for k, v in report["shards"].items()}
    empty = {k for k, n in sizes.items() if n == 0}
    assert empty and len(empty) < len(sizes), sizes
    registry = Registry(config.experiment, workdir.root)

    def served():
        live = registry.load_adapter_set(tmp_path / uuid.uuid4().hex)
        assert AggregatorState.load(live.folder / "aggregator").shards() == sorted(live.shards)
        return set(live.shards)

    assert served() == set(sizes) - empty
    assert all(registry.live_version(registry.shard_model(k)) is not None for k in sizes)  # registered all the same
    users_of = {}
    for user, shards in shard_of_users(workdir).items():
        for shard in shards:
            users_of.setdefault(shard, set()).add(user)
    shard, (user,) = next((k, u) for k, u in sorted(users_of.items()) if len(u) == 1)
    new_request(workdir, [user], [], "empties-a-shard")
    [audit] = rounds.process(config, workdir)
    assert audit["affected_shards"] == [shard] and audit["scan"]["clean"]
    assert served() == set(sizes) - empty - {shard}
    assert_identical_to_scratch(config, workdir, tmp_path, [user], [])


@pytest.mark.slow  # two trainings from scratch: make test-slow
def test_semantic_user_shards_forget_a_user_in_one_shard_and_regroup_a_partly_forgotten_one(ray_session, tiny_config, tmp_path):
    """Issue 12: with a user's samples kept in one shard, forgetting a user retrains that shard alone;
    forgetting one interaction of another user removes its samples and moves the rest of that user's
    samples to the shard their new mean belongs to. The result equals training from scratch, also
    with the head computed in bfloat16 (as configs/movielens.yaml does)."""
    config = tiny_config.model_copy(update={
        "experiment": "tiny-semantic-user",
        "model": tiny_config.model.model_copy(update={"head_dtype": "bfloat16"}),
        "partition": tiny_config.partition.model_copy(update={"method": "semantic-user"}),
    })
    workdir = Workdir(tmp_path / "work")
    train_job.run(config, workdir)
    owners = shard_of_users(workdir)
    assert all(len(shards) == 1 for shards in owners.values()) and len(set().union(*owners.values())) > 1
    targets = [ids[-1] for ids in load_splits(workdir)["train"]["interactions"]]  # each sample's target interaction
    moving = next((i for i in targets if not user_moves(workdir, set(), {i}).empty), None)
    assert moving is not None, "no interaction of the tiny data moves its user: the test needs another seed"
    mover = moving.split(":")[0]
    [(source,), (destination,)] = [owners[mover], set(user_moves(workdir, set(), {moving})["shard"])]
    whole = next(u for u, s in sorted(owners.items()) if u != mover)

    new_request(workdir, [whole], [moving], "regroup")
    [audit] = rounds.process(config, workdir)
    assert audit["affected_shards"] == sorted(owners[whole] | {source, destination}) and audit["scan"]["clean"], audit
    assert shard_of_users(workdir)[mover] == {destination}
    assert_identical_to_scratch(config, workdir, tmp_path, [whole], [moving])
