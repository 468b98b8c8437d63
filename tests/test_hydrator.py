"""Hydrator against a real Redis: admission under reordering/duplication (property test vs a
sequential reference model), replicas, crash between the Lua write and the dirty XADD,
geometry misses, malformed frames, epoch changes, spot admission."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from processors.epochs.hydrator import Hydrator, HydratorSettings
from schemas import keys
from schemas.messages import WS_PAYLOAD_FIELD, WS_RECV_FIELD, DirtyEntry, from_entry
from streams.processor import Deps
from streams.settings import RuntimeSettings
from tests.factories import contract, seed_epoch
from tests.util import RedisServer, eventually

MS = 1_000_000
T0 = 1_764_000_000_000  # ms
EXP = "2026-12-18"
EID = "e1"

# Three contracts: one seeded with a quote and a trade, one with a quote only, one empty.
SEEDED = [
    contract("SPXW", EXP, "C", 6000, bid=1.0, ask=1.2, quote_ts_ns=(T0 + 3) * MS,
             last=1.1, last_size=2, trade_ts_ns=(T0 + 3) * MS),
    contract("SPXW", EXP, "P", 6000, bid=2.0, ask=2.5, quote_ts_ns=(T0 + 2) * MS),
    contract("SPX", EXP, "C", 6005),
]  # fmt: skip
CIDS = [c.cid for c in SEEDED]
OUTSIDE = contract("SPXW", EXP, "C", 9995).cid  # valid ticker, not in the topology


def quote(cid: str, t: int, bp: float, ap: float) -> dict[str, Any]:
    return {"ev": "Q", "sym": cid, "bx": 1, "ax": 1, "bp": bp, "ap": ap, "bs": 1, "as": 1,
            "t": t, "q": 1}  # fmt: skip


def trade(cid: str, t: int, p: float, s: int) -> dict[str, Any]:
    return {"ev": "T", "sym": cid, "x": 1, "p": p, "s": s, "c": [209], "t": t, "q": 1}


async def push(redis: Redis, frames: list[list[dict[str, Any]]], recv0: int = T0 * MS) -> None:
    pipe = redis.pipeline(transaction=False)
    for i, fr in enumerate(frames):
        pipe.xadd(
            keys.WS_STREAM, {WS_RECV_FIELD: str(recv0 + i), WS_PAYLOAD_FIELD: orjson.dumps(fr)}
        )
    await pipe.execute()


async def entries(redis: Redis) -> list[Any]:
    return list(await redis.xrange(keys.WS_STREAM))


async def dirty(redis: Redis) -> list[DirtyEntry]:
    return [
        from_entry(f, DirtyEntry) for _, f in await redis.xrange(keys.contracts_dirty_stream("SPX"))
    ]


async def state(redis: Redis, eid: str = EID, cids: list[str] = CIDS) -> dict[str, dict[str, str]]:
    out = {}
    for cid in cids:
        h = await redis.hgetall(keys.epoch_contract("SPX", eid, cid))
        out[cid] = {k.decode(): v.decode() for k, v in h.items()}
    return out


async def seed(redis: Redis) -> None:
    await seed_epoch(redis, EID, "SPX", SEEDED, spot=6000.0)


def metric(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


# --- reference model -----------------------------------------------------------------------
Ev = tuple[str, int, int, int, int]  # kind, cid index, ts ms, value a (x0.05), value b


def to_json(e: Ev) -> dict[str, Any]:
    kind, ci, t, a, b = e
    if kind == "Q":
        return quote(CIDS[ci], t, a * 0.05, (a + b) * 0.05)
    return trade(CIDS[ci], t, a * 0.05, b)


def reference(events: list[Ev]) -> dict[str, dict[str, str]]:
    """Sequential admission over stream order: A absent -> set; B newer -> replace; C keep."""
    q: dict[str, tuple[int, float, float]] = {}
    t: dict[str, tuple[int, float, int]] = {}
    for c in SEEDED:
        if c.bid is not None and c.ask is not None and c.quote_ts_ns is not None:
            q[c.cid] = (c.quote_ts_ns, c.bid, c.ask)
        if c.last is not None and c.trade_ts_ns is not None:
            t[c.cid] = (c.trade_ts_ns, c.last, int(c.last_size or 1))
    for e in events:
        j = to_json(e)
        ts = j["t"] * MS
        if e[0] == "Q":
            if j["sym"] not in q or ts > q[j["sym"]][0]:
                q[j["sym"]] = (ts, j["bp"], j["ap"])
        elif j["sym"] not in t or ts > t[j["sym"]][0]:
            t[j["sym"]] = (ts, j["p"], j["s"])
    out: dict[str, dict[str, str]] = {}
    for cid in CIDS:
        d: dict[str, str] = {}
        if cid in q:
            ts, bp, ap = q[cid]
            d.update(quote_ts=str(ts), bid=repr(bp), ask=repr(ap), mid=repr((bp + ap) / 2))
        if cid in t:
            ts, p, _size = t[cid]
            d.update(trade_ts=str(ts), last=repr(p))
        if d:
            d["ts_ns"] = str(max(int(d.get("quote_ts", 0)), int(d.get("trade_ts", 0))))
        out[cid] = d
    return out


def values(st_: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """The value fields the reference models (size compared separately: seeded as float)."""
    names = ("quote_ts", "bid", "ask", "mid", "trade_ts", "last", "ts_ns")
    return {cid: {k: v for k, v in h.items() if k in names} for cid, h in st_.items()}


event_st = st.tuples(
    st.sampled_from(["Q", "T"]),
    st.integers(0, len(CIDS) - 1),
    st.integers(T0, T0 + 6),  # a narrow window: many equal timestamps, seeded ones in range
    st.integers(1, 40),
    st.integers(1, 5),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), events=st.lists(event_st, min_size=1, max_size=40))
def test_reordered_duplicated_events_match_sequential_admission(
    redis_server: RedisServer, data: st.DataObject, events: list[Ev]
) -> None:
    # duplicate some events at random later positions (redelivery / provider duplicates)
    for i in data.draw(st.lists(st.integers(0, len(events) - 1), max_size=10), label="dups"):
        pos = data.draw(st.integers(i, len(events)), label="pos")
        events.insert(pos, events[i])
    cuts = sorted(
        set(data.draw(st.lists(st.integers(1, len(events)), max_size=12), label="frames"))
    )
    frames = [events[a:b] for a, b in zip([0, *cuts], [*cuts, len(events)], strict=True) if a < b]
    bcuts = sorted(
        set(data.draw(st.lists(st.integers(1, len(frames)), max_size=6), label="batches"))
    )
    sub_batch = data.draw(st.integers(1, 4), label="sub_batch")  # entries per Lua call

    async def scenario() -> None:
        redis = Redis.from_url(redis_server.url)
        try:
            await redis.flushall()
            await seed(redis)
            await push(redis, [[to_json(e) for e in f] for f in frames])
            es = await entries(redis)
            rs = RuntimeSettings(redis_url=redis_server.url, consumer="p1")
            hyd = Hydrator(
                Deps(redis, rs, CollectorRegistry()), HydratorSettings(sub_batch=sub_batch)
            )
            for a, b in zip([0, *bcuts], [*bcuts, len(es)], strict=True):
                if a < b:
                    await hyd.handle(es[a:b])
            got = await state(redis)
            assert values(got) == reference(events)
            for cid in CIDS:  # fixed fields untouched, no slot invented
                assert got[cid]["type"] in ("C", "P") and got[cid]["symbol"] == "SPX"
            assert await redis.exists(keys.epoch_contract("SPX", EID, OUTSIDE)) == 0
        finally:
            await redis.aclose()

    asyncio.run(scenario())


# --- replicas --------------------------------------------------------------------------------
def replica_frames(n: int) -> tuple[list[list[dict[str, Any]]], list[Ev]]:
    """Frames with unique timestamps per (contract, kind), reordered, with exact duplicates."""
    import random

    rng = random.Random(42)
    evs: list[Ev] = []
    for k in range(n):
        evs.append(
            (rng.choice("QT"), k % len(CIDS), T0 + 10 + k, rng.randint(1, 40), rng.randint(1, 5))
        )
    rng.shuffle(evs)
    evs += rng.sample(evs, n // 5)  # duplicates at the end (same ts, same values)
    frames = [[to_json(e) for e in evs[i : i + 4]] for i in range(0, len(evs), 4)]
    return frames, evs


async def drained(redis: Redis, n: int) -> bool:
    groups = await redis.xinfo_groups(keys.WS_STREAM)
    return (
        bool(groups) and int(groups[0]["entries-read"] or 0) >= n and int(groups[0]["pending"]) == 0
    )


async def run_until_drained(redis: Redis, hyds: list[Hydrator], n: int) -> None:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(h.run(stop)) for h in hyds]
    try:
        await eventually(lambda: drained(redis, n), timeout_s=20)
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def test_two_replicas_give_the_same_state_as_one(
    redis: Redis, settings: RuntimeSettings, registry: CollectorRegistry
) -> None:
    frames, evs = replica_frames(600)
    results = []
    for consumers in (["solo"], ["rep-a", "rep-b"]):
        await redis.flushall()
        await seed(redis)
        await push(redis, frames)
        hyds = [
            Hydrator(
                Deps(redis, RuntimeSettings(redis_url=settings.redis_url, consumer=c, count=7,
                                            block_ms=20), CollectorRegistry()),
                HydratorSettings(sub_batch=3),
            )
            for c in consumers
        ]  # fmt: skip
        await run_until_drained(redis, hyds, len(frames))
        if len(consumers) == 2:  # both really consumed
            per = {
                c["name"].decode(): int(c["pending"]) for c in
                await redis.xinfo_consumers(keys.WS_STREAM, keys.HYDRATOR_GROUP)
            }  # fmt: skip
            assert set(per) == {"rep-a", "rep-b"}
            processed = [h.consumer.metrics.processed._value.get() for h in hyds]  # type: ignore[attr-defined]
            assert all(p > 0 for p in processed), processed
        notified = {c for d in await dirty(redis) for c in d.cids}
        results.append((await state(redis), notified))
    assert results[0][0] == results[1][0]
    assert values(results[0][0]) == reference(evs)
    assert results[0][1] == results[1][1] == set(CIDS)


# --- crash between the Lua write and the dirty XADD -------------------------------------------
class Killed(BaseException):
    """Escapes the runtime's per-entry error isolation, like a process kill would."""


