"""What the jobs share: train a work dir's shards, register them, publish an adapter set. The
train job runs all of it, the forget job registers and publishes its retrained shards, the
evaluation trains its baselines; no job imports another."""

from __future__ import annotations

import time
from functools import partial

import numpy as np
import torch

from components.aggregate import AggregatorState
from components.config import Config
from components.data import read_parquet
from components.metrics import auc, bar_figure, loss_curve_figure
from components.model import embed, load_base_model, load_tokenizer, make_deterministic
from components.registry import Registry, keep_own_registry
from components.store import Workdir, fit_partitioner, load_splits, prepare, remove_samples, write_json, write_shards
from components.train import learning_rate
from ray_jobs.common import connect_ray
from ray_jobs.passes import StorePass, embed_pass
from ray_jobs.shard_training import train_shards


def register_shards(config: Config, workdir: Workdir, registry: Registry, results: dict[int, dict],
                    extra_tags: dict[str, str] | None = None) -> dict[int, str]:
    """A registered version per trained shard (not live yet): returns shard -> version."""
    labels = load_splits(workdir)["valid"]["label"].to_numpy()
    versions = {}
    for shard, result in sorted(results.items()):
        figure = loss_curve_figure(result["losses"], f"{config.experiment} shard {shard}")
        params = {"shard": shard, "seed": config.seed, "adapter": config.adapter.kind,
                  "partition": config.partition.method, "num_slices": config.partition.num_slices,
                  "epochs": config.train.epochs, "slice_mode": config.train.slice_mode,
                  "batch_size": config.train.batch_size, "learning_rate": learning_rate(config)}
        tags = {"samples": str(result["samples"]), "manifest_sha256": result["manifest_sha256"],
                "adapter_sha256": result["adapter_sha256"], "config_sha256": config.sha256(),
                "seed": str(config.seed), "restarted_from": str(result["restarted_from"]),
                "valid_auc": f"{auc(labels, result['valid_predictions']):.4f}", **(extra_tags or {})}
        with workdir.checkpoints(shard).local_folder() as checkpoints:
            versions[shard] = registry.log_shard_version(shard, workdir.adapter(shard), checkpoints, params, result["losses"],
                                                         tags, figures={"loss_curve.png": figure})
    return versions


def publish_adapter_set(config: Config, workdir: Workdir, registry: Registry, state: AggregatorState,
                        shard_versions: dict[int, str], tags: dict[str, str] | None = None) -> str:
    """Save the aggregator state, register an adapter set pinning `shard_versions`, make it live.
    A shard the data left empty (an adaptive cluster no sample fell into, or one emptied by
    forgetting) keeps its registered version but stays out of the set: its adapter saw no data."""
    for shard, version in shard_versions.items():
        registry.set_live(registry.shard_model(shard), version)
    sizes = {k: len(read_parquet(workdir.shard_samples(k))) for k in sorted(shard_versions)}
    served = {k: v for k, v in shard_versions.items() if sizes[k]}
    state = AggregatorState(state.sample_ids, state.labels, state.embeddings,
                            {k: p for k, p in state.predictions.items() if k in served})
    folder = workdir.path("aggregator")
    state.save(folder)
    (folder / "partitioner.npz").write_bytes(workdir.partitioner.read_bytes())
    figure = bar_figure({f"shard {k}": n for k, n in sizes.items()}, "training samples", f"{config.experiment}: shard sizes")
    version = registry.register_adapter_set(served, folder, {"config_sha256": config.sha256(), **(tags or {})},
                                            figures={"shard_sizes.png": figure})
    registry.set_live(registry.set_model, version)
    return version


def reference_embedder(config: Config, tokenizer):
    """How the partitioner's reference prompts (a few hundred, catalogue only) are embedded: on the
    inference pool's GPUs where the config gives it some, else here, cheaper than starting a pool."""
    if config.inference.gpus_per_worker:
        return partial(embed_pass, config)
    return lambda prompts: embed(load_base_model(config.model, config.seed, tokenizer), tokenizer, prompts, config.model)


def train_workdir(config: Config, workdir: Workdir, exclude_users=(), exclude_interactions=(),
                  states_from: Workdir | None = None) -> dict:
    """Prepare the store (once), partition, train every shard, register, publish. `states_from`:
    a work dir of the same model whose stored trunk states are linked instead of computed."""
    started = time.time()
    if exclude_users or exclude_interactions:  # a reference: never the deployment's registry
        uri = keep_own_registry(workdir.root, "a reference training, as if some data never existed")
        print(f"reference training: registered in its own MLflow store {uri}, never in the deployment's", flush=True)
    connect_ray(config, workdir)
    registry = Registry(config.experiment, workdir.root)
    registry.claim()
    make_deterministic(max(1, int(config.train.cpus_per_actor)))
    tokenizer = load_tokenizer(config.model)
    store_pass = StorePass(config, workdir, tokenizer)
    prepare(config, workdir, None, tokenizer, states_from=states_from, compute=store_pass)
    if exclude_users or exclude_interactions:
        removed = remove_samples(workdir, set(exclude_users), set(exclude_interactions))
        print(f"excluded {sum(map(len, removed.values()))} sample(s) of the given users/interactions", flush=True)
    partitioner = fit_partitioner(config, workdir, reference_embedder(config, tokenizer))
    splits = load_splits(workdir)
    sizes = write_shards(config, workdir, splits["train"], partitioner)
    print(f"{config.partition.method} partition: shard sizes {sizes}", flush=True)

    results = train_shards(config, workdir, sorted(sizes))
    versions = register_shards(config, workdir, registry, results)
    valid = splits["valid"]
    state = AggregatorState(
        valid["sample_id"].tolist(), torch.tensor(valid["label"].to_numpy()),
        torch.from_numpy(np.stack(valid["embedding"].to_numpy())) if len(valid) else torch.zeros(0, 0),
        {k: torch.tensor(np.asarray(r["valid_predictions"])) for k, r in results.items()},
    )
    set_version = publish_adapter_set(config, workdir, registry, state, versions)
    report = {
        "experiment": config.experiment, "config_sha256": config.sha256(), "adapter_set_version": set_version,
        "partition": config.partition.method, "seconds": round(time.time() - started, 2), "store": store_pass.report(),
        "shards": {
            str(k): {"version": versions[k], "samples": r["samples"], "manifest_sha256": r["manifest_sha256"],
                     "adapter_sha256": r["adapter_sha256"], "restarted_from": r["restarted_from"],
                     "seconds": round(r["seconds"], 2), "started_at": r["started_at"], "finished_at": r["finished_at"],
                     "peak_rss_mb": round(r["peak_rss_mb"], 1), "workers": r["workers"], "nodes": r["nodes"]}
            for k, r in sorted(results.items())
        },
    }
    write_json(workdir.path("reports", "train.json"), report)
    return report
