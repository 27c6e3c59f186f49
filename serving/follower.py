"""A replica's view of the registry, without Serve: the live adapter set loaded in memory and the
shards masked right now, as one immutable `View` that a request reads once. `LiveSetFollower`
polls the registry, loads a new live set off the event loop and swaps it in with one assignment,
and applies mask changes the same way; a forget request masks at once through `mask`, under the
same lock, so a poll with a stale read cannot undo it."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from components.aggregate import ServedSet, load_served_set, served_mask
from components.config import Config
from components.registry import Registry

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class View:
    """What a request sees, swapped as a whole: the loaded set and the shards masked now."""

    served: ServedSet
    masked: frozenset[int]


def download_served_set(config: Config, registry: Registry, version: str) -> ServedSet:
    """Download one adapter-set version, read it into memory, and delete the files."""
    download = Path(tempfile.mkdtemp(prefix=f"adapter-set-{version}-"))
    try:
        adapter_set = registry.load_adapter_set(download, version)
        if adapter_set is None:
            raise RuntimeError(f"adapter set version {version} not found")
        return load_served_set(config, adapter_set)
    finally:
        shutil.rmtree(download, ignore_errors=True)  # no copy of any adapter stays on disk


class LiveSetFollower:
    def __init__(self, config: Config, registry: Registry, view: View, load_set: Callable[[str], ServedSet]):
        self.config, self.registry, self.view, self.load_set = config, registry, view, load_set
        self.lock = asyncio.Lock()  # mask decisions one at a time: polls and forget requests
        self.loading: asyncio.Task | None = None
        self.last_poll = time.time()

    @classmethod
    async def start(cls, config: Config, registry: Registry, load_set: Callable[[str], ServedSet] | None = None):
        """Load the live set (and the masks) before the replica answers anything."""
        load_set = load_set or (lambda version: download_served_set(config, registry, version))
        masked, live, _ = await asyncio.to_thread(registry.mask_and_live_set)
        if live is None:
            raise RuntimeError(f"no live adapter set {registry.set_model!r}: run python -m ray_jobs.train first")
        served = await asyncio.to_thread(load_set, live)
        return cls(config, registry, View(served, frozenset(masked)), load_set)

    async def follow(self, between_polls: Callable[[], None] | None = None) -> None:
        """Poll for ever, every serving.poll_interval_s; a registry hiccup never stops it.
        `between_polls` runs off the event loop after each poll (its errors are logged)."""
        while True:
            try:
                await self.poll_once()
            except Exception:  # noqa: BLE001
                logger.exception("polling the registry failed; serving adapter set %s", self.view.served.version)
            self.last_poll = time.time()
            if between_polls is not None:
                try:
                    await asyncio.to_thread(between_polls)
                except Exception:  # noqa: BLE001
                    logger.exception("the follower's between-polls step failed")
            await asyncio.sleep(self.config.serving.poll_interval_s)

    async def poll_once(self) -> None:
        """Apply the registry's masks now; start loading the live set if it moved."""
        async with self.lock:
            view = self.view
            masked, live = await self._mask_with(view.served, view.masked)
            if masked != view.masked:
                self.view = View(view.served, masked)
                logger.info("masked shards now %s", sorted(masked))
        if live is not None and live != self.view.served.version and self.loading is None:
            self.loading = asyncio.create_task(self._swap_to(live))

    def mask(self, shards: set[int]) -> None:
        """Mask `shards` in this replica at once (the caller holds `lock`)."""
        self.view = View(self.view.served, self.view.masked | frozenset(shards))

    async def _mask_with(self, served: ServedSet, shown: frozenset[int]) -> tuple[frozenset[int], str | None]:
        """The shards to mask while `served` is loaded and `shown` are masked, and the registry's live
        set version (under the lock: a forget request must not interleave)."""
        registry_mask, live, live_pins = await asyncio.to_thread(self.registry.mask_and_live_set)
        loaded = {k: v["version"] for k, v in served.shards.items()}
        return frozenset(served_mask(registry_mask, shown, loaded, loaded if live == served.version else live_pins)), live

    async def _swap_to(self, version: str) -> None:
        try:
            started = time.time()
            served = await asyncio.to_thread(self.load_set, version)  # fully loaded before anyone sees it
            async with self.lock:
                old = self.view
                masked, _ = await self._mask_with(served, old.masked)
                self.view = View(served, masked)  # the swap: one reference assignment
            logger.info("swapped adapter set %s -> %s in %.1fs (masked %s)", old.served.version, version,
                        time.time() - started, sorted(masked))
        except Exception:  # noqa: BLE001 - keep serving the old set; the next poll tries again
            logger.exception("loading adapter set %s failed; still serving %s", version, self.view.served.version)
            await asyncio.sleep(max(1.0, self.config.serving.poll_interval_s))
        finally:
            self.loading = None