async def test_kill_between_write_and_dirty_xadd_loses_no_notification(
    redis: Redis, settings: RuntimeSettings
) -> None:
    await seed(redis)
    frames = [[quote(CIDS[2], T0 + 50, 3.0, 3.5), trade(CIDS[1], T0 + 51, 2.2, 4)],
              [quote(CIDS[0], T0 + 52, 1.05, 1.15)]]  # fmt: skip
    await push(redis, frames)
    rs = RuntimeSettings(redis_url=settings.redis_url, consumer="h-1", block_ms=20)

    first = Hydrator(Deps(redis, rs, CollectorRegistry()))

    async def killed(_: list[DirtyEntry]) -> None:
        raise Killed

    first._emit_dirty = killed  # type: ignore[method-assign]
    with pytest.raises(Killed):
        await first.run(asyncio.Event())
    # The Lua write happened, the notification did not, the entries are still pending.
    st_ = await state(redis)
    assert st_[CIDS[2]]["bid"] == "3.0" and st_[CIDS[1]]["last"] == "2.2"
    assert await redis.xlen(keys.contracts_dirty_stream("SPX")) == 0
    assert int((await redis.xinfo_groups(keys.WS_STREAM))[0]["pending"]) == 2

    # Restart (same pod name): the own-PEL drain redelivers and the notifications come out.
    restarted = Hydrator(Deps(redis, rs, CollectorRegistry()))
    await run_until_drained(redis, [restarted], 2)
    ds = await dirty(redis)
    assert {c for d in ds for c in d.cids} == {CIDS[0], CIDS[1], CIDS[2]}
    assert all(d.epoch == EID and d.symbol == "SPX" and d.reason == "ws" for d in ds)
    assert max(d.max_ts_ns for d in ds) == (T0 + 52) * MS
    assert min(d.recv_ts_ns or 0 for d in ds) == T0 * MS


