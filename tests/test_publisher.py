"""Heatmap publisher against a real Redis: complete-first publish, stability when the market
is closed, diffs replayed on a client equal the canonical model, epoch gating, fencing and
leader failover without versions going backwards or repeating."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from processors import lua
from processors.heatmap import publisher as publisher_mod
from processors.heatmap.publisher import Publisher, PublisherSettings
from processors.heatmap.tile_builder import TileBuilder, TileSettings
from schemas import keys
from schemas.heatmap import split_staged
from schemas.messages import (
    PIECE_MARK,
    DirtyEntry,
    ModelDiff,
    PublishedModel,
    encode_model_pieces,
    entry,
    from_entry,
)
from streams.clock import SystemClock
from streams.processor import Deps
from streams.settings import RuntimeSettings
from tests.factories import option_chain, seed_epoch
from tests.util import RedisServer, eventually

NOW = 1_764_000_000_000_000_000
SEC = 1_000_000_000
EXPS = ["2026-12-01", "2026-12-02"]
STRIKES = [5950 + 5 * i for i in range(21)]
TCFG = TileSettings(widths_spx=(5, 10), n_expiries=2, drop_expired=False)
PCFG = PublisherSettings(
    lease_ttl_ms=1000, renew_ms=250, max_interval_ms=40, tick_ms=10, min_changed_tiles=40
)
STRAT = "butterfly"


async def seed(redis: Redis, eid: str = "e1", shift: int = 0, **kw: Any) -> list[str]:
    chain = option_chain(
        "SPXW", EXPS, [k + shift for k in STRIKES], spot=6000 + shift, asof="2026-11-24"
    )
    await seed_epoch(redis, eid, "SPX", chain, spot=6000 + shift, **kw)
    return [c.cid for c in chain]


_REPLICA_CLIENTS: list[Redis] = []


@pytest.fixture(autouse=True)
async def _close_replica_clients() -> AsyncIterator[None]:
    yield
    while _REPLICA_CLIENTS:
        await _REPLICA_CLIENTS.pop().aclose()


def with_consumer(deps: Deps, name: str) -> Deps:
    """A separate replica: own consumer name, own Redis connections (closed after the
    test), own metrics."""
    r = Redis.from_url(deps.settings.redis_url)
    _REPLICA_CLIENTS.append(r)
    return Deps(
        redis=r,
        settings=dataclasses.replace(deps.settings, consumer=name),
        registry=CollectorRegistry(),
        clock=SystemClock(),
    )


async def model(redis: Redis) -> dict[str, Any] | None:
    raw = await redis.get(keys.heatmap_model("SPX", STRAT))
    return None if raw is None else msgspec.json.decode(raw)


async def staging_items(redis: Redis) -> dict[str, Any]:
    raw = await redis.hgetall(keys.heatmap_staging("SPX", STRAT))
    return {k.decode(): msgspec.json.decode(split_staged(v)[1]) for k, v in raw.items()}


async def diffs(redis: Redis) -> list[tuple[bytes, ModelDiff]]:
    return [
        (i, from_entry(f, ModelDiff))
        for i, f in await redis.xrange(keys.heatmap_diffs_stream(STRAT, "SPX"))
    ]


async def dirty(redis: Redis, b: TileBuilder, eid: str, cids: list[str], ts: int) -> None:
    """Hydrator-like quote updates on ``cids`` then the builder's batch for them."""
    rng = random.Random(ts)
    pipe = redis.pipeline()
    for c in cids:
        mid = rng.uniform(0.5, 60)
        pipe.hset(
            keys.epoch_contract("SPX", eid, c),
            mapping={"bid": mid - 0.1, "ask": mid + 0.1, "mid": mid, "quote_ts": ts, "ts_ns": ts},
        )
    await pipe.execute()
    await b.handle([(b"1-0", entry(DirtyEntry("SPX", eid, cids, ts, recv_ts_ns=time.time_ns())))])


async def crash(p: Publisher, task: asyncio.Task[None]) -> None:
    """Kill a replica like a process crash: cancel it (no lease release) and drop its
    sockets (redis-py may otherwise sit on a half-cancelled blocking read)."""
    task.cancel()
    await asyncio.wait({task}, timeout=2)
    await p.redis.connection_pool.disconnect()
    await asyncio.wait({task}, timeout=5)
    assert task.done()
    if not task.cancelled():
        assert isinstance(task.exception(), RedisConnectionError | OSError)  # sockets died


