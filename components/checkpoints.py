"""A shard's slice checkpoints, where the run's storage keeps them: a folder of the shared work dir,
or a URI that pyarrow's filesystems reach from every node (s3://, gs://, file://...).

    <location>/slice-<r>/checkpoint.pt    stage r's checkpoint (a Ray Train checkpoint's one file)

Every read, write and removal goes through `pyarrow.fs`, as Ray Train's own copies into the
storage do, so the code is one whatever the storage.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from pyarrow import fs

CHECKPOINT_FILE = "checkpoint.pt"


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def filesystem(location: str | os.PathLike) -> tuple[fs.FileSystem, str]:
    """pyarrow's filesystem for a URI or a local path, and the path on it."""
    return fs.FileSystem.from_uri(str(location) if is_uri(location) else str(Path(location).resolve()))


def read_bytes(location: str | os.PathLike) -> bytes | None:
    """A file of the storage; None where it is not there (or not readable from here)."""
    storage, path = filesystem(location)
    try:
        with storage.open_input_stream(path) as f:
            return f.read()
    except OSError:
        return None


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Written beside its final name and moved there: a reader finds the whole file or none."""
    storage, path = filesystem(location)
    folder, name = path.rsplit("/", 1)
    storage.create_dir(folder)
    partial = f"{folder}/.{name}.{os.getpid()}.tmp"
    with storage.open_output_stream(partial) as f:
        f.write(data)
    storage.move(partial, path)


def files_under(location: str | os.PathLike) -> list[str]:
    """Every file under a folder of the storage, each as a location `read_bytes` takes."""
    storage, root = filesystem(location)
    scheme = str(location)[: str(location).index("://") + 3] if is_uri(location) else ""
    found = storage.get_file_info(fs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(scheme + info.path for info in found if info.type == fs.FileType.File)


def delete(location: str | os.PathLike) -> None:
    """A file or a folder (with all it holds) of the storage; nothing where it is already gone."""
    storage, path = filesystem(location)
    kind = storage.get_file_info(path).type
    if kind == fs.FileType.Directory:
        storage.delete_dir(path)
    elif kind == fs.FileType.File:
        storage.delete_file(path)


class SliceCheckpoints:
    """One shard's slice checkpoints at `location` (a local folder or a URI)."""

    def __init__(self, location: str | os.PathLike):
        self.location = str(location)
        self.fs, self.root = filesystem(location)

    def __repr__(self) -> str:
        return f"SliceCheckpoints({self.location!r})"

    def read(self, stage: int) -> dict | None:
        """Stage `stage`'s checkpoint, or None where there is none or it was cut short (a copy into
        storage interrupted by a failure: that stage is trained again)."""
        data = read_bytes(f"{self.location}/slice-{stage}/{CHECKPOINT_FILE}")
        try:
            return None if data is None else torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError):  # cut short
            return None

    def write(self, state: dict, stage: int) -> None:
        """Store a checkpoint where no Ray Train run copies it in."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_bytes(f"{self.location}/slice-{stage}/{CHECKPOINT_FILE}", buffer.getvalue())

    def remove(self, stage: int) -> None:
        delete(f"{self.location}/slice-{stage}")
        if not is_uri(self.location):  # a checkpoint file as work dirs kept them before Ray Train
            Path(self.root, f"slice-{stage}.pt").unlink(missing_ok=True)

    def stages(self) -> list[str]:
        """The names of the stage folders the storage holds, whatever their content."""
        found = self.fs.get_file_info(fs.FileSelector(self.root, allow_not_found=True))
        return sorted(Path(info.path).name for info in found if Path(info.path).name.startswith("slice-"))

    @contextlib.contextmanager
    def local_folder(self) -> Iterator[Path | None]:
        """A local copy of the checkpoints for the time of the block (for the registry to log as
        artifacts), taken the same way whatever the storage; None where there are none."""
        if not self.stages():
            yield None
            return
        with tempfile.TemporaryDirectory(prefix="checkpoints-") as folder:
            fs.copy_files(self.root, folder, source_filesystem=self.fs, destination_filesystem=fs.LocalFileSystem())
            yield Path(folder)
