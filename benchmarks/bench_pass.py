"""The store's per-sample trunk pass: batched against one prompt at a time, 2 Ray Data workers against 1.

    python -m benchmarks.bench_pass [--config configs/movielens.yaml] [--prompts 64]

On the first --prompts samples of the config's data, in one run:
- in this process, on model.trunk_threads threads: components.model.trunk_pass one prompt at a
  time (how the store was built before) against trunk_pass_by_length (prompts of one token count
  together, inference.batch_size at most), and how many of the batched states and embeddings equal
  the one-at-a-time ones bit for bit;
- the Ray Data pass that the jobs run (ray_jobs.passes.StorePass, states written to a scratch
  store), with 2 workers against 1, each worker on 1 CPU and 1 torch thread, batches of 16; the
  wall time includes starting the actors and loading the model in each.
The machine's load average is printed at the start and the end: on a shared machine the ratios
are only as good as the load was steady.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import torch

from benchmarks.common import figure, finish, local_ray, offline, parser
from components.config import load_config
from components.data import build_samples, load_interactions_and_items
from components.model import STATE_DTYPES, load_base_model, load_tokenizer, make_deterministic, tokenize, trunk_pass, trunk_pass_by_length
from components.store import PASS_COLUMNS, Workdir

NAME = "bench_pass"
RAY_BATCH = 16  # 4 batches of the 64 prompts: two workers share them evenly


def in_process(config, prompts: list[str]) -> tuple[float, float, int]:
    """Seconds one at a time, seconds batched by token count, and how many prompts agree bit for bit."""
    make_deterministic(1)  # the trunk runs on model.trunk_threads
    tokenizer = load_tokenizer(config.model)
    model = load_base_model(config.model, config.seed, tokenizer)
    started = time.time()
    alone = [trunk_pass(model, tokenize(tokenizer, [p], config.model.max_length), config.model) for p in prompts]
    alone_seconds = time.time() - started
    started = time.time()
    batched = trunk_pass_by_length(model, tokenizer, prompts, config.model, config.inference.batch_size)
    batched_seconds = time.time() - started
    dtype = STATE_DTYPES[config.model.trunk_dtype]
    same = sum(torch.equal(a.states[0].to(dtype), s.to(dtype)) and torch.equal(a.embedding[0], e)
               for a, (s, e) in zip(alone, batched))
    return alone_seconds, batched_seconds, same


def ray_pass(config, rows, workers: int) -> float:
    """Seconds of the jobs' Ray Data pass over `rows` with `workers` actors of 1 CPU and 1 thread."""
    from ray_jobs.passes import StorePass

    config = config.model_copy(update={
        "model": config.model.model_copy(update={"trunk_threads": 1}),
        "inference": config.inference.model_copy(update={"workers": workers, "cpus_per_worker": 1.0, "gpus_per_worker": 0.0,
                                                         "batch_size": RAY_BATCH}),
    })
    scratch = Workdir(tempfile.mkdtemp(prefix="bench-pass-"))
    try:
        store_pass = StorePass(config, scratch, load_tokenizer(config.model))
        store_pass(rows)
        print(f"  {workers} worker(s): {store_pass.seconds:.1f}s, {len(store_pass.pids)} actor(s)", flush=True)
        return store_pass.seconds
    finally:
        shutil.rmtree(scratch.root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = parser(NAME, __doc__.splitlines()[0], prepares=False)
    p.add_argument("--prompts", type=int, default=64, help="samples to run through the trunk (default 64)")
    args = p.parse_args(argv)
    offline()
    started = time.time()
    config = load_config(args.config)
    rows = build_samples(*load_interactions_and_items(config.data), config.data).head(args.prompts)[PASS_COLUMNS]
    prompts = rows["prompt"].tolist()
    print(f"{NAME}: {len(prompts)} prompts of {config.model.label}, {config.model.trunk_layers or 'all'} trunk layers; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    alone, batched, same = in_process(config, prompts)
    print(f"  one at a time {alone:.1f}s, by token count {batched:.1f}s; {same}/{len(prompts)} bit for bit", flush=True)
    local_ray()
    one, two = ray_pass(config, rows, 1), ray_pass(config, rows, 2)
    n = len(prompts)
    print(f"load average {os.getloadavg()[0]:.1f}", flush=True)
    figures = [
        figure("trunk pass, batched by token count", n / batched, "prompts/s", "one at a time", n / alone),
        figure("Ray Data pass, 2 workers", n / two, "prompts/s", "1 worker", n / one),
    ]
    return 0 if finish(NAME, {"figures": figures, "seconds": time.time() - started, "prompts": n,
                               "identical_to_one_at_a_time": same}) else 1


if __name__ == "__main__":
    raise SystemExit(main())
