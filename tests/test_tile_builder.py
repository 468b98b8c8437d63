"""Tile builder against a real Redis: full epoch install, incremental recompute of exactly
the affected tiles, admission, epoch gating and atomic epoch replacement."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from processors.heatmap import grid as hm
from processors.heatmap import tile_builder as tb
from processors.heatmap import tile_vec as tv
from processors.heatmap.tile_builder import QuoteParser, TileBuilder, TileSettings
from schemas import keys
from schemas.heatmap import TileDelta, TileView, split_staged
from schemas.messages import DirtyEntry, entry, from_entry
from streams.consumer import Entry
from streams.processor import Deps
from tests.factories import option_chain, seed_epoch
from tests.heatmap_reference import decode_view, reference_full_build, stage_value
from tests.util import eventually

NOW = 1_764_000_000_000_000_000
SEC = 1_000_000_000
EXPS = ["2026-12-01", "2026-12-02", "2026-12-03"]
STRIKES = [5950 + 5 * i for i in range(21)]
CFG = TileSettings(widths_spx=(5, 10, 20), n_expiries=2, drop_expired=False)


async def seed(redis: Redis, eid: str = "e1", created: int = NOW, **kw: object) -> list[str]:
    chain = option_chain("SPXW", EXPS, STRIKES, spot=6000, asof="2026-11-24")
    await seed_epoch(redis, eid, "SPX", chain, spot=6000, now_ns=created, **kw)  # type: ignore[arg-type]
    return [c.cid for c in chain]


def as_entries(*msgs: DirtyEntry) -> list[Entry]:
    return [(f"{i + 1}-0".encode(), entry(m)) for i, m in enumerate(msgs)]


async def staged(redis: Redis, strategy: str = "butterfly") -> dict[str, bytes]:
    raw = await redis.hgetall(keys.heatmap_staging("SPX", strategy))
    return {k.decode(): v for k, v in raw.items()}


def view_of(raw: bytes) -> TileView:
    return decode_view(split_staged(raw)[1])


async def staged_view(redis: Redis, strategy: str, tid: str) -> TileView:
    return view_of((await staged(redis, strategy))[tid])


async def deltas(redis: Redis, strategy: str = "butterfly") -> list[TileDelta]:
    return [
        from_entry(f, TileDelta) for _, f in await redis.xrange(keys.tiles_stream(strategy, "SPX"))
    ]


async def tick(redis: Redis, eid: str, cid: str, ts: int, bid: float, ask: float) -> None:
    """What the hydrator does for a newer quote (admission itself is the hydrator's job)."""
    await redis.hset(
        keys.epoch_contract("SPX", eid, cid),
        mapping={
            "bid": bid,
            "ask": ask,
            "mid": (bid + ask) / 2,
            "quote_ts": ts,
            "ts_ns": ts,
            "src": "ws",
        },
    )


async def assert_staging_matches_reference(redis: Redis, strategy: str, eid: str) -> None:
    ref = await reference_full_build(redis, eid, "SPX", strategy, CFG, NOW)
    got = await staged(redis, strategy)
    assert set(got) == set(ref)
    assert (await redis.hget(keys.heatmap_manifest("SPX", strategy), "epoch")) == eid.encode()
    diff = [k for k in ref if got[k] != stage_value(ref[k])]  # seq and published view
    assert not diff, diff[:5]


@pytest.mark.parametrize("strategy", hm.STRATEGIES)
async def test_epoch_entry_installs_every_tile(deps: Deps, redis: Redis, strategy: str) -> None:
    await seed(redis)
    b = TileBuilder(deps, strategy, CFG)
    await b.handle(as_entries(DirtyEntry("SPX", "e1", [], NOW, recv_ts_ns=NOW - 5, reason="epoch")))
    await assert_staging_matches_reference(redis, strategy, "e1")
    man = await redis.hgetall(keys.heatmap_manifest("SPX", strategy))
    assert msgspec.json.decode(man[b"roots"]) == {e: "SPXW" for e in EXPS[:2]}
    n = len(await staged(redis, strategy))
    assert man[b"epoch"] == b"e1" and int(man[b"expected"]) == n > 0
    (d,) = await deltas(redis, strategy)
    assert d.full and d.epoch == "e1" and d.expected == n and d.recv_ts_ns == NOW - 5


@pytest.mark.parametrize("seed_no", [1, 2, 3])
async def test_random_dirty_sequences_keep_staging_equal_to_full_rebuild(
    deps: Deps, redis: Redis, seed_no: int
) -> None:
    cids = await seed(redis)
    b = TileBuilder(deps, "butterfly", CFG)
    await b.handle(as_entries(DirtyEntry("SPX", "e1", [], NOW, reason="epoch")))
    rng = random.Random(seed_no)
    ts = NOW + SEC
    for _ in range(6):
        batch = rng.sample(cids, rng.randint(1, 12))
        for c in batch:
            ts += rng.randint(1, 3 * SEC)
            mid = rng.uniform(0.1, 80)
            await tick(redis, "e1", c, ts, round(mid - 0.05, 2), round(mid + 0.05, 2))
        before = await staged(redis)
        await redis.delete(keys.tiles_stream("butterfly", "SPX"))
        await b.handle(as_entries(DirtyEntry("SPX", "e1", batch, ts, recv_ts_ns=ts - 7)))
        after = await staged(redis)
        await assert_staging_matches_reference(redis, "butterfly", "e1")
        changed = {k for k in after if after[k] != before.get(k)}
        ds = await deltas(redis)
        announced = {i for d in ds for i in d.ids}
        assert changed <= announced  # every change announced...
        grid = await b._grid("SPX", "e1")
        assert announced <= set(grid.affected(batch))  # ...and only affected tiles recomputed
        assert all(d.recv_ts_ns == ts - 7 for d in ds)


async def test_update_of_a_non_newest_leg_is_admitted(deps: Deps, redis: Redis) -> None:
    """Admission uses the sum of leg ts: an update that does not raise the max leg ts (the
    tile's `ts`) still replaces the staged tile."""
    await seed(redis)
    b = TileBuilder(deps, "vertical", CFG)
    await b.handle(as_entries(DirtyEntry("SPX", "e1", [], NOW, reason="epoch")))
    tid = "SPX:2026-12-01:vertical:6000-6005:C"
    legs = (await b._grid("SPX", "e1")).specs[tid].legs
    c0, c1 = legs[0][0], legs[1][0]
    await tick(redis, "e1", c0, NOW + 10 * SEC, 50.0, 50.2)  # newest leg
    await b.handle(as_entries(DirtyEntry("SPX", "e1", [c0], NOW + 10 * SEC)))
    await tick(redis, "e1", c1, NOW + 5 * SEC, 40.0, 40.2)  # newer for c1, older than max
    await b.handle(as_entries(DirtyEntry("SPX", "e1", [c1], NOW + 5 * SEC)))
    assert (await staged_view(redis, "vertical", tid)).debit == pytest.approx(50.1 - 40.1)


@pytest.mark.parametrize("late", ["quote", "trade"])
async def test_update_older_than_the_other_kind_is_admitted(
    deps: Deps, redis: Redis, late: str
) -> None:
    """A quote older than the contract's newest trade (or a trade older than its newest
    quote) changes the values without moving the contract's ts_ns = max(quote_ts,
    trade_ts); the recomputed tile must still replace the staged one (a REST re-seed and
    the WS interleave like that; seen as a tile differing after a Redis restart)."""
    await seed(redis)
    b = TileBuilder(deps, "single", CFG)
    await b.handle(as_entries(DirtyEntry("SPX", "e1", [], NOW, reason="epoch")))
    tid = "SPX:2026-12-01:single:6000:C"
    cid = (await b._grid("SPX", "e1")).specs[tid].legs[0][0]
    key = keys.epoch_contract("SPX", "e1", cid)
    if late == "quote":
        # newest trade at +60 s, quote at +10 s (stale): the tile prices off the last trade
        await redis.hset(key, mapping={"bid": 9.0, "ask": 9.2, "mid": 9.1,
                                       "quote_ts": NOW + 10 * SEC, "last": 7.0,
                                       "trade_ts": NOW + 60 * SEC, "ts_ns": NOW + 60 * SEC,
                                       "src": "ws"})  # fmt: skip
        await b.handle(as_entries(DirtyEntry("SPX", "e1", [cid], NOW + 60 * SEC)))
        assert (await staged_view(redis, "single", tid)).debit == pytest.approx(7.0)
        # a quote at +55 s (newer than the stored quote, older than ts_ns): now fresh
        await redis.hset(key, mapping={"bid": 8.0, "ask": 8.2, "mid": 8.1,
                                       "quote_ts": NOW + 55 * SEC})  # fmt: skip
        want = 8.1
    else:
        # newest quote at +60 s but no usable mid: the tile prices off the last trade
        await redis.hdel(key, "bid", "ask", "mid")
        await redis.hset(key, mapping={"quote_ts": NOW + 60 * SEC, "last": 7.0,
                                       "trade_ts": NOW + 10 * SEC, "ts_ns": NOW + 60 * SEC,
                                       "src": "ws"})  # fmt: skip
        await b.handle(as_entries(DirtyEntry("SPX", "e1", [cid], NOW + 60 * SEC)))
        assert (await staged_view(redis, "single", tid)).debit == pytest.approx(7.0)
        await redis.hset(key, mapping={"last": 6.5, "trade_ts": NOW + 55 * SEC})
        want = 6.5
    await b.handle(as_entries(DirtyEntry("SPX", "e1", [cid], NOW + 60 * SEC)))
    assert (await staged_view(redis, "single", tid)).debit == pytest.approx(want)
    await assert_staging_matches_reference(redis, "single", "e1")


async def test_older_tile_is_not_admitted_and_redelivery_reannounces(
    deps: Deps, redis: Redis
) -> None:
    cids = await seed(redis)
    b = TileBuilder(deps, "single", CFG)
    await b.handle(as_entries(DirtyEntry("SPX", "e1", [], NOW, reason="epoch")))
    c = cids[0]
    await tick(redis, "e1", c, NOW + 9 * SEC, 1.0, 1.2)
    msg = DirtyEntry("SPX", "e1", [c], NOW + 9 * SEC)
    await b.handle(as_entries(msg))
    tid = next(iter((await b._grid("SPX", "e1")).affected([c])))
    good = (await staged(redis, "single"))[tid]
    # a slow replica computed from older values: its write is refused
    spec = (await b._grid("SPX", "e1")).specs[tid]
    old = (spec.id, hm.staged_value(spec, {c: None}, CFG.max_quote_age_ns))
    assert await b._stage_tiles("SPX", "e1", [old[0]], [old[1]]) == [-1]
    assert (await staged(redis, "single"))[tid] == good
    # Redelivery of the same dirty entry after its delta was lost: announced again. (The
    # optimistic write puts values and delta in one transaction, so "values staged, delta
    # lost" takes another writer in between, which the manifest's writer field shows.)
    await redis.hset(keys.heatmap_manifest("SPX", "single"), "writer", "admission")
    await redis.delete(keys.tiles_stream("single", "SPX"))
    await b.handle(as_entries(msg))
    assert [d.ids for d in await deltas(redis, "single")] == [[tid]]
    assert (await staged(redis, "single"))[tid] == good


async def test_restaging_a_tile_with_its_staged_seq_is_a_no_op(deps: Deps, redis: Redis) -> None:
    """Admission keeps the first value of a seq: the same value again, or another value with
    the same seq (a replica that read the same legs), changes nothing, is counted "equal"
    and does not mark staging as written by admission."""
    await seed(redis)
    b = TileBuilder(deps, "single", CFG)
    await b.handle(as_entries(DirtyEntry("SPX", "e1", [], NOW, reason="epoch")))
    before = await staged(redis, "single")
    man = keys.heatmap_manifest("SPX", "single")
    writer = await redis.hget(man, "writer")
    assert writer != b"admission"
    tid, good = next(iter(before.items()))
    seq, _ = split_staged(good)
    other = b"%d:%b" % (seq, b'{"legs":[],"debit":null}')
    assert await b._stage_tiles("SPX", "e1", [tid, tid], [good, other]) == [0, 0]
    assert await staged(redis, "single") == before
    assert await redis.hget(man, "writer") == writer
    n_equal = deps.registry.get_sample_value(
        "massive_tiles_staged_total", {"strategy": "single", "result": "equal"}
    )
    assert n_equal == 2
    # one more than the staged seq is admitted (the boundary above)
    newer = b"%d:%b" % (seq + 1, good.partition(b":")[2])
    assert await b._stage_tiles("SPX", "e1", [tid], [newer]) == [1]
    assert (await staged(redis, "single"))[tid] == newer
    assert await redis.hget(man, "writer") == b"admission"
    # a replica still computing an epoch that staging no longer holds writes nothing
    older = b"%d:%b" % (seq + 2, good.partition(b":")[2])
    assert await b._stage_tiles("SPX", "e0", [tid], [older]) is None
    assert (await staged(redis, "single"))[tid] == newer


async def test_entries_of_a_non_active_epoch_are_skipped_and_counted(
    deps: Deps, redis: Redis
) -> None:
    cids = await seed(redis)
    b = TileBuilder(deps, "butterfly", CFG)
    await b.handle(as_entries(DirtyEntry("SPX", "e1", [], NOW, reason="epoch")))
    before = await staged(redis)
    await redis.delete(keys.tiles_stream("butterfly", "SPX"))
    await tick(redis, "e1", cids[5], NOW + SEC, 3.0, 3.4)
    await b.handle(
        [
            *as_entries(
                DirtyEntry("SPX", "warming-x", cids[:3], NOW, reason="epoch"),
                DirtyEntry("SPX", "retired-y", cids[5:6], NOW),
            ),
            (b"9-0", {b"d": b"not json"}),
        ]
    )
    assert await staged(redis) == before and await deltas(redis) == []
    skipped = deps.registry.get_sample_value(
        "massive_tile_builder_skipped_total", {"strategy": "butterfly", "reason": "inactive_epoch"}
    )
    bad = deps.registry.get_sample_value(
        "massive_tile_builder_skipped_total", {"strategy": "butterfly", "reason": "bad_entry"}
    )
    assert (skipped, bad) == (2, 1)


async def test_new_epoch_replaces_staging_and_older_epoch_never_comes_back(
    deps: Deps, redis: Redis
) -> None:
    await seed(redis, "e1", created=NOW)
    b = TileBuilder(deps, "butterfly", CFG)
    await b.handle(as_entries(DirtyEntry("SPX", "e1", [], NOW, reason="epoch")))
    old_ids = set(await staged(redis))
    # a new topology: strikes shifted by 100 -> a different tile set
    chain = option_chain("SPXW", EXPS, [k + 100 for k in STRIKES], spot=6100, asof="2026-11-24")
    await seed_epoch(redis, "e2", "SPX", chain, spot=6100, now_ns=NOW + 60 * SEC)
    await b.handle(as_entries(DirtyEntry("SPX", "e2", [], NOW, reason="epoch")))
    new = await staged(redis)
    assert new and old_ids - set(new)  # e1-only tiles existed and are gone from staging
    await assert_staging_matches_reference(redis, "butterfly", "e2")
    # a slow replica finishing a full build of the retired e1 cannot reinstall it
    await redis.set(keys.epoch_active("SPX"), "e1")  # (as seen by that replica's read)
    b2 = TileBuilder(deps, "butterfly", CFG)
    assert await b2.full_build("SPX", "e1", recv_ts_ns=None, n_dirty=0) == "superseded"
    assert await staged(redis) == new
    assert (await redis.hget(keys.heatmap_manifest("SPX", "butterfly"), "epoch")) == b"e2"


async def test_old_epoch_grid_and_table_are_dropped_before_the_new_ones_are_built(
    deps: Deps, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await seed(redis, "e1", created=NOW)
    b = TileBuilder(deps, "vertical", CFG)
    await b.handle(as_entries(DirtyEntry("SPX", "e1", [], NOW, reason="epoch")))
    assert b._tables["SPX"][0] == "e1"
    held: list[tuple[object, object]] = []
    real_make = tb.make_grid

    def spy(*args: Any, **kw: Any) -> hm.Grid:
        held.append((b._grids.get("SPX"), b._tables.get("SPX")))
        return real_make(*args, **kw)

    monkeypatch.setattr(tb, "make_grid", spy)
    chain = option_chain("SPXW", EXPS, [k + 100 for k in STRIKES], spot=6100, asof="2026-11-24")
    await seed_epoch(redis, "e2", "SPX", chain, spot=6100, now_ns=NOW + 60 * SEC)
    await b.handle(as_entries(DirtyEntry("SPX", "e2", [], NOW, reason="epoch")))
    assert held == [(None, None)]  # nothing of e1 was alive while e2's grid was loaded
    assert b._grids["SPX"][0] == b._tables["SPX"][0] == "e2"
    await assert_staging_matches_reference(redis, "vertical", "e2")


def test_leg_memo_is_bounded_and_keeps_recent_replies() -> None:
    parse = QuoteParser(max_entries=100)

    def reply(i: int) -> bytes:
        return f"{i}.5|{i}.7||{NOW + i}||||ws|{NOW + i}".encode()

    first = parse.pair(reply(0))
    for i in range(1, 40):
        parse.pair(reply(i))
    assert parse.pair(reply(0)) is first  # memoised
    for i in range(1000):
        parse.pair(reply(i))
        assert len(parse) <= 100
    recent = parse.pair(reply(999))
    assert parse.pair(reply(999)) is recent
    q = parse(reply(7))
    assert q is not None and q.bid == 7.5 and q.src == "ws"


async def test_run_bootstraps_an_active_epoch_and_consumes_the_stream(
    deps: Deps, redis: Redis
) -> None:
    cids = await seed(redis)
    b = TileBuilder(deps, "vertical", CFG)
    stop = asyncio.Event()
    task = asyncio.create_task(b.run(stop))
    try:

        async def installed() -> bool:
            return await redis.hget(keys.heatmap_manifest("SPX", "vertical"), "epoch") == b"e1"

        await eventually(installed)
        await tick(redis, "e1", cids[10], NOW + 3 * SEC, 7.0, 7.5)
        await redis.xadd(
            keys.contracts_dirty_stream("SPX"),
            entry(DirtyEntry("SPX", "e1", [cids[10]], NOW + 3 * SEC)),  # type: ignore[arg-type]
        )

        async def incremental_seen() -> bool:
            return any(not d.full for d in await deltas(redis, "vertical"))

        await eventually(incremental_seen)
        await assert_staging_matches_reference(redis, "vertical", "e1")
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


def _counter(deps: Deps, name: str, **labels: str) -> float:
    return deps.registry.get_sample_value(name, labels) or 0.0


async def test_lone_builder_stages_optimistically_without_the_admission_script(
    deps: Deps, redis: Redis
) -> None:
    cids = await seed(redis)
    b = TileBuilder(deps, "vertical", CFG)
    await b.handle(as_entries(DirtyEntry("SPX", "e1", [], NOW, reason="epoch")))
    await redis.config_resetstat()
    c = cids[5]
    await tick(redis, "e1", c, NOW + 3 * SEC, 4.0, 4.4)
    await b.handle(as_entries(DirtyEntry("SPX", "e1", [c], NOW + 3 * SEC)))
    stats = await redis.info("commandstats")
    assert "cmdstat_exec" in stats  # MULTI/EXEC of plain HSETs...
    staged_calls = stats.get("cmdstat_evalsha", {}).get("calls", 0)
    fetch_calls = -(-len((await b._table("SPX", "e1")).leg_contracts(
        (await b._table("SPX", "e1")).affected([c]))) // CFG.fetch_chunk)  # fmt: skip
    assert staged_calls == fetch_calls  # ...and no staging script: only the leg reads
    await assert_staging_matches_reference(redis, "vertical", "e1")
    assert _counter(deps, "massive_tile_stage_conflicts_total", strategy="vertical") == 0


async def test_staging_written_meanwhile_falls_back_to_admission(deps: Deps, redis: Redis) -> None:
    """A replica (or an install) writes staging between our WATCH and EXEC: EXEC aborts and
    our values go through the admission script, which keeps the replica's newer tile and
    stages the rest of ours; the staging equals the full rebuild once all is processed."""
    cids = await seed(redis)
    b = TileBuilder(deps, "vertical", CFG)
    await b.handle(as_entries(DirtyEntry("SPX", "e1", [], NOW, reason="epoch")))
    c = cids[5]
    table = await b._table("SPX", "e1")
    tids = table.tile_ids(table.affected([c]))
    victim = tids[0]
    newer = b"9" * 30 + b':{"legs":[],"flags":["from_a_replica"]}'
    real_values = b._values

    async def compute_then_replica_writes(*a: object) -> tuple[list[str], list[bytes]]:
        out = await real_values(*a)  # type: ignore[arg-type]
        await redis.hset(keys.heatmap_staging("SPX", "vertical"), victim, newer)
        return out

    b._values = compute_then_replica_writes  # type: ignore[method-assign,assignment]
    await tick(redis, "e1", c, NOW + 3 * SEC, 4.0, 4.4)
    await redis.delete(keys.tiles_stream("vertical", "SPX"))
    await b.handle(as_entries(DirtyEntry("SPX", "e1", [c], NOW + 3 * SEC)))
    assert _counter(deps, "massive_tile_stage_conflicts_total", strategy="vertical") == 1
    got = await staged(redis, "vertical")
    assert got[victim] == newer  # the newer (higher seq) value is not overwritten
    assert _counter(deps, "massive_tiles_staged_total", strategy="vertical", result="older") == 1
    ref = await reference_full_build(redis, "e1", "SPX", "vertical", CFG, NOW)
    for t in tids[1:]:
        assert got[t] == stage_value(ref[t])  # the rest of ours landed through admission
    (d,) = await deltas(redis, "vertical")
    assert set(d.ids) == set(tids) - {victim}  # the refused tile is the replica's to announce


async def test_lone_builder_announces_only_changed_views(
    deps: Deps, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recomputed tile whose published view did not change (a newer quote with the same
    prices) is staged with its new seq but not announced; a changed view is; any foreign
    write to staging makes the builder announce everything again. (Batches below
    tile_vec.SMALL_BATCH take the per-tile path, which has no view keys and announces all;
    this batch is small, so the numpy path is forced.)"""
    monkeypatch.setattr(tv, "SMALL_BATCH", 0)
    cids = await seed(redis)
    b = TileBuilder(deps, "vertical", CFG)
    await b.handle(as_entries(DirtyEntry("SPX", "e1", [], NOW, reason="epoch")))
    c = cids[5]
    table = await b._table("SPX", "e1")
    tids = set(table.tile_ids(table.affected([c])))

    async def step(ts: int, bid: float, ask: float) -> set[str]:
        await tick(redis, "e1", c, ts, bid, ask)
        await redis.delete(keys.tiles_stream("vertical", "SPX"))
        await b.handle(as_entries(DirtyEntry("SPX", "e1", [c], ts)))
        await assert_staging_matches_reference(redis, "vertical", "e1")
        return {i for d in await deltas(redis, "vertical") for i in d.ids}

    assert await step(NOW + 3 * SEC, 4.0, 4.4) == tids  # writer was the install: all
    assert await step(NOW + 4 * SEC, 4.1, 4.5) == tids  # every view changed
    # a newer quote, same prices, same second (age_s is part of the view): nothing new
    assert await step(NOW + 4 * SEC + 1, 4.1, 4.5) == set()
    assert _counter(deps, "massive_tiles_unchanged_total", strategy="vertical") == len(tids)
    await redis.hset(keys.heatmap_manifest("SPX", "vertical"), "writer", "admission")
    assert await step(NOW + 4 * SEC + 2, 4.1, 4.5) == tids  # someone else wrote: all
    assert await step(NOW + 4 * SEC + 3, 4.1, 4.5) == set()


@pytest.mark.parametrize("chunk", [7, 70])
@pytest.mark.parametrize("strategy", hm.STRATEGIES)
async def test_full_build_in_chunks_installs_what_one_chunk_does(
    deps: Deps, redis: Redis, strategy: str, chunk: int
) -> None:
    """A full build computes and writes ``build_chunk`` tiles at a time (its memory peak);
    chunks below and above tile_vec's per-tile threshold give the one-step build's bytes."""
    await seed(redis)
    whole = TileBuilder(deps, strategy, CFG)
    assert await whole.full_build("SPX", "e1", recv_ts_ns=None, n_dirty=0) == "installed"
    one_step = await staged(redis, strategy)
    assert len(one_step) > chunk
    await redis.delete(
        keys.heatmap_staging("SPX", strategy), keys.heatmap_manifest("SPX", strategy)
    )
    cfg = TileSettings(
        widths_spx=CFG.widths_spx, n_expiries=2, drop_expired=False, build_chunk=chunk
    )
    b = TileBuilder(deps, strategy, cfg)
    assert await b.full_build("SPX", "e1", recv_ts_ns=None, n_dirty=0) == "installed"
    assert await staged(redis, strategy) == one_step
    await assert_staging_matches_reference(redis, strategy, "e1")
    # A replica that finds the epoch installed merges through admission, chunk by chunk:
    # the legs that moved meanwhile are in staging afterwards, nothing else changed.
    cids = [c.cid for c in option_chain("SPXW", EXPS, STRIKES, spot=6000, asof="2026-11-24")]
    await tick(redis, "e1", cids[3], NOW + 5 * SEC, 1.0, 1.2)
    assert await b.full_build("SPX", "e1", recv_ts_ns=None, n_dirty=0) == "merged"
    await assert_staging_matches_reference(redis, strategy, "e1")
    assert not await redis.exists(keys.heatmap_build("SPX", strategy, b.spec.consumer))


async def test_a_batch_touching_more_tiles_than_a_chunk_is_staged_in_parts(
    deps: Deps, redis: Redis
) -> None:
    """A dirty batch whose tiles exceed ``build_chunk`` (a catch-up, a wide re-seed) is
    written as several transactions, each with its delta; staging ends as a full rebuild's
    and every changed tile is announced."""
    cids = await seed(redis)
    cfg = TileSettings(widths_spx=CFG.widths_spx, n_expiries=2, drop_expired=False, build_chunk=40)
    b = TileBuilder(deps, "butterfly", cfg)
    await b.handle(as_entries(DirtyEntry("SPX", "e1", [], NOW, reason="epoch")))
    before = await staged(redis)
    await redis.delete(keys.tiles_stream("butterfly", "SPX"))
    rng = random.Random(5)
    ts = NOW + SEC
    for c in cids:
        ts += 1000
        mid = rng.uniform(0.1, 80)
        await tick(redis, "e1", c, ts, round(mid - 0.05, 2), round(mid + 0.05, 2))
    await b.handle(as_entries(DirtyEntry("SPX", "e1", cids, ts, recv_ts_ns=ts - 7)))
    await assert_staging_matches_reference(redis, "butterfly", "e1")
    after = await staged(redis)
    ds = await deltas(redis)
    assert len(ds) > len(before) // 40  # written in parts of at most ~40 tiles
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed and changed <= {i for d in ds for i in d.ids}
    assert all(len(d.ids) <= 40 for d in ds)
