"""What proves a forget: the scan for traces of the subject (the work dir, any folder, any file
format it could hide in) and the bit-for-bit comparison with a model trained from scratch."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from components.aggregate import AggregatorState
from components.checkpoints import files_under, read_bytes
from components.data import SPLITS, read_parquet, samples_touching
from components.store import Workdir
from components.train import last_clean_stage
from components.unlearn import all_requests


def scan_workdir(workdir: Workdir, config, users: set[str], interactions: set[str]) -> list[str]:
    """Every place in the work dir where a sample of the subject could remain; returns findings."""
    findings = []
    files = [workdir.split(n) for n in SPLITS] + [workdir.shard_samples(k) for k in range(workdir.num_shards())]
    for path in files:
        if path.exists() and samples_touching(read_parquet(path), users, interactions).any():
            findings.append(f"sample store: {path.relative_to(workdir.root)} still holds samples of the subject")
    for shard in range(workdir.num_shards()):
        samples = read_parquet(workdir.shard_samples(shard))
        slices = [samples.loc[samples["slice"] == r, "sample_id"].tolist() for r in range(config.partition.num_slices)]
        checkpoints = workdir.checkpoints(shard)
        if len(checkpoints.stages()) > last_clean_stage(checkpoints, slices, config) + 1:
            findings.append(f"checkpoints: shard {shard} keeps a checkpoint trained on other data")
    stored = {s for path in files if path.exists() for s in read_parquet(path)["sample_id"]}
    for path, header in workdir.trunk.headers():
        if header["user_id"] in users or not interactions.isdisjoint(header["interactions"]):
            findings.append(f"trunk states: {path.relative_to(workdir.root)} holds a sample of the subject")
        elif header["sample_id"] not in stored:
            findings.append(f"trunk states: {path.relative_to(workdir.root)} belongs to no stored sample")
    aggregator = workdir.path("aggregator")
    if (aggregator / "state.pt").exists():
        state = AggregatorState.load(aggregator)
        touched = [s for s in state.sample_ids if s.split(":")[0] in users or s in interactions]
        if touched:
            findings.append(f"aggregator state: {len(touched)} validation sample(s) of the subject")
    for record in all_requests(workdir):
        if record["state"] == "done" and ("users" in record or "interactions" in record):
            findings.append(f"request log: {record['request_id']} keeps plain ids")
    return findings


def files_holding(needle: str, roots: Iterable[Path]) -> list[Path]:
    """Every file under `roots` (files or folders) that holds `needle`: its UTF-8 bytes anywhere in
    the file, or, in a Parquet file (compressed pages hide bytes), in any value of any column."""
    pattern = needle.encode()
    found = []
    for root in map(Path, roots):
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            try:
                hit = _parquet_holds(path, needle) if path.suffix == ".parquet" else _bytes_hold(path, pattern)
            except OSError:  # vanished while scanning (a log rotated, a temp file replaced)
                continue
            if hit:
                found.append(path)
    return found


def stored_files_holding(needle: str, location: str) -> list[str]:
    """files_holding for a folder of the checkpoint storage (components.checkpoints), a URI's included."""
    return [name for name in files_under(location) if needle.encode() in (read_bytes(name) or b"")]


def _bytes_hold(path: Path, pattern: bytes, chunk: int = 1 << 20) -> bool:
    with path.open("rb") as f:
        tail = b""
        while block := f.read(chunk):
            if pattern in tail + block:
                return True
            tail = block[-(len(pattern) - 1):] if len(pattern) > 1 else b""
    return False


def _parquet_holds(path: Path, needle: str) -> bool:
    try:
        frame = read_parquet(path)
    except Exception:  # noqa: BLE001 - not readable as Parquet: look at its bytes
        return _bytes_hold(path, needle.encode())
    return any(frame[column].astype(str).str.contains(needle, regex=False).any() for column in frame.columns)


# --- bit-for-bit comparison -----------------------------------------------------------------------


def compare_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    if sorted(a) != sorted(b):
        return [f"different tensor names: {sorted(set(a) ^ set(b))[:3]}"]
    return [name for name in sorted(a) if not torch.equal(a[name], b[name])]


def compare_states(a: AggregatorState, b: AggregatorState) -> list[str]:
    diffs = []
    if a.sample_ids != b.sample_ids:
        diffs.append("validation sample ids")
    for field in ("labels", "embeddings"):
        if not torch.equal(getattr(a, field), getattr(b, field)):
            diffs.append(field)
    if a.shards() != b.shards():
        diffs.append("shards")
    diffs += [f"predictions of shard {k}" for k in a.shards() if k in b.predictions and not torch.equal(a.predictions[k], b.predictions[k])]
    return diffs
