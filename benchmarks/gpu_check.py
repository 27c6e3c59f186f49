"""The GPU check, one command for the day a GPU is lent: `python -m benchmarks.gpu_check`.

configs/movielens.yaml at the paper's full depth (`trunk_layers: 0`: LoRA in every layer, nothing
stored), the base model in bfloat16, the four shards sharing one GPU (`gpus_per_actor: 0.25`),
through bench_train, bench_serving and bench_forget (python -m benchmarks), whose summary prints
the training, serving and forgetting ratios against baselines measured in the same run. Sized for
under 10 minutes on one H100 (the benchmarks' subsets: 512 training samples). Without CUDA it
stops at once (exit 2): a GPU run never falls back to the CPU unnoticed.

Not yet run on a GPU: no GPU was lent to this project when it was written.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from benchmarks.common import MOVIELENS, ROOT, bench_config, bench_dir, write_config

BENCHMARKS = "bench_train,bench_serving,bench_forget"


def gpu_config(path: str):
    return bench_config(path, "gpu-check", model={"trunk_layers": 0, "dtype": "bfloat16", "head_dtype": "bfloat16"},
                        train={"gpus_per_actor": 0.25, "cpus_per_actor": 2})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(MOVIELENS), help="base config (default configs/movielens.yaml)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        parser.exit(2, f"error: torch {torch.__version__} sees no CUDA device here: the GPU check needs one "
                       "(the CUDA image, or pip install torch from the CUDA index)\n")
    config = write_config(gpu_config(args.config), bench_dir() / "gpu-check.yaml")
    print(f"GPU check on {torch.cuda.get_device_name(0)}: {config}", flush=True)
    return subprocess.call([sys.executable, "-m", "benchmarks", "--config", str(config), "--only", BENCHMARKS], cwd=ROOT)


if __name__ == "__main__":
    raise SystemExit(main())