async def test_redelivered_batch_reemits_but_older_events_do_not(deps: Deps, redis: Redis) -> None:
    await seed(redis)
    await push(redis, [[quote(CIDS[1], T0 + 9, 2.1, 2.6)], [quote(CIDS[0], T0 + 1, 9.0, 9.5)]])
    es = await entries(redis)
    hyd = Hydrator(deps)
    await hyd.handle(es)
    await hyd.handle(es)  # redelivery of the same batch
    ds = await dirty(redis)
    # CIDS[0]'s quote is older than the seeded one (rule C): never notified.
    assert [d.cids for d in ds] == [[CIDS[1]], [CIDS[1]]]
    assert (await state(redis))[CIDS[0]]["bid"] == "1.0"
    # Accounting: per handling, 2 events in = 1 applied (or found applied) + 1 discarded.
    reg = deps.registry
    assert metric(reg, "massive_hydrator_applied_total", kind="quote") == 2
    assert metric(reg, "massive_hydrator_discarded_total") == 2


# --- bad input -----------------------------------------------------------------------------
async def test_geometry_miss_is_counted_and_creates_nothing(
    deps: Deps, redis: Redis, registry: CollectorRegistry
) -> None:
    await seed(redis)
    ndx = contract("NDX", EXP, "C", 20000).cid  # no NDX epoch at all
    await push(redis, [[quote(OUTSIDE, T0 + 9, 1.0, 1.1), trade(ndx, T0 + 9, 5.0, 1),
                        quote(CIDS[2], T0 + 9, 0.5, 0.6)]])  # fmt: skip
    n_keys = await redis.dbsize()
    await Hydrator(deps).handle(await entries(redis))
    assert metric(registry, "massive_hydrator_geometry_miss_total", symbol="SPX") == 1
    assert metric(registry, "massive_hydrator_geometry_miss_total", symbol="NDX") == 1
    assert await redis.exists(keys.epoch_contract("SPX", EID, OUTSIDE)) == 0
    assert await redis.dbsize() == n_keys + 1  # only the dirty stream appeared
    assert (await state(redis))[CIDS[2]]["bid"] == "0.5"
    assert [d.cids for d in await dirty(redis)] == [[CIDS[2]]]


