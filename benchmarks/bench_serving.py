"""Serving cost of the aggregation methods, as ratios to one single adapter, on the same inputs.

    python -m benchmarks.bench_serving                 # real SmolLM2-135M (converted once by make setup)
    python -m benchmarks.bench_serving --model tiny    # the tiny test LLaMA: seconds, for a smoke run

K = 4 random (seeded) LoRA adapters, r = 8, alpha = 16 on q_proj and v_proj; a synthetic validation
index of 500 entries (APA's neighbours); prompts are TALLRec prompts built from the public catalogue.
Latency at batch 1 and throughput at batch 16 of:
  - single adapter: peft's LoraModel with one adapter (the baseline), and MixtureModel with K = 1
  - APA mixture over K = 4: frozen-model embedding + neighbour weights + one mixed forward
    (with the embedding over all layers and over the first 2 / 4 / 8 layers)
  - APA decomposed mixture over K = 4
  - SISA output averaging over K = 4 (four forward passes)
The throughput runs and the replica use the embedding depth of configs/movielens.yaml (--depth).
Memory: the peak RSS of a Ray actor holding what a Serve replica holds (frozen model, K adapters as
one mixture, the index) after answering a batch, against the same with one adapter (target: under
1.5 GB with K = 4). Each figure is the best of several interleaved rounds (the machine may be
shared), in wall-clock time and, in brackets, in this process's CPU time. Targets: the APA mixture at most 1.15x the single
adapter's latency at batch 1 and at least 0.8x its throughput at batch 16. On a machine shared with
other heavy processes, two torch threads on two cores make even CPU-time figures swing (threads
wait for each other); `--threads 1` then gives steadier ratios.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from peft.utils import set_peft_model_state_dict  # noqa: E402

from benchmarks.common import MOVIELENS, figure, finish, limit  # noqa: E402
from components.aggregate import AggregatorState, MixtureModel, apa_weights, predict  # noqa: E402
from components.config import Config, load_config  # noqa: E402
from components.model import answer_logits, load_base_model, load_tokenizer, p_yes, tokenize  # noqa: E402


def catalogue_prompts(n: int, history_len: int, seed: int) -> list[str]:
    """TALLRec prompts from the public MovieLens catalogue (no user data); synthetic titles if absent."""
    from components.data import DataError, build_prompt

    try:
        from components.config import DataConfig
        from components.data import load_interactions_and_items
        from components.partition import reference_prompts

        return reference_prompts(load_interactions_and_items(DataConfig())[1], n, history_len, seed)
    except (DataError, OSError):
        rng = np.random.default_rng(seed)
        title = lambda: f"Movie {rng.integers(10_000)} ({rng.integers(1930, 2000)})"  # noqa: E731
        return [build_prompt([title() for _ in range(6)], [title() for _ in range(4)], title()) for _ in range(n)]


def random_adapters(base, config: Config, k: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """K LoRA state dicts with peft's keys and shapes, A and B random (a trained adapter's B is not 0)."""
    a = config.adapter
    shapes = {}
    for name, module in base.named_modules():
        if name.rsplit(".", 1)[-1] in a.target_modules and isinstance(module, torch.nn.Linear):
            shapes[f"base_model.model.{name}.lora_A.weight"] = (a.r, module.in_features)
            shapes[f"base_model.model.{name}.lora_B.weight"] = (module.out_features, a.r)
    adapters = []
    for shard in range(k):
        g = torch.Generator().manual_seed(seed * 1000 + shard)
        adapters.append({name: torch.randn(shape, generator=g) * 0.02 for name, shape in shapes.items()})
    return adapters


def synthetic_index(n: int, hidden: int, k: int, seed: int) -> AggregatorState:
    g = torch.Generator().manual_seed(seed)
    return AggregatorState([f"v:{i}" for i in range(n)], torch.randint(0, 2, (n,), generator=g),
                           torch.randn(n, hidden, generator=g), {s: torch.rand(n, generator=g) for s in range(k)})


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def model_config(model: str, seed: int) -> Config:
    """A default config around the benchmark's model."""
    return Config.model_validate({"experiment": "bench", "seed": seed,
                                  "model": {"name": "smollm2-135m" if model == "smollm2" else "tiny-llama"}})


