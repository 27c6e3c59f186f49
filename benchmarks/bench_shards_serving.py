"""The K sweep's serving figures (benchmarks/bench_shards.py): latency at batch 1 and throughput at
batch 16 of a loaded adapter set (a ServedSet, as a Serve replica holds it) dense and sparse top-m,
against one adapter (peft) timed in the same interleaved rounds; and a replica's peak memory."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from components.config import Config
from components.store import Workdir

ONE = "one adapter (peft)"


def with_sparse(config: Config, top_m: int | None) -> Config:
    """The config with aggregate.top_m set (validated as a config file's would be)."""
    return Config.model_validate({**config.model_dump(mode="json"),
                                  "aggregate": {**config.aggregate.model_dump(mode="json"), "top_m": top_m}})


def serving(config: Config, root: Workdir, m: int, args) -> dict:
    """Serving timings (time_serving) of the work dir's live set, loaded as a Serve replica loads it."""
    from components.aggregate import load_served_set
    from components.registry import Registry
    from components.train import ADAPTER_FILE

    with tempfile.TemporaryDirectory(dir=root.root) as folder:
        adapter_set = Registry(config.experiment, root.root).load_adapter_set(Path(folder))
        served = load_served_set(config, adapter_set)
        first = torch.load(Path(adapter_set.shards[min(adapter_set.shards)]["local"]) / ADAPTER_FILE, weights_only=True)
    return time_serving(config, served, first, m, args)


def serving_random(config: Config, k: int, m: int, args) -> dict:
    """Serving timings (time_serving) of K random LoRA adapters and a synthetic validation index of
    `args.index` entries, as benchmarks/bench_serving.py builds them: serving alone, on any model."""
    from benchmarks.bench_serving import random_adapters, synthetic_index
    from components.aggregate import ServedSet
    from components.mixture import MixtureModel
    from components.model import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    base = load_base_model(config.model, config.seed, tokenizer)
    adapters = random_adapters(config, base, k, config.seed)
    mixture = MixtureModel(base, tokenizer, dict(enumerate(adapters)), config.adapter.alpha / config.adapter.r, config.model)
    state = synthetic_index(args.index, base.config.hidden_size, k, config.seed)
    return time_serving(config, ServedSet("random", {}, mixture, state, None, "attention"), adapters[0], m, args)


def time_serving(config: Config, served, first: dict, m: int, args) -> dict:
    """Latency (batch 1) and throughput (batch `args.batch`) of a ServedSet, dense and sparse top-m,
    against one adapter (peft, `first`), timed in the same interleaved rounds (benchmarks/bench_serving.py)."""
    from peft import get_peft_model
    from peft.utils import set_peft_model_state_dict

    from benchmarks.bench_serving import best_of, catalogue_prompts
    from components.model import head_logits, load_base_model, p_yes, tokenize, trunk_pass
    from components.train import lora_config

    mc, sparse = config.model, with_sparse(config, m)
    base = load_base_model(mc, config.seed, served.mixture.tokenizer)
    single = get_peft_model(base, lora_config(config, base))
    set_peft_model_state_dict(single, first)
    single.eval()
    yes, no = served.mixture.yes_id, served.mixture.no_id

    @torch.no_grad()
    def one(prompts):
        out = trunk_pass(single, tokenize(served.mixture.tokenizer, prompts, mc.max_length), mc, embedding=False)
        return p_yes(head_logits(single, out.states, out.mask, mc), yes, no)

    K = len(served.mixture.shards)
    candidates = {ONE: one, f"APA dense K={K}": lambda prompts: served.predict(config, prompts),
                  f"APA sparse top-{m} of K={K}": lambda prompts: served.predict(sparse, prompts)}
    prompts = catalogue_prompts(max(args.batch, args.latency_rounds), config.data.history_len, config.seed)
    for fn in candidates.values():  # warm-up
        fn(prompts[:1])
        fn(prompts[:args.batch])
    latency, latency_cpu = best_of(candidates, args.latency_rounds, lambda r: [prompts[r % len(prompts)]])
    batch, batch_cpu = best_of(candidates, args.throughput_rounds, lambda r: prompts[:args.batch])
    names = list(candidates)
    row = {"names": names, "latency_ms": {n: latency[n] * 1000 for n in names}, "throughput": {n: args.batch / batch[n] for n in names},
           "latency_ratio": {n: latency[n] / latency[ONE] for n in names},
           "latency_ratio_cpu": {n: latency_cpu[n] / latency_cpu[ONE] for n in names},
           "batch_ratio": {n: batch[n] / batch[ONE] for n in names},  # time of a batch against one adapter's
           "batch_ratio_cpu": {n: batch_cpu[n] / batch_cpu[ONE] for n in names}}
    print("  " + "; ".join(f"{n}: {row['latency_ms'][n]:.1f} ms ({row['latency_ratio'][n]:.2f}x), "
                           f"{row['throughput'][n]:.0f} req/s ({row['batch_ratio'][n]:.2f}x the time)" for n in names), flush=True)
    return row


def replica_peak_rss_mb(config: dict, files: dict, state_folder: str | None, batch: int) -> float:
    """Peak RSS of a process holding what a Serve replica holds (the model, the adapters at `files`
    as one mixture and, for a set, its aggregator state) after answering a batch twice; in a Ray actor."""
    import resource

    from benchmarks.bench_serving import catalogue_prompts
    from components.aggregate import AggregatorState, ServedSet, load_mixture
    from components.model import load_tokenizer

    torch.set_num_threads(1)
    config = Config.model_validate(config)
    mixture = load_mixture(config, {int(k): Path(v) for k, v in files.items()}, load_tokenizer(config.model))
    prompts = catalogue_prompts(batch, config.data.history_len, config.seed)
    for _ in range(2):
        if state_folder:
            ServedSet("bench", {}, mixture, AggregatorState.load(Path(state_folder)), None, "attention").predict(config, prompts)
        else:
            mixture.p_yes(mixture.encode(prompts), torch.ones(len(prompts), 1))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def replica_memory(config: Config, root: Workdir, batch: int) -> dict:
    """Peak RSS of a fresh Ray actor serving the K adapters (dense), and of one serving one adapter."""
    import ray

    from components.config import ALLOCATOR_ENV
    from components.registry import Registry
    from components.train import ADAPTER_FILE

    measure = ray.remote(num_cpus=1, max_calls=1, runtime_env={"env_vars": ALLOCATOR_ENV})(replica_peak_rss_mb)
    with tempfile.TemporaryDirectory(dir=root.root) as folder:
        adapter_set = Registry(config.experiment, root.root).load_adapter_set(Path(folder))
        files = {str(k): str(Path(v["local"]) / ADAPTER_FILE) for k, v in adapter_set.shards.items()}
        first = min(files, key=int)
        dump = config.model_dump(mode="json")
        mixed = ray.get(measure.remote(dump, files, str(adapter_set.folder / "aggregator"), batch))
        alone = ray.get(measure.remote(dump, {first: files[first]}, None, batch))
    print(f"  replica peak RSS {mixed:.0f} MB with the K adapters, {alone:.0f} MB with one", flush=True)
    return {"rss_mb": mixed, "rss_one_mb": alone}
