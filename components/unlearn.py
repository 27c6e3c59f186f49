"""Forget requests: a durable request log and the plan of a forgetting round (what proves a
round's result, the trace scan and the bit-for-bit comparison, is components.proof).

A request moves through recorded states; a process killed in any state resumes from it:

    received -> masked -> deleted -> interim -> retrained -> registered -> unmasked -> purged -> done

While a round retrains, an affected shard serves from its last clean slice checkpoint (`interim`:
trained only on slices before the subject's first one) and is masked only where it has none. The
share of the training data masked at once is bounded (forget.max_masked_share): a request that
would pass the bound waits, unmasked, for the next round, which carries every pending request.

A request whose round fails the same way again and again is `failed` (its shards stay masked)
until an operator retries it, or abandons it if nothing was deleted yet (`abandoned`).

Requests waiting while a round runs are coalesced into the next round, so each affected shard
retrains once per round. The ids to forget are kept only while a request is pending; a finished
request and its audit record keep a salted hash of the subject instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from components.data import SPLITS, read_parquet, samples_touching
from components.lease import Heartbeat, Lease
from components.store import Workdir, user_moves, write_json

STATES = ("received", "masked", "deleted", "interim", "retrained", "registered", "unmasked", "purged", "done")


def state_index(state: str) -> int:
    return STATES.index(state)


@dataclass(frozen=True)
class ForgetRequest:
    request_id: str
    affected_shards: list[int]
    state: str
    waiting: str | None = None  # why it waits, unmasked, for a round to admit it


class RequestError(ValueError):
    """A forget request that cannot be accepted (the message says why)."""


def _requests_dir(workdir: Workdir) -> Path:
    return workdir.path("requests")


def request_path(workdir: Workdir, request_id: str) -> Path:
    if not request_id or not all(c.isalnum() or c in "-_." for c in request_id) or request_id.startswith("."):
        raise RequestError(f"invalid request id {request_id!r}: use letters, digits, '-', '_' and '.'")
    return _requests_dir(workdir) / f"{request_id}.json"


def load_request(workdir: Workdir, request_id: str) -> dict | None:
    path = request_path(workdir, request_id)
    return json.loads(path.read_text()) if path.exists() else None


def save_request(workdir: Workdir, record: dict) -> None:
    write_json(request_path(workdir, record["request_id"]), record)


def all_requests(workdir: Workdir) -> list[dict]:
    return _requests(workdir, lambda state: True)


def pending_requests(workdir: Workdir) -> list[dict]:
    """Requests a round still has to carry out (not done, not failed, not abandoned), oldest first."""
    return _requests(workdir, lambda state: state in STATES[:-1])


def _requests(workdir: Workdir, wanted: Callable[[str], bool]) -> list[dict]:
    """The requests whose state is `wanted`, oldest first. Every POST and every poll scans the log,
    which keeps each finished request: only the wanted ones are parsed."""
    records = [json.loads(Path(path).read_text()) for path, (state, _) in _headers(workdir) if wanted(state)]
    return sorted(records, key=lambda r: (r["created"], r["request_id"]))


def any_waiting(workdir: Workdir) -> bool:
    """Whether a pending request waits for a round to admit it (read without parsing the log)."""
    return any(state in STATES[:-1] and waiting for _, (state, waiting) in _headers(workdir))


def _headers(workdir: Workdir) -> list[tuple[str, tuple[str, bool]]]:
    """Each request file with its state and whether it waits."""
    folder = _requests_dir(workdir)
    if not folder.is_dir():
        return []
    with os.scandir(folder) as entries:
        return [(e.path, _read_once(_HEADERS, e.path, _header)) for e in entries if e.name.endswith(".json")]


def _header(path: str) -> tuple[str, bool]:
    record = json.loads(Path(path).read_text())
    return record["state"], "waiting" in record


# What was read from a file, kept beside the file's identity (inode, mtime, size: every write here
# replaces the file) and read again when it changes: one entry per file, never a stale one.
_HEADERS: dict[str, tuple[tuple[int, int, int], tuple[str, bool]]] = {}
_SHARD_USERS: dict[str, tuple[tuple[int, int, int], frozenset[bytes]]] = {}
# The key of the shard-user hashes: drawn once per process, so the cache holds no user id and
# nothing outside this process's memory can reverse it.
_USER_KEY = secrets.token_bytes(32)


def _read_once(cache: dict, path: str, read: Callable[[str], object]):
    stat = os.stat(path)
    identity = stat.st_ino, stat.st_mtime_ns, stat.st_size
    if path not in cache or cache[path][0] != identity:
        cache[path] = identity, read(path)
    return cache[path][1]


def validate_ids(users: list[str], interactions: list[str]) -> None:
    if not users and not interactions:
        raise RequestError("a forget request names at least one user or interaction")
    bad = [i for i in interactions if i.count(":") != 1 or not all(i.split(":"))]
    if bad:
        # The entry's number, not its text: an error line is logged, and the text names a user.
        raise RequestError(f"interactions are USER:ITEM pairs; entry {interactions.index(bad[0]) + 1} is not")


def shard_hits(workdir: Workdir, users: set[str], interactions: set[str]) -> dict[int, pd.DataFrame]:
    """The samples of each shard that the subject touches (with their slices): its own, and those
    a semantic-user partition moves out of or into the shard (components.store.user_moves)."""
    # A sample's interactions are its own user's (USER:ITEM): only shards holding these users are read.
    # The cache holds keyed hashes, not ids: a replica's memory keeps no forgotten user's id.
    owners = {_user_key(u) for u in users | {i.split(":")[0] for i in interactions}}
    hits = {}
    for shard in range(workdir.num_shards()):
        path = workdir.shard_samples(shard)
        if owners.isdisjoint(_read_once(_SHARD_USERS, str(path), _users_in)):
            continue
        # Not the embeddings, most of the file: a forget request is answered (masked) after this.
        frame = read_parquet(path, ["sample_id", "user_id", "interactions", "slice"])
        touched = frame[samples_touching(frame, users, interactions)]
        if len(touched):
            hits[shard] = touched
    moves = user_moves(workdir, users, interactions)
    for column in ("from_shard", "shard") if len(moves) else ():
        for shard, rows in moves.groupby(column):
            hits[int(shard)] = pd.concat([hits[int(shard)], rows]) if int(shard) in hits else rows
    return hits


def _users_in(path: str) -> frozenset[bytes]:
    return frozenset(_user_key(u) for u in read_parquet(Path(path), ["user_id"])["user_id"].astype(str).unique())


def _user_key(user: str) -> bytes:
    return hashlib.blake2b(user.encode(), key=_USER_KEY, digest_size=16).digest()


def new_request(workdir: Workdir, users: list[str], interactions: list[str], request_id: str | None = None,
                source: str = "cli", hold: Callable[[list[int]], str | None] | None = None) -> ForgetRequest:
    """Record a request durably (state `received`) with the shards it affects. The same request id
    twice returns the existing record and does no extra work. `hold(affected)` says why the request
    must wait unmasked for a round to admit it (see `hold_past_bound`), or None: masked at once."""
    users = sorted({str(u).strip() for u in users if str(u).strip()})
    interactions = sorted({str(i).strip() for i in interactions if str(i).strip()})
    validate_ids(users, interactions)
    request_id = request_id or uuid.uuid4().hex[:16]
    existing = load_request(workdir, request_id)
    if existing is not None:
        return ForgetRequest(request_id, existing["affected_shards"], existing["state"], existing.get("waiting"))
    affected = sorted(shard_hits(workdir, set(users), set(interactions)))
    record = {
        "request_id": request_id, "created": time.time(), "source": source, "state": "received",
        "users": users, "interactions": interactions, "affected_shards": affected,
        "subject_hash": subject_hash(workdir, users, interactions), "history": [["received", time.time()]],
    }
    if hold is not None and (why := hold(affected)):
        record["waiting"] = why  # decided before the record exists: a round never sees it masked by mistake
    save_request(workdir, record)
    return ForgetRequest(request_id, affected, "received", record.get("waiting"))


def advance(workdir: Workdir, record: dict, state: str, **fields) -> dict:
    record.update(fields, state=state)
    record["history"].append([state, time.time()])
    save_request(workdir, record)
    return record


def scrub(record: dict) -> dict:
    """Drop the plain ids once a request is done: only the salted hash remains."""
    return {k: v for k, v in record.items() if k not in ("users", "interactions")}


def masked_by_pending(workdir: Workdir, exclude: Iterable[str] = ()) -> set[int]:
    """Shards that must stay masked: those of every request not yet past `registered`, failed
    requests included (their shards stay masked until the request is retried to the end), except
    requests waiting for a round past the bound, those in `exclude` (a round masks its own) and
    the shards a round left serving to stay within the bound (`deferred_shards`)."""
    exclude = set(exclude)
    return {s for r in _requests(workdir, lambda state: state not in ("abandoned", "done"))
            if "waiting" not in r and r["request_id"] not in exclude
            and state_index(r.get("failed_at", r["state"]) if r["state"] == "failed" else r["state"]) < state_index("unmasked")
            for s in r["affected_shards"] if s not in r.get("deferred_shards", ())}


# --- the bound on the share of the training data masked at once -------------------------------------


def shard_sizes(workdir: Workdir) -> dict[int, int]:
    """Training samples per shard, from the Parquet footers (no data read)."""
    return {k: pq.read_metadata(workdir.shard_samples(k)).num_rows for k in range(workdir.num_shards())}


def data_share(sizes: dict[int, int], shards: Iterable[int]) -> float:
    """The share of the training samples that lie in `shards` (masked ones, or served ones)."""
    return sum(sizes.get(k, 0) for k in set(shards)) / max(1, sum(sizes.values()))


def hold_past_bound(sizes: dict[int, int], masked: set[int], shards: Iterable[int], bound: float) -> str | None:
    """Why a request over `shards` must wait unmasked while `masked` are masked, or None if masking
    it now keeps the masked share of the training data within `bound`."""
    share = data_share(sizes, masked | set(shards))
    if share <= bound + 1e-12:
        return None
    return (f"waiting for the next round: masking shard(s) {sorted(set(shards) - masked)} now would mask {share:.0%} of the "
            f"training data, over forget.max_masked_share {bound:.0%}; they keep serving until the next round (after the "
            f"running one) masks them, or, where that would pass the bound, publishes their clean versions")


def hold_new_requests(workdir: Workdir, masked: set[int], bound: float) -> Callable[[list[int]], str | None]:
    """`new_request`'s `hold` while `masked` are masked: a new request waits behind any waiting one
    (first come, first masked: a large request is never overtaken for ever), or where masking its
    shards now would pass `bound`."""

    def hold(affected: list[int]) -> str | None:
        if any_waiting(workdir):
            return ("waiting for the next round behind older requests that wait for it (first come, first masked); "
                    "its shards keep serving until that round masks them or publishes their clean versions")
        return hold_past_bound(shard_sizes(workdir), masked, affected, bound)

    return hold


def admit_round(workdir: Workdir) -> list[dict]:
    """The requests the next round carries out: every pending one, oldest first. The bound limits
    what a round masks (`deferred_shards`), never what it retrains: a request that had to wait
    unmasked is done by the next round, however many came with it, so under a steady stream of
    requests each waits at most one round and each shard retrains once a round. (Admitting only
    what fits the bound carried 1-4 requests a round at K=16: docs/operations.md.)"""
    pending = pending_requests(workdir)
    for record in pending:
        if record.pop("waiting", None) is not None:
            save_request(workdir, record)
    return pending


def deferred_shards(sizes: dict[int, int], plan: dict, masked: set[int], bound: float) -> list[int]:
    """A round's shards left unmasked so that the masked share stays within `bound`; they serve
    until the round's clean versions are live. Shards with a clean checkpoint are deferred first,
    as they would serve again from it soon anyway; shards without one are masked first."""
    order = sorted(plan, key=lambda k: (plan[k]["restart_slice"] > 0, int(k)))
    deferred = []
    for shard in map(int, order):
        if shard not in masked and data_share(sizes, masked | {shard}) > bound + 1e-12:
            deferred.append(shard)
        else:
            masked = masked | {shard}
    return sorted(deferred)


def fail_request(workdir: Workdir, record: dict, error: str) -> dict:
    """Give up retrying: the request is `failed` (visible, with the error) in the state it reached."""
    return advance(workdir, record, "failed", failed_at=record["state"], error=error)


def retry_request(workdir: Workdir, record: dict) -> dict:
    """An operator's retry: the failed request goes back to the state it failed in."""
    if record["state"] != "failed":
        raise RequestError(f"request {record['request_id']} is {record['state']}, not failed: nothing to retry")
    record.pop("error", None)
    return advance(workdir, record, record.pop("failed_at"), retried_at=time.time())  # earlier failures no longer count


