"""Issue 31: the replica's registry follower is a class of its own, tested here without Serve: on the
session's trained work dir and its real MLflow registry, it loads the live set, follows a mask set
in the registry within one poll, masks at once for a forget request, and survives a registry that
fails a poll."""

import asyncio
import shutil

import pytest

from components.aggregate import AggregatorState
from components.registry import Registry
from serving.follower import LiveSetFollower


def test_the_follower_loads_the_live_set_and_follows_the_registrys_masks(trained_tiny, tiny_config):
    workdir, report = trained_tiny
    registry = Registry(tiny_config.experiment, workdir.root)

    async def scenario():
        follower = await LiveSetFollower.start(tiny_config, registry)
        assert follower.view.served.version == str(report["adapter_set_version"]) and follower.view.masked == frozenset()
        before = follower.view
        registry.set_masked_shards({2})  # as a forget job on any node would
        try:
            await follower.poll_once()
            assert follower.view.masked == {2} and follower.view.served is before.served  # a new view, the same set
            async with follower.lock:
                follower.mask({1})  # a forget request on this replica: at once, before the registry says so
            assert follower.view.masked == {1, 2}
        finally:
            registry.set_masked_shards(set())
        # The registry no longer masks 2, and never masked 1: the next poll unmasks both.
        await follower.poll_once()
        assert follower.view.masked == frozenset() and follower.loading is None

        # A poll that fails (the registry unreachable) is logged; following goes on.
        follower.config = tiny_config.model_copy(update={"serving": tiny_config.serving.model_copy(update={"poll_interval_s": 0.05})})
        calls = []
        real = registry.mask_and_live_set

        def flaky():
            calls.append(1)
            if len(calls) == 1:
                raise ConnectionError("registry unreachable")
            return real()

        registry.mask_and_live_set = flaky
        task = asyncio.create_task(follower.follow())
        while len(calls) < 3:
            await asyncio.sleep(0.05)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_a_shard_the_live_set_no_longer_holds_serves_no_more_even_when_the_new_set_cannot_load(trained_tiny, tiny_config,
                                                                                                tmp_path):
    """A forget that empties a shard leaves it out of the next set; one that forgets every
    shard's data publishes an empty set, which no replica can load. Either way the old version
    (purged from the registry) stops serving at the first poll, before or without the new set."""
    workdir, report = trained_tiny
    registry = Registry(tiny_config.experiment, workdir.root)
    original = str(registry.live_version(registry.set_model).version)
    live = registry.load_adapter_set(tmp_path / "live")
    pins = {int(k): v["version"] for k, v in live.shards.items()}

    def aggregator_of(shards):  # as publish_adapter_set writes it: the state of the set's shards only
        folder = shutil.copytree(live.folder / "aggregator", tmp_path / f"aggregator-{len(shards)}")
        state = AggregatorState.load(folder)
        AggregatorState(state.sample_ids, state.labels, state.embeddings,
                        {k: v for k, v in state.predictions.items() if k in shards}).save(folder)
        return folder

    async def scenario():
        follower = await LiveSetFollower.start(tiny_config, registry)
        try:
            emptied = max(pins)
            kept = {k: v for k, v in pins.items() if k != emptied}
            registry.set_live(registry.set_model, registry.register_adapter_set(kept, aggregator_of(kept), {"test": "a shard emptied"}))
            await follower.poll_once()
            assert follower.view.masked == {emptied} and follower.view.served.version == original
            if follower.loading:
                await follower.loading
            # The new set never held that shard: nothing masks it any more, and nothing serves it.
            assert emptied not in follower.view.served.mixture.shards
            registry.set_live(registry.set_model, registry.register_adapter_set({}, aggregator_of({}), {"test": "every shard emptied"}))
            served = follower.view.served
            await follower.poll_once()
            if follower.loading:
                await follower.loading  # fails: a mixture needs an adapter; the loaded set stays, masked
            assert follower.view.served is served and follower.view.masked == set(served.mixture.shards)
            assert served.serving(follower.view.masked) == []
        finally:
            registry.set_live(registry.set_model, original)

    asyncio.run(scenario())
