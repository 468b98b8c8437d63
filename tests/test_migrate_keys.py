"""``massive-pipeline migrate-keys`` on a Redis holding a deployment in the names before the
cluster key schema (written here as the old version wrote them)."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from processors.ops import epoch_cli
from processors.ops.migrate_keys import migrate
from schemas import keys
from schemas.heatmap import TileDelta
from schemas.messages import DirtyEntry, entry
from tests.util import RedisServer

SYMS = ("SPX", "NDX")


async def old_deployment(r: Redis) -> dict[str, str]:
    """The old layout: one hash of active epochs, {eid}-tagged epoch keys, streams shared by
    the symbols, per-strategy leases. Returns the ids of a few entries."""
    await r.flushall()
    ids: dict[str, str] = {}
    for sym, eid in (("SPX", "e-spx"), ("NDX", "e-ndx")):
        p = f"epoch:{{{eid}}}:"
        await r.hset(p + "meta", mapping={"symbol": sym, "state": "active", "n_contracts": 2})
        await r.sadd(p + "contracts", f"O:{sym}C1", f"O:{sym}P1")
        for c in (f"O:{sym}C1", f"O:{sym}P1"):
            await r.hset(p + f"contract:{c}", mapping={"bid": "1", "quote_ts": "5"})
        await r.zadd(p + "by_strike", {f"O:{sym}C1": 1.0})
        await r.hset(p + "gex", f"O:{sym}C1", "{}")
        await r.hset("massive:epoch:active", sym, eid)
        await r.zadd("massive:epoch:index", {eid: 7.0})
        await r.set(f"massive:heatmap:model:{sym}:single", b'{"v":1}')
        await r.set(f"massive:heatmap:version:{sym}:single", 3)
        await r.hset(f"heatmap:{{{sym}:single}}:staging", "t1", "1:{}")
        await r.hset(f"heatmap:{{{sym}:single}}:manifest", "epoch", eid)
        await r.set(f"massive:gex:model:{sym}", b"{}")
        await r.xadd(f"massive:gex:levels:{sym}", {"d": b"{}"})
    retired = "epoch:{e-old}:"
    await r.hset(retired + "meta", mapping={"symbol": "SPX", "state": "retired"})
    await r.expire(retired + "meta", 100)
    await r.zadd("massive:epoch:index", {"e-old": 1.0})
    dirty = "massive:contracts:dirty"
    for i, sym in enumerate(("SPX", "NDX", "SPX", "NDX")):
        d = DirtyEntry(symbol=sym, epoch="e", cids=["c"], max_ts_ns=i)
        ids[f"dirty{i}"] = (await r.xadd(dirty, entry(d), id=f"{100 + i}-0")).decode()
    await r.xgroup_create(dirty, "tiles-single", id="0")
    # the group read two entries and acked the first: the second is pending
    await r.xreadgroup("tiles-single", "c1", {dirty: ">"}, count=2)
    await r.xack(dirty, "tiles-single", ids["dirty0"])
    t = TileDelta(symbol="NDX", strategy="single", epoch="e", ids=["t1"])
    await r.xadd("massive:tiles:single", entry(t), id="200-0")
    await r.xgroup_create("massive:tiles:single", "publisher", id="$")
    ids["diff"] = (
        await r.xadd("massive:heatmap:diffs:single", {"d": b'{"symbol":"SPX","version":3}'})
    ).decode()
    await r.xadd("massive:heatmap:diffs:single", {"d": b"not json"})
    await r.xadd("massive:ws:stream", {"recv_ts_ns": "1", "payload": b"[]"})
    await r.xgroup_create("massive:ws:stream", "hydrator", id="0")
    await r.xadd("massive:chain:stream", {"d": b"{}"})
    await r.set("massive:heatmap:leader:single:fence", 9)
    await r.set("massive:gex:leader:fence", 4)
    return ids


async def test_migrate_keys_moves_a_deployment_to_the_cluster_names(
    redis_server: RedisServer,
) -> None:
    r = Redis.from_url(redis_server.url)
    try:
        ids = await old_deployment(r)
        before = await r.dbsize()
        await r.set("massive:heatmap:leader:single", "9:old-pod", px=60_000)
        with pytest.raises(RuntimeError, match="still runs"):
            await migrate(r, SYMS)
        dry = await migrate(r, SYMS, dry_run=True)
        assert dry.moved_keys > 20 and await r.dbsize() == before + 1  # nothing changed
        await r.delete("massive:heatmap:leader:single")
        plan = await migrate(r, SYMS)
        assert plan.moved_keys == dry.moved_keys and plan.copied_entries == dry.copied_entries

        for sym, eid in (("SPX", "e-spx"), ("NDX", "e-ndx")):
            assert await r.get(keys.epoch_active(sym)) == eid.encode()
            assert await r.zscore(keys.epoch_index(sym), eid) == 7.0
            assert await r.hget(keys.epoch_meta(sym, eid), "state") == b"active"
            assert await r.hget(keys.epoch_contract(sym, eid, f"O:{sym}P1"), "bid") == b"1"
            assert await r.scard(keys.epoch_contracts(sym, eid)) == 2
            assert await r.exists(keys.epoch_by_strike(sym, eid), keys.epoch_gex(sym, eid)) == 2
            assert await r.get(keys.heatmap_version(sym, "single")) == b"3"
            assert await r.hget(keys.heatmap_manifest(sym, "single"), "epoch") == eid.encode()
            assert await r.exists(keys.heatmap_staging(sym, "single"), keys.gex_model(sym)) == 2
            assert await r.xlen(keys.gex_levels_stream(sym)) == 1
            assert await r.get(keys.publisher_fence(sym, "single")) == b"9"
            assert await r.get(keys.gex_fence(sym)) == b"4"
        # the retired epoch keeps its TTL under its new name
        assert 0 < await r.ttl(keys.epoch_meta("SPX", "e-old")) <= 100
        # the dirty stream, split by symbol with the same ids; the group starts before its
        # pending entry (dirty1, NDX): it and everything after are delivered again
        spx = [e.decode() for e, _ in await r.xrange(keys.contracts_dirty_stream("SPX"))]
        ndx = [e.decode() for e, _ in await r.xrange(keys.contracts_dirty_stream("NDX"))]
        assert spx == [ids["dirty0"], ids["dirty2"]] and ndx == [ids["dirty1"], ids["dirty3"]]
        got = await r.xreadgroup(
            "tiles-single", "c2", {keys.contracts_dirty_stream("NDX"): ">"}, count=10
        )
        assert [e.decode() for e, _ in got[0][1]] == [ids["dirty1"], ids["dirty3"]]
        got = await r.xreadgroup(
            "tiles-single", "c2", {keys.contracts_dirty_stream("SPX"): ">"}, count=10
        )
        assert [e.decode() for e, _ in got[0][1]] == [ids["dirty2"]]
        (g,) = await r.xinfo_groups(keys.contracts_dirty_stream("NDX"))
        assert g["lag"] == 0  # ENTRIESREAD was set: the lag is known
        # the tile stream's group (created at $) keeps its position: nothing to deliver
        assert await r.xlen(keys.tiles_stream("single", "NDX")) == 1
        (g,) = await r.xinfo_groups(keys.tiles_stream("single", "NDX"))
        assert g["name"] == b"publisher" and g["lag"] == 0
        # diffs keep their ids (checkpoints name them); an undecodable entry stays behind
        (diff,) = await r.xrange(keys.heatmap_diffs_stream("single", "SPX"))
        assert diff[0].decode() == ids["diff"]
        assert plan.kept_entries == 1 and await r.xlen("massive:heatmap:diffs:single") == 1
        # the shared streams: renamed with their groups
        assert await r.xlen(keys.WS_STREAM) == 1
        assert (await r.xinfo_groups(keys.WS_STREAM))[0]["name"] == b"hydrator"
        assert await r.xlen(keys.CHAIN_STREAM) == 1
        for gone in (
            "massive:epoch:active",
            "massive:epoch:index",
            "massive:contracts:dirty",
            "massive:tiles:single",
            "massive:ws:stream",
            "epoch:{e-spx}:meta",
            "massive:heatmap:model:SPX:single",
            "heatmap:{SPX:single}:staging",
            "massive:gex:leader:fence",
        ):
            assert not await r.exists(gone), gone
        # the new tools read the result
        rep = await epoch_cli.collect(r, SYMS)
        assert rep.active == {"SPX": "e-spx", "NDX": "e-ndx"}
        assert {e.eid for e in rep.epochs} == {"e-spx", "e-ndx", "e-old"}
        # a second run has nothing left but the undecodable diff
        again = await migrate(r, SYMS)
        assert again.moved_keys == 0 and again.copied_entries == 0
    finally:
        await r.aclose()