def abandon_request(workdir: Workdir, record: dict) -> dict:
    """An operator's decision to drop a request whose round has not deleted anything yet; its plain
    ids go (the data stay in the store, and its shards are unmasked by the caller)."""
    state = record.get("failed_at", record["state"]) if record["state"] == "failed" else record["state"]
    if record["state"] in ("done", "abandoned"):
        raise RequestError(f"request {record['request_id']} is already {record['state']}")
    if state_index(state) >= state_index("deleted"):
        raise RequestError(f"request {record['request_id']} reached {state!r}: its data are deleted and its shards must be "
                           f"retrained, so it cannot be abandoned; fix the cause and retry it")
    return advance(workdir, scrub(record), "abandoned", abandoned_at=state)


def round_path(workdir: Workdir) -> Path:
    """The round in progress, rewritten (atomically) before each of its steps."""
    return workdir.path("rounds", "current.json")


def current_round(workdir: Workdir) -> dict | None:
    return json.loads(round_path(workdir).read_text()) if round_path(workdir).exists() else None


ROUND_LEASE_TTL_S = 30.0  # a holder on another node counts as gone this long after its last heartbeat


def round_lease(workdir: Workdir, **info) -> Lease:
    return Lease(workdir.path("rounds", "lease"), ROUND_LEASE_TTL_S, **info)


