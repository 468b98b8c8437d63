"""Rules inside the epoch Lua scripts that the stage tests cannot reach with realistic data:
timestamps compared as decimal strings, length first (a shorter string is an older time,
whatever its digits), and the state gate of build.lua."""

from __future__ import annotations

import msgspec
import pytest
from redis.asyncio import Redis

from processors import lua
from schemas import keys

EID = "e1"
CID = "O:SPXW261218C06000000"
_pack = msgspec.msgpack.Encoder().encode


async def hydrate_quote(redis: Redis, ts: str, bid: str) -> list[int]:
    """hydrate.lua with one quote event on CID."""
    args = [_pack([CID, ts, bid, "2.0", "1.5"]), _pack([])]
    names = [keys.epoch_meta("SPX", EID), keys.epoch_contract("SPX", EID, CID)]
    reply: list[int] = await lua.get("hydrate")(redis, names, args)
    return reply


@pytest.mark.parametrize(
    ("stored", "event", "applied"),
    [("999999999", "1000000000", True), ("1000000000", "999999999", False)],
)
async def test_hydrate_orders_timestamps_of_different_lengths_by_value(
    redis: Redis, stored: str, event: str, applied: bool
) -> None:
    await redis.hset(keys.epoch_meta("SPX", EID), "state", "active")
    key = keys.epoch_contract("SPX", EID, CID)
    await redis.hset(key, mapping={"bid": "0.5", "quote_ts": stored, "ts_ns": stored})
    reply = await hydrate_quote(redis, event, "1.0")
    assert reply[0] == lua.EpochWrite.APPLIED
    assert (reply[2:] == [0]) is applied
    want = event if applied else stored
    assert await redis.hmget(key, "quote_ts", "ts_ns") == [want.encode(), want.encode()]


async def test_hydrate_discards_another_value_at_the_stored_time(redis: Redis) -> None:
    """Equal time, other values (a replica's or a reordered duplicate): the stored quote is
    kept and the event is not reported; the same values again are reported (a redelivery
    whose notification may have been lost)."""
    await redis.hset(keys.epoch_meta("SPX", EID), "state", "active")
    key = keys.epoch_contract("SPX", EID, CID)
    await redis.hset(key, mapping={"bid": "1.0", "quote_ts": "1000", "ts_ns": "1000"})
    assert await hydrate_quote(redis, "1000", "1.1") == [lua.EpochWrite.APPLIED, 0]
    assert await redis.hget(key, "bid") == b"1.0"
    await redis.hset(key, "ask", "2.0")
    assert await hydrate_quote(redis, "1000", "1.0") == [lua.EpochWrite.APPLIED, 0, 0]


@pytest.mark.parametrize(
    ("stored", "event", "applied"),
    [("999999999", "1000000000", True), ("1000000000", "999999999", False)],
)
async def test_spot_orders_timestamps_of_different_lengths_by_value(
    redis: Redis, stored: str, event: str, applied: bool
) -> None:
    await redis.hset(keys.SPOT_LATEST, mapping={"SPX": "6000", "SPX:ts_ns": stored})
    n = await lua.get("spot")(redis, [keys.SPOT_LATEST], ["SPX", "6001", event])
    assert int(n) == int(applied)
    assert await redis.hget(keys.SPOT_LATEST, "SPX") == (b"6001" if applied else b"6000")


@pytest.mark.parametrize("state", ["active", "retired"])
async def test_build_writes_only_into_a_warming_epoch(redis: Redis, state: str) -> None:
    """A build chunk that arrives after another writer promoted or retired the epoch
    writes nothing (the normalizer then raises and the entry is retried)."""
    await redis.hset(keys.epoch_meta("SPX", EID), "state", state)
    row = [CID, "6000", "20261218", "{}", "bid", "1.0", "ask", "1.2"]
    args = [_pack([row])]
    names = [*keys.epoch_fixed_keys("SPX", EID), keys.epoch_contract("SPX", EID, CID)]
    assert await lua.get("build")(redis, names, args) == lua.Build.NOT_WARMING
    assert (
        await redis.exists(keys.epoch_contract("SPX", EID, CID), keys.epoch_contracts("SPX", EID))
        == 0
    )
    await redis.hset(keys.epoch_meta("SPX", EID), "state", "warming")
    assert await lua.get("build")(redis, names, args) == 1
    assert await redis.hget(keys.epoch_contract("SPX", EID, CID), "ask") == b"1.2"