def replica_peak_rss_mb(model: str, shards: int, index: int, batch: int, depth: int | None, threads: int, seed: int) -> float:
    """Peak RSS of a process holding what a Serve replica holds (the frozen model, `shards` adapters
    as one mixture, a validation index) after answering one batch; run inside a Ray actor."""
    torch.set_num_threads(threads)
    config = model_config(model, seed)
    config = config.model_copy(update={"model": config.model.model_copy(update={"embedding_layers": depth})})
    tokenizer = load_tokenizer()
    base = load_base_model(config.model, config.seed, tokenizer)
    adapters = random_adapters(base, config, shards, seed)
    mixture = MixtureModel(base, tokenizer, dict(enumerate(adapters)), config.adapter.alpha / config.adapter.r,
                           config.model.max_length)
    state = synthetic_index(index, base.config.hidden_size, shards, seed)
    prompts = catalogue_prompts(batch, config.data.history_len, seed)
    for _ in range(2):
        predict(config, mixture, prompts, state, None, method="attention", batch_size=batch)
    return peak_rss_mb()


def measure_replicas(args, depth: int | None) -> dict[int, float]:
    """Peak RSS of a replica serving K adapters and of one serving a single adapter, each in a
    fresh Ray actor with the environment Serve replicas get (components.config.ALLOCATOR_ENV)."""
    import ray

    from components.config import ALLOCATOR_ENV, OFFLINE_ENV

    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {**OFFLINE_ENV, **ALLOCATOR_ENV}})
    try:
        measure = ray.remote(num_cpus=args.threads, max_calls=1)(replica_peak_rss_mb)
        return {k: ray.get(measure.remote(args.model, k, args.index, args.batch, depth, args.threads, args.seed))
                for k in (1, args.shards)}
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_serving", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--shards", type=int, default=4, help="K")
    parser.add_argument("--batch", type=int, default=16, help="batch size of the throughput runs")
    parser.add_argument("--index", type=int, default=500, help="validation index entries")
    parser.add_argument("--layers", default="2,4,8", help="embedding layers to compare with all layers")
    parser.add_argument("--depth", type=int, default=load_config(MOVIELENS).model.embedding_layers,
                        help="embedding layers of the throughput runs and the replica (default: configs/movielens.yaml's)")
    parser.add_argument("--latency-rounds", type=int, default=5)
    parser.add_argument("--throughput-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()

    config = model_config(args.model, args.seed)
    tokenizer = load_tokenizer()
    base = load_base_model(config.model, config.seed, tokenizer)
    adapters = random_adapters(base, config, args.shards, args.seed)
    scaling = config.adapter.alpha / config.adapter.r
    single = get_peft_model(copy.deepcopy(base), LoraConfig(task_type=TaskType.CAUSAL_LM, r=config.adapter.r,
                                                            lora_alpha=config.adapter.alpha, lora_dropout=0.0,
                                                            target_modules=list(config.adapter.target_modules)))
    set_peft_model_state_dict(single, adapters[0])
    single.eval()
    mixture1 = MixtureModel(copy.deepcopy(base), tokenizer, {0: adapters[0]}, scaling, config.model.max_length)
    mixture = MixtureModel(base, tokenizer, dict(enumerate(adapters)), scaling, config.model.max_length)
    hidden = base.config.hidden_size
    state = synthetic_index(args.index, hidden, args.shards, args.seed)
    layers = list(dict.fromkeys([None, *(int(x) for x in args.layers.split(",") if x), args.depth]))
    yes_id, no_id = mixture.yes_id, mixture.no_id
    prompts = catalogue_prompts(max(args.batch, args.latency_rounds), config.data.history_len, args.seed)
    tokens = [len(tokenizer(p)["input_ids"]) for p in prompts]
    print(f"model {args.model} ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params), K={args.shards}, "
          f"LoRA r={config.adapter.r} on {','.join(config.adapter.target_modules)}, index {args.index}, "
          f"prompts {min(tokens)}-{max(tokens)} tokens, torch threads {torch.get_num_threads()}", flush=True)

    def with_layers(n):
        return config.model_copy(update={"model": config.model.model_copy(update={"embedding_layers": n})})

    @torch.no_grad()
    def run_single(batch_prompts):
        return p_yes(answer_logits(single, tokenize(tokenizer, batch_prompts, config.model.max_length)), yes_id, no_id)

    @torch.no_grad()
    def run_mixture1(batch_prompts):
        batch = mixture1.batch(batch_prompts)
        return mixture1.p_yes(batch, torch.ones(len(batch_prompts), 1))

    def method(name: str, n_layers=None):
        cfg = with_layers(n_layers)
        return lambda batch_prompts: predict(cfg, mixture, batch_prompts, state, None, method=name, batch_size=len(batch_prompts))[0]

    def label(n):
        return "all layers" if n is None else f"{n} layers"

    candidates = {"single adapter (peft)": run_single, "single adapter (MixtureModel K=1)": run_mixture1}
    for n in layers:
        candidates[f"APA mixture K={args.shards}, embedding {label(n)}"] = method("attention", n)
    for n in dict.fromkeys((None, args.depth)):
        candidates[f"APA decomposed K={args.shards}, embedding {label(n)}"] = method("decomposed", n)
    candidates[f"SISA averaging K={args.shards}"] = method("average")
    throughput_set = ["single adapter (peft)", "single adapter (MixtureModel K=1)",
                      f"APA mixture K={args.shards}, embedding {label(None)}", f"APA mixture K={args.shards}, embedding {label(args.depth)}",
                      f"APA decomposed K={args.shards}, embedding {label(args.depth)}", f"SISA averaging K={args.shards}"]
    throughput_set = list(dict.fromkeys(throughput_set))

    # the same inputs for every method; a warm-up pass of every method (batch 1) and model (batch 16)
    for fn in candidates.values():
        fn(prompts[:1])
    for fn in (run_single, run_mixture1, candidates[throughput_set[3]]):
        fn(prompts[: args.batch])
    print(f"warm-up done ({time.time() - started:.0f}s)", flush=True)

    def timed(fn, batch_prompts) -> tuple[float, float]:
        """Wall seconds and this process's CPU seconds (all threads) of one call."""
        wall, cpu = time.perf_counter(), time.process_time()
        fn(batch_prompts)
        return time.perf_counter() - wall, time.process_time() - cpu

    inf = float("inf")
    latency, latency_cpu = dict.fromkeys(candidates, inf), dict.fromkeys(candidates, inf)
    names = list(candidates)
    for r in range(args.latency_rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order every round
            wall, cpu = timed(candidates[name], [prompts[r % len(prompts)]])
            latency[name], latency_cpu[name] = min(latency[name], wall), min(latency_cpu[name], cpu)
    print(f"latency at batch 1 done ({time.time() - started:.0f}s)", flush=True)

    best, best_cpu = dict.fromkeys(throughput_set, inf), dict.fromkeys(throughput_set, inf)
    for r in range(args.throughput_rounds):
        for name in throughput_set[r % len(throughput_set):] + throughput_set[: r % len(throughput_set)]:
            wall, cpu = timed(candidates[name], prompts[: args.batch])
            best[name], best_cpu[name] = min(best[name], wall), min(best_cpu[name], cpu)
    throughput = {name: args.batch / t for name, t in best.items()}
    throughput_cpu = {name: args.batch / t for name, t in best_cpu.items()}
    print(f"throughput at batch {args.batch} done ({time.time() - started:.0f}s)", flush=True)

    query = mixture.embed(mixture.batch(prompts[:1]), 2)
    t = time.perf_counter()
    for _ in range(100):
        apa_weights(query, state, config.aggregate.neighbours, config.aggregate.tau)
    weights_ms = (time.perf_counter() - t) * 10

    base = "single adapter (peft)"
    print()
    print("wall clock (best of the rounds); in brackets the same ratio in process CPU time, which a")
    print("shared machine disturbs less")
    print(f"{'method':<44} {'latency b=1':>11} {'ratio':>15} {'throughput b=' + str(args.batch):>17} {'ratio':>15}")
    for name in candidates:
        ratio = f"{latency[name] / latency[base]:5.2f}x [{latency_cpu[name] / latency_cpu[base]:5.2f}x]"
        if name in throughput:
            tp = (f"{throughput[name]:11.2f} req/s "
                  f"{throughput[name] / throughput[base]:5.2f}x [{throughput_cpu[name] / throughput_cpu[base]:5.2f}x]")
        else:
            tp = f"{'-':>17}"
        print(f"{name:<44} {latency[name] * 1000:8.0f} ms {ratio} {tp}")
    print(f"APA weights alone (index of {args.index}, n={config.aggregate.neighbours}): {weights_ms:.2f} ms per request")
    print()
    for n in layers:
        name = f"APA mixture K={args.shards}, embedding {label(n)}"
        lat, lat_cpu = latency[name] / latency[base], latency_cpu[name] / latency_cpu[base]
        line = (f"target, embedding {label(n)}: latency {lat:.2f}x [{lat_cpu:.2f}x] "
                f"(<= 1.15x: {'met' if max(lat, lat_cpu) <= 1.15 else 'met in CPU time only' if lat_cpu <= 1.15 else 'NOT met'})")
        if name in throughput:
            tp, tp_cpu = throughput[name] / throughput[base], throughput_cpu[name] / throughput_cpu[base]
            line += (f", throughput {tp:.2f}x [{tp_cpu:.2f}x] "
                     f"(>= 0.8x: {'met' if min(tp, tp_cpu) >= 0.8 else 'met in CPU time only' if tp_cpu >= 0.8 else 'NOT met'})")
        print(line)
    replica = measure_replicas(args, args.depth)
    print(f"peak RSS of a replica (a Ray actor holding the model, the adapters and the index): {replica[args.shards]:.0f} MB "
          f"with K={args.shards} adapters, {replica[1]:.0f} MB with one; this benchmark process {peak_rss_mb():.0f} MB; "
          f"total {time.time() - started:.0f}s")

    # the figures for `python -m benchmarks` (benchmarks/common.py): ratios oriented bigger = better
    figures = []
    for name in candidates:
        if name != base:
            target = 1 / 1.15 if name.startswith("APA mixture") else None
            figures.append(figure(f"latency b=1, {name}", latency[name] * 1000, "ms", f"latency b=1, {base}",
                                  latency[base] * 1000, target=target, higher_is_better=False))
    for name in throughput:
        if name != base:
            target = 0.8 if name.startswith("APA mixture") else None
            figures.append(figure(f"throughput b={args.batch}, {name}", throughput[name], "req/s",
                                  f"throughput b={args.batch}, {base}", throughput[base], target=target))
    figures.append(limit(f"peak RSS of a replica serving K={args.shards} adapters", replica[args.shards], "MB", 1500,
                         "a replica serving one adapter", replica[1]))
    finish("bench_serving", {"figures": figures, "seconds": time.time() - started, "model": args.model,
                             "shards": args.shards, "cpu_time_ratios": {
                                 "latency": {n: latency_cpu[n] / latency_cpu[base] for n in candidates},
                                 "throughput": {n: throughput_cpu[n] / throughput_cpu[base] for n in throughput}}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