def start(p: Publisher) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    return stop, asyncio.create_task(p.run(stop))


@contextlib.asynccontextmanager
async def leading(deps: Deps, redis: Redis) -> AsyncIterator[Publisher]:
    """Epoch e1 installed by a tile builder and a publisher leading on it, caught up
    (version 1); stopped on exit."""
    await seed(redis)
    b = TileBuilder(deps, STRAT, TCFG)
    await b.handle([(b"1-0", entry(DirtyEntry("SPX", "e1", [], NOW, reason="epoch")))])
    p = Publisher(deps, STRAT, PCFG, "SPX")
    stop, task = start(p)
    try:
        await eventually(lambda: caught_up(redis))
        yield p
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def caught_up(redis: Redis) -> bool:
    m = await model(redis)
    return m is not None and m["items"] == await staging_items(redis)


def count(p: Publisher, condition: str) -> float:
    v = p.deps.registry.get_sample_value(
        "massive_publishes_total", {"strategy": STRAT, "condition": condition}
    )
    return v or 0.0


async def test_closed_market_publishes_the_complete_model_once(deps: Deps, redis: Redis) -> None:
    await seed(redis)
    b = TileBuilder(deps, STRAT, TCFG)
    await b.handle([(b"1-0", entry(DirtyEntry("SPX", "e1", [], NOW, reason="epoch")))])
    p = Publisher(deps, STRAT, PCFG, "SPX")
    stop, task = start(p)
    try:
        await eventually(lambda: caught_up(redis))
        m = await model(redis)
        assert m is not None and m["version"] == 1 and m["epoch"] == "e1"
        assert m["meta"]["roots"] == {e: "SPXW" for e in EXPS}  # legs' tickers: root + id
        ((diff_id, d),) = await diffs(redis)
        assert m["diff_id"] == diff_id.decode() and d.version == 1 and d.prev_version == 0
        # a snapshot version: the whole model is the checkpoint installed with the diff,
        # which carries no items (the stream never holds a whole grid)
        assert d.snapshot and d.changed == {} and not d.removed
        assert m["meta"]["expected"] == len(m["items"]) == d.meta["n_tiles"]
        (raw,) = [f[b"d"] for _, f in await redis.xrange(keys.heatmap_diffs_stream(STRAT, "SPX"))]
        assert len(raw) < 1_000
        # no dirty traffic (and even a redundant re-announcement): no further versions
        await b.handle([(b"2-0", entry(DirtyEntry("SPX", "e1", [], NOW, reason="epoch")))])
        await asyncio.sleep(PCFG.max_interval_ms / 1000 * 8)  # observe stability over time
        assert (await model(redis) or {})["version"] == 1 and len(await diffs(redis)) == 1
        assert count(p, "complete") == 1 and count(p, "time") == count(p, "value") == 0
        pending = await redis.xpending(keys.tiles_stream(STRAT, "SPX"), keys.PUBLISHER_GROUP)
        assert pending["pending"] == 0  # everything acked once covered
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert await redis.get(keys.publisher_lease("SPX", STRAT)) is None  # released on graceful stop


