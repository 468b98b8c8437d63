"""GEX builder processor against a real Redis (tests/conftest.py private server)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from typing import Any

import httpx
import msgspec
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from processors.gex import exposure as gex_math
from processors.gex.calculator import GexBuilder, GexSettings, build
from processors.serve.gateway import SseSettings, create_app
from schemas import keys
from schemas.messages import (
    ChainContract,
    GexLevels,
    GexRow,
    ModelDiff,
    PublishedModel,
    encode_gex_source,
    from_entry,
)
from streams.clock import ManualClock, SystemClock
from streams.processor import Deps
from streams.settings import RuntimeSettings
from tests.factories import contract, seed_epoch
from tests.util import eventually

NOW_NS = int(dt.datetime(2026, 3, 16, 15, 0, tzinfo=dt.UTC).timestamp()) * 10**9  # Mon 11:00 NY
TODAY, FRI = "2026-03-16", "2026-03-20"
SPOT = 6800.0

# shares = gamma * OI * 100 (see tests/test_gex_math.py for the same arithmetic)
CHAIN = [
    contract("SPXW", FRI, "C", 6800, gamma=0.002, oi=1000, iv=0.16),  # 200
    contract("SPX", FRI, "C", 6800, gamma=0.001, oi=500, iv=0.16),  # 50 -> 250 at 6800/FRI
    contract("SPXW", FRI, "P", 6800, gamma=0.002, oi=300, iv=0.16),  # 60
    contract("SPXW", FRI, "P", 6750, gamma=0.0015, oi=2000, iv=0.18),  # 300
    contract("SPXW", FRI, "C", 6850, gamma=0.0015, oi=400, iv=0.15),  # 60
    contract("SPXW", TODAY, "C", 6800, gamma=0.004, oi=100, iv=0.14),  # 40 (0DTE)
    contract("SPXW", TODAY, "P", 6750, gamma=0.001, oi=100, iv=0.17),  # 10 (0DTE)
]


def settings(**kw: Any) -> GexSettings:
    base: dict[str, Any] = dict(interval_s=2.0, reprice_interval_s=600.0)
    base.update(kw)
    return GexSettings(**base)


def make(
    redis: Redis, rt: RuntimeSettings, clock: ManualClock | SystemClock, **kw: Any
) -> tuple[GexBuilder, CollectorRegistry]:
    reg = CollectorRegistry()
    deps = Deps(redis=redis, settings=rt, registry=reg, clock=clock)
    return GexBuilder(deps, settings(**kw), "SPX"), reg


async def model(redis: Redis, sym: str = "SPX") -> PublishedModel:
    raw = await redis.get(keys.gex_model(sym))
    assert raw is not None
    return msgspec.json.decode(raw, type=PublishedModel)


async def diffs(redis: Redis) -> list[tuple[str, ModelDiff]]:
    out = []
    for eid, fields in await redis.xrange(keys.gex_diffs_stream("SPX")):
        out.append((eid.decode(), from_entry(fields, ModelDiff)))
    return out


async def set_row(redis: Redis, eid: str, c: ChainContract, **changes: float | None) -> None:
    raw = await redis.hget(keys.epoch_gex("SPX", eid), c.cid)
    row = msgspec.json.decode(raw, type=GexRow)
    row = msgspec.structs.replace(row, **changes)
    await redis.hset(keys.epoch_gex("SPX", eid), c.cid, msgspec.json.encode(row))


async def test_publishes_model_legacy_keys_and_diff_atomically(
    redis: Redis, settings: RuntimeSettings
) -> None:
    await seed_epoch(redis, "e1", "SPX", CHAIN, spot=SPOT, now_ns=NOW_NS)
    clock = ManualClock(NOW_NS + 10**9)
    b, reg = make(redis, settings, clock)
    await b.tick()
    assert b.leader
    m = await model(redis)
    assert (m.symbol, m.kind, m.epoch, m.version) == ("SPX", "gex", "e1", 1)
    assert set(m.items) == {"6750", "6800", "6850"}
    assert m.items["6800"]["calls"] == pytest.approx(290)  # 200 + 50 (SPX+SPXW) + 40
    assert m.items["6800"]["puts"] == pytest.approx(-60)
    assert m.items["6750"]["puts"] == pytest.approx(-310)
    assert m.items["6750"]["puts_0dte"] == pytest.approx(-10)
    assert m.items["6800"]["net_usd"] == pytest.approx(230 * SPOT * SPOT * 0.01, abs=0.01)
    meta = m.meta
    assert meta["spot"] == SPOT and meta["spot_source"] == "latest"
    assert meta["epoch"] == "e1" and meta["n_contracts"] == 7 and meta["n_missing_greeks"] == 0
    assert meta["expiries"] == [TODAY, FRI] and meta["today"] == TODAY
    lv = meta["levels"]["all"]
    assert (lv["call_wall"], lv["put_wall"], lv["abs_gamma_strike"]) == (6800, 6750, 6800)
    assert "zero_gamma" in lv and "zero_gamma_reason" in lv
    assert "zero_gamma" in meta["levels"]["0dte"]
    assert meta["totals"]["all"]["net"] == pytest.approx(350 - 370)
    assert meta["snapshot_ts_ns"] == NOW_NS
    ds = await diffs(redis)
    assert len(ds) == 1
    diff_id, d = ds[0]
    assert m.diff_id == diff_id
    assert (d.version, d.prev_version, d.kind, d.epoch) == (1, 0, "gex", "e1")
    assert d.changed == m.items and d.removed == []
    assert d.meta["levels"] == meta["levels"]
    for key, sign in ((keys.gex_model_calls("SPX"), 1), (keys.gex_model_puts("SPX"), -1)):
        legacy = msgspec.json.decode(await redis.get(key))
        assert legacy["symbol"] == "SPX" and legacy["version"] == 1 and legacy["epoch"] == "e1"
        assert legacy["ts"] == pytest.approx((NOW_NS + 10**9) / 1e9)
        for exp, strikes in legacy["expirations"].items():
            for k, v in strikes.items():
                assert v >= 0
                side = "calls" if sign == 1 else "puts"
                assert k in m.items and exp in (TODAY, FRI)
                assert sign * m.items[k][side] >= v - 1e-6
    calls = msgspec.json.decode(await redis.get(keys.gex_model_calls("SPX")))
    assert calls["expirations"][FRI]["6800"] == pytest.approx(250)  # summed, not overwritten
    puts = msgspec.json.decode(await redis.get(keys.gex_model_puts("SPX")))
    assert puts["expirations"] == {
        FRI: {"6750": pytest.approx(300), "6800": pytest.approx(60)},
        TODAY: {"6750": pytest.approx(10)},
    }
    count = reg.get_sample_value("massive_tick_to_publish_seconds_count", {"model": "gex"})
    assert count == 1
    assert reg.get_sample_value("massive_tick_to_publish_seconds_sum", {"model": "gex"}) == 1.0
    assert reg.get_sample_value("massive_gex_build_seconds_count", {"symbol": "SPX"}) == 1


async def test_identical_inputs_publish_no_new_version_and_oi_change_is_sparse(
    redis: Redis, settings: RuntimeSettings
) -> None:
    await seed_epoch(redis, "e1", "SPX", CHAIN, spot=SPOT, now_ns=NOW_NS)
    clock = ManualClock(NOW_NS)
    b, reg = make(redis, settings, clock)
    await b.tick()
    # the normalizer re-seeds the same values with a newer snapshot time: still no version
    # (levels and exposures are time-valued: the same clock gives the same model)
    await seed_epoch(redis, "e1", "SPX", CHAIN, spot=SPOT, now_ns=NOW_NS + 5 * 10**9)
    assert await b.build("SPX", "e1", b.state["SPX"], clock.monotonic()) == "unchanged"
    for _ in range(3):
        clock.advance(2.5)
        await b.tick()
    assert (await model(redis)).version == 1
    assert len(await diffs(redis)) == 1
    same = reg.get_sample_value(
        "massive_gex_builds_total", {"symbol": "SPX", "outcome": "same_inputs"}
    )
    assert same == 3
    unchanged = reg.get_sample_value(
        "massive_gex_builds_total", {"symbol": "SPX", "outcome": "unchanged"}
    )
    assert unchanged == 1

    await set_row(redis, "e1", CHAIN[4], oi=800.0)  # 6850 call: 60 -> 120 shares
    await b.tick()  # not due yet (cadence): nothing happens
    assert (await model(redis)).version == 1
    clock.advance(2.5)
    await b.tick()
    m = await model(redis)
    assert m.version == 2
    ds = await diffs(redis)
    assert len(ds) == 2
    diff_id, d = ds[-1]
    assert m.diff_id == diff_id
    assert (d.version, d.prev_version) == (2, 1)
    assert set(d.changed) == {"6850"}
    assert d.changed["6850"]["calls"] == pytest.approx(120)
    assert d.removed == []
    assert d.meta["totals"]["all"]["calls"] == pytest.approx(350 + 60)
    assert m.items["6850"]["calls"] == pytest.approx(120)


async def test_a_chain_head_moved_under_the_leader_is_resynced_not_overwritten(
    redis: Redis, settings: RuntimeSettings
) -> None:
    """Redis holds another history than the leader's (it lost our last version, or another
    leader published): the publish is refused, the leader reloads what is published and its
    next version continues that chain."""
    await seed_epoch(redis, "e1", "SPX", CHAIN, spot=SPOT, now_ns=NOW_NS)
    clock = ManualClock(NOW_NS)
    b, reg = make(redis, settings, clock)
    await b.tick()
    assert len(await diffs(redis)) == 1
    await redis.set(keys.gex_head("SPX"), "1-1")  # a head that is not our last diff
    await set_row(redis, "e1", CHAIN[4], oi=800.0)
    clock.advance(2.5)
    await b.tick()
    assert len(await diffs(redis)) == 1 and (await model(redis)).version == 1
    resync = reg.get_sample_value(
        "massive_gex_builds_total", {"symbol": "SPX", "outcome": "resync"}
    )
    assert resync == 1
    clock.advance(2.5)
    await b.tick()
    (last_id, last), *_ = reversed(await diffs(redis))
    assert (last.version, last.prev_id) == (2, "1-1")
    assert await redis.get(keys.gex_head("SPX")) == last_id.encode()


async def test_reprice_interval_rebuilds_same_inputs(
    redis: Redis, settings: RuntimeSettings
) -> None:
    await seed_epoch(redis, "e1", "SPX", CHAIN, spot=SPOT, now_ns=NOW_NS)
    clock = ManualClock(NOW_NS)
    b, reg = make(redis, settings, clock, reprice_interval_s=10.0)
    await b.tick()
    clock.advance(11)
    await b.tick()
    built = sum(
        reg.get_sample_value("massive_gex_builds_total", {"symbol": "SPX", "outcome": o}) or 0
        for o in ("published", "unchanged")
    )
    assert built == 2
    m = await model(redis)
    # a new version only if time decay moved the zero-gamma level; items never change
    ds = await diffs(redis)
    assert m.version == len(ds)
    if m.version == 2:
        assert ds[-1][1].changed == {}


async def test_epoch_promotion_is_built_immediately(
    redis: Redis, settings: RuntimeSettings
) -> None:
    await seed_epoch(redis, "e1", "SPX", CHAIN, spot=SPOT, now_ns=NOW_NS)
    clock = ManualClock(NOW_NS)
    b, _ = make(redis, settings, clock)
    await b.tick()
    new_chain = [c for c in CHAIN if c.strike != 6850] + [
        contract("SPXW", FRI, "C", 6900, gamma=0.001, oi=10, iv=0.15)
    ]
    await seed_epoch(redis, "e2", "SPX", new_chain, spot=SPOT, now_ns=NOW_NS)
    await b.tick()  # no clock advance: built because the active epoch changed
    m = await model(redis)
    assert (m.version, m.epoch) == (2, "e2")
    _, d = (await diffs(redis))[-1]
    assert d.epoch == "e2" and d.removed == ["6850"] and set(d.changed) == {"6900"}
    assert m.meta["epoch"] == "e2"


async def test_missing_greeks_and_bad_rows_are_counted_not_fatal(
    redis: Redis, settings: RuntimeSettings
) -> None:
    chain = [
        *CHAIN,
        contract("SPXW", FRI, "C", 6900, gamma=None, oi=100, iv=0.15),
        contract("SPXW", FRI, "P", 6900, gamma=0.001, oi=None, iv=0.15),
    ]
    await seed_epoch(redis, "e1", "SPX", chain, spot=SPOT, now_ns=NOW_NS)
    await redis.hset(keys.epoch_gex("SPX", "e1"), "O:SPXW260320C06950000", b"garbage")
    b, reg = make(redis, settings, ManualClock(NOW_NS))
    await b.tick()
    m = await model(redis)
    # no gamma: re-priced from its IV; no OI: excluded; undecodable: rejected
    assert m.meta["n_missing_greeks"] == 1
    assert m.meta["rejected"] == {"undecodable": 1}
    assert m.meta["n_contracts"] == len(CHAIN) + 1
    cov = m.meta["coverage"]
    assert cov["excluded"] == {"no_oi": 1} and cov["repriced_gamma"] == 1
    assert cov["scope"] == "window" and cov["expirations"] == 2
    assert m.items["6900"]["calls"] > 0 and m.items["6900"]["puts"] == 0
    assert reg.get_sample_value("massive_gex_missing_greeks_total", {"symbol": "SPX"}) == 1
    rej = reg.get_sample_value(
        "massive_gex_rejected_total", {"symbol": "SPX", "reason": "undecodable"}
    )
    assert rej == 1
    # a spot-only rebuild reuses the prepared projection: nothing is counted twice
    await redis.hset(keys.SPOT_LATEST, "SPX", repr(SPOT + 1))
    b.clock.advance(2.5)  # type: ignore[attr-defined]
    await b.tick()
    assert (await model(redis)).version == 2
    assert reg.get_sample_value("massive_gex_missing_greeks_total", {"symbol": "SPX"}) == 1


async def test_loop_survives_errors_and_recovers(
    redis: Redis, settings: RuntimeSettings, registry: CollectorRegistry
) -> None:
    await seed_epoch(redis, "e1", "SPX", CHAIN, spot=SPOT, now_ns=NOW_NS)
    await redis.delete(keys.epoch_gex("SPX", "e1"))
    await redis.set(keys.epoch_gex("SPX", "e1"), b"not a hash")  # HGETALL -> WRONGTYPE
    deps = Deps(redis=redis, settings=settings, registry=registry, clock=SystemClock())
    b = GexBuilder(deps, settings_fast(), "SPX")
    stop = asyncio.Event()
    task = asyncio.create_task(b.run(stop))
    try:

        async def errors() -> bool:
            return (registry.get_sample_value("massive_gex_errors_total") or 0) >= 2

        await eventually(errors)
        assert not task.done()
        await redis.delete(keys.epoch_gex("SPX", "e1"))
        await seed_epoch(redis, "e1", "SPX", CHAIN, spot=SPOT, now_ns=NOW_NS)

        async def published() -> bool:
            return await redis.exists(keys.gex_model("SPX")) == 1

        await eventually(published, timeout_s=10)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_spot_falls_back_to_epoch_meta_and_is_required(
    redis: Redis, settings: RuntimeSettings
) -> None:
    await seed_epoch(redis, "e1", "SPX", CHAIN, spot=SPOT, now_ns=NOW_NS)
    await redis.delete(keys.SPOT_LATEST)
    clock = ManualClock(NOW_NS)
    b, reg = make(redis, settings, clock)
    await b.tick()
    m = await model(redis)
    assert m.meta["spot"] == SPOT and m.meta["spot_source"] == "epoch_meta"
    await redis.hdel(keys.epoch_meta("SPX", "e1"), "spot")
    await set_row(redis, "e1", CHAIN[0], oi=1.0)
    clock.advance(2.5)
    await b.tick()
    assert (await model(redis)).version == 1
    no_spot = reg.get_sample_value(
        "massive_gex_builds_total", {"symbol": "SPX", "outcome": "no_spot"}
    )
    assert no_spot == 1


async def test_small_spot_moves_keep_diffs_sparse(redis: Redis, settings: RuntimeSettings) -> None:
    await seed_epoch(redis, "e1", "SPX", CHAIN, spot=SPOT, now_ns=NOW_NS)
    clock = ManualClock(NOW_NS)
    b, _ = make(redis, settings, clock, dollar_spot_step_bp=10.0)
    await b.tick()
    await redis.hset(keys.SPOT_LATEST, "SPX", repr(SPOT * 1.0002))  # 2 bp
    clock.advance(2.5)
    await b.tick()
    m = await model(redis)
    _, d = (await diffs(redis))[-1]
    assert m.version == 2 and d.changed == {}
    assert m.meta["spot"] == SPOT * 1.0002 and m.meta["dollar_spot"] == SPOT
    await redis.hset(keys.SPOT_LATEST, "SPX", repr(SPOT * 1.002))  # 20 bp
    clock.advance(2.5)
    await b.tick()
    m = await model(redis)
    _, d = (await diffs(redis))[-1]
    assert m.version == 3 and set(d.changed) == set(m.items)
    assert m.meta["dollar_spot"] == SPOT * 1.002
    f = (SPOT * 1.002) ** 2 * 0.01
    assert m.items["6800"]["calls_usd"] == pytest.approx(290 * f, abs=0.01)


async def test_one_leader_standby_takes_over_and_stale_leader_is_fenced(
    redis: Redis, settings: RuntimeSettings
) -> None:
    await seed_epoch(redis, "e1", "SPX", CHAIN, spot=SPOT, now_ns=NOW_NS)
    clock_a, clock_b = ManualClock(NOW_NS), ManualClock(NOW_NS)
    a, _ = make(redis, settings, clock_a)
    b, _ = make(redis, settings, clock_b)
    await a.tick()
    await b.tick()
    assert a.leader and not b.leader
    assert (await model(redis)).version == 1
    # A stalls past its lease; B takes over and continues the version sequence
    await redis.delete(keys.gex_lease("SPX"))
    await set_row(redis, "e1", CHAIN[3], oi=1000.0)
    clock_b.advance(2.5)
    await b.tick()
    assert b.leader
    m = await model(redis)
    assert m.version == 2 and set((await diffs(redis))[-1][1].changed) == {"6750"}
    # A wakes up believing it leads (renewal not yet due) and tries to publish: fenced
    await set_row(redis, "e1", CHAIN[2], oi=1.0)
    clock_a.advance(2.5)
    await a.tick()
    assert not a.leader
    assert (await model(redis)).version == 2
    assert [d.version for _, d in await diffs(redis)] == [1, 2]
    clock_b.advance(2.5)
    await b.tick()
    assert [d.version for _, d in await diffs(redis)] == [1, 2, 3]
    assert [d.prev_version for _, d in await diffs(redis)] == [0, 1, 2]


async def test_a_stale_leader_is_fenced_even_when_nobody_holds_the_lease(
    redis: Redis, settings: RuntimeSettings
) -> None:
    """A took the lease, stalled past it; B acquired (the fence moved) and lost it in turn.
    No lease is held when A wakes up and publishes: the fence alone refuses it."""
    await seed_epoch(redis, "e1", "SPX", CHAIN, spot=SPOT, now_ns=NOW_NS)
    clock_a, clock_b = ManualClock(NOW_NS), ManualClock(NOW_NS)
    a, _ = make(redis, settings, clock_a)
    b, _ = make(redis, settings, clock_b)
    await a.tick()
    assert a.leader and (await model(redis)).version == 1
    await redis.delete(keys.gex_lease("SPX"))
    await b.tick()
    assert b.leader
    await redis.delete(keys.gex_lease("SPX"))
    await set_row(redis, "e1", CHAIN[3], oi=1000.0)
    clock_a.advance(2.5)  # a build is due, a renewal not yet
    await a.tick()
    assert not a.leader
    assert (await model(redis)).version == 1 and len(await diffs(redis)) == 1


async def test_run_loop_publishes_reacts_and_releases_lease(
    redis: Redis, settings: RuntimeSettings, registry: CollectorRegistry
) -> None:
    await seed_epoch(redis, "e1", "SPX", CHAIN, spot=SPOT, now_ns=NOW_NS)
    deps = Deps(redis=redis, settings=settings, registry=registry, clock=RunningClock(NOW_NS))
    b = GexBuilder(deps, settings_fast(), "SPX")
    stop = asyncio.Event()
    task = asyncio.create_task(b.run(stop))
    try:

        async def version() -> int:
            raw = await redis.get(keys.gex_model("SPX"))
            return 0 if raw is None else msgspec.json.decode(raw, type=PublishedModel).version

        await eventually(lambda: _ge(version, 1))
        assert b.ready
        await set_row(redis, "e1", CHAIN[0], oi=5.0)
        await eventually(lambda: _ge(version, 2))
        _, d = (await diffs(redis))[-1]
        assert set(d.changed) == {"6800"}
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert await redis.get(keys.gex_lease("SPX")) is None


class RunningClock(SystemClock):
    """Real time, but starting at ``start_ns`` (the chain's contracts are not expired)."""

    def __init__(self, start_ns: int) -> None:
        self.offset = start_ns - time.time_ns()

    def time_ns(self) -> int:
        return time.time_ns() + self.offset


def settings_fast() -> GexSettings:
    return GexSettings(interval_s=0.05, poll_s=0.02, lease_ttl_ms=1000)


async def _ge(f: Any, n: int) -> bool:
    return bool(await f() >= n)


def test_build_reads_env_and_arg(deps: Deps, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASSIVE_GEX_INTERVAL_S", "5")
    deps = dataclasses.replace(deps, settings=dataclasses.replace(deps.settings, symbols=("NDX",)))
    p = build(deps, None)
    assert p.name == "gex" and [(b.symbol, b.settings.interval_s) for b in p.members] == [
        ("NDX", 5.0)
    ]
    assert [b.symbol for b in build(deps, "SPX,NDX").members] == ["SPX", "NDX"]
    with pytest.raises(ValueError):
        GexSettings(interval_s=0)
    with pytest.raises(ValueError):
        GexSettings(grid_step_pct=0)


# --- whole-chain source and the levels history ---------------------------------------------
async def write_source(redis: Redis, chain: list[ChainContract], ts_ns: int, spot: float) -> None:
    src = gex_math.source_from_contracts("SPX", ts_ns, spot, chain)
    await redis.hset(
        keys.gex_source("SPX"),
        mapping={"ts_ns": ts_ns, "spot": repr(spot), "data": encode_gex_source(src)},
    )


async def test_full_chain_source_is_the_universe_and_a_stale_one_falls_back(
    redis: Redis, settings: RuntimeSettings
) -> None:
    window = [c for c in CHAIN if c.expiry == TODAY]  # the heatmap's epoch: 0DTE only
    await seed_epoch(redis, "e1", "SPX", window, spot=SPOT, now_ns=NOW_NS)
    far = "2026-06-18"
    full = [*CHAIN, contract("SPX", far, "P", 6000, gamma=0.0002, oi=9000, iv=0.25)]
    await write_source(redis, full, NOW_NS, SPOT)
    clock = ManualClock(NOW_NS)
    b, reg = make(redis, settings, clock, source_max_age_s=60.0)
    await b.tick()
    m = await model(redis)
    cov = m.meta["coverage"]
    assert cov["scope"] == "full" and cov["contracts"] == len(full)
    assert m.meta["expiries"] == [TODAY, FRI, far]
    assert set(m.meta["expiry"]) == {TODAY, FRI, far}
    assert m.meta["expiry"][FRI]["settlement"] == "AM+PM"
    assert m.meta["expiry"][far]["settlement"] == "AM"
    legacy = msgspec.json.decode(await redis.get(keys.gex_model_calls("SPX")) or b"{}")
    assert set(legacy["expirations"]) == {TODAY, FRI, far}
    assert m.items["6000"]["puts"] == pytest.approx(-0.0002 * 9000 * 100)
    # the source ages out: the epoch's projection (the window) is used, and said so
    clock.advance(61)
    await b.tick()
    m = await model(redis)
    assert m.meta["coverage"]["scope"] == "window" and m.meta["expiries"] == [TODAY]
    # an unreadable source is counted and not used
    await redis.hset(keys.gex_source("SPX"), mapping={"ts_ns": clock.time_ns(), "data": b"\x00"})
    clock.advance(2.5)
    await b.tick()
    assert (await model(redis)).meta["coverage"]["scope"] == "window"
    bad = reg.get_sample_value(
        "massive_gex_rejected_total", {"symbol": "SPX", "reason": "bad_source"}
    )
    assert bad == 1


async def test_levels_history_stream_one_entry_per_publish_trimmed_by_age(
    redis: Redis, settings: RuntimeSettings
) -> None:
    await seed_epoch(redis, "e1", "SPX", CHAIN, spot=SPOT, now_ns=NOW_NS)
    clock = ManualClock(NOW_NS)
    b, _ = make(redis, settings, clock, history_retention_s=100.0)
    await b.tick()
    for i in range(3):
        await redis.hset(keys.SPOT_LATEST, "SPX", repr(SPOT + 2 * (i + 1)))
        clock.advance(2.5)
        await b.tick()
    entries = await redis.xrange(keys.gex_levels_stream("SPX"))
    levels = [from_entry(f, GexLevels) for _, f in entries]
    m = await model(redis)
    assert [x.version for x in levels] == list(range(1, m.version + 1)) and m.version == 4
    last = levels[-1]
    lv = m.meta["levels"]
    assert (last.spot, last.zero_gamma, last.call_wall, last.put_wall) == (
        m.meta["spot"],
        lv["all"]["zero_gamma"],
        lv["all"]["call_wall"],
        lv["all"]["put_wall"],
    )
    assert last.zero_gamma_0dte == lv["0dte"]["zero_gamma"]
    assert last.net_usd == m.meta["totals"]["all"]["net_usd"]


async def test_levels_history_is_trimmed_by_age_on_publish(
    redis: Redis, settings: RuntimeSettings
) -> None:
    # the writer trims with MINID on its own clock and Redis ids are Redis's wall clock:
    # this test runs on real time, with an entry already older than the retention
    now = time.time_ns()
    expiry = (dt.datetime.fromtimestamp(now / 1e9, dt.UTC) + dt.timedelta(days=30)).date()
    chain = [
        contract("SPXW", expiry.isoformat(), r, k, gamma=0.001, oi=100, iv=0.2)
        for k in (6750, 6800, 6850)
        for r in ("C", "P")
    ]
    await seed_epoch(redis, "e1", "SPX", chain, spot=SPOT, now_ns=now)
    stream = keys.gex_levels_stream("SPX")
    old_ms = now // 1_000_000 - 200_000
    await redis.xadd(stream, {"d": b"old"}, id=f"{old_ms}-0")
    b, _ = make(redis, settings, RunningClock(now), history_retention_s=100.0)
    await b.tick()
    left = [from_entry(f, GexLevels) for _, f in await redis.xrange(stream)]
    assert [x.version for x in left] == [1]


async def test_api_gex_history_serves_the_levels_oldest_first(
    redis: Redis, settings: RuntimeSettings, registry: CollectorRegistry
) -> None:
    await seed_epoch(redis, "e1", "SPX", CHAIN, spot=SPOT, now_ns=NOW_NS)
    clock = ManualClock(NOW_NS)
    b, _ = make(redis, settings, clock)
    await b.tick()
    for i in range(2):
        await redis.hset(keys.SPOT_LATEST, "SPX", repr(SPOT + 3 * (i + 1)))
        clock.advance(2.5)
        await b.tick()
    settings = dataclasses.replace(settings, symbols=("SPX",))
    deps = Deps(redis=redis, settings=settings, registry=registry, clock=clock)
    app = create_app(deps, SseSettings())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        r = await http.get("/api/gex/history", params={"symbol": "SPX"})
        assert r.status_code == 200
        levels = msgspec.json.decode(r.content, type=list[GexLevels])
        assert [x.version for x in levels] == [1, 2, 3]
        assert [x.spot for x in levels] == [SPOT, SPOT + 3, SPOT + 6]
        ids = await redis.xrange(keys.gex_levels_stream("SPX"))
        first_ms, last_ms = (int(i.split(b"-")[0]) for i in (ids[0][0], ids[-1][0]))

        async def since(ms: int) -> list[int]:
            r = await http.get("/api/gex/history", params={"symbol": "SPX", "since_ms": ms})
            return [x.version for x in msgspec.json.decode(r.content, type=list[GexLevels])]

        assert await since(first_ms - 1) == [1, 2, 3]
        assert await since(last_ms) == []  # entries strictly after that millisecond
        assert (await http.get("/api/gex/history", params={"symbol": "NDX"})).json() == []
        assert (await http.get("/api/gex/history", params={"since_ms": "x"})).status_code == 400
