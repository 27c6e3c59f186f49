"""What the benchmarks share: where they write, the configs they run, and how a figure is reported.

A figure is a measured value next to the baseline it is compared with, measured in the same run,
and their ratio (oriented so that bigger is better: a speedup, not a slowdown). A benchmark module
run as `python -m benchmarks.<name>` prints its table and, when $BENCH_RESULT names a file, writes
{"benchmark": ..., "figures": [...], ...} there for `python -m benchmarks` to summarise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import yaml

from components.config import OFFLINE_ENV, Config, load_config
from components.data import SPLITS
from components.registry import keep_own_registry
from components.store import Workdir

ROOT = Path(__file__).resolve().parents[1]
MOVIELENS = ROOT / "configs" / "movielens.yaml"
ENV = {**OFFLINE_ENV, "RAY_AUTH_MODE": "disabled"}


def offline() -> None:
    for key, value in ENV.items():
        os.environ.setdefault(key, value)


def local_ray() -> None:
    """A Ray of the benchmark's own, never a cluster another process started with `ray start` on
    this shared machine (which ray.init() without an address would join); the jobs' connect_ray()
    then finds it initialized. Workers get the offline environment and the model cache."""
    import ray

    env = {k: os.environ[k] for k in (*OFFLINE_ENV, "UNLEARN_CACHE", "MLFLOW_TRACKING_URI") if k in os.environ}
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": env})


def bench_dir() -> Path:
    return Path(os.environ.get("BENCH_DIR", ROOT / "runs" / "bench")).resolve()


def parser(name: str, description: str, prepares: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark takes; `prepares`: it builds a sample store (prepare_store)."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    p.add_argument("--config", default=str(MOVIELENS), help="base config (default configs/movielens.yaml)")
    p.add_argument("--workdir", help=f"where to work (default {bench_dir()}/{name}; wiped first)")
    if prepares:
        p.add_argument("--states-from", help="a store of the same model whose trunk states are linked, not computed "
                       "(default runs/store/<experiment of --config>, when it exists)")
    return p


def bench_config(path: str, experiment: str, **sections) -> Config:
    """The config at `path` with a benchmark's experiment name and section overrides."""
    config = load_config(path)
    update = {"experiment": experiment}
    for section, values in sections.items():
        if values:
            update[section] = getattr(config, section).model_copy(update=values)
    return config.model_copy(update=update)


def fresh_workdir(path: str | None, name: str) -> Workdir:
    """A benchmark's own work dir, emptied: every run measures from the same start. It and the work
    dirs inside it register in an MLflow store of their own, never in a deployment's."""
    folder = Path(path) if path else bench_dir() / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"{name}: registers in its own MLflow store {keep_own_registry(folder, 'a benchmark')}", flush=True)
    return Workdir(folder)


def write_config(config: Config, path: Path) -> Path:
    """A YAML file of a resolved config, for jobs that take --config FILE."""
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _unsized(config: Config, *sections: str) -> dict:
    """What trunk states and the partitioner depend on: config sections and the data but for the
    split sizes (a smaller split is the first n of the same draw; the partitioner sees only the
    public catalogue)."""
    return {**config.model_dump(mode="json", include=set(sections)),
            "data": config.data.model_dump(mode="json", exclude={"n_train", "n_valid", "n_test"})}


def store_dir(config: Config) -> Path:
    return ROOT / "runs" / "store" / config.experiment


def shared_store(config: Config) -> Workdir:
    """runs/store/<experiment>: the config's sample store with every sample's trunk state, computed
    once (resumable: states already stored are kept) for `make bench`'s benchmarks, the evaluation
    and `make recipe`, which link its states and never recompute them."""
    from components.model import load_base_model, load_tokenizer, make_deterministic
    from components.store import prepare

    store = Workdir(store_dir(config))
    if not all(store.split(name).exists() for name in SPLITS):
        make_deterministic(1)  # the trunk itself runs on model.trunk_threads
        tokenizer = load_tokenizer(config.model)
        print(f"preparing the shared sample store {store.root}", flush=True)
        prepare(config, store, load_base_model(config.model, config.seed, tokenizer), tokenizer,
                log=lambda m: print(f"  {m}", flush=True))
    return store


def states_source(args: argparse.Namespace) -> Path:
    """--states-from, or where a prepared store of --config may hold trunk states already."""
    return Path(args.states_from) if args.states_from else store_dir(load_config(args.config))


def equal_but_rounding(recomputed, stored) -> bool:
    """A state or embedding recomputed for one sample alone against the stored one, computed in a
    batch: equal but for the last bits (some CPUs' kernels round a batch's rows differently from a
    row alone; the exactness proof never compares these, it reads the stored bits), where another
    model, config or prompt differs everywhere."""
    import torch

    return torch.allclose(recomputed.float(), stored.float(), rtol=2**-8, atol=2**-8)


def _link_states(config: Config, source: Workdir, pool: Workdir, model, tokenizer) -> int:
    """Link every state `source` has stored (complete files only: they are written atomically, so
    a store still being prepared is fine) into `pool`, after checking that one of them, recomputed
    here, equals the stored file but for rounding (states and embedding): the same model and prompts."""
    from components.data import build_samples, load_interactions_and_items
    from components.model import STATE_DTYPES, tokenize, trunk_pass

    ids = [header["sample_id"] for _, header in source.trunk.headers()]
    if not ids:
        return 0
    samples = build_samples(*load_interactions_and_items(config.data), config.data).set_index("sample_id")
    probe = next((s for s in ids if s in samples.index), None)
    if probe is None:
        raise SystemExit(f"{source.root} stores trunk states of other samples than this config's data")
    out = trunk_pass(model, tokenize(tokenizer, [samples.loc[probe, "prompt"]], config.model.max_length), config.model)
    [states], [embedding] = source.trunk.read([probe]), source.trunk.read([probe], "embedding")
    if not (equal_but_rounding(out.states[0].to(STATE_DTYPES[config.model.trunk_dtype]), states)
            and equal_but_rounding(out.embedding[0], embedding)):
        raise SystemExit(f"{source.root} stored its trunk states with another model or config: pass another --states-from")
    pool.trunk.link_from(source.trunk, ids)
    return len(ids)