async def test_malformed_frames_are_counted_and_good_ones_apply(
    deps: Deps, redis: Redis, registry: CollectorRegistry
) -> None:
    await seed(redis)
    pipe = redis.pipeline(transaction=False)
    pipe.xadd(keys.WS_STREAM, {WS_RECV_FIELD: "1", WS_PAYLOAD_FIELD: b"[{not json"})
    pipe.xadd(keys.WS_STREAM, {WS_PAYLOAD_FIELD: orjson.dumps([quote(CIDS[2], T0 + 9, 9, 9)])})
    bad_event = {"ev": "Q", "sym": CIDS[1], "bp": "x", "ap": 1, "t": T0 + 9}
    mixed = [bad_event, trade(CIDS[1], T0 + 9, 2.5, 3), {"ev": "status", "status": "ok"}]
    pipe.xadd(keys.WS_STREAM, {WS_RECV_FIELD: "2", WS_PAYLOAD_FIELD: orjson.dumps(mixed)})
    pipe.xadd(keys.WS_STREAM, {WS_RECV_FIELD: "3", WS_PAYLOAD_FIELD: orjson.dumps(
        [quote(CIDS[0], T0 + 9, 1.5, 1.6)])})  # fmt: skip
    await pipe.execute()
    settings = RuntimeSettings(redis_url=deps.settings.redis_url, consumer="m", block_ms=20)
    hyd = Hydrator(Deps(redis, settings, registry))
    await run_until_drained(redis, [hyd], 4)
    assert metric(registry, "massive_hydrator_rejected_total", reason="bad_frame") == 1
    assert metric(registry, "massive_hydrator_rejected_total", reason="bad_entry") == 1
    assert metric(registry, "massive_hydrator_rejected_total", reason="bad_event") == 1
    assert metric(registry, "massive_hydrator_events_total", kind="other") == 1
    st_ = await state(redis)
    assert st_[CIDS[1]]["last"] == "2.5" and st_[CIDS[1]]["bid"] == "2.0"
    assert st_[CIDS[0]]["bid"] == "1.5"
    assert "bid" not in st_[CIDS[2]]  # its entry had no recv_ts_ns: rejected as a whole
    assert await redis.xlen(keys.dead_letter_stream(keys.WS_STREAM)) == 0


