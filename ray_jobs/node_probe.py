"""What a node of the cluster sees, asked at each job's start by `ray_jobs.common.check_nodes`: a
task on every node. It lives apart from the jobs so that a node imports no model library for it
(transformers, peft): 1.6 s of imports on 2 cores, where a job module's cost ~5 s on every node."""

from __future__ import annotations

import hashlib
from pathlib import Path

import ray
import torch

from components.checkpoints import read_bytes
from components.config import model_folder


@ray.remote(num_cpus=0)
def what_this_node_sees(probe: str, storage_probe: str | None, token: str, model_path: str | None, model_digest: str | None,
                        needs_cuda: bool) -> list[str]:
    problems = []
    path = Path(probe)
    if not path.exists() or path.read_text() != token:
        problems.append(f"does not see the work dir {path.parent} (the file the driver just wrote there is not there)")
    if storage_probe and read_bytes(storage_probe) != token.encode():
        problems.append(f"does not reach train.storage {storage_probe.rsplit('/', 1)[0]} (the driver's file there is not there)")
    folder = model_folder(model_path)
    if folder_digest(folder) != model_digest:
        problems.append(f"does not see the model folder {folder} as the driver does (missing or other files)")
    if needs_cuda and not torch.cuda.is_available():
        problems.append(f"offers GPUs to Ray but torch {torch.__version__} there sees no CUDA device")
    return problems


def folder_digest(folder: Path) -> str | None:
    """What identifies a model folder: its config and tokenizer files' bytes (the weights are too big to hash at start)."""
    files = [folder / name for name in ("config.json", "tokenizer.json", "tokenizer_config.json") if (folder / name).exists()]
    if not (folder / "config.json").exists() and not (folder / "tokenizer.json").exists():
        return None
    return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()