def apply(items: dict[str, Any], version: int, d: ModelDiff) -> int:
    assert d.prev_version == version, (d.prev_version, version)
    assert not d.snapshot, "a snapshot version is read from the model key"
    items.update(d.changed)
    for k in d.removed:
        items.pop(k)
    return d.version


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    batches=st.lists(
        st.lists(st.integers(0, 10_000), min_size=1, max_size=25), min_size=1, max_size=6
    ),
    epoch_switch=st.booleans(),
)
def test_client_replaying_diffs_equals_canonical_model(
    redis_server: RedisServer, batches: list[list[int]], epoch_switch: bool
) -> None:
    async def scenario() -> None:
        redis = Redis.from_url(redis_server.url)
        await redis.flushall()
        rs = RuntimeSettings(redis_url=redis_server.url, consumer="c1", block_ms=20)
        deps = Deps(redis=redis, settings=rs, registry=CollectorRegistry())
        cids = await seed(redis)
        b = TileBuilder(deps, STRAT, TCFG)
        await b.handle([(b"1-0", entry(DirtyEntry("SPX", "e1", [], NOW, reason="epoch")))])
        p = Publisher(deps, STRAT, PCFG, "SPX")
        stop, task = start(p)
        try:
            await eventually(lambda: caught_up(redis))
            snap = await model(redis)
            assert snap is not None
            eid, ts = "e1", NOW
            switched: dict[str, Any] | None = None  # the model key as e2 was published
            for i, batch in enumerate(batches):
                if epoch_switch and i == len(batches) // 2:
                    eid = "e2"
                    cids = await seed(redis, "e2", shift=10, now_ns=NOW + SEC)
                    await b.handle(
                        [(b"1-0", entry(DirtyEntry("SPX", eid, [], ts, reason="epoch")))]
                    )
                    await eventually(lambda: caught_up(redis))
                    switched = await model(redis)
                ts += SEC
                await dirty(redis, b, eid, sorted({cids[j % len(cids)] for j in batch}), ts)
                if i % 2:
                    await asyncio.sleep(0.02)
            await eventually(lambda: caught_up(redis))
            final = await model(redis)
            assert final is not None
            items, version = dict(snap["items"]), snap["version"]
            ds = [d for _, d in await diffs(redis)]
            assert [d.version for d in ds] == list(range(1, len(ds) + 1))
            for d in ds:
                if d.version > version and d.snapshot:
                    # a client reads the model key (a reader between the switch and the
                    # next checkpoint gets exactly this one)
                    assert switched is not None and d.epoch == switched["epoch"] == "e2"
                    assert switched["version"] == d.version
                    items, version = dict(switched["items"]), d.version
                elif d.version > version:
                    version = apply(items, version, d)
            assert version == final["version"] and items == final["items"]
            assert final["epoch"] == eid
            assert sum(d.snapshot for d in ds) == 1 + epoch_switch
            assert await redis.hget(keys.heatmap_manifest("SPX", STRAT), "epoch") == eid.encode()
            assert set(items) == set(await staging_items(redis))  # exactly eid's tiles
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)
            await redis.aclose()

    asyncio.run(scenario())