# --- epochs, spot, scripts -----------------------------------------------------------------
async def test_epoch_change_moves_writes_to_the_new_epoch(deps: Deps, redis: Redis) -> None:
    await seed(redis)
    hyd = Hydrator(deps)
    await push(redis, [[quote(CIDS[2], T0 + 9, 0.5, 0.6)]])
    await hyd.handle((await entries(redis))[-1:])
    # Promote e2 (one more strike) the way the normalizer does: old meta retired.
    new = contract("SPXW", EXP, "C", 9995)
    await seed_epoch(redis, "e2", "SPX", [*SEEDED, new], spot=6001.0)
    await redis.hset(keys.epoch_meta("SPX", EID), "state", "retired")
    await push(redis, [[quote(new.cid, T0 + 10, 7.0, 7.5), quote(CIDS[2], T0 + 10, 0.7, 0.8)]])
    await hyd.handle((await entries(redis))[-1:])
    e2 = await state(redis, "e2", [new.cid, CIDS[2]])
    assert e2[new.cid]["bid"] == "7.0" and e2[CIDS[2]]["bid"] == "0.7"
    assert (await state(redis))[CIDS[2]]["bid"] == "0.5"  # the retired epoch is never written
    assert [(d.epoch, sorted(d.cids)) for d in await dirty(redis)] == [
        (EID, [CIDS[2]]), ("e2", sorted([new.cid, CIDS[2]]))]  # fmt: skip


async def test_epoch_change_within_one_batch_of_sub_batches(
    redis: Redis, settings: RuntimeSettings, registry: CollectorRegistry
) -> None:
    """The first sub-batch finds its cached epoch retired (re-resolved and applied again);
    the next one, routed before that with the old cache (its new contract a miss), is
    routed again: nothing is lost, counted as a miss, or written into the retired epoch."""
    await seed(redis)
    hyd = Hydrator(Deps(redis, settings, registry), HydratorSettings(sub_batch=1))
    await push(redis, [[quote(CIDS[2], T0 + 9, 0.5, 0.6)]])
    await hyd.handle(await entries(redis))  # caches e1
    new = contract("SPXW", EXP, "C", 9995)
    await seed_epoch(redis, "e2", "SPX", [*SEEDED, new], spot=6001.0)
    await redis.hset(keys.epoch_meta("SPX", EID), "state", "retired")
    await push(redis, [[quote(CIDS[2], T0 + 10, 0.7, 0.8)], [quote(new.cid, T0 + 11, 7.0, 7.5)],
                       [trade(CIDS[0], T0 + 12, 1.3, 2)],
                       [quote(new.cid, T0 + 13, 7.1, 7.6)]])  # fmt: skip
    await hyd.handle((await entries(redis))[1:])
    e2 = await state(redis, "e2", [new.cid, CIDS[2], CIDS[0]])
    assert e2[new.cid]["bid"] == "7.1" and e2[CIDS[2]]["bid"] == "0.7"
    assert e2[CIDS[0]]["last"] == "1.3"
    assert (await state(redis))[CIDS[2]]["bid"] == "0.5"  # the retired epoch is never written
    assert "last" not in (await state(redis))[CIDS[2]]
    assert metric(registry, "massive_hydrator_geometry_miss_total", symbol="SPX") == 0
    assert metric(registry, "massive_hydrator_applied_total", kind="quote") == 1 + 3
    ds = await dirty(redis)
    assert ds[0].epoch == EID and all(d.epoch == "e2" for d in ds[1:])
    assert {c for d in ds[1:] for c in d.cids} == {new.cid, CIDS[2], CIDS[0]}


