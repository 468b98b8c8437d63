"""The gateway hands a dropped mirror's memory back to the OS: when the janitor trims, the
mirror and its model are garbage already (nothing of the janitor's keeps them alive)."""

from __future__ import annotations

import gc
import weakref
from dataclasses import replace

import pytest
from redis.asyncio import Redis

from processors.serve import gateway as gw_mod
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
