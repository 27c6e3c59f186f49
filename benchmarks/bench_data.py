"""How building samples scales with the interaction log: a synthetic log of --rows interactions
(default 1,000,000: string user ids, ISBN-like item ids, dates as text, its own column names,
read through data.columns) against MovieLens-100K in the same run.

    python -m benchmarks.bench_data [--rows 1000000]

Each side runs in a process of its own, so its peak memory (ru_maxrss) is its own: reading and
checking the files, building the samples (column-wise, no Python loop over rows), and cutting the
time split. Figures: rows per second of the synthetic log against MovieLens' (near 1x: the build is
linear in the rows), and each side's seconds and peak memory.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import figure, finish
from components.config import DataConfig
from components.data import build_samples, load_interactions_and_items, split_by_time

NAME = "bench_data"
COLUMNS = {"User-ID": "user_id", "ISBN": "item_id", "Book-Rating": "rating", "Read-At": "timestamp", "Book-Title": "title"}


def write_log(folder: Path, rows: int, seed: int = 0) -> DataConfig:
    """`rows` ratings by rows/50 readers of rows/20 books, over one year; returns the config reading them."""
    rng = np.random.default_rng(seed)
    users, items = max(1, rows // 50), max(1, rows // 20)
    isbns = pd.Series(np.arange(items) + 140000000).astype(str).radd("0")
    pd.DataFrame({"ISBN": isbns, "Book-Title": "Book " + pd.Series(np.arange(items)).astype(str)}).to_csv(folder / "books.csv", index=False)
    seconds = rng.integers(0, 365 * 86400, rows) + 1704067200
    pd.DataFrame({
        "User-ID": pd.Series(rng.integers(0, users, rows)).astype(str).radd("u-"),
        "ISBN": isbns.to_numpy()[rng.integers(0, items, rows)],
        "Book-Rating": rng.integers(1, 11, rows),
        "Read-At": pd.to_datetime(seconds, unit="s").strftime("%Y-%m-%dT%H:%M:%S"),
    }).to_csv(folder / "ratings.csv", index=False)
    return DataConfig(source="files", interactions_path=str(folder / "ratings.csv"), items_path=str(folder / "books.csv"),
                      columns=COLUMNS, like_threshold=6, n_train=1024, n_valid=500, n_test=1000)


def measure(config: DataConfig, out) -> None:
    """In a child process: the three stages' seconds, the counts, and the process's peak memory."""
    started = time.time()
    inter, items = load_interactions_and_items(config)
    loaded = time.time()
    samples = build_samples(inter, items, config)
    built = time.time()
    split_by_time(samples, config, seed=0)
    out.put({"rows": len(inter), "samples": len(samples), "load_s": loaded - started, "build_s": built - loaded,
             "split_s": time.time() - built, "seconds": time.time() - started,
             "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def run_isolated(config: DataConfig) -> dict:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    process = context.Process(target=measure, args=(config, out))
    process.start()
    result = out.get()
    process.join()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_data", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="interactions in the synthetic log")
    parser.add_argument("--config", help="ignored (python -m benchmarks passes every benchmark one)")
    args = parser.parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory() as folder:
        config = write_log(Path(folder), args.rows)
        print(f"{NAME}: a synthetic log of {args.rows:,} ratings written ({time.time() - started:.0f}s)", flush=True)
        baseline = run_isolated(DataConfig())
        large = run_isolated(config)
    for name, row in (("MovieLens-100K", baseline), (f"synthetic {args.rows:,}", large)):
        print(f"  {name}: {row['rows']:,} rows -> {row['samples']:,} samples; read and check {row['load_s']:.1f}s, "
              f"build {row['build_s']:.1f}s, split {row['split_s']:.1f}s; peak {row['peak_mb']:.0f} MB", flush=True)
    rate = lambda row: row["rows"] / row["seconds"]  # noqa: E731
    figures = [
        figure("rows per second, synthetic log", rate(large), "rows/s", "MovieLens-100K", rate(baseline)),
        figure("seconds to samples, synthetic log", large["seconds"], "s", "MovieLens-100K", baseline["seconds"],
               higher_is_better=False),
        figure("peak memory, synthetic log", large["peak_mb"], "MB", "MovieLens-100K", baseline["peak_mb"], higher_is_better=False),
    ]
    finish(NAME, {"seconds": time.time() - started, "figures": figures, "synthetic": large, "movielens": baseline})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
