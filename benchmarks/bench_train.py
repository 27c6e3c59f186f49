"""Training: shard actors in parallel, their memory, and the train job against the retrain baseline.

    python -m benchmarks.bench_train [--config configs/movielens.yaml] [--n-train 1024]

In one run, on one prepared sample store (trunk states linked, never computed in a timed part;
shard actors load only the head and run it over the stored states):
  1. samples/s of one shard actor alone, then of two shard actors in parallel on identical work
     (the same shard of two copies of the store): the speedup (target >= 1.6x on 2 cores);
  2. peak RSS of a shard actor (the shard results of the train job; target < 1.5 GB);
  3. wall time of the whole train job (K shard actors, as many at once as there are CPUs)
     against the `retrain` baseline job (one adapter on all the training data, one actor).
The split sizes default to the config's; at configs/movielens.yaml's 4096 training samples the
run would take over half an hour on 2 cores (estimated from ~75 ms per sample and epoch), so
`--n-train` runs it on a subset (the first n of the same seeded draw, so their states are linked
too). Keep the config's n_valid for the memory figure: every actor holds the validation states.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

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
)
from components.config import Config
from components.data import read_parquet, write_parquet
from components.store import Workdir, copy_store

NAME = "bench_train"


def samples_seen(config: Config, shard_samples) -> int:
    """Samples one training pass of a shard processes (cumulative slices count again at each stage)."""
    sizes = shard_samples["slice"].value_counts().reindex(range(config.partition.num_slices), fill_value=0).to_numpy()
    per_stage = np.cumsum(sizes) if config.train.slice_mode == "cumulative" else sizes
    return int(per_stage.sum()) * config.train.epochs


def actor_copy(source: Workdir, target: Workdir, shard: int) -> None:
    """A work dir holding `source`'s shard and one validation sample (scoring stays out of the timing)."""
    copy_store(source, target)
    valid = read_parquet(target.split("valid"))
    write_parquet(valid.head(1), target.split("valid"))
    target.shard_samples(shard).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source.shard_samples(shard), target.shard_samples(shard))


def train_actors(config: Config, workdirs: list[Workdir], shard: int) -> list[dict]:
    """The real shard trainer (a Ray Train run), one per work dir, all started together; their results."""
    from ray_jobs.shard_training import train_shards

    with ThreadPoolExecutor(max_workers=len(workdirs)) as pool:
        return [results[shard] for results in pool.map(lambda w: train_shards(config, w, [shard]), workdirs)]


def run(config_path: str, workdir: str | None = None, sizes: dict | None = None, states_from=None) -> dict:
    from components.baselines import baseline_config
    from ray_jobs.orchestration import train_workdir as train_job

    offline()
    started = time.time()
    root = fresh_workdir(workdir, NAME)
    config = bench_config(config_path, "bench-train", data=sizes)
    main = Workdir(root.path("sharded"))
    d = config.data
    print(f"{NAME}: {config.model.label} (trunk {config.model.trunk_layers} layers), n_train {d.n_train}, n_valid "
          f"{d.n_valid}, K={config.partition.num_shards}, R={config.partition.num_slices}, {config.train.epochs} epoch(s), "
          f"{config.train.cpus_per_actor:g} CPU per actor; work dir {root.root}", flush=True)
    prepared = prepare_store(config, main, states_from)
    print(f"sample store and partitioner prepared in {prepared:.0f}s (not timed below)", flush=True)
    local_ray()

    print("\n[1/3] the whole train job (K shard actors)", flush=True)
    t = time.time()
    report = train_job(config, main)
    sharded_wall = time.time() - t
    print("\n[2/3] the retrain baseline job (one adapter on all the data)", flush=True)
    retrain_config = baseline_config(config, "retrain")
    retrain_dir = Workdir(root.path("retrain"))
    copy_store(main, retrain_dir)
    t = time.time()
    retrain_report = train_job(retrain_config, retrain_dir)
    retrain_wall = time.time() - t

    print("\n[3/3] one shard actor alone, then two in parallel on identical work", flush=True)
    sizes = {int(k): v["samples"] for k, v in report["shards"].items()}
    shard = sorted(sizes, key=lambda k: (sizes[k], k))[len(sizes) // 2]  # the median shard
    seen = samples_seen(config, read_parquet(main.shard_samples(shard)))
    copies = [Workdir(root.path(f"actor-{i}")) for i in range(3)]
    for copy in copies:
        actor_copy(main, copy, shard)
    [alone] = train_actors(config, copies[:1], shard)
    alone_rate = seen / (alone["finished_at"] - alone["started_at"])
    print(f"  alone: {seen} samples in {alone['finished_at'] - alone['started_at']:.1f}s = {alone_rate:.2f} samples/s", flush=True)
    pair = train_actors(config, copies[1:], shard)
    pair_wall = max(r["finished_at"] for r in pair) - min(r["started_at"] for r in pair)
    pair_rate = 2 * seen / pair_wall
    print(f"  two in parallel: {2 * seen} samples in {pair_wall:.1f}s = {pair_rate:.2f} samples/s", flush=True)
    identical = alone["adapter_sha256"] == pair[0]["adapter_sha256"] == pair[1]["adapter_sha256"]

    rss = max(s["peak_rss_mb"] for s in report["shards"].values())
    weights_mb = _weights_mb(config)
    compute = sum(s["seconds"] for s in report["shards"].values())
    retrain_compute = sum(s["seconds"] for s in retrain_report["shards"].values())
    figures = [
        figure("samples/s, two shard actors in parallel", pair_rate, "samples/s", "one actor alone", alone_rate, target=1.6),
        limit("peak RSS of a shard actor", rss, "MB", 1500, "the head's frozen weights (fp32)", weights_mb),
        figure(f"train job wall time (K={len(report['shards'])} shards)", sharded_wall, "s",
               "retrain baseline job (1 adapter)", retrain_wall, higher_is_better=False),
        figure("train job compute (sum of shard seconds)", compute, "s", "retrain baseline compute", retrain_compute,
               higher_is_better=False),
    ]
    return finish(NAME, {
        "figures": figures, "seconds": time.time() - started, "prepare_seconds": prepared,
        "config": config.model_dump(mode="json"), "train_report": report, "retrain_report": retrain_report,
        "throughput": {"shard": shard, "samples_seen": seen, "alone": _brief(alone), "pair": [_brief(r) for r in pair],
                       "identical_adapters": identical},
    })


def _brief(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("losses", "valid_predictions")}


def _weights_mb(config: Config) -> float:
    """What a shard actor holds of the model: the head's layers, the norm and the (tied) embeddings."""
    from components.model import load_base_model, load_tokenizer

    model = load_base_model(config.model, config.seed, load_tokenizer(config.model), head_only=True)
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def main(argv: list[str] | None = None) -> int:
    p = parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, help="training samples (default: the config's)")
    p.add_argument("--n-valid", type=int, help="validation samples, scored by every actor (default: the config's)")
    args = p.parse_args(argv)
    sizes = {k: v for k, v in {"n_train": args.n_train, "n_valid": args.n_valid}.items() if v}
    run(args.config, args.workdir, sizes, states_source(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
