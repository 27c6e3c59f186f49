"""Issue 31: the replica's registry follower is a class of its own, tested here without Serve: on the
session's trained work dir and its real MLflow registry, it loads the live set, follows a mask set
in the registry within one poll, masks at once for a forget request, and survives a registry that
fails a poll."""

import asyncio

import pytest

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