async def test_no_tile_of_a_warming_or_retired_epoch_is_published(deps: Deps, redis: Redis) -> None:
    cids1 = await seed(redis, "e1")
    b = TileBuilder(deps, STRAT, TCFG)
    await b.handle([(b"1-0", entry(DirtyEntry("SPX", "e1", [], NOW, reason="epoch")))])
    p = Publisher(deps, STRAT, PCFG, "SPX")
    stop, task = start(p)
    try:
        await eventually(lambda: caught_up(redis))
        e1_ids = set((await model(redis) or {})["items"])
        # e2 is warming (not active) but a racing builder installs it in staging anyway
        cids2 = await seed(redis, "e2", shift=10, state="warming", now_ns=NOW + SEC)
        await b.full_build("SPX", "e2", recv_ts_ns=None, n_dirty=0)
        await dirty(redis, b, "e1", cids1[:5], NOW + 2 * SEC)  # e1 now "not installed"
        await asyncio.sleep(PCFG.max_interval_ms / 1000 * 5)
        assert all(d.epoch == "e1" for _, d in await diffs(redis))
        m = await model(redis)
        assert m is not None and m["epoch"] == "e1"
        assert p.deps.registry.get_sample_value(
            "massive_publisher_rejected_total", {"strategy": STRAT, "reason": "staging_not_active"}
        )
        # promotion: e2 active, e1 retired; the next publish is e2's complete model
        await redis.hset(keys.epoch_meta("SPX", "e2"), "state", "active")
        await redis.set(keys.epoch_active("SPX"), "e2")
        await b.handle([(b"2-0", entry(DirtyEntry("SPX", "e2", [], NOW, reason="epoch")))])
        await eventually(lambda: caught_up(redis))
        n_before = len(await diffs(redis))
        # e2's first version is a snapshot installed with its checkpoint: e2's tiles only
        first = await model(redis)
        last_id, last = (await diffs(redis))[-1]
        assert last.snapshot and last.epoch == "e2" and not last.changed and not last.removed
        assert first is not None and first["epoch"] == "e2"
        assert first["diff_id"] == last_id.decode() and first["version"] == last.version
        assert set(first["items"]) == set(await staging_items(redis))
        # a late incremental delta for retired e1 changes nothing published
        await dirty(redis, b, "e1", cids1[5:9], NOW + 3 * SEC)
        await dirty(redis, b, "e2", cids2[:4], NOW + 4 * SEC)
        await eventually(lambda: caught_up(redis))
        ds = [d for _, d in await diffs(redis)]
        switch = next(i for i, d in enumerate(ds) if d.epoch == "e2")
        assert all(d.epoch == "e1" for d in ds[:switch])
        assert all(d.epoch == "e2" for d in ds[switch:]) and len(ds) > n_before
        e2_ids = set(await staging_items(redis))
        for d in ds:  # items carry no epoch: each diff only touches its own epoch's tiles
            assert set(d.changed) <= (e1_ids if d.epoch == "e1" else e2_ids)
        assert ds[switch].snapshot and all(not d.snapshot for d in ds[switch + 1 :])
        assert set(first["items"]) == e2_ids != e1_ids
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_publish_script_rejects_a_stale_leader_and_an_inactive_epoch(
    deps: Deps, redis: Redis
) -> None:
    await seed(redis)
    b = TileBuilder(deps, STRAT, TCFG)
    await b.handle([(b"1-0", entry(DirtyEntry("SPX", "e1", [], NOW, reason="epoch")))])
    p = Publisher(with_consumer(deps, "test-1b"), STRAT, PCFG, "SPX")
    _stop, task = start(p)
    await eventually(lambda: caught_up(redis))
    old_token = p.token
    await crash(p, task)  # lease not released
    q = Publisher(with_consumer(deps, "test-2"), STRAT, PCFG, "SPX")
    stop2, task2 = start(q)
    try:
        await eventually(lambda: _leads(q), timeout_s=5)
        # the crashed leader wakes up and tries to publish with its old token
        p.lease.token = old_token
        st = await p._state("SPX")
        st.pending = {"SPX:x": b"{}"}
        await p._publish_pending(st, "time")
        assert p.token is None  # it learns it is fenced and stops
        assert p.deps.registry.get_sample_value(
            "massive_publisher_rejected_total", {"strategy": STRAT, "reason": "fenced"}
        )
        m = await model(redis)
        assert m is not None and "SPX:x" not in m["items"] and m["version"] == 1
        # the lua script also refuses an epoch that is not the active one
        st2 = await q._state("SPX")
        await q._commit(st2, "time", "e-warming", {}, [], dict(st2.items), None, None)
        assert q.deps.registry.get_sample_value(
            "massive_publisher_rejected_total", {"strategy": STRAT, "reason": "inactive_epoch"}
        )
        assert (await model(redis) or {})["version"] == 1
    finally:
        stop2.set()
        await asyncio.wait_for(task2, 5)


async def test_publish_script_refuses_any_version_but_current_plus_one(
    deps: Deps, redis: Redis
) -> None:
    """Under a valid token and lease, with the right chain head: a repeated, older or skipping
    version is refused (-4) and writes nothing, as is current + 1 on another chain head;
    current + 1 on the head goes in."""
    async with leading(deps, redis) as p:
        ver_key, head_key = keys.heatmap_version("SPX", STRAT), keys.heatmap_head("SPX", STRAT)
        stream = keys.heatmap_diffs_stream(STRAT, "SPX")
        head = await redis.get(head_key)
        assert head is not None and await redis.get(ver_key) == b"1"
        n_diffs = await redis.xlen(stream)
        for version in (1, 0, 3):
            code, _ = await p._write("SPX", "e1", version, b"{}", head.decode())
            assert code == -4, version
        assert await redis.get(ver_key) == b"1" and await redis.get(head_key) == head
        assert await redis.xlen(stream) == n_diffs
        # the right version on another chain head (Redis lost our last diff): refused too
        assert (await p._write("SPX", "e1", 2, b"{}", "1-1"))[0] == -4
        code, diff_id = await p._write("SPX", "e1", 2, b"{}", head.decode())
        assert code == 1 and await redis.get(ver_key) == b"2"
        assert await redis.get(head_key) == diff_id.encode()


