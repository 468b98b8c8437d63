"""Normalizer against a real Redis: epoch ids, build/promote/retire, re-seed with admission,
restart without rebuild, no half-built epoch visible to readers, TTL on every retired key,
crash windows, bad input."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from processors import lua
from processors.epochs.normalizer import Normalizer, NormalizerSettings, epoch_id
from processors.gex import exposure as gex_math
from schemas import keys
from schemas.messages import (
    ChainContract,
    ChainPointer,
    ChainSnapshot,
    ContractRecord,
    DirtyEntry,
    GexRow,
    decode_gex_source,
    encode_snapshot,
    entry,
    from_entry,
)
from streams.clock import SystemClock
from streams.processor import Deps
from streams.settings import RuntimeSettings
from tests.factories import big_chain, contract
from tests.util import RedisServer, eventually

NS = 1_764_000_000_000_000_000
SEC = 1_000_000_000
EXP1, EXP2 = "2026-12-17", "2026-12-18"


def chain(ts: int = NS, *, extra: list[ChainContract] = (), **over: Any) -> ChainSnapshot:  # type: ignore[assignment]
    base = [
        contract("SPXW", EXP1, "C", 6000, bid=1.0, ask=1.2, quote_ts_ns=ts - 5, last=1.1,
                 last_size=3, trade_ts_ns=ts - 9, iv=0.2, delta=0.5, gamma=0.01, oi=100),
        contract("SPXW", EXP1, "P", 6000, bid=2.0, ask=2.4, quote_ts_ns=ts - 5, iv=0.21,
                 gamma=0.011, oi=50),
        contract("SPX", EXP2, "C", 6005, bid=3.0, ask=3.5, quote_ts_ns=ts - 5, oi=7),
    ]  # fmt: skip
    return ChainSnapshot(
        symbol="SPX", ts_ns=ts, spot=over.get("spot", 6001.0), contracts=[*base, *extra]
    )


async def put(redis: Redis, snap: ChainSnapshot, tag: str = "") -> ChainPointer:
    key = keys.chain_snapshot(snap.symbol, snap.ts_ns) + tag
    await redis.set(key, encode_snapshot(snap))
    return ChainPointer(
        symbol=snap.symbol, snapshot_key=key, ts_ns=snap.ts_ns, n_contracts=len(snap.contracts)
    )


def normalizer(deps: Deps, **cfg: Any) -> Normalizer:
    # Chunks of 2: the build, the re-seed, the carry and the key batches of every test cross
    # chunk boundaries (3-contract chains).
    return Normalizer(
        deps, NormalizerSettings(**{"build_chunk": 2, "seed_chunk": 2, "key_batch": 2, **cfg})
    )


async def active(redis: Redis, sym: str = "SPX") -> str:
    v = await redis.get(keys.epoch_active(sym))
    assert v is not None
    return v.decode()


async def meta(redis: Redis, eid: str) -> dict[str, str]:
    return {
        k.decode(): v.decode()
        for k, v in (await redis.hgetall(keys.epoch_meta("SPX", eid))).items()
    }


async def dirty(redis: Redis) -> list[DirtyEntry]:
    return [
        from_entry(f, DirtyEntry) for _, f in await redis.xrange(keys.contracts_dirty_stream("SPX"))
    ]


async def record(redis: Redis, eid: str, cid: str) -> ContractRecord:
    return ContractRecord.from_hash(cid, await redis.hgetall(keys.epoch_contract("SPX", eid, cid)))


async def epoch_keys(redis: Redis, eid: str) -> list[bytes]:
    return [
        k async for k in redis.scan_iter(match=keys.epoch_key_prefix("SPX", eid) + "*", count=1000)
    ]


def metric(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


# --- epoch id ---------------------------------------------------------------------------------
cid_st = st.builds(
    lambda root, day, right, k: contract(root, f"2026-12-{day:02d}", right, 5000 + 5 * k).cid,
    st.sampled_from(["SPX", "SPXW"]),
    st.integers(1, 28),
    st.sampled_from(["C", "P"]),
    st.integers(0, 400),
)


@settings(max_examples=200, deadline=None)
@given(cids=st.lists(cid_st, min_size=1, max_size=30, unique=True), data=st.data())
def test_epoch_id_depends_only_on_the_set_of_contracts(
    cids: list[str], data: st.DataObject
) -> None:
    exps = sorted({"20" + c[-15:-13] + "-" + c[-13:-11] + "-" + c[-11:-9] for c in cids})
    eid = epoch_id("SPX", cids, exps)
    assert len(eid) == 16 and int(eid, 16) >= 0
    shuffled = data.draw(st.permutations(cids))
    assert epoch_id("SPX", [*shuffled, *cids[:3]], exps) == eid  # order, duplicates
    extra = data.draw(cid_st.filter(lambda c: c not in cids))
    assert epoch_id("SPX", [*cids, extra], exps) != eid  # a new strike/expiry/right
    if len(cids) > 1:
        assert epoch_id("SPX", cids[1:], exps) != eid
    assert epoch_id("NDX", cids, exps) != eid


# --- build --------------------------------------------------------------------------------------
async def test_first_snapshot_builds_and_promotes_a_complete_epoch(
    deps: Deps, redis: Redis, registry: CollectorRegistry
) -> None:
    snap = chain()
    n = normalizer(deps, dirty_chunk=2)
    assert await n.process(await put(redis, snap)) == "built"
    eid = await active(redis)
    cids = sorted(c.cid for c in snap.contracts)
    assert eid == epoch_id("SPX", cids, [EXP1, EXP2])
    m = await meta(redis, eid)
    assert m["symbol"] == "SPX" and m["state"] == "active" and m["n_contracts"] == "3"
    assert m["expiries"] == f"{EXP1},{EXP2}" and m["spot"] == "6001.0"
    assert m["snapshot_ts_ns"] == str(NS) and int(m["promoted_ns"]) >= int(m["created_ns"]) > 0
    assert (
        sorted(c.decode() for c in await redis.smembers(keys.epoch_contracts("SPX", eid))) == cids
    )
    by_strike = {
        k.decode(): v
        for k, v in await redis.zrange(keys.epoch_by_strike("SPX", eid), 0, -1, withscores=True)
    }
    assert by_strike == {c.cid: c.strike for c in snap.contracts}
    by_exp = {
        k.decode(): v
        for k, v in await redis.zrange(keys.epoch_by_expiry("SPX", eid), 0, -1, withscores=True)
    }
    assert by_exp == {c.cid: float(c.expiry.replace("-", "")) for c in snap.contracts}
    gex = await redis.hgetall(keys.epoch_gex("SPX", eid))
    rows = {k.decode(): msgspec.json.decode(v, type=GexRow) for k, v in gex.items()}
    assert rows[snap.contracts[0].cid] == GexRow("SPXW", EXP1, 6000.0, "C", 0.01, 100.0, 0.2, NS)
    roots = {c.cid: "SPX" if c.expiry == EXP2 else "SPXW" for c in snap.contracts}
    assert {cid: row.root for cid, row in rows.items()} == roots
    for cid, root in roots.items():
        assert await redis.hget(keys.epoch_contract("SPX", eid, cid), "root") == root.encode()
    r0 = await record(redis, eid, snap.contracts[0].cid)
    assert (r0.bid, r0.ask, r0.mid, r0.quote_ts_ns) == (1.0, 1.2, 1.1, NS - 5)
    assert (r0.last, r0.size, r0.trade_ts_ns, r0.ts_ns) == (1.1, 3.0, NS - 9, NS - 5)
    assert (r0.iv, r0.delta, r0.gamma, r0.oi, r0.right, r0.src) == (
        0.2,
        0.5,
        0.01,
        100.0,
        "C",
        "chain",
    )
    h2 = await redis.hgetall(keys.epoch_contract("SPX", eid, snap.contracts[2].cid))
    assert h2[b"root"] == b"SPX" and b"last" not in h2 and b"delta" not in h2
    ds = await dirty(redis)
    assert [d.reason for d in ds] == ["epoch", "epoch"] and [len(d.cids) for d in ds] == [2, 1]
    assert sorted(c for d in ds for c in d.cids) == cids and {d.epoch for d in ds} == {eid}
    assert await redis.zscore(keys.epoch_index("SPX"), eid) is not None
    spot = await redis.hgetall(keys.SPOT_LATEST)
    assert spot[b"SPX"] == b"6001.0" and spot[b"SPX:ts_ns"] == str(NS).encode()
    assert metric(registry, "massive_epoch_promotions_total", symbol="SPX") == 1


async def test_same_topology_reseeds_with_admission_and_notifies_changes_and_confirmations(
    deps: Deps, redis: Redis, registry: CollectorRegistry
) -> None:
    n = normalizer(deps)
    await n.process(await put(redis, chain()))
    eid = await active(redis)
    created = (await meta(redis, eid))["created_ns"]
    await redis.delete(keys.contracts_dirty_stream("SPX"))
    c0, c1, c2 = chain().contracts
    # c0: newer quote; c1: OLDER quote (discarded) but new iv; c2: identical values, its
    # quote confirmed by a newer snapshot (quote_rx_ts) -> notified too.
    later = ChainSnapshot("SPX", NS + SEC, 6002.0, [
        msgspec.structs.replace(c0, bid=1.5, ask=1.7, quote_ts_ns=NS + 10),
        msgspec.structs.replace(c1, bid=9.0, ask=9.9, quote_ts_ns=NS - 50, iv=0.3),
        c2,
    ])  # fmt: skip
    assert await n.process(await put(redis, later)) == "reseeded"
    assert (await meta(redis, eid))["created_ns"] == created
    r0, r1 = await record(redis, eid, c0.cid), await record(redis, eid, c1.cid)
    assert (r0.bid, r0.ask, r0.mid, r0.quote_ts_ns, r0.ts_ns) == (1.5, 1.7, 1.6, NS + 10, NS + 10)
    assert (r0.last, r0.trade_ts_ns) == (1.1, NS - 9)  # trade unchanged
    assert (r1.bid, r1.ask, r1.quote_ts_ns, r1.iv) == (2.0, 2.4, NS - 5, 0.3)
    ds = await dirty(redis)
    assert [(d.reason, sorted(d.cids)) for d in ds] == [("seed", sorted([c0.cid, c1.cid, c2.cid]))]
    row = msgspec.json.decode(await redis.hget(keys.epoch_gex("SPX", eid), c1.cid), type=GexRow)  # type: ignore[arg-type]
    assert (row.iv, row.ts_ns) == (0.3, NS + SEC)
    gex = await redis.hgetall(keys.epoch_gex("SPX", eid))
    by_cid = {k.decode(): msgspec.json.decode(v, type=GexRow) for k, v in gex.items()}
    assert {cid: (g.root, g.expiry) for cid, g in by_cid.items()} == {
        c0.cid: ("SPXW", EXP1),
        c1.cid: ("SPXW", EXP1),
        c2.cid: ("SPX", EXP2),
    }
    m = await meta(redis, eid)
    assert m["snapshot_ts_ns"] == str(NS + SEC) and m["spot"] == "6002.0"
    assert metric(registry, "massive_epoch_promotions_total", symbol="SPX") == 1
    # The same values again: every quote it carries counts as received then (quote_rx_ts:
    # tiles judge a quote's age by it), and that is notified (tiles recompute freshness)
    again = msgspec.structs.replace(later, ts_ns=NS + 2 * SEC)
    await n.process(await put(redis, again))
    ds = await dirty(redis)
    assert len(ds) == 2 and sorted(ds[-1].cids) == sorted(c.cid for c in (c0, c1, c2))
    for c in (c0, c1, c2):
        rx = await redis.hget(keys.epoch_contract("SPX", eid, c.cid), "quote_rx_ts")
        assert rx == str(NS + 2 * SEC).encode()
    # a late, older snapshot of the same values: nothing changes, nothing is notified
    older = msgspec.structs.replace(later, ts_ns=NS + SEC // 2)
    await n.process(await put(redis, older, tag=":late"))
    rx = await redis.hget(keys.epoch_contract("SPX", eid, c0.cid), "quote_rx_ts")
    assert rx == str(NS + 2 * SEC).encode()  # never moves back
    assert len(await dirty(redis)) == 2


async def test_full_chain_snapshot_feeds_the_gex_source_not_an_epoch(
    deps: Deps, redis: Redis, registry: CollectorRegistry
) -> None:
    n = normalizer(deps, gex_source_ttl_s=77)
    full = chain(extra=[contract("SPX", "2027-06-17", "P", 5000, bid=9.0, ask=9.4, oi=4000)])
    ptr = msgspec.structs.replace(await put(redis, full), scope="full")
    assert await n.process(ptr) == "gex_source"
    assert await redis.get(keys.epoch_active("SPX")) is None  # the heatmap's epochs: untouched
    h = await redis.hgetall(keys.gex_source("SPX"))
    assert h[b"ts_ns"] == str(NS).encode() and h[b"spot"] == b"6001.0"
    assert 0 < await redis.ttl(keys.gex_source("SPX")) <= 77
    cols = gex_math.source_columns(decode_gex_source(h[b"data"]))
    assert cols.n == 4 and sorted(cols.expiries) == sorted({EXP1, EXP2, "2027-06-17"})
    assert sorted(cols.roots) == ["SPX", "SPXW"] and cols.ts_ns == NS
    # a redelivered or older full snapshot never rolls the source back
    old = msgspec.structs.replace(await put(redis, chain(NS - SEC)), scope="full")
    assert await n.process(old) == "stale_gex_source"
    assert (await redis.hget(keys.gex_source("SPX"), "ts_ns")) == str(NS).encode()
    await redis.expire(keys.gex_source("SPX"), 5)
    assert await n.process(ptr) == "stale_gex_source"  # redelivered: not written again
    assert 0 < await redis.ttl(keys.gex_source("SPX")) <= 5
    bad = msgspec.structs.replace(ptr, scope="sideways")
    assert await n.process(bad) == "bad_pointer"
    got = metric(registry, "massive_normalizer_snapshots_total", symbol="SPX", result="gex_source")
    assert got == 1


async def test_restart_with_the_same_topology_does_not_rebuild(
    redis: Redis, settings: RuntimeSettings
) -> None:
    first = Normalizer(Deps(redis, settings, CollectorRegistry()))
    await first.process(await put(redis, chain()))
    eid = await active(redis)
    before = await meta(redis, eid)
    reg = CollectorRegistry()
    restarted = Normalizer(Deps(redis, settings, reg))  # a new process: no local state
    assert await restarted.process(await put(redis, chain(NS + SEC))) == "reseeded"
    after = await meta(redis, eid)
    assert after["created_ns"] == before["created_ns"]
    assert after["promoted_ns"] == before["promoted_ns"]
    assert metric(reg, "massive_epoch_promotions_total", symbol="SPX") == 0
    assert metric(reg, "massive_normalizer_snapshots_total", symbol="SPX", result="reseeded") == 1


# --- topology change ----------------------------------------------------------------------------
async def test_promotion_is_never_seen_half_built_and_retired_keys_all_expire(
    deps: Deps, redis: Redis
) -> None:
    n = normalizer(deps, build_chunk=200)
    snap1 = big_chain("SPX", 4000, ts_ns=NS)
    await n.process(await put(redis, snap1))
    old = await active(redis)
    extra = contract("SPXW", snap1.contracts[-1].expiry, "C", 99_000, bid=0.1, ask=0.2)
    snap2 = msgspec.structs.replace(snap1, ts_ns=NS + SEC, contracts=[*snap1.contracts, extra])

    seen: list[tuple[str, str, int, int]] = []
    stop = asyncio.Event()

    async def reader() -> None:
        r = Redis.from_url(deps.settings.redis_url)
        try:
            while not stop.is_set():
                eid = (await r.get(keys.epoch_active("SPX"))).decode()  # type: ignore[union-attr]
                state, n_c = await r.hmget(keys.epoch_meta("SPX", eid), "state", "n_contracts")
                card = await r.scard(keys.epoch_contracts("SPX", eid))
                seen.append((eid, state.decode(), int(n_c), card))
                await asyncio.sleep(0)
        finally:
            await r.aclose()

    task = asyncio.create_task(reader())
    await eventually(lambda: _true_after(seen, 5))
    assert await n.process(await put(redis, snap2)) == "built"
    new = await active(redis)
    target = len(seen) + 5
    await eventually(lambda: _true_after(seen, target))
    stop.set()
    await task
    assert new != old
    assert {s[0] for s in seen} == {old, new}  # the reader saw both sides of the switch
    for eid, state, n_c, card in seen:
        assert state in ("active", "retired"), (eid, state)
        assert n_c == card == (4000 if eid == old else 4001)
    # Every key of the retired epoch carries a TTL <= 300 s; the new one's carry none.
    old_keys = await epoch_keys(redis, old)
    assert len(old_keys) == 4000 + 5  # contracts + meta, topology, 2 planes, gex
    ttls = [await redis.ttl(k) for k in old_keys]
    assert all(0 < t <= 300 for t in ttls), sorted(set(ttls))
    assert (await meta(redis, old))["state"] == "retired"
    assert all([await redis.ttl(k) == -1 for k in (await epoch_keys(redis, new))[:200]])
    ds = [d for d in await dirty(redis) if d.epoch == new]
    assert {d.reason for d in ds} == {"epoch"} and sum(len(d.cids) for d in ds) == 4001


async def _true_after(seen: list[Any], k: int) -> bool:
    return len(seen) >= k


async def test_older_snapshot_with_another_topology_is_not_promoted_back(
    deps: Deps, redis: Redis, registry: CollectorRegistry
) -> None:
    n = normalizer(deps)
    extra = [contract("SPXW", EXP2, "P", 6010, bid=1.0, ask=1.1)]
    await n.process(await put(redis, chain(NS + SEC, extra=extra)))
    eid = await active(redis)
    assert await n.process(await put(redis, chain(NS))) == "stale"
    assert await active(redis) == eid
    assert metric(registry, "massive_normalizer_snapshots_total", symbol="SPX", result="stale") == 1


class RacingClock(SystemClock):
    """A clock whose next reading, once armed, first runs ``race`` (a write by another
    client): the promotion reads the clock between its read of the active pointer and EXEC."""

    def __init__(self) -> None:
        self.race: Callable[[], None] | None = None

    def time_ns(self) -> int:
        race, self.race = self.race, None
        if race is not None:
            race()
        return super().time_ns()


async def test_promotion_retries_when_another_writer_moves_the_active_pointer(
    deps: Deps, redis: Redis, redis_server: RedisServer
) -> None:
    """Another writer promotes epoch ``rival`` after this promotion read the active pointer
    and before its EXEC: the transaction must not go through on the stale read. It retries,
    retires the rival (not the epoch it read first) and carries from it."""
    clock = RacingClock()
    n = Normalizer(dataclasses.replace(deps, clock=clock), NormalizerSettings())
    await n.process(await put(redis, chain(NS)))
    first = await active(redis)
    rival = "00000000000000ff"
    other = SyncRedis.from_url(redis_server.url)

    def rival_promotes() -> None:
        other.hset(keys.epoch_meta("SPX", rival), mapping={"symbol": "SPX", "state": "active"})
        other.set(keys.epoch_active("SPX"), rival)

    real = n.promote
    replaced: list[str | None] = []

    async def promote(topo: Any, snap: ChainSnapshot) -> str | None:
        clock.race = rival_promotes  # fires at the promotion's first clock reading
        replaced.append(await real(topo, snap))
        return replaced[-1]

    n.promote = promote  # type: ignore[method-assign]
    extra = [contract("SPXW", EXP2, "P", 6010, bid=1.0, ask=1.1)]
    try:
        assert await n.process(await put(redis, chain(NS + SEC, extra=extra))) == "built"
    finally:
        other.close()
    new = await active(redis)
    assert new not in (first, rival)
    assert (await meta(redis, rival))["state"] == "retired"
    assert replaced == [rival]  # what it carried from and retired


async def test_topology_coming_back_rebuilds_it_fresh_without_ttls(
    deps: Deps, redis: Redis
) -> None:
    n = normalizer(deps)
    extra = [contract("SPXW", EXP2, "P", 6010, bid=1.0, ask=1.1)]
    await n.process(await put(redis, chain(NS)))
    a = await active(redis)
    await n.process(await put(redis, chain(NS + SEC, extra=extra)))
    b = await active(redis)
    assert await redis.ttl(keys.epoch_meta("SPX", a)) > 0
    assert await n.process(await put(redis, chain(NS + 2 * SEC))) == "built"
    assert await active(redis) == a
    assert all([await redis.ttl(k) == -1 for k in await epoch_keys(redis, a)])
    assert (await meta(redis, a))["state"] == "active"
    assert (await meta(redis, b))["state"] == "retired"
    assert all([await redis.ttl(k) > 0 for k in await epoch_keys(redis, b)])


async def ttls(redis: Redis, eid: str) -> dict[bytes, int]:
    return {k: await redis.ttl(k) for k in await epoch_keys(redis, eid)}


async def test_a_reactivated_epoch_has_no_ttl_while_active_and_gets_it_again_when_retired(
    deps: Deps, redis: Redis
) -> None:
    """A -> B -> A -> B: each time an epoch is active none of its keys expires; each time it
    is retired every one of its keys (the whole epoch, not a part) expires again."""
    n = normalizer(deps, retire_ttl_s=300)
    extra = [contract("SPXW", EXP2, "P", 6010, bid=1.0, ask=1.1)]
    await n.process(await put(redis, chain(NS)))
    a = await active(redis)
    full = {a: len(await epoch_keys(redis, a))}
    for step in range(1, 6):  # B, A, B, A, B
        snap = chain(NS + step * SEC, extra=extra if step % 2 else [])
        assert await n.process(await put(redis, snap)) == "built"
        now = await active(redis)
        index = [e.decode() for e in await redis.zrange(keys.epoch_index("SPX"), 0, -1)]
        (old,) = [e for e in index if e != now]
        full.setdefault(now, len(await epoch_keys(redis, now)))
        on, off = await ttls(redis, now), await ttls(redis, old)
        assert (await meta(redis, now))["state"] == "active"
        assert len(on) == full[now] and set(on.values()) == {-1}, (step, now)
        assert (await meta(redis, old))["state"] == "retired"
        assert len(off) == full[old] and all(0 < t <= 300 for t in off.values()), (step, old)


async def test_promotions_close_together_keep_one_retired_epoch(
    deps: Deps, redis: Redis, registry: CollectorRegistry
) -> None:
    """A -> B -> C -> D within the retire TTL: the newest retired epoch keeps its keys until
    its TTL, each older one is deleted when the next build starts (no stack of whole epochs:
    while a new epoch is built, Redis holds it and the active one only)."""
    n = normalizer(deps, retire_ttl_s=300)
    seen: list[str] = []
    during: list[int] = []  # epochs with keys when each build starts
    real_build = n.build

    async def counting_build(topo: Any, snap: Any) -> None:
        index = [e.decode() for e in await redis.zrange(keys.epoch_index("SPX"), 0, -1)]
        during.append(sum([bool(await epoch_keys(redis, e)) for e in index]))
        await real_build(topo, snap)

    n.build = counting_build  # type: ignore[method-assign]
    for step in range(4):
        extra = [contract("SPXW", EXP2, "P", 6010 + 5 * j, bid=1.0, ask=1.1) for j in range(step)]
        assert await n.process(await put(redis, chain(NS + step * SEC, extra=extra))) == "built"
        seen.append(await active(redis))
    index = {e.decode() for e in await redis.zrange(keys.epoch_index("SPX"), 0, -1)}
    assert index == set(seen[-2:])
    assert (await meta(redis, seen[-2]))["state"] == "retired"
    assert all(0 < t <= 300 for t in (await ttls(redis, seen[-2])).values())
    assert set((await ttls(redis, seen[-1])).values()) == {-1}
    for old in seen[:-2]:
        assert await epoch_keys(redis, old) == []
    assert metric(registry, "massive_epoch_deleted_early_total") == 2
    assert during == [0, 1, 1, 1]


async def test_a_reactivated_epoch_whose_meta_expired_first_is_rebuilt_whole(
    deps: Deps, redis: Redis
) -> None:
    """The keys of a retired epoch expire one by one; if its meta goes first, the rest (with
    their TTLs and old fields) must not survive into its next life."""
    n = normalizer(deps)
    extra = [contract("SPXW", EXP2, "P", 6010, bid=1.0, ask=1.1)]
    await n.process(await put(redis, chain(NS)))
    a = await active(redis)
    c0 = chain().contracts[0].cid
    await n.process(await put(redis, chain(NS + SEC, extra=extra)))
    b = await active(redis)
    await redis.hset(keys.epoch_contract("SPX", a, c0), "stale", "1")  # a field of its first life
    await redis.delete(keys.epoch_meta("SPX", a))  # expired before its other keys
    assert await n.process(await put(redis, chain(NS + 2 * SEC))) == "built"
    assert await active(redis) == a
    on = await ttls(redis, a)
    assert on and set(on.values()) == {-1}
    assert await redis.hget(keys.epoch_contract("SPX", a, c0), "stale") is None
    await n.process(await put(redis, chain(NS + 3 * SEC, extra=extra)))
    assert await active(redis) == b
    assert all(0 < t <= 300 for t in (await ttls(redis, a)).values())


# --- carry: WS values of the old epoch into the new one ----------------------------------------
async def ws_apply(
    redis: Redis, eid: str, quotes: list[tuple[str, int, float, float]],
    trades: list[tuple[str, int, float, int]],
) -> None:  # fmt: skip
    """What the hydrator does for these events (lua/hydrate.lua on the epoch)."""
    enc = msgspec.msgpack.encode
    q = [x for c, t, b, a in quotes for x in (c, str(t), repr(b), repr(a), repr((b + a) / 2))]
    tr = [x for c, t, p, n in trades for x in (c, str(t), repr(p), str(n))]
    cids = [c for c, *_ in quotes] + [c for c, *_ in trades]
    names = [keys.epoch_meta("SPX", eid), *(keys.epoch_contract("SPX", eid, c) for c in cids)]
    res = await lua.get("hydrate")(redis, names, [enc(q), enc(tr)])
    assert int(res[0]) == 0 and len(res) - 2 == len(quotes) + len(trades)


NEW_STRIKE = [contract("SPXW", EXP2, "P", 6010, bid=1.0, ask=1.1)]


async def warm_and_tick(deps: Deps, redis: Redis) -> tuple[str, list[str], ChainPointer]:
    """Epoch 1 from chain(NS); the WS then moves c0's quote and c2's trade past the next
    snapshot's times and c1's quote to a time before them; returns epoch 1, the cids and a
    pointer to a snapshot (NS + 1 s) with a new strike."""
    await normalizer(deps).process(await put(redis, chain(NS)))
    e1 = await active(redis)
    c0, c1, c2 = (c.cid for c in chain().contracts)
    await ws_apply(redis, e1, [(c0, NS + 2 * SEC, 1.5, 1.7), (c1, NS + SEC // 2, 2.1, 2.5)],
                   [(c2, NS + 2 * SEC, 3.3, 4)])  # fmt: skip
    await redis.delete(keys.contracts_dirty_stream("SPX"))
    return e1, [c0, c1, c2], await put(redis, chain(NS + SEC, extra=NEW_STRIKE))


async def test_ws_values_newer_than_the_new_snapshot_are_carried_into_the_new_epoch(
    deps: Deps, redis: Redis, registry: CollectorRegistry
) -> None:
    e1, (c0, c1, c2), ptr = await warm_and_tick(deps, redis)
    assert await normalizer(deps).process(ptr) == "built"
    e2 = await active(redis)
    assert e2 != e1
    r0, r1, r2 = [await record(redis, e2, c) for c in (c0, c1, c2)]
    # c0: the WS quote (newer than the snapshot's) survives the epoch switch; its trade is
    # the snapshot's.
    assert (r0.bid, r0.ask, r0.mid, r0.quote_ts_ns) == (1.5, 1.7, 1.6, NS + 2 * SEC)
    assert (r0.last, r0.trade_ts_ns) == (1.1, NS + SEC - 9)
    assert r0.src == "ws" and r0.ts_ns == NS + 2 * SEC
    # c1: the WS quote was older than the new snapshot's: the snapshot's stays.
    assert (r1.bid, r1.quote_ts_ns, r1.src) == (2.0, NS + SEC - 5, "chain")
    # c2: the snapshot had no trade; the WS trade is carried next to the snapshot's quote.
    assert (r2.last, r2.size, r2.trade_ts_ns) == (3.3, 4.0, NS + 2 * SEC)
    assert (r2.bid, r2.quote_ts_ns, r2.ts_ns) == (3.0, NS + SEC - 5, NS + 2 * SEC)
    # Carried while warming: the promotion's own notifications cover them.
    ds = [d for d in await dirty(redis) if d.epoch == e2]
    assert {d.reason for d in ds} == {"epoch"} and sum(len(d.cids) for d in ds) == 4
    assert "carry_from" not in await meta(redis, e2)
    assert metric(registry, "massive_epoch_carried_total", symbol="SPX") == 2
    # The next snapshot of the same topology carries nothing again.
    await redis.delete(keys.contracts_dirty_stream("SPX"))
    assert await normalizer(deps).process(
        await put(redis, chain(NS + SEC, extra=NEW_STRIKE), ":again")
    ) == "reseeded"  # fmt: skip
    assert await dirty(redis) == []


def tick_before_promotion(n: Normalizer, redis: Redis, e1: str, cid: str) -> None:
    """Make ``n`` apply a WS quote (NS + 3 s) to epoch ``e1`` after its carry into the
    warming epoch, just before the promotion."""
    real = n.promote

    async def promote(topo: Any, snap: ChainSnapshot) -> str | None:
        await ws_apply(redis, e1, [(cid, NS + 3 * SEC, 2.2, 2.6)], [])
        return await real(topo, snap)

    n.promote = promote  # type: ignore[method-assign]


async def test_ws_values_applied_during_the_promotion_are_carried_and_notified(
    deps: Deps, redis: Redis
) -> None:
    e1, (_, c1, _), ptr = await warm_and_tick(deps, redis)
    n = normalizer(deps)
    tick_before_promotion(n, redis, e1, c1)
    assert await n.process(ptr) == "built"
    e2 = await active(redis)
    r1 = await record(redis, e2, c1)
    assert (r1.bid, r1.ask, r1.quote_ts_ns, r1.src) == (2.2, 2.6, NS + 3 * SEC, "ws")
    carried = [d for d in await dirty(redis) if d.reason == "carry"]
    assert len(carried) == 1 and carried[0].cids == [c1] and carried[0].epoch == e2
    assert carried[0].max_ts_ns == NS + 3 * SEC and carried[0].recv_ts_ns is None
    assert "carry_from" not in await meta(redis, e2)


# --- crash windows --------------------------------------------------------------------------------
class Killed(BaseException):
    pass


async def test_crash_after_reseed_write_notifies_all_on_redelivery(
    deps: Deps, redis: Redis
) -> None:
    n = normalizer(deps)
    await n.process(await put(redis, chain()))
    eid = await active(redis)
    await redis.delete(keys.contracts_dirty_stream("SPX"))
    c0 = chain().contracts[0]
    newer = chain(NS + SEC)  # c0 gets a newer quote below
    newer = msgspec.structs.replace(
        newer,
        contracts=[msgspec.structs.replace(c0, bid=1.4, quote_ts_ns=NS + 7), *newer.contracts[1:]],
    )
    ptr = await put(redis, newer)

    def boom(*_: Any, **__: Any) -> int:
        raise Killed

    crashing = normalizer(deps)
    crashing._xadd_dirty = boom  # type: ignore[method-assign]
    with pytest.raises(Killed):
        await crashing.process(ptr)
    assert (await record(redis, eid, c0.cid)).bid == 1.4  # written, not notified
    assert await redis.xlen(keys.contracts_dirty_stream("SPX")) == 0
    assert await normalizer(deps).process(ptr) == "reseeded"  # redelivery
    ds = await dirty(redis)
    assert [d.reason for d in ds] == ["seed"]
    assert sorted(ds[0].cids) == sorted(c.cid for c in newer.contracts)
    # Markers settled: the same snapshot once more (nothing newer in it) notifies nothing.
    await normalizer(deps).process(await put(redis, newer, tag=":again"))
    assert len(await dirty(redis)) == 1


async def test_crash_after_carry_write_notifies_the_carried_contracts_on_redelivery(
    deps: Deps, redis: Redis
) -> None:
    e1, (c0, c1, c2), ptr = await warm_and_tick(deps, redis)
    crashing = normalizer(deps)
    tick_before_promotion(crashing, redis, e1, c1)
    real = crashing._xadd_dirty

    def boom(*args: Any, **kw: Any) -> int:
        if args[5] == "carry":
            raise Killed
        return real(*args, **kw)

    crashing._xadd_dirty = boom  # type: ignore[method-assign]
    with pytest.raises(Killed):
        await crashing.process(ptr)
    e2 = await active(redis)
    assert (await record(redis, e2, c1)).bid == 2.2  # carried, not notified
    assert (await meta(redis, e2))["carry_from"] == e1
    assert {d.reason for d in await dirty(redis)} == {"epoch"}
    assert await normalizer(deps).process(ptr) == "reseeded"  # redelivery
    # Carried again: c1 notified (and c0 / c2, carried while warming: over-notified once).
    carried = [d for d in await dirty(redis) if d.reason == "carry"]
    assert len(carried) == 1 and sorted(carried[0].cids) == sorted([c0, c1, c2])
    assert "carry_from" not in await meta(redis, e2)
    # The re-seed of the same snapshot kept the newer WS values.
    assert [(await record(redis, e2, c)).bid for c in (c0, c1)] == [1.5, 2.2]


async def test_crash_between_promotion_and_retirement_is_swept(deps: Deps, redis: Redis) -> None:
    n = normalizer(deps)
    await n.process(await put(redis, chain()))
    old = await active(redis)

    async def boom(_: str, __: str) -> int:
        raise Killed

    crashing = normalizer(deps)
    crashing.retire = boom  # type: ignore[method-assign]
    extra = [contract("SPXW", EXP2, "P", 6010, bid=1.0, ask=1.1)]
    with pytest.raises(Killed):
        await crashing.process(await put(redis, chain(NS + SEC, extra=extra)))
    assert (await meta(redis, old))["state"] == "retired"
    assert all([await redis.ttl(k) == -1 for k in await epoch_keys(redis, old)])
    # The restarted normalizer sweeps before its first batch.
    restarted = normalizer(deps)
    await restarted.handle([(b"1-0", entry(await put(redis, chain(NS + 2 * SEC, extra=extra))))])
    old_keys = await epoch_keys(redis, old)
    assert old_keys and all([0 < await redis.ttl(k) <= 300 for k in old_keys])


async def test_sweep_drops_expired_epochs_from_the_index(deps: Deps, redis: Redis) -> None:
    n = normalizer(deps)
    await n.process(await put(redis, chain()))
    old = await active(redis)
    await n.process(await put(redis, chain(NS + SEC, extra=[contract("SPX", EXP2, "P", 6010)])))
    for k in await epoch_keys(redis, old):  # as if 300 s passed
        await redis.delete(k)
    await n.sweep()
    assert await redis.zrange(keys.epoch_index("SPX"), 0, -1) == [(await active(redis)).encode()]


async def test_sweep_never_retires_the_epoch_the_active_pointer_names(
    deps: Deps, redis: Redis
) -> None:
    """The sweep reads every meta, then the active pointers: a promotion in between (another
    symbol's normalizer sweeps while this one promotes a rebuilt epoch) shows the epoch as
    retired without a TTL, yet active. The pointer wins: its keys keep no TTL."""
    n = normalizer(deps)
    await n.process(await put(redis, chain()))
    eid = await active(redis)
    await redis.hset(keys.epoch_meta("SPX", eid), "state", "retired")  # the meta as read before
    await n.sweep()
    assert all([await redis.ttl(k) == -1 for k in await epoch_keys(redis, eid)])


async def test_retiring_again_never_extends_a_ttl(deps: Deps, redis: Redis) -> None:
    """Retirement (and the sweep) put a TTL only on keys without one: a second retirement of
    an epoch whose keys are already expiring leaves their deadline where it was."""
    n = normalizer(deps, retire_ttl_s=300)
    await n.process(await put(redis, chain()))
    eid = await active(redis)
    ks = await epoch_keys(redis, eid)
    assert await n.retire("SPX", eid) == len(ks)
    for k in ks:  # as if 295 s passed
        await redis.expire(k, 5)
    assert await n.retire("SPX", eid) == 0
    assert all([0 < await redis.ttl(k) <= 5 for k in ks])


# --- bad input ------------------------------------------------------------------------------------
async def test_vanished_blob_and_bad_entries_are_counted_skips(
    redis: Redis, settings: RuntimeSettings, registry: CollectorRegistry
) -> None:
    good = await put(redis, chain())
    gone = ChainPointer(
        symbol="SPX", snapshot_key="massive:chain:snapshot:SPX:1", ts_ns=1, n_contracts=3
    )
    await redis.set("massive:chain:snapshot:SPX:2", b"\x93garbage")
    garbage = ChainPointer(
        symbol="SPX", snapshot_key="massive:chain:snapshot:SPX:2", ts_ns=2, n_contracts=3
    )
    pipe = redis.pipeline(transaction=False)
    for p in (gone, garbage):
        pipe.xadd(keys.CHAIN_STREAM, entry(p))  # type: ignore[arg-type]
    pipe.xadd(keys.CHAIN_STREAM, {b"d": b"{not json"})
    pipe.xadd(keys.CHAIN_STREAM, entry(good))  # type: ignore[arg-type]
    await pipe.execute()
    rs = RuntimeSettings(redis_url=settings.redis_url, consumer="n1", block_ms=20)
    n = Normalizer(Deps(redis, rs, registry))
    stop = asyncio.Event()
    task = asyncio.create_task(n.run(stop))

    async def done() -> bool:
        gs = await redis.xinfo_groups(keys.CHAIN_STREAM)
        return bool(gs) and int(gs[0]["entries-read"] or 0) == 4 and int(gs[0]["pending"]) == 0

    await eventually(done)
    stop.set()
    await task
    snaps = "massive_normalizer_snapshots_total"
    assert metric(registry, snaps, symbol="SPX", result="missing_blob") == 1
    assert metric(registry, snaps, symbol="SPX", result="bad_blob") == 1
    assert metric(registry, snaps, symbol="other", result="bad_pointer") == 1
    assert metric(registry, snaps, symbol="SPX", result="built") == 1
    assert await redis.xlen(keys.dead_letter_stream(keys.CHAIN_STREAM)) == 0


async def test_a_snapshot_with_one_malformed_contract_is_refused_whole(
    deps: Deps, redis: Redis, registry: CollectorRegistry
) -> None:
    """One contract of a valid blob with a field of the wrong type (the snapshot itself
    decodes): refused whole as ``bad_blob`` for either scope, before anything is written,
    and none of its contracts counted as a rejected contract."""
    extra = [contract("NDX", EXP1, "C", 20000), contract("SPXW", EXP1, "P", 6005, bid=1.0)]
    doc = msgspec.msgpack.decode(encode_snapshot(chain(extra=extra)))
    doc["contracts"][-1][2] = "six thousand"  # the strike: [cid, expiry, strike, ...]
    key = keys.chain_snapshot("SPX", NS) + ":bad"
    await redis.set(key, msgspec.msgpack.encode(doc))
    n = normalizer(deps, build_chunk=500)  # the bad contract is decoded in its own chunk
    window = ChainPointer(symbol="SPX", snapshot_key=key, ts_ns=NS, n_contracts=5)
    assert await n.process(window) == "bad_blob"
    assert await n.process(msgspec.structs.replace(window, scope="full")) == "bad_blob"
    assert await redis.keys("epoch:*") == [] and await redis.get(keys.epoch_active("SPX")) is None
    assert not await redis.exists(keys.gex_source("SPX"))
    # the NDX contract before it would be a rejected contract of a blob that is used
    assert (
        metric(registry, "massive_normalizer_contracts_rejected_total", reason="wrong_symbol") == 0
    )


async def test_invalid_contracts_are_rejected_from_the_topology(
    deps: Deps, redis: Redis, registry: CollectorRegistry
) -> None:
    good = chain().contracts
    bad = [
        ChainContract(cid="O:SPXW26121", expiry=EXP1, strike=6000, right="C"),
        contract("NDX", EXP1, "C", 20000),
        msgspec.structs.replace(contract("SPXW", EXP1, "C", 6100), strike=6105.0),
        good[0],  # duplicate
    ]
    snap = ChainSnapshot("SPX", NS, 6000.0, [*good, *bad])
    assert await normalizer(deps).process(await put(redis, snap)) == "built"
    eid = await active(redis)
    assert await redis.scard(keys.epoch_contracts("SPX", eid)) == 3
    rej = "massive_normalizer_contracts_rejected_total"
    reasons = ("bad_ticker", "wrong_symbol", "ticker_mismatch", "duplicate")
    assert [metric(registry, rej, reason=r) for r in reasons] == [1, 1, 1, 1]
    empty = ChainSnapshot("SPX", NS + SEC, 6000.0, bad[:3])
    assert await normalizer(deps).process(await put(redis, empty)) == "empty"


async def test_spot_from_snapshots_obeys_admission(deps: Deps, redis: Redis) -> None:
    n = normalizer(deps)
    await n.process(await put(redis, chain(NS + SEC, spot=6010.0)))
    await n.process(await put(redis, chain(NS, spot=5990.0)))  # older: ignored
    spot = await redis.hgetall(keys.SPOT_LATEST)
    assert spot[b"SPX"] == b"6010.0" and spot[b"SPX:ts_ns"] == str(NS + SEC).encode()


_opt_ts = st.one_of(st.none(), st.integers(-30, 30).map(lambda s: NS + s * SEC))


@settings(max_examples=40, deadline=None)
@given(
    stamps=st.lists(
        st.lists(st.tuples(_opt_ts, _opt_ts), min_size=3, max_size=3), min_size=1, max_size=4
    )
)
def test_every_contract_hash_keeps_ts_ns_the_max_of_its_quote_and_trade_ts(
    redis_server: Any, stamps: list[list[tuple[int | None, int | None]]]
) -> None:
    """The hydrator's Lua fast path admits an event strictly newer than ``ts_ns`` without
    reading its own kind's slot; that is only right while every writer keeps ``ts_ns =
    max(quote_ts, trade_ts)``. A build then re-seeds with random (and missing) quote/trade
    times, admitted or discarded per kind, must keep it in every hash."""

    async def scenario() -> None:
        r = Redis.from_url(redis_server.url)
        await r.flushdb()
        d = Deps(
            redis=r,
            settings=RuntimeSettings(redis_url=redis_server.url, consumer="inv"),
            registry=CollectorRegistry(),
        )
        n = normalizer(d)
        try:
            for i, row in enumerate(stamps):
                snap = ChainSnapshot("SPX", NS + (i + 1) * SEC, 6001.0, [
                    contract("SPXW", EXP1, right, 6000 + 5 * j, bid=1.0 + i, ask=1.2 + i,
                             quote_ts_ns=q, last=1.1 + i, trade_ts_ns=t)
                    for j, ((q, t), right) in enumerate(zip(row, "CPC", strict=True))
                ])  # fmt: skip
                await n.process(await put(r, snap))
                eid = await active(r)
                for c in snap.contracts:
                    h = await r.hgetall(keys.epoch_contract("SPX", eid, c.cid))
                    q, t = int(h.get(b"quote_ts", 0)), int(h.get(b"trade_ts", 0))
                    assert int(h.get(b"ts_ns", 0)) == max(q, t), h
        finally:
            await r.aclose()

    asyncio.run(scenario())


async def test_snapshot_spot_is_admitted_at_the_providers_time(deps: Deps, redis: Redis) -> None:
    """A (possibly delayed) REST spot carries its provider time: it never outranks a newer
    live spot (a stock's /stocks trade, an index's V event)."""
    await redis.hset(keys.SPOT_LATEST, mapping={"SPX": "6003.5", "SPX:ts_ns": str(NS - SEC)})
    old = msgspec.structs.replace(chain(NS), spot_ts_ns=NS - 2 * SEC)  # 15-min delayed, say
    await normalizer(deps).process(await put(redis, old))
    spot = await redis.hgetall(keys.SPOT_LATEST)
    assert spot[b"SPX"] == b"6003.5" and spot[b"SPX:ts_ns"] == str(NS - SEC).encode()
    new = msgspec.structs.replace(chain(NS + SEC), spot=6004.0, spot_ts_ns=NS)
    await normalizer(deps).process(await put(redis, new))
    spot = await redis.hgetall(keys.SPOT_LATEST)
    assert spot[b"SPX"] == b"6004.0" and spot[b"SPX:ts_ns"] == str(NS).encode()