async def test_error_between_request_and_reply_leaves_no_connection_out_of_sync(
    redis: Redis, settings: RuntimeSettings
) -> None:
    """A failure after a sub-batch's request is sent and before its reply is read (here in
    decoding the next sub-batch) must not hand the connection back with a reply unread: the
    next command on it would read that stale reply as its own."""
    await seed(redis)
    hyd = Hydrator(Deps(redis, settings, CollectorRegistry()), HydratorSettings(sub_batch=1))
    await push(redis, [[quote(CIDS[0], T0 + 9, 1.1, 1.3)]])
    await hyd.handle(await entries(redis))  # caches the epoch: the next request carries events
    await push(redis, [[quote(CIDS[2], T0 + 9, 0.5, 0.6)], [quote(CIDS[1], T0 + 9, 2.1, 2.6)]])
    es = (await entries(redis))[1:]
    real = hyd._collect
    calls = 0

    def failing(chunk: list[Any]) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ValueError("decode failed")
        return real(chunk)

    hyd._collect = failing  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="decode failed"):
        await hyd.handle(es)
    for _ in range(3):  # whichever pooled connection comes next answers its own command
        assert await redis.get(keys.epoch_active("SPX")) == EID.encode()
        assert await redis.hget(keys.epoch_contract("SPX", EID, CIDS[2]), "bid") == b"0.5"
    hyd._collect = real  # type: ignore[method-assign]
    await hyd.handle(es)
    assert (await state(redis))[CIDS[1]]["bid"] == "2.1"
    assert {c for d in await dirty(redis) for c in d.cids} == {CIDS[0], CIDS[1], CIDS[2]}


async def test_inactive_epoch_is_never_written(deps: Deps, redis: Redis) -> None:
    await seed_epoch(redis, EID, "SPX", SEEDED, spot=6000.0, state="warming")
    await redis.set(keys.epoch_active("SPX"), EID)  # pointer without an active meta
    await push(redis, [[quote(CIDS[2], T0 + 9, 0.5, 0.6)]])
    with pytest.raises(RuntimeError, match="kept changing"):
        await Hydrator(deps).handle(await entries(redis))
    assert "bid" not in (await state(redis))[CIDS[2]]


async def test_index_values_update_spot_with_admission(deps: Deps, redis: Redis) -> None:
    await seed(redis)  # spot 6000 at ts 1_764_000_000_000_000_000 ns
    frames = [[{"ev": "V", "val": 6010.5, "T": "I:SPX", "t": T0 + 5},
               {"ev": "V", "val": 6011.5, "T": "I:SPX", "t": T0 + 4}],
              [{"ev": "V", "val": 21000.0, "T": "I:NDX", "t": T0 + 1}],
              [{"ev": "V", "val": 5000.0, "T": "I:SPX", "t": T0 - 1}]]  # fmt: skip
    await push(redis, frames)
    await Hydrator(deps).handle(await entries(redis))
    spot = {k.decode(): v.decode() for k, v in (await redis.hgetall(keys.SPOT_LATEST)).items()}
    assert spot == {"SPX": "6010.5", "SPX:ts_ns": str((T0 + 5) * MS),
                    "NDX": "21000.0", "NDX:ts_ns": str((T0 + 1) * MS)}  # fmt: skip