def prepare_store(config: Config, workdir: Workdir, states_from: Path | None = None) -> float:
    """Build the sample store (samples, trunk states, embeddings) and fit the public partitioner
    once; returns the seconds. Both are kept out of every timed job, which reuses them as a
    retrain in an existing work dir does. They are cached under <bench dir>/cache by what they
    depend on (data, model, partition, seed) and copied from there, trunk states linked. Trunk
    states and fitted partitioners have caches of their own that do not depend on the split
    sizes, so a sample's state is computed once whatever benchmark or size needs it;
    `states_from`, a store of the same model (checked on one sample; it may be half prepared), seeds it."""
    from components.model import embed, load_base_model, load_tokenizer, make_deterministic
    from components.store import copy_store, fit_partitioner, prepare

    started = time.time()
    cache = Workdir(bench_dir() / "cache" / _key(config.model_dump(mode="json", include={"seed", "data", "model", "partition"})))
    if not (all(cache.split(name).exists() for name in SPLITS) and cache.partitioner.exists()):
        make_deterministic(1)  # the trunk itself runs on model.trunk_threads
        tokenizer = load_tokenizer(config.model)
        model = load_base_model(config.model, config.seed, tokenizer)
        pool = Workdir(bench_dir() / "cache" / f"states-{_key(_unsized(config, 'seed', 'model'))}")
        fitted = bench_dir() / "cache" / f"partitioner-{_key(_unsized(config, 'seed', 'model', 'partition'))}.npz"
        if config.model.trunk_layers and states_from:
            linked = _link_states(config, Workdir(states_from), pool, model, tokenizer)
            print(f"  {linked} trunk states found in {states_from} (linked); the rest come from the cache or are computed",
                  flush=True)
        staging = Workdir(cache.root.with_name(f".{cache.root.name}.{os.getpid()}"))
        shutil.rmtree(staging.root, ignore_errors=True)
        splits = prepare(config, staging, model, tokenizer, log=lambda m: print(f"  {m}", flush=True), states_from=pool)
        if config.model.trunk_layers:  # states computed just now serve every later store
            pool.trunk.link_from(staging.trunk, [s for frame in splits.values() for s in frame["sample_id"]])
        if fitted.exists():
            staging.partitioner.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(fitted, staging.partitioner)
        fit_partitioner(config, staging, lambda prompts: embed(model, tokenizer, prompts, config.model))  # or loads the copy
        if not fitted.exists():
            shutil.copyfile(staging.partitioner, fitted)
        shutil.rmtree(cache.root, ignore_errors=True)
        os.replace(staging.root, cache.root)
    copy_store(cache, workdir)
    workdir.partitioner.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cache.partitioner, workdir.partitioner)
    print(f"  sample store and partitioner from {cache.root} (trunk states linked)", flush=True)
    return time.time() - started


def figure(name: str, value: float, unit: str, baseline: str, baseline_value: float, *, target: float | None = None,
           higher_is_better: bool = True) -> dict:
    """A measured value against its baseline; the ratio is oriented so that bigger is better
    (value/baseline, or baseline/value when a lower value is better) and `target` applies to it."""
    ratio = None
    if value and baseline_value:
        ratio = value / baseline_value if higher_is_better else baseline_value / value
    return {"name": name, "value": value, "unit": unit, "baseline": baseline, "baseline_value": baseline_value,
            "ratio": ratio, "target": target, "target_text": f"ratio >= {target:g}" if target else "",
            "ok": None if target is None or ratio is None else ratio >= target}


def limit(name: str, value: float, unit: str, below: float, baseline: str, baseline_value: float) -> dict:
    """A value with an absolute upper limit (memory, latency); the ratio is value/baseline."""
    return {"name": name, "value": value, "unit": unit, "baseline": baseline, "baseline_value": baseline_value,
            "ratio": value / baseline_value if baseline_value else None, "target": below,
            "target_text": f"value < {below:g} {unit}", "ok": value < below}


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def table(title: str, figures: list[dict]) -> str:
    rows = [("figure", "value", "baseline", "ratio", "target", "ok")]
    for f in figures:
        rows.append((f["name"], f"{_num(f['value'])} {f['unit']}",
                     f"{f['baseline']}: {_num(f['baseline_value'])}" if f["baseline"] else "-",
                     f"{f['ratio']:.3g}x" if f["ratio"] is not None else "-", f["target_text"] or "-",
                     {True: "yes", False: "NO", None: "-"}[f["ok"]]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"== {title}", "  ".join(h.ljust(w) for h, w in zip(rows[0], widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows[1:]]
    return "\n".join(lines)


def finish(name: str, result: dict) -> dict:
    """Print a benchmark's table and write its result to $BENCH_RESULT (default
    <bench dir>/results/<name>.json)."""
    print("\n" + table(f"{name} ({result.get('seconds', 0):.0f}s)", result["figures"]), flush=True)
    out = Path(os.environ.get("BENCH_RESULT") or bench_dir() / "results" / f"{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": name, **result}, indent=1, default=str))
    return result