async def test_diff_id_above_a_later_stream_id_is_chosen_and_carried_by_the_model(
    deps: Deps, redis: Redis
) -> None:
    """The publisher picks diff ids from its clock; when the stream already holds a later id
    (another leader, clock skew) the script refuses and the model is re-rendered with an id
    above it: the diff lands and the model's diff_id is exactly its entry id."""
    async with leading(deps, redis) as p:
        future_ms = time.time_ns() // 1_000_000 + 3_600_000
        await redis.xadd(keys.heatmap_diffs_stream(STRAT, "SPX"), {"d": b"{}"}, id=f"{future_ms}-5")
        st = await p._state("SPX")
        tid = next(iter(st.items))
        st.pending = {tid: msgspec.Raw(b'{"changed":true}')}
        await p._publish_pending(st, "time")
        # the model key is a checkpoint, written by the lead loop once nothing is pending
        await eventually(lambda: _model_version_is(redis, 2))
        m = await model(redis)
        assert m is not None and m["items"][tid] == {"changed": True}
        last_id, last = (await redis.xrevrange(keys.heatmap_diffs_stream(STRAT, "SPX"), count=1))[0]
        assert m["diff_id"] == last_id.decode() == f"{future_ms}-6"
        assert msgspec.json.decode(last[b"d"])["version"] == 2


async def test_model_key_is_a_checkpoint_and_a_new_leader_catches_up_from_the_diffs(
    deps: Deps, redis: Redis
) -> None:
    """Under sustained changes the model key is rewritten at most every checkpoint_ms; the
    diffs after its diff_id carry the rest. A leader that dies before checkpointing leaves
    an old model key: its successor applies the diffs after it before publishing (a value
    clients hold from those diffs but the staging does not is then corrected), so clients
    stay consistent, and once idle the model key is exactly current."""
    cids = await seed(redis)
    b = TileBuilder(deps, STRAT, TCFG)
    await b.handle([(b"1-0", entry(DirtyEntry("SPX", "e1", [], NOW, reason="epoch")))])
    cfg = dataclasses.replace(PCFG, checkpoint_ms=3_600_000)
    p = Publisher(with_consumer(deps, "cp-1"), STRAT, cfg, "SPX")
    stop, task = start(p)
    await eventually(lambda: caught_up(redis))
    snap = await model(redis)
    assert snap is not None and snap["version"] == 1
    first_raw = await redis.get(keys.heatmap_model("SPX", STRAT))
    # v2 publishes a value the staging does not hold (clients hold it): only a successor
    # that knows v2 sees it differs from the staging and corrects it
    st = p.syms["SPX"]
    touched = set((await b._grid("SPX", "e1")).affected(cids[:12]))
    tid = next(t for t in st.items if t not in touched)
    st.pending = {tid: b'{"moved":1}'}
    await p._publish_pending(st, "time")
    await dirty(redis, b, "e1", cids[:6], NOW + 5 * SEC)  # and real changes: v3...
    await eventually(lambda: _version_key_at_least(redis, 3))
    # the leader dies; the model key is made to hold the v1 checkpoint, as if it had died
    # before any later checkpoint (the hour-long interval held it back except when idle)
    await crash(p, task)
    await redis.set(keys.heatmap_model("SPX", STRAT), first_raw)
    q = Publisher(with_consumer(deps, "cp-2"), STRAT, PCFG, "SPX")
    stop2, task2 = start(q)
    try:
        await eventually(lambda: _leads(q), timeout_s=5)
        await dirty(redis, b, "e1", cids[6:12], NOW + 9 * SEC)
        await eventually(lambda: caught_up(redis))
        final = await model(redis)
        assert final is not None
        items, version = dict(snap["items"]), snap["version"]
        for _, d in await diffs(redis):
            if d.version > version:
                version = apply(items, version, d)
        assert version == final["version"] and items == final["items"]
        assert final["items"] == await staging_items(redis)
    finally:
        stop.set()
        stop2.set()
        await asyncio.wait_for(task2, 5)