async def test_stock_trades_and_quotes_are_the_spot_of_their_symbol(
    deps: Deps, redis: Redis
) -> None:
    await seed(redis)
    await seed_epoch(redis, "eAAPL", "AAPL", [contract("AAPL", EXP, "C", 230)], spot=230.0)
    # SPY has a default spec; AAPL is configured and runs (an active epoch)
    frames = [
        [trade("SPY", T0 + 5, 601.25, 100), quote("SPY", T0 + 4, 601.1, 601.2)],
        [quote("AAPL", T0 + 7, 230.1, 230.2), trade("AAPL", T0 + 6, 230.0, 50)],
        [quote("AAPL", T0 + 8, 0.0, 230.2)],
    ]  # fmt: skip  (one-sided: no spot)
    await push(redis, frames)
    cfg = dataclasses.replace(deps.settings, symbols=("SPX", "AAPL"))
    h = Hydrator(dataclasses.replace(deps, settings=cfg))
    await h.handle(await entries(redis))  # the first batch: the epoch cache is still empty
    await push(redis, [frames[1]], recv0=(T0 + 50) * MS)
    await h.handle((await entries(redis))[-1:])
    spot = {k.decode(): v.decode() for k, v in (await redis.hgetall(keys.SPOT_LATEST)).items()}
    assert spot["SPY"] == "601.25" and spot["SPY:ts_ns"] == str((T0 + 5) * MS)
    assert spot["AAPL"] == "230.15" and spot["AAPL:ts_ns"] == str((T0 + 7) * MS)
    reg = deps.registry
    assert metric(reg, "massive_hydrator_events_total", kind="stock") == 4
    assert metric(reg, "massive_hydrator_rejected_total", reason="stock_no_price") == 0
    # a stock symbol that neither runs nor is configured (or garbage) is no spot: a miss
    # (so were AAPL's events of the first batch, before the epoch cache knew AAPL)
    misses = metric(reg, "massive_hydrator_geometry_miss_total", symbol="other")
    await push(redis, [[trade("MSFT", T0 + 9, 430.0, 1), trade("0#0", T0 + 9, 1.0, 1)]],
               recv0=(T0 + 100) * MS)  # fmt: skip
    await h.handle((await entries(redis))[-1:])
    assert not {"MSFT", "0#0"} & {k.decode() for k in await redis.hkeys(keys.SPOT_LATEST)}
    assert metric(reg, "massive_hydrator_geometry_miss_total", symbol="other") == misses + 2
    assert await dirty(redis) == []


async def test_survives_script_flush(deps: Deps, redis: Redis) -> None:
    await seed(redis)
    hyd = Hydrator(deps)
    await push(redis, [[quote(CIDS[2], T0 + 9, 0.5, 0.6)]])
    await hyd.handle(await entries(redis))
    await redis.script_flush()
    await push(redis, [[quote(CIDS[2], T0 + 10, 0.6, 0.7)]])
    await hyd.handle((await entries(redis))[-1:])
    assert (await state(redis))[CIDS[2]]["bid"] == "0.6"


def test_settings_validate() -> None:
    with pytest.raises(ValueError):
        HydratorSettings(dirty_chunk=0)


async def test_dirty_entries_are_chunked(redis: Redis, settings: RuntimeSettings) -> None:
    many = [contract("SPXW", EXP, "C", 5000 + 5 * k) for k in range(12)]
    await seed_epoch(redis, EID, "SPX", many, spot=6000.0)
    await push(redis, [[quote(c.cid, T0 + 9, 1.0, 1.1) for c in many]])
    hyd = Hydrator(Deps(redis, settings, CollectorRegistry()), HydratorSettings(dirty_chunk=5))
    await hyd.handle(await entries(redis))
    ds = await dirty(redis)
    assert [len(d.cids) for d in ds] == [5, 5, 2]
    assert sorted(c for d in ds for c in d.cids) == sorted(c.cid for c in many)
