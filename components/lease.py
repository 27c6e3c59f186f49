"""A lease on a folder of a shared work dir: at most one live holder at a time, across the
processes and nodes that mount the work dir (NFS, CephFS, EFS, a local disk).

A lease is a sequence of generation files `<folder>/<gen>.json`. Taking it creates generation
top+1 with `link()`, which is atomic and fails if the file exists on every POSIX and NFS file
system (unlike flock, which some shared file systems ignore): of two takers, one wins. The current
holder is alive while it keeps renewing `expires` (a heartbeat); on its own host a holder whose
process is gone is dead at once, so a killed job's lease is free without waiting for the TTL.
A holder that sees a higher generation has lost the lease (it stalled past the TTL) and must stop.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path


def _process_start(pid: int) -> str | None:
    """The start time of a process (field 22 of /proc/PID/stat): tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(record: dict, now: float) -> bool:
    if record.get("released") or record.get("expires", 0) <= now:
        return False
    if record.get("host") == socket.gethostname():  # same host: the process must still exist
        return _process_start(record["pid"]) == record.get("pid_start")
    return True


class Lease:
    def __init__(self, folder: Path, ttl_s: float, **info):
        self.folder, self.ttl_s, self.info = Path(folder), ttl_s, info
        self.token = uuid.uuid4().hex
        self.gen: int | None = None

    def _generations(self) -> list[int]:
        return sorted(int(p.stem) for p in self.folder.glob("*.json") if p.stem.isdigit())

    def _path(self, gen: int) -> Path:
        return self.folder / f"{gen:012d}.json"

    def _read(self, gen: int) -> dict | None:
        try:
            return json.loads(self._path(gen).read_text())
        except (OSError, ValueError):
            return None

    def _record(self) -> dict:
        pid = os.getpid()
        return {**self.info, "token": self.token, "host": socket.gethostname(), "pid": pid,
                "pid_start": _process_start(pid), "expires": time.time() + self.ttl_s}

    def holder(self) -> dict | None:
        """The live holder's record (anyone's, this one's included), or None."""
        gens = self._generations()
        record = self._read(gens[-1]) if gens else None
        return record if record is not None and _alive(record, time.time()) else None

    def acquire(self) -> bool:
        """Take the lease if nobody holds it; True if this object holds it now."""
        if self.held():
            return self.renew()
        self.folder.mkdir(parents=True, exist_ok=True)
        gens = self._generations()
        top = gens[-1] if gens else 0
        if top and (self._read(top) is None or self.holder() is not None):
            return False  # a live holder, or a generation being written right now
        tmp = self.folder / f".{self.token}.tmp"
        tmp.write_text(json.dumps(self._record()))
        try:
            os.link(tmp, self._path(top + 1))
        except FileExistsError:
            # NFS may retry a LINK whose reply was lost and report EEXIST for our own link: then our
            # temporary file has two names. Otherwise another taker won this generation.
            if os.stat(tmp).st_nlink != 2:
                return False
        finally:
            tmp.unlink(missing_ok=True)
        self.gen = top + 1
        for old in gens:
            self._path(old).unlink(missing_ok=True)
        return True

    def held(self) -> bool:
        """This object still holds the lease: its generation is the newest and carries its token."""
        if self.gen is None:
            return False
        gens = self._generations()
        record = self._read(self.gen)
        return bool(gens) and gens[-1] == self.gen and record is not None and record.get("token") == self.token

    def renew(self) -> bool:
        if not self.held():
            self.gen = None
            return False
        tmp = self.folder / f".{self.token}.tmp"
        tmp.write_text(json.dumps(self._record()))
        tmp.replace(self._path(self.gen))
        return True

    def release(self) -> None:
        if self.held():
            tmp = self.folder / f".{self.token}.tmp"
            tmp.write_text(json.dumps({**self._record(), "released": True}))
            tmp.replace(self._path(self.gen))  # the file stays: generations only grow
        self.gen = None


class Heartbeat:
    """Renews a held lease every ttl/4 seconds in a daemon thread; calls `on_lost` (which should end
    the process) if the lease was taken over, so a stalled holder never writes after losing it."""

    def __init__(self, lease: Lease, on_lost):
        self.lease, self.on_lost = lease, on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="lease-heartbeat")

    def _run(self) -> None:
        while not self._stop.wait(self.lease.ttl_s / 4):
            if not self.lease.renew():
                self.on_lost()
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