async def _version_key_at_least(redis: Redis, version: int) -> bool:
    v = await redis.get(keys.heatmap_version("SPX", STRAT))
    return v is not None and int(v) >= version


async def _model_version_is(redis: Redis, version: int) -> bool:
    m = await model(redis)
    return m is not None and m["version"] == version


async def _leads(p: Publisher) -> bool:
    return p.leader


async def test_leader_crash_hands_over_without_version_regression(deps: Deps, redis: Redis) -> None:
    cids = await seed(redis)
    b = TileBuilder(deps, STRAT, TCFG)
    await b.handle([(b"1-0", entry(DirtyEntry("SPX", "e1", [], NOW, reason="epoch")))])
    a = Publisher(with_consumer(deps, "pub-a"), STRAT, PCFG, "SPX")
    stop_a, task_a = start(a)
    await eventually(lambda: _leads(a))
    s = Publisher(with_consumer(deps, "pub-b"), STRAT, PCFG, "SPX")
    stop_s, task_s = start(s)
    rng = random.Random(5)
    ts = NOW
    try:
        for _ in range(5):
            ts += SEC
            await dirty(redis, b, "e1", rng.sample(cids, 6), ts)
            await asyncio.sleep(0.03)
        assert not s.leader
        assert (
            await redis.xpending_range(
                keys.tiles_stream(STRAT, "SPX"),
                keys.PUBLISHER_GROUP,
                "-",
                "+",
                100,
                consumername="pub-b",
            )
            == []
        )  # the standby never read
        await crash(a, task_a)  # the lease stays until its TTL expires
        t0 = time.monotonic()
        for _ in range(4):  # changes keep coming during the takeover
            ts += SEC
            await dirty(redis, b, "e1", rng.sample(cids, 6), ts)
        await eventually(lambda: _leads(s), timeout_s=5)
        takeover = time.monotonic() - t0
        assert takeover < PCFG.lease_ttl_ms / 1000 + PCFG.renew_ms / 1000 + 1.5
        for _ in range(4):
            ts += SEC
            await dirty(redis, b, "e1", rng.sample(cids, 6), ts)
            await asyncio.sleep(0.03)
        await eventually(lambda: caught_up(redis))
        versions = [d.version for _, d in await diffs(redis)]
        assert versions == list(range(1, len(versions) + 1))  # no regression, no duplicate
        assert (await model(redis) or {})["version"] == versions[-1]
        assert count(a, "complete") == 1 and count(s, "complete") == 0
    finally:
        stop_s.set()
        stop_a.set()
        await asyncio.wait_for(task_s, 5)


