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
from components.store import Workdir

ROOT = Path(__file__).resolve().parents[1]
MOVIELENS = ROOT / "configs" / "movielens.yaml"
ENV = {**OFFLINE_ENV, "RAY_AUTH_MODE": "disabled"}


def offline() -> None:
    for key, value in ENV.items():
        os.environ.setdefault(key, value)


def bench_dir() -> Path:
    return Path(os.environ.get("BENCH_DIR", ROOT / "runs" / "bench")).resolve()


def parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    p.add_argument("--config", default=str(MOVIELENS), help="base config (default configs/movielens.yaml)")
    p.add_argument("--workdir", help=f"where to work (default {bench_dir()}/{name}; wiped first)")
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
    """A benchmark's own work dir, emptied: every run measures from the same start."""
    folder = Path(path) if path else bench_dir() / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return Workdir(folder)


def write_config(config: Config, path: Path) -> Path:
    """A YAML file of a resolved config, for jobs that take --config FILE."""
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path


def copy_store(source: Workdir, target: Workdir) -> None:
    """The sample store (train/valid/test with embeddings) of one work dir into another."""
    for name in SPLITS:
        target.split(name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.split(name), target.split(name))


def prepare_store(config: Config, workdir: Workdir) -> float:
    """Build the sample store (samples + frozen-model embeddings) and fit the public partitioner
    once; returns the seconds. Both are kept out of every timed job, which reuses them as a
    retrain in an existing work dir does. They are cached under <bench dir>/cache by what they
    depend on (data, model, partition, seed), so later benchmarks and runs copy them instead."""
    from components.model import load_base_model, load_tokenizer, make_deterministic
    from components.store import fit_partitioner, prepare

    started = time.time()
    key = hashlib.sha256(json.dumps(config.model_dump(mode="json", include={"seed", "data", "model", "partition"}),
                                    sort_keys=True).encode()).hexdigest()[:16]
    cache = Workdir(bench_dir() / "cache" / key)
    if all(cache.split(name).exists() for name in SPLITS) and cache.partitioner.exists():
        copy_store(cache, workdir)
        workdir.partitioner.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cache.partitioner, workdir.partitioner)
        print(f"  sample store and partitioner copied from {cache.root}", flush=True)
        return time.time() - started
    make_deterministic(os.cpu_count() or 1)
    tokenizer = load_tokenizer()
    model = load_base_model(config.model, config.seed, tokenizer)
    prepare(config, workdir, model, tokenizer, log=lambda m: print(f"  {m}", flush=True))
    fit_partitioner(config, workdir, model, tokenizer)
    staging = Workdir(cache.root.with_name(f".{key}.{os.getpid()}"))
    copy_store(workdir, staging)
    staging.partitioner.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(workdir.partitioner, staging.partitioner)
    shutil.rmtree(cache.root, ignore_errors=True)
    os.replace(staging.root, cache.root)
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
