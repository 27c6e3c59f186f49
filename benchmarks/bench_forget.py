"""Forgetting: one user against retraining every shard, and how soon serving learns of a request.

    python -m benchmarks.bench_forget [--config configs/movielens.yaml] [--n-train 512 --n-valid 64] [--users 12]

With K=4 shards and R=4 slices, on a prepared sample store (trunk states linked): train all
shards once (the full retrain, the baseline), then forget several users one after another with
the forget job, each as `python -m ray_jobs.forget --request-file FILE` would (in-process), and compare
the mean per user against the full retrain:
  - compute: seconds of shard training (sum over the shards retrained) against the sum over all
    shards of the full train (target >= 1.3 x K = 5.2x);
  - wall time: the forget job, request to audit, against the whole train job (reported beside:
    on 2 cores the full train runs two shard actors at once, a forget often one);
  - the time from the request to the registry's masked_shards (what serving polls) showing the
    affected shards, read by a separate client as a serving replica would (target < 1 s).
The split sizes default to the config's; `--n-train` runs on a subset (the first n of the same
seeded draw, so their states are linked too). Scale `--n-valid` with it (e.g. 512 and 64 for
configs/movielens.yaml's 4096 and 500): every shard trained re-scores the validation set, and
that fixed cost per shard must keep its share of a shard's seconds for the ratio to carry over.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import threading
import time

import numpy as np

from benchmarks.common import (
    bench_config,
    figure,
    finish,
    fresh_workdir,
    limit,
    local_ray,
    offline,
    parser,
    prepare_store,
    states_source,
    write_config,
)
from components.data import read_parquet, stable_hash
from components.store import Workdir

NAME = "bench_forget"


def shards_of(workdir: Workdir, user: str) -> set[int]:
    return {k for k in range(workdir.num_shards()) if (read_parquet(workdir.shard_samples(k))["user_id"].astype(str) == user).any()}


@contextlib.contextmanager
def counted_retrains():
    """The forget job's calls into the shard trainers (rounds.train_shards), recorded as they return:
    the shards each retrained and their seconds."""
    from ray_jobs import rounds

    captured, original = [], rounds.train_shards

    def counting(*args, **kwargs):
        captured.append(original(*args, **kwargs))
        return captured[-1]

    rounds.train_shards = counting
    try:
        yield captured
    finally:
        rounds.train_shards = original


def forget_one(config, config_file, workdir: Workdir, user: str, request_id: str, captured: list) -> dict:
    """Run the forget job for `user` in a thread while a second registry client polls the mask."""
    from components.registry import Registry
    from ray_jobs import forget as forget_job

    affected = shards_of(workdir, user)
    reader = Registry(config.experiment, workdir.root)  # what a serving replica reads
    outcome = {}

    def job():
        try:
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as request:  # the job deletes it
                json.dump({"users": [user]}, request)
            outcome["rc"] = forget_job.main(["--config", str(config_file), "--workdir", str(workdir.root),
                                             "--request-file", request.name, "--request-id", request_id])
        except SystemExit as exit_:
            outcome["rc"] = exit_.code
        outcome["finished"] = time.perf_counter()

    captured.clear()
    thread = threading.Thread(target=job, name=f"forget-{request_id}")
    started = time.perf_counter()
    thread.start()
    masked_after = None
    while masked_after is None and time.perf_counter() - started < 60:
        if affected <= reader.masked_shards():
            masked_after = time.perf_counter() - started
        else:
            time.sleep(0.005)
    thread.join()
    if outcome.get("rc") not in (0, None):
        raise RuntimeError(f"the forget job for request {request_id} exited with {outcome.get('rc')}")
    audit = json.loads(workdir.path("audit", f"{request_id}.json").read_text())
    return {
        "affected_shards": sorted(affected), "audit_shards": audit["affected_shards"],
        "slice_restarted_from": audit["slice_restarted_from"], "samples_removed": audit["samples_removed"],
        "wall_seconds": outcome["finished"] - started, "audit_seconds": sum(audit["seconds"].values()),
        "compute_seconds": sum(r["seconds"] for results in captured for r in results.values()),
        "shards_retrained": sorted(k for results in captured for k in results),
        "mask_seconds": masked_after, "scan_clean": audit["scan"]["clean"],
    }


def run(config_path: str, workdir: str | None = None, sizes: dict | None = None, n_users: int = 12, states_from=None) -> dict:
    from ray_jobs.orchestration import train_workdir as train_job

    offline()
    started = time.time()
    root = fresh_workdir(workdir, NAME)
    config = bench_config(config_path, "bench-forget", data=sizes, partition={"num_shards": 4, "num_slices": 4})
    K = config.partition.num_shards
    print(f"{NAME}: {config.model.label} (trunk {config.model.trunk_layers} layers), n_train {config.data.n_train}, "
          f"n_valid {config.data.n_valid}, K={K}, R={config.partition.num_slices}, {config.train.slice_mode} slices, "
          f"{config.train.epochs} epoch(s); work dir {root.root}", flush=True)
    prepared = prepare_store(config, root, states_from)
    print(f"sample store and partitioner prepared in {prepared:.0f}s (not timed below)", flush=True)
    config_file = write_config(config, root.path("config.yaml"))
    local_ray()

    print("\n[baseline] the full retrain: every shard", flush=True)
    t = time.time()
    report = train_job(config, root)
    full_wall = time.time() - t
    full_compute = sum(s["seconds"] for s in report["shards"].values())

    users = sorted(set(read_parquet(root.split("train"))["user_id"].astype(str)), key=lambda u: stable_hash("bench-forget", config.seed, u))
    forgets = []
    with counted_retrains() as captured:
        for i, user in enumerate(users[:n_users]):
            print(f"\n[forget {i + 1}/{n_users}] one training user (shards {sorted(shards_of(root, user))})", flush=True)
            result = forget_one(config, config_file, root, user, f"bench-{i}", captured)
            print(f"  wall {result['wall_seconds']:.1f}s, shard training {result['compute_seconds']:.1f}s, "
                  f"masked after {result['mask_seconds']:.3f}s, retrained shards {result['shards_retrained']} "
                  f"from slices {result['slice_restarted_from']}", flush=True)
            forgets.append(result)

    wall = float(np.mean([f["wall_seconds"] for f in forgets]))
    compute = float(np.mean([f["compute_seconds"] for f in forgets]))
    masks = [f["mask_seconds"] for f in forgets]
    mask = max(masks) if None not in masks else float("inf")  # never seen within a minute
    figures = [
        figure(f"forget one user, compute (mean of {len(forgets)})", compute, "s",
               f"full retrain compute (sum over {K} shards)", full_compute, target=1.3 * K, higher_is_better=False),
        figure(f"forget one user, wall (mean of {len(forgets)})", wall, "s", f"full retrain of all {K} shards (train job)",
               full_wall, higher_is_better=False),
        limit("request -> masked_shards visible (worst)", mask, "s", 1.0, "forget wall", wall),
    ]
    return finish(NAME, {"figures": figures, "seconds": time.time() - started, "prepare_seconds": prepared,
                         "config": config.model_dump(mode="json"), "full_train": {"wall_seconds": full_wall, "report": report},
                         "forgets": forgets})


def main(argv: list[str] | None = None) -> int:
    p = parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, help="training samples (default: the config's)")
    p.add_argument("--n-valid", type=int, help="validation samples (default: the config's)")
    # A user's cost is set by the slice their id hashes to (a restart from slice s redoes R-s slices):
    # a dozen users keep the mean near its expectation; three did not.
    p.add_argument("--users", type=int, default=12, help="users to forget, one after another (default 12)")
    args = p.parse_args(argv)
    sizes = {k: v for k, v in {"n_train": args.n_train, "n_valid": args.n_valid}.items() if v}
    run(args.config, args.workdir, sizes, args.users, states_source(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