@settings(max_examples=60, deadline=None)
@given(
    n_items=st.integers(0, 40),
    per_piece=st.integers(1, 50),
    meta=st.dictionaries(st.sampled_from(["n_tiles", "roots", 'x"y']), st.integers()),
    diff_id=st.one_of(st.none(), st.just("1-0")),
)
def test_model_pieces_join_to_the_model_json(
    n_items: int, per_piece: int, meta: dict[str, Any], diff_id: str | None
) -> None:
    items = {f"t{i}": msgspec.Raw(b'{"v":%d}' % i) for i in range(n_items)}
    m = PublishedModel("SPX", 'heatmap:"b"', "e1", 7, NOW, items, meta, diff_id)
    pieces = list(encode_model_pieces(m, per_piece))
    assert b"".join(pieces) == msgspec.json.encode(m)
    assert len(pieces) == -(-n_items // per_piece) + 1
    # marked: the same model to a JSON decoder, and cut at the marks into the head, each
    # piece of items (as an object once its comma is dropped) and the tail
    marked = b"".join(encode_model_pieces(m, per_piece, marked=True))
    assert msgspec.json.decode(marked) == msgspec.json.decode(msgspec.json.encode(m))
    head, *parts, tail = marked.split(PIECE_MARK)
    assert head.endswith(b',"items":{') and tail.startswith(b"},")
    assert len(parts) == -(-n_items // per_piece)
    got: dict[str, Any] = {}
    for part in parts:
        got.update(msgspec.json.decode(b"{" + part.removesuffix(b",") + b"}"))
    assert got == {k: {"v": i} for i, k in enumerate(items)}


async def test_a_reader_never_sees_a_partial_checkpoint(
    deps: Deps, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint is written one tile per round trip (here) into the leader's temp key;
    a reader polling the model key meanwhile sees the old checkpoint or the new one whole,
    and the temp key is gone once it is installed."""
    monkeypatch.setattr(
        publisher_mod, "encode_model_pieces", lambda m, **kw: encode_model_pieces(m, 1, **kw)
    )
    async with leading(deps, redis) as p:
        st_ = p.syms["SPX"]
        model_k = keys.heatmap_model("SPX", STRAT)
        old = await redis.get(model_k)
        new = PublishedModel(
            "SPX",
            p.kind,
            st_.epoch or "",
            st_.version,
            st_.ts_ns,
            st_.items,
            {"probe": 1},
            st_.diff_id,
        )
        token = p.token
        assert token is not None and len(st_.items) > 50
        tmp = keys.heatmap_model_tmp("SPX", STRAT, token)
        seen: list[tuple[bytes, int]] = []
        done = asyncio.Event()

        async def reader() -> None:
            while not done.is_set():
                pipe = redis.pipeline(transaction=True)
                pipe.get(model_k)
                pipe.exists(tmp)
                seen.append(tuple(await pipe.execute()))  # type: ignore[arg-type]

        task = asyncio.create_task(reader())
        try:
            assert await p._write_checkpoint("SPX", st_.version, new) == lua.Publish.OK
        finally:
            done.set()
            await task
        assert any(t for _, t in seen)  # the reader ran while the pieces were written
        want = b"".join(encode_model_pieces(new, 1, marked=True))
        assert msgspec.json.decode(want) == msgspec.json.decode(msgspec.json.encode(new))
        assert {v for v, _ in seen} <= {old, want}
        assert await redis.get(model_k) == want
        assert not await redis.exists(tmp) and await redis.ttl(model_k) == -1


async def test_a_checkpoint_is_fenced_checked_and_dropped_unless_installed(
    deps: Deps, redis: Redis
) -> None:
    """A stale leader's checkpoint (fence moved), one of a version no longer current, and a
    temp key that lost pieces (expired mid-write) are never installed, and leave no key."""
    async with leading(deps, redis) as p:
        st_ = p.syms["SPX"]
        model_k = keys.heatmap_model("SPX", STRAT)
        old = await redis.get(model_k)
        token = p.token
        assert token is not None
        tmp = keys.heatmap_model_tmp("SPX", STRAT, token)
        new = PublishedModel(
            "SPX", p.kind, st_.epoch or "", st_.version, st_.ts_ns, st_.items, {}, st_.diff_id
        )
        assert await p._write_checkpoint("SPX", st_.version + 1, new) == lua.Publish.MOVED
        await redis.set(tmp, b"{partial", px=60_000)
        rc = await p._checkpoint(
            redis,
            [
                p.lease.fence_key,
                p.lease.lease_key,
                keys.heatmap_version("SPX", STRAT),
                tmp,
                model_k,
            ],
            [str(token), p.lease.value, str(st_.version), "100"],
        )
        assert lua.Publish(int(rc)) == lua.Publish.TORN
        assert not await redis.exists(tmp)
        await redis.incr(p.lease.fence_key)  # another leader acquired: we are stale
        assert await p._write_checkpoint("SPX", st_.version, new) == lua.Publish.FENCED
        assert await redis.get(model_k) == old
        assert not await redis.exists(tmp)


async def test_a_snapshot_version_installs_its_checkpoint_with_its_diff_or_nothing(
    deps: Deps, redis: Redis
) -> None:
    """A whole model is a snapshot version: the publish script renames its checkpoint onto
    the model key with a diff that carries no items, the checkpoint's diff_id being the
    diff's id (re-rendered when the stream holds a later id). A refused publish (version
    moved, temp key torn, fenced) adds no diff, installs nothing and leaves no temp key."""
    async with leading(deps, redis) as p:
        st = p.syms["SPX"]
        stream = keys.heatmap_diffs_stream(STRAT, "SPX")
        model_k = keys.heatmap_model("SPX", STRAT)
        token = p.token
        assert token is not None
        tmp = keys.heatmap_model_tmp("SPX", STRAT, token)
        whole = {k: msgspec.Raw(b'{"w":1}') for k in st.items}
        future_ms = time.time_ns() // 1_000_000 + 3_600_000
        await redis.xadd(stream, {"d": b"{}"}, id=f"{future_ms}-5")
        v = st.version
        await p._commit(st, "complete", "e1", {}, [], dict(whole), None, len(whole))
        m = await model(redis)
        last_id, last = (await redis.xrevrange(stream, count=1))[0]
        d = msgspec.json.decode(last[b"d"], type=ModelDiff)
        assert d.snapshot and d.version == v + 1 and not d.changed and not d.removed
        assert m is not None and m["version"] == v + 1 and m["diff_id"] == f"{future_ms}-6"
        assert last_id.decode() == m["diff_id"] and st.checkpoint_id == m["diff_id"]
        assert m["items"] == {k: {"w": 1} for k in whole} and st.checkpointed == v + 1
        assert not await redis.exists(tmp)

        before, n = await redis.get(model_k), await redis.xlen(stream)
        head = st.head

        def other(diff_id: str) -> PublishedModel:
            return PublishedModel("SPX", p.kind, "e1", v + 2, 0, {}, {}, diff_id)

        moved, _ = await p._write("SPX", "e1", v + 1, b"{}", head, other)
        assert moved == lua.Publish.MOVED
        real = p._stage_model

        async def torn(key: str, model_: PublishedModel) -> int:
            return await real(key, model_) + 1  # as if a piece expired before the last

        p._stage_model = torn  # type: ignore[method-assign]
        assert (await p._write("SPX", "e1", v + 2, b"{}", head, other))[0] == lua.Publish.TORN
        p._stage_model = real  # type: ignore[method-assign]
        await redis.incr(p.lease.fence_key)  # another leader acquired: we are stale
        assert (await p._write("SPX", "e1", v + 2, b"{}", head, other))[0] == lua.Publish.FENCED
        assert await redis.get(model_k) == before and await redis.xlen(stream) == n
        assert not await redis.exists(tmp)


async def test_a_renew_in_flight_when_redis_dies_does_not_stall_the_leader(
    deps: Deps, redis: Redis
) -> None:
    """redis-py can surface the cancellation of a call in flight as a dead-socket error,
    which the renewer survives by design. When the lead loop meets the outage, the renewer
    must still end: the leader used to wait on it forever, reading and logging nothing,
    while the renewer kept the lease alive (seen once in CI after a Redis restart)."""
    async with leading(deps, redis) as p:
        in_flight = asyncio.Event()
        real_renew, real_evaluate = p._renew_once, p._evaluate

        async def renew_in_flight() -> bool:
            in_flight.set()
            try:
                await asyncio.sleep(30)  # the call Redis will not answer
            except asyncio.CancelledError:
                # what redis-py may raise when cancelled mid-read on a dying socket
                raise RedisConnectionError("Connection closed by server.") from None
            return True

        async def outage() -> None:
            await in_flight.wait()  # the lead loop meets the outage while a renew is out
            p._evaluate = real_evaluate  # type: ignore[method-assign]
            p._renew_once = real_renew  # type: ignore[method-assign]
            raise RedisConnectionError("Connection closed by server.")

        p._renew_once = renew_in_flight  # type: ignore[method-assign]
        p._evaluate = outage  # type: ignore[method-assign]
        outages = {"processor": p.name, "stream": "", "group": ""}

        async def recovered() -> bool:
            n = p.deps.registry.get_sample_value("massive_redis_errors_total", outages)
            return n == 1 and p.leader

        await eventually(recovered, timeout_s=5)
        v0 = int(await redis.get(keys.heatmap_version("SPX", STRAT)) or 0)
        b = TileBuilder(deps, STRAT, TCFG)
        cids = [c.decode() for c in await redis.smembers(keys.epoch_contracts("SPX", "e1"))]
        await dirty(redis, b, "e1", sorted(cids)[:6], NOW + 7 * SEC)
        await eventually(lambda: _version_key_at_least(redis, v0 + 1), timeout_s=5)
