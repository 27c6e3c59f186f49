"""Forgetting: one user against retraining every shard, and how soon serving learns of a request.

    python -m benchmarks.bench_forget [--config configs/movielens.yaml] [--n-train 128] [--users 3]

With K=4 shards and R=4 slices: train all shards once (the full retrain, the baseline), then
forget several users one after another with the forget job, each as `python -m ray_jobs.forget
--users ID` would (in-process), and compare the mean per user against the full retrain:
  - wall time: the forget job, request to audit, against the whole train job (target >= 1.3 x K);
  - compute: seconds of shard training (sum over the shards retrained) against the sum over all
    shards of the full train (target >= 1.3 x K);
  - the time from the request to the registry's masked_shards (what serving polls) showing the
    affected shards, read by a separate client as a serving replica would (target < 1 s).
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np

from benchmarks.common import bench_config, figure, finish, fresh_workdir, limit, offline, parser, prepare_store, write_config
from components.data import read_parquet, stable_hash
from components.store import Workdir

NAME = "bench_forget"


def shards_of(workdir: Workdir, user: str) -> set[int]:
    return {k for k in range(workdir.num_shards()) if (read_parquet(workdir.shard_samples(k))["user_id"].astype(str) == user).any()}


def forget_one(config, config_file, workdir: Workdir, user: str, request_id: str, captured: list) -> dict:
    """Run the forget job for `user` in a thread while a second registry client polls the mask."""
    from components.registry import Registry
    from ray_jobs import forget as forget_job

    affected = shards_of(workdir, user)
    reader = Registry(config.experiment, workdir.root)  # what a serving replica reads
    outcome = {}

    def job():
        try:
            outcome["rc"] = forget_job.main(["--config", str(config_file), "--workdir", str(workdir.root),
                                             "--users", user, "--request-id", request_id])
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


def run(config_path: str, workdir: str | None = None, n_train: int = 128, n_valid: int = 32, n_users: int = 3) -> dict:
    from ray_jobs import forget as forget_job
    from ray_jobs.common import connect_ray
    from ray_jobs.train import run as train_job

    offline()
    started = time.time()
    root = fresh_workdir(workdir, NAME)
    config = bench_config(config_path, "bench-forget", data={"n_train": n_train, "n_valid": n_valid, "n_test": 32},
                          partition={"num_shards": 4, "num_slices": 4})
    K = config.partition.num_shards
    print(f"{NAME}: {config.model.name}, n_train {n_train}, K={K}, R={config.partition.num_slices}, "
          f"{config.train.slice_mode} slices; work dir {root.root}", flush=True)
    prepared = prepare_store(config, root)
    print(f"sample store and partitioner prepared in {prepared:.0f}s (not timed below)", flush=True)
    config_file = write_config(config, root.path("config.yaml"))
    connect_ray()

    print("\n[baseline] the full retrain: every shard", flush=True)
    t = time.time()
    report = train_job(config, root)
    full_wall = time.time() - t
    full_compute = sum(s["seconds"] for s in report["shards"].values())

    users = sorted(set(read_parquet(root.split("train"))["user_id"].astype(str)), key=lambda u: stable_hash("bench-forget", config.seed, u))
    # Count the shards retrained and their seconds: wrap the forget job's call into the shard actors.
    captured: list = []
    original = forget_job.train_shards

    def counting(*args, **kwargs):
        captured.append(original(*args, **kwargs))
        return captured[-1]

    forget_job.train_shards = counting
    forgets = []
    try:
        for i, user in enumerate(users[:n_users]):
            print(f"\n[forget {i + 1}/{n_users}] one training user (shards {sorted(shards_of(root, user))})", flush=True)
            result = forget_one(config, config_file, root, user, f"bench-{i}", captured)
            print(f"  wall {result['wall_seconds']:.1f}s, shard training {result['compute_seconds']:.1f}s, "
                  f"masked after {result['mask_seconds']:.3f}s, retrained shards {result['shards_retrained']} "
                  f"from slices {result['slice_restarted_from']}", flush=True)
            forgets.append(result)
    finally:
        forget_job.train_shards = original

    wall = float(np.mean([f["wall_seconds"] for f in forgets]))
    compute = float(np.mean([f["compute_seconds"] for f in forgets]))
    masks = [f["mask_seconds"] for f in forgets]
    mask = max(masks) if None not in masks else float("inf")  # never seen within a minute
    figures = [
        figure(f"forget one user, wall (mean of {len(forgets)})", wall, "s", f"full retrain of all {K} shards (train job)",
               full_wall, target=1.3 * K, higher_is_better=False),
        figure(f"forget one user, compute (mean of {len(forgets)})", compute, "s",
               f"full retrain compute (sum over {K} shards)", full_compute, target=1.3 * K, higher_is_better=False),
        limit("request -> masked_shards visible (worst)", mask, "s", 1.0, "forget wall", wall),
    ]
    return finish(NAME, {"figures": figures, "seconds": time.time() - started, "prepare_seconds": prepared,
                         "config": config.model_dump(mode="json"), "full_train": {"wall_seconds": full_wall, "report": report},
                         "forgets": forgets})


def main(argv: list[str] | None = None) -> int:
    p = parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=128, help="training samples (default 128: about 6 minutes on 2 cores)")
    p.add_argument("--n-valid", type=int, default=32)
    p.add_argument("--users", type=int, default=3, help="users to forget, one after another (default 3)")
    args = p.parse_args(argv)
    run(args.config, args.workdir, args.n_train, args.n_valid, args.users)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