def round_holder(workdir: Workdir) -> dict | None:
    """Who runs a forgetting round on this work dir right now (None: nobody)."""
    return round_lease(workdir).holder()


@contextlib.contextmanager
def round_lock(workdir: Workdir, **info):
    """At most one forgetting round at a time per work dir, across the nodes sharing it (a lease,
    see components.lease); yields False if another process holds it. A holder that loses the lease
    (it stalled past the TTL and another took over) exits at once, before writing anything more."""
    lease = round_lease(workdir, **info)
    if not lease.acquire():
        yield False
        return

    def lost() -> None:
        print(f"error: the round lease on {workdir.root} was taken over: stopping", flush=True)
        os._exit(3)

    try:
        with Heartbeat(lease, lost):
            yield True
    finally:
        lease.release()


# --- the subject's salted hash --------------------------------------------------------------------


def _salt(workdir: Workdir) -> bytes:
    path = workdir.path("audit", ".salt")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(secrets.token_bytes(32))
        tmp.chmod(0o600)
        tmp.replace(path)
    return path.read_bytes()


def subject_hash(workdir: Workdir, users: list[str], interactions: list[str]) -> str:
    subject = json.dumps({"users": sorted(users), "interactions": sorted(interactions)})
    return hashlib.sha256(_salt(workdir) + subject.encode()).hexdigest()


# --- the plan of a round ----------------------------------------------------------------------------


def plan_round(workdir: Workdir, users: set[str], interactions: set[str]) -> dict:
    """Which shards retrain from which slice, and how many samples go, before anything is deleted."""
    hits = shard_hits(workdir, users, interactions)
    removed, known = {}, set()
    for name in SPLITS:
        frame = read_parquet(workdir.split(name))
        touched = samples_touching(frame, users, interactions)
        removed[name] = int(touched.sum())
        known |= set(frame.loc[touched, "user_id"])
    shards = {}
    for shard, rows in sorted(hits.items()):
        gone = samples_touching(rows, users, interactions)  # the others are samples a semantic-user partition moves
        shards[str(shard)] = {"restart_slice": int(rows["slice"].min()), "samples_removed": int(gone.sum()),
                              "samples_moved": int((~gone).sum())}
    return {
        "shards": shards,
        "samples_removed": removed,
        "unknown_users": len(users - known),  # reported, not an error: the rest of the request goes on
    }
