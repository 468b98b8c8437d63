"""The gateway hands a dropped mirror's memory back to the OS: when the janitor trims, the
mirror and its model are garbage already (nothing of the janitor's keeps them alive)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from dataclasses import replace

import pytest
from redis.asyncio import Redis

from processors.serve import gateway as gw_mod
from processors.serve import views
from streams.processor import Deps
from tests.sse_publisher import FakeMarket, ModelWriter, publish_full
from tests.test_sse_gateway import SETTINGS, Client, base, gateway
from tests.util import eventually


async def test_a_dropped_mirror_and_its_model_are_freed_before_the_trim(
    deps: Deps, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = ModelWriter(redis)
    spx = FakeMarket("SPX")
    await publish_full(writer, spx, 1)
    front = min(e.isoformat() for e in spx.expiries)
    refs: list[weakref.ref[object]] = []
    trims: list[list[bool]] = []  # per trim: which of ``refs`` were still alive

    def trim() -> bool:
        gc.collect()  # as release_freed_memory does before malloc_trim
        trims.append([r() is not None for r in refs])
        return True

    monkeypatch.setattr(gw_mod, "release_freed_memory", trim)
    url = f"/sse/heatmap/butterfly?symbol=SPX&expiry={front}&right=C"
    async with gateway(deps, replace(SETTINGS, view_linger_s=0.0)) as gw:
        async with Client(base(gw) + url) as c:
            await c.next_data("snapshot")
            refs += [
                weakref.ref(x)
                for f in gw.gateway.feeds.values()
                for m in f.mirrors.values()
                for x in (m, m.model)
            ]
            assert refs and not trims

        async def dropped() -> bool:
            return not any(f.mirrors for f in gw.gateway.feeds.values()) and bool(trims)

        await eventually(dropped, timeout_s=10)
        assert not any(trims[-1]), trims


def _alive(*types: type) -> dict[str, int]:
    gc.collect()
    counts = {t.__name__: 0 for t in types}
    for o in gc.get_objects():
        if isinstance(o, types):
            counts[type(o).__name__] += 1
    return counts


async def test_every_client_object_is_freed_on_disconnect(deps: Deps, redis: Redis) -> None:
    """What a connected client costs the gateway (its subscriber, its view feed and mirror
    once no one else uses them, its pending diffs) is garbage once it left: nothing of the
    gateway keeps a reference."""
    writer = ModelWriter(redis)
    spx = FakeMarket("SPX")
    await publish_full(writer, spx, 1)
    expiries = sorted(e.isoformat() for e in spx.expiries)
    urls = [
        "/sse/heatmap/butterfly?symbol=SPX",  # whole model
        f"/sse/heatmap/butterfly?symbol=SPX&expiry={expiries[0]}&right=C",
        f"/sse/heatmap/butterfly?symbol=SPX&expiry={expiries[-1]}&right=P",
        f"/sse/heatmap/vertical?symbol=SPX&expiry={expiries[0]}",
    ]
    kinds = (gw_mod.WholeSubscriber, views.Subscriber, views.ViewFeed, gw_mod.Mirror, views.Model)
    async with gateway(deps, replace(SETTINGS, view_linger_s=0.0)) as gw:
        feeds = gw.gateway.feeds.values()
        before = _alive(*kinds)
        async with contextlib.AsyncExitStack() as stack:
            for url in urls:
                c = await stack.enter_async_context(Client(base(gw) + url))
                await c.next_data("snapshot")
            during = _alive(*kinds)
            # one subscriber per client, one view feed per view, one mirror per model
            assert during["WholeSubscriber"] - before["WholeSubscriber"] == 1, during
            assert during["Subscriber"] - before["Subscriber"] == 3, during
            assert during["ViewFeed"] - before["ViewFeed"] == 3, during
            assert during["Mirror"] - before["Mirror"] == 2, during
            assert during["Model"] - before["Model"] == 2, during

        async def all_freed() -> bool:
            return not any(f.whole or f.mirrors for f in feeds) and _alive(*kinds) == before

        await eventually(all_freed, timeout_s=10)


async def test_a_loader_that_swallows_its_cancellation_is_ended_and_its_mirror_freed(
    deps: Deps, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mirror's loader cancelled in the middle of a Redis read can meet the cancellation
    as a Redis error and go on (retry, or wait for the next GEX date refresh). The janitor
    cancels a dropped mirror's tasks until they end: such a task no longer lives on, holding
    the mirror and its model."""
    writer = ModelWriter(redis)
    spx = FakeMarket("SPX")
    await publish_full(writer, spx, 1)
    front = min(e.isoformat() for e in spx.expiries)
    real_load = gw_mod.Mirror._load_loop
    swallowed: list[str] = []

    async def stubborn(self: gw_mod.Mirror) -> None:
        await real_load(self)
        while True:  # as a loader retrying after an error, still running when dropped
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if not swallowed:
                    swallowed.append(self.symbol)  # met as a dead socket: retried
                    continue
                raise

    monkeypatch.setattr(gw_mod.Mirror, "_load_loop", stubborn)
    url = f"/sse/heatmap/butterfly?symbol=SPX&expiry={front}&right=C"
    async with gateway(deps, replace(SETTINGS, view_linger_s=0.0)) as gw:
        async with Client(base(gw) + url) as c:
            await c.next_data("snapshot")
            mirrors = [m for f in gw.gateway.feeds.values() for m in f.mirrors.values()]
            assert len(mirrors) == 1
            assert mirrors[0].task is not None
            ref, task_ref = weakref.ref(mirrors[0]), weakref.ref(mirrors[0].task)
            del mirrors

        async def ended() -> bool:
            gc.collect()  # the task and its frames are garbage once it ended
            return task_ref() is None and ref() is None

        await eventually(ended, timeout_s=10)
        assert swallowed == ["SPX"]
