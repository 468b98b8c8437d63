"""record / replay: the recording format, receive-time ordering, pacing, the CLI round trip,
and determinism: one recording replayed twice through normalizer + hydrator + tile builders +
publishers + GEX publishes the same model versions."""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from processors import MODEL_PATH
from processors.ops import replay as rp
from schemas import keys
from schemas.messages import (
    WS_PAYLOAD_FIELD,
    WS_RECV_FIELD,
    ChainContract,
    ChainPointer,
    ChainSnapshot,
    SpotTick,
    encode_snapshot,
    entry,
    from_entry,
)
from streams.settings import RuntimeSettings
from tests.factories import option_chain
from tests.util import RedisServer, eventually

T0 = 1_764_000_000_000_000_000  # 2025-11-24T16:00:00Z: a Monday, 11:00 in New York
MS = 1_000_000
ASOF = "2025-11-24"
EXPIRIES = ["2025-11-24", "2025-11-25"]


# --- a small synthetic market session ------------------------------------------------------
def snapshot(ts_ns: int, strikes: list[float], spot: float, shift: float) -> ChainSnapshot:
    base = option_chain("SPXW", EXPIRIES, strikes, spot=spot, asof=ASOF, quote_ts_ns=ts_ns - 5 * MS)
    contracts = [
        msgspec.structs.replace(
            c,
            bid=round(max(0.0, (c.bid or 0) + shift), 2),
            ask=round((c.ask or 0) + shift, 2),
            iv=0.2,
            delta=0.5,
            gamma=round(0.002 / (1 + ((c.strike - spot) / 40) ** 2), 6),
            oi=float(100 + int(c.strike) % 70 + (90 if c.right == "P" else 0)),
        )
        for c in base
    ]
    return ChainSnapshot(symbol="SPX", ts_ns=ts_ns, spot=spot, contracts=contracts)


class Session:
    """Raw feeds as the ingest processors write them: chain blobs + pointers, spot ticks,
    WS frames with receive times. Frame times are spaced so the session spans ~12 s."""

    def __init__(self, seed: int = 7) -> None:
        rnd = random.Random(seed)
        self.chain: list[tuple[ChainSnapshot, str]] = []
        self.ws: list[tuple[int, bytes]] = []
        self.spot: list[SpotTick] = []
        strikes = [5850.0 + 10 * i for i in range(11)]
        spot = 5900.0
        t = T0
        live: list[ChainContract] = []

        def add_chain(ts: int, strikes: list[float], shift: float, reason: str) -> None:
            nonlocal live
            snap = snapshot(ts, strikes, spot, shift)
            self.chain.append((snap, reason))
            live = snap.contracts

        add_chain(t, strikes, 0.0, "startup")
        for i in range(1, 31):
            t = T0 + i * 400 * MS
            if i == 12:  # same topology: re-seed values in the active epoch
                add_chain(t, strikes, 0.05, "cadence")
                continue
            if i == 20:  # a new listed strike: new epoch, promotion
                strikes = [*strikes, 5960.0]
                add_chain(t, strikes, 0.1, "cadence")
                continue
            events: list[dict[str, Any]] = []
            for c in rnd.sample(live, 3):
                mid = ((c.bid or 0) + (c.ask or 0)) / 2 + rnd.choice((-0.1, 0.05, 0.1))
                ev_t = (t - 3 * MS) // MS
                if rnd.random() < 0.7:
                    bid = round(max(0.05, mid - 0.1), 2)
                    events.append(
                        {
                            "ev": "Q",
                            "sym": c.cid,
                            "bp": bid,
                            "ap": round(bid + 0.2, 2),
                            "bs": 5,
                            "as": 7,
                            "t": ev_t,
                        }
                    )
                else:
                    events.append({"ev": "T", "sym": c.cid, "p": round(mid, 2), "s": 2, "t": ev_t})
            if i % 4 == 0:
                spot = round(spot + rnd.choice((-1.5, 0.75, 2.0)), 2)
                events.append({"ev": "V", "T": "I:SPX", "val": spot, "t": (t - MS) // MS})
                self.spot.append(SpotTick("SPX", spot, t - MS, "ws"))
            if i == 7:  # a contract outside the topology: a geometry miss, not a new slot
                events.append(
                    {
                        "ev": "Q",
                        "sym": "O:SPXW251124C09990000",
                        "bp": 1.0,
                        "ap": 1.2,
                        "t": (t - 3 * MS) // MS,
                    }
                )
            self.ws.append((t, json.dumps(events).encode()))
            if i == 9:
                self.ws.append((t + 50 * MS, b'[{"ev":"Q","sym":'))  # malformed frame

    async def write(self, redis: Redis) -> None:
        """Into the raw streams, in an order unrelated to receive time (so recording must
        sort): all WS frames first, then chain pointers, then spot ticks (those with ids at
        their receive time, as a live XADD would give them)."""
        for recv, payload in self.ws:
            await redis.xadd(keys.WS_STREAM, {WS_RECV_FIELD: str(recv), WS_PAYLOAD_FIELD: payload})
        for snap, reason in self.chain:
            key = keys.chain_snapshot(snap.symbol, snap.ts_ns)
            await redis.set(key, encode_snapshot(snap), ex=600)
            ptr = ChainPointer(
                snap.symbol, key, snap.ts_ns, len(snap.contracts), snap.spot, 0.1, reason
            )
            await redis.xadd(keys.CHAIN_STREAM, entry(ptr))  # type: ignore[arg-type]
        for tick in self.spot:  # receive time of a spot entry = its id (XADD time)
            eid = f"{tick.ts_ns // MS}-0"
            await redis.xadd(keys.SPOT_STREAM, entry(tick), id=eid)  # type: ignore[arg-type]

    @property
    def n_records(self) -> int:
        return len(self.ws) + len(self.chain) + len(self.spot)


@pytest.fixture
def session() -> Session:
    return Session()


# --- format and recording ------------------------------------------------------------------
async def test_record_orders_by_receive_time_and_captures_blobs(
    redis: Redis, session: Session
) -> None:
    await session.write(redis)
    # A pointer whose blob already expired is skipped (and counted), not recorded half.
    gone = ChainPointer("SPX", keys.chain_snapshot("SPX", T0 + 1), T0 + 1, 1)
    await redis.xadd(keys.CHAIN_STREAM, entry(gone))  # type: ignore[arg-type]
    records, stats = await rp.record_range(redis, list(rp.FEEDS.values()))
    assert stats.missing_blobs == 1
    assert len(records) == session.n_records
    assert stats.records == {
        keys.WS_STREAM: len(session.ws),
        keys.CHAIN_STREAM: len(session.chain),
        keys.SPOT_STREAM: len(session.spot),
    }
    times = [r.t_ns for r in records]
    assert times == sorted(times)
    expected = sorted(
        [(t, keys.WS_STREAM) for t, _ in session.ws]
        + [(s.ts_ns, keys.CHAIN_STREAM) for s, _ in session.chain]
        + [(x.ts_ns, keys.SPOT_STREAM) for x in session.spot]
    )
    assert [(r.t_ns, r.stream) for r in records] == expected
    chain = [r for r in records if r.stream == keys.CHAIN_STREAM]
    for rec, (snap, _) in zip(chain, session.chain, strict=True):
        assert rec.blob == encode_snapshot(snap)
        assert rec.blob_key == from_entry(dict(rec.fields), ChainPointer).snapshot_key
    ws = [r for r in records if r.stream == keys.WS_STREAM]
    assert [dict(r.fields)[WS_PAYLOAD_FIELD] for r in ws] == [p for _, p in session.ws]


def test_recording_file_round_trip_and_corruption(tmp_path: Path) -> None:
    recs = [
        rp.Record(5, keys.WS_STREAM, [(b"recv_ts_ns", b"5"), (b"payload", b"\x00\xff[]")]),
        rp.Record(9, keys.CHAIN_STREAM, [(b"d", b"{}")], "massive:chain:snapshot:SPX:9", b"\x93"),
    ]
    path = tmp_path / "a.mrec.gz"
    with rp.RecordingWriter(path, [keys.WS_STREAM, keys.CHAIN_STREAM], 123) as w:
        for r in recs:
            w.write(r)
    header, it = rp.read_recording(path)
    assert (header.format, header.version, header.created_ns) == (rp.FORMAT, rp.VERSION, 123)
    assert list(it) == recs

    raw = gzip.decompress(path.read_bytes())
    cut = tmp_path / "cut.mrec.gz"
    cut.write_bytes(gzip.compress(raw[:-3]))
    _, it = rp.read_recording(cut)
    with pytest.raises(rp.RecordingError, match="truncated"):
        list(it)
    bad = tmp_path / "bad.mrec.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x00\x02hi"))
    with pytest.raises(rp.RecordingError, match="not a massive-recording"):
        rp.read_recording(bad)
    plain = tmp_path / "plain.mrec.gz"
    plain.write_bytes(b"not gzip at all")
    with pytest.raises(rp.RecordingError):
        rp.read_recording(plain)


async def test_follow_mode_writes_in_receive_time_order(redis: Redis, tmp_path: Path) -> None:
    path = tmp_path / "f.mrec.gz"
    stop = asyncio.Event()
    with rp.RecordingWriter(path, [keys.WS_STREAM], 1) as w:
        task = asyncio.create_task(
            rp.record_follow(
                redis, [keys.WS_STREAM], w, stop, "$", reorder_window_s=5.0, block_ms=20
            )
        )
        await asyncio.sleep(0.05)  # let the follower take its "$" position
        for recv in (T0 + 3 * MS, T0 + 1 * MS, T0 + 2 * MS):  # arrives out of order
            await redis.xadd(keys.WS_STREAM, {WS_RECV_FIELD: str(recv), WS_PAYLOAD_FIELD: b"[]"})
        await asyncio.sleep(0.1)
        stop.set()
        stats = await asyncio.wait_for(task, 5)
    assert stats.records[keys.WS_STREAM] == 3
    _, it = rp.read_recording(path)
    assert [r.t_ns for r in it] == [T0 + MS, T0 + 2 * MS, T0 + 3 * MS]


# --- replay ----------------------------------------------------------------------------------
async def test_replay_keeps_relative_receive_times_scaled_by_speed(redis: Redis) -> None:
    gaps_s = [0.0, 0.3, 0.9, 1.2]
    recs = [
        rp.Record(T0 + int(g * 1e9), keys.WS_STREAM, [(b"recv_ts_ns", b"0"), (b"payload", b"[]")])
        for g in gaps_s
    ]
    seen: list[float] = []

    async def stamp(_: rp.Record) -> None:
        seen.append(time.perf_counter())

    start = time.perf_counter()  # the schedule starts at or after this
    stats = await rp.replay_records(redis, recs, speed=3.0, after_write=stamp)
    got = [b - start for b in seen]
    for want, have in zip(gaps_s, got, strict=True):
        assert want / 3 <= have <= want / 3 + 0.25  # never early; late only by load
    assert stats.max_late_s < 0.25
    assert stats.span_s == pytest.approx(1.2)
    assert await redis.xlen(keys.WS_STREAM) == 4

    seen.clear()
    fast = await rp.replay_records(redis, recs, speed=None, after_write=stamp)
    assert fast.wall_s < 0.4 and seen[-1] - seen[0] < 0.4  # not paced (1.2 s recorded)


def _all_entries(r: Any, stream: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in r.xrange(stream)]


def test_cli_record_then_replay_reproduces_the_raw_streams(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import redis as sync_redis

    session = Session(seed=3)
    r = sync_redis.Redis.from_url(redis_server.url)
    r.flushall()

    async def write() -> None:
        a = Redis.from_url(redis_server.url)
        await session.write(a)
        await a.aclose()

    asyncio.run(write())
    before = {s: _all_entries(r, s) for s in rp.FEEDS.values()}
    blobs = {k: r.get(k) for k in r.scan_iter("massive:chain:snapshot:*")}
    path = tmp_path / "s.mrec.gz"
    assert rp.record_main(["--out", str(path), "--redis-url", redis_server.url]) == 0
    assert f"{session.n_records} records" in capsys.readouterr().out
    assert rp.replay_main([str(path), "--summary"]) == 0
    assert f"{session.n_records} records" in capsys.readouterr().out

    r.flushall()
    url = redis_server.url
    assert rp.replay_main([str(path), "--as-fast-as-possible", "--redis-url", url]) == 0
    assert {s: _all_entries(r, s) for s in rp.FEEDS.values()} == before
    assert {k: r.get(k) for k in blobs} == blobs
    assert all(0 < r.ttl(k) <= 3600 for k in blobs)

    # Only the ws feed, and a bad file / bad flag are reported, not raised.
    r.flushall()
    ws_only = tmp_path / "ws.mrec.gz"
    asyncio.run(write())
    assert rp.record_main(["-o", str(ws_only), "--redis-url", url, "--streams", "ws"]) == 0
    _, it = rp.read_recording(ws_only)
    assert {x.stream for x in it} == {keys.WS_STREAM}
    (tmp_path / "junk").write_bytes(b"junk")
    assert rp.replay_main([str(tmp_path / "junk"), "--redis-url", url]) == 1
    with pytest.raises(SystemExit):
        rp.replay_main([str(path), "--speed", "0"])
    with pytest.raises(SystemExit):
        rp.record_main(["-o", str(ws_only), "--streams", "trades"])
    r.close()


# --- causal replay: deterministic, equal to the lockstep reference ---------------------------
def ws_events(records: list[rp.Record]) -> list[tuple[int, str]]:
    """(position among the records, cid) of every recorded Q/T event, in recording order."""
    out = []
    for i, r in enumerate(records):
        if r.stream != keys.WS_STREAM:
            continue
        try:
            evs = json.loads(dict(r.fields)[WS_PAYLOAD_FIELD])
        except ValueError:
            continue
        out += [(i, e["sym"]) for e in evs if e.get("ev") in ("Q", "T")]
    return out


def expected_misses(records: list[rp.Record]) -> int:
    """WS events for a contract that the newest (window) chain snapshot of its symbol before
    the event did not list: what the hydrator must count as geometry_miss, and nothing else."""
    listed: dict[str, set[str]] = {}
    by_pos: dict[int, dict[str, set[str]]] = {}
    for i, r in enumerate(records):
        if r.stream == keys.CHAIN_STREAM and r.blob is not None:
            if from_entry(dict(r.fields), ChainPointer).scope != "window":
                continue  # a whole chain for GEX: no epoch
            snap = msgspec.msgpack.decode(r.blob, type=ChainSnapshot)
            listed = {**listed, snap.symbol: {c.cid for c in snap.contracts}}
        by_pos[i] = listed
    n = 0
    for i, cid in ws_events(records):
        sym = "SPX" if cid.startswith("O:SPX") else "NDX"
        n += cid not in by_pos[i].get(sym, set())
    return n


def metric_sum(registry: CollectorRegistry, name: str) -> float:
    return sum(s.value for m in registry.collect() for s in m.samples if s.name == name)


def replay_settings(settings: RuntimeSettings, run: int) -> RuntimeSettings:
    return RuntimeSettings(
        redis_url=settings.redis_url,
        consumer=f"replay-{run}",
        symbols=("SPX",),
        block_ms=1000,
        min_idle_ms=60_000,
        reclaim_interval_s=60.0,
        grace_s=5.0,
    )


async def replay_to_file(
    redis: Redis,
    recording: Path,
    out: Path,
    opts: rp.ReplayOptions,
    settings: RuntimeSettings,
    registry: CollectorRegistry,
) -> rp.ReplayStats:
    from processors.ops.replay_compare import OutputWriter

    await redis.flushall()
    w = OutputWriter(out)
    try:
        stats = await rp.replay_file(
            redis, recording, opts, settings, registry, on_instant=lambda: w.collect(redis)
        )
        await w.finish(redis)
    finally:
        w.close()
    return stats


@pytest.fixture
def pipeline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Small changes are held until the max interval passes on the recording's clock: both
    # publish conditions occur, and held tile deltas stay pending in the publisher group.
    monkeypatch.setenv("MASSIVE_PUBLISHER_MIN_CHANGED_PCT", "20")
    monkeypatch.setenv("MASSIVE_PUBLISHER_MAX_INTERVAL_MS", "1000")
    monkeypatch.setenv("MASSIVE_PUBLISHER_LEASE_TTL_MS", "600000")
    monkeypatch.setenv("MASSIVE_GEX_LEASE_TTL_MS", "600000")


@pytest.fixture
async def recording(redis: Redis, session: Session, tmp_path: Path) -> AsyncIterator[Path]:
    await session.write(redis)
    path = tmp_path / "session.mrec.gz"
    records, _ = await rp.record_range(redis, list(rp.FEEDS.values()))
    with rp.RecordingWriter(path, list(rp.FEEDS.values()), 1) as w:
        for rec in records:
            w.write(rec)
    await redis.flushall()
    yield path


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_causal_replay_is_deterministic_and_equals_the_lockstep_reference(
    redis: Redis,
    settings: RuntimeSettings,
    recording: Path,
    pipeline_env: None,
    tmp_path: Path,
) -> None:
    from processors.ops import replay_compare as rc

    runs: list[Path] = []
    regs: list[CollectorRegistry] = []
    stats: list[rp.ReplayStats] = []
    for run, mode in enumerate(("causal", "causal", "lockstep")):
        out = tmp_path / f"{run}-{mode}.mout.gz"
        regs.append(CollectorRegistry())
        opts = rp.ReplayOptions(mode=mode, processors=list(MODEL_PATH), timeout_s=30.0)
        st = await replay_to_file(
            redis, recording, out, opts, replay_settings(settings, run), regs[-1]
        )
        assert sum(st.records.values()) == Session().n_records
        runs.append(out)
        stats.append(st)
    assert stats[0].instants == stats[1].instants == stats[2].instants > 10
    # Non-trivial: every model published several versions, across two epochs, by both the
    # value and the time condition; GEX too.
    a = rc.open_source(str(runs[0]))
    epochs = set()
    for s in rc.diff_streams(("SPX",)):  # the session's symbol
        versions = []
        async for _, raw, _ck in a.diffs(s):
            d = msgspec.json.decode(raw)
            versions.append(d["version"])
            epochs.add(d["epoch"])
        assert len(versions) >= 2 and versions == sorted(versions), (s, versions)
    assert len(epochs) == 2
    models = await a.models()
    assert msgspec.json.decode(models[keys.gex_model("SPX")])["items"]
    for s in keys.STRATEGIES:
        assert msgspec.json.decode(models[keys.heatmap_model("SPX", s)])["items"]
    for cond in ("complete", "value", "time"):
        n = sum(
            regs[0].get_sample_value("massive_publishes_total", {"strategy": s, "condition": cond})
            or 0
            for s in keys.STRATEGIES
        )
        assert n > 0, cond
    # The guarantee: run after run, and equal to the reference.
    for other in runs[1:]:
        res = await rc.compare(rc.open_source(str(runs[0])), rc.open_source(str(other)))
        assert res.difference is None, (other.name, str(res.difference))
        assert sum(res.diffs.values()) > 10 and res.models == 6  # SPX: 3 heatmaps, GEX x 3
        # every epoch's first heatmap version: its checkpoint saved and compared
        assert res.checkpoints == 2 * len(keys.STRATEGIES) and res.checkpoints_missing == 0
    # WS events were applied, and the only geometry misses are the events for a contract the
    # recording had not listed at that point.
    _, it = rp.read_recording(recording)
    records = list(it)
    for reg in regs:
        assert metric_sum(reg, "massive_hydrator_applied_total") > 40
        assert metric_sum(reg, "massive_hydrator_geometry_miss_total") == expected_misses(records)
    assert expected_misses(records) == 1


async def test_a_chain_snapshot_is_applied_alone(
    redis: Redis, settings: RuntimeSettings, tmp_path: Path, pipeline_env: None
) -> None:
    """A WS frame right after a snapshot that lists a new strike meets the new epoch (its
    event applies), and one right before it meets the old one (a geometry miss), however
    fast the records are written: the snapshot waits for what came before it and is
    promoted before anything after it is written."""
    strikes = [5900.0, 5910.0]
    s1 = snapshot(T0 + 100 * MS, strikes, 5905.0, 0.0)
    s2 = snapshot(T0 + 300 * MS, [*strikes, 5920.0], 5905.0, 0.0)
    new = next(c.cid for c in s2.contracts if c.strike == 5920.0)

    def chain(s: ChainSnapshot) -> rp.Record:
        key = keys.chain_snapshot("SPX", s.ts_ns)
        ptr = ChainPointer("SPX", key, s.ts_ns, len(s.contracts), s.spot)
        fields = list(entry(ptr).items())
        return rp.Record(s.ts_ns, keys.CHAIN_STREAM, fields, key, encode_snapshot(s))

    def quote(t: int, bid: float) -> rp.Record:
        ev = json.dumps([{"ev": "Q", "sym": new, "bp": bid, "ap": bid + 0.2, "t": t // MS}])
        fields = [(WS_RECV_FIELD, str(t).encode()), (WS_PAYLOAD_FIELD, ev.encode())]
        return rp.Record(t, keys.WS_STREAM, fields)

    records = [chain(s1), quote(T0 + 299 * MS, 1.0), chain(s2), quote(T0 + 301 * MS, 2.0)]
    path = tmp_path / "r.mrec.gz"
    with rp.RecordingWriter(path, [keys.CHAIN_STREAM, keys.WS_STREAM], 1) as w:
        for r in records:
            w.write(r)
    reg = CollectorRegistry()
    opts = rp.ReplayOptions(processors=["normalizer", "hydrator"], step_ms=1000.0)
    st = await rp.replay_file(redis, path, opts, replay_settings(settings, 0), reg)
    assert st.instants == 1  # all four records in one instant, still in causal order
    assert metric_sum(reg, "massive_hydrator_geometry_miss_total") == 1
    assert metric_sum(reg, "massive_hydrator_applied_total") == 1
    eid = (await redis.get(keys.epoch_active("SPX"))).decode()  # type: ignore[union-attr]
    assert await redis.hget(keys.epoch_contract("SPX", eid, new), "bid") == b"2.0"


def test_cli_replay_runs_processors_in_process_with_the_recording_clock(
    redis_server: RedisServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``replay FILE --run normalizer``: the normalizer builds the epochs of the recorded
    chain snapshots, stamped with recorded times (not the wall clock)."""
    import redis as sync_redis

    # The CLI defaults these (setdefault) for in-process replays; keep that out of other tests.
    monkeypatch.setenv("MASSIVE_PUBLISHER_LEASE_TTL_MS", "60000")
    monkeypatch.setenv("MASSIVE_GEX_LEASE_TTL_MS", "60000")

    session = Session()
    path = tmp_path / "s.mrec.gz"

    async def make() -> None:
        a = Redis.from_url(redis_server.url)
        await a.flushall()
        await session.write(a)
        records, _ = await rp.record_range(a, [keys.CHAIN_STREAM])
        with rp.RecordingWriter(path, [keys.CHAIN_STREAM], 1) as w:
            for rec in records:
                w.write(rec)
        await a.flushall()
        await a.aclose()

    asyncio.run(make())
    url = redis_server.url
    assert rp.replay_main([str(path), "--redis-url", url, "--run", "normalizer"]) == 0
    out = capsys.readouterr().out
    assert f"replayed {path}: {len(session.chain)} records" in out and "causal" in out
    r = sync_redis.Redis.from_url(url)
    try:
        eid = r.get(keys.epoch_active("SPX"))
        assert eid is not None
        meta = r.hgetall(keys.epoch_meta("SPX", eid.decode()))
        last_chain = session.chain[-1][0]
        assert meta[b"state"] == b"active"
        # Promoted at the recorded receive time of the snapshot that changed the topology.
        assert int(meta[b"promoted_ns"]) == last_chain.ts_ns
        assert int(meta[b"n_contracts"]) == len(last_chain.contracts)
        (g,) = r.xinfo_groups(keys.CHAIN_STREAM)
        assert (g["lag"], g["pending"]) == (0, 0)
    finally:
        r.close()
    with pytest.raises(SystemExit):  # no recording and no --compare
        rp.replay_main(["--redis-url", url])


# --- self-contained recordings -------------------------------------------------------------
async def test_follow_starts_with_the_chain_snapshot_and_spot_of_every_symbol(
    redis: Redis, settings: RuntimeSettings, tmp_path: Path, pipeline_env: None
) -> None:
    """``record --follow`` started mid-session: the file begins with the newest snapshot of
    each symbol and its spot, so replaying it alone applies the first WS events (no prefix
    of geometry misses waiting for the next snapshot)."""
    session = Session()
    # The session so far: both chain pointers before the topology change, spot from the WS.
    for snap, reason in session.chain[:2]:
        key = keys.chain_snapshot(snap.symbol, snap.ts_ns)
        await redis.set(key, encode_snapshot(snap), ex=600)
        ptr = ChainPointer(
            snap.symbol, key, snap.ts_ns, len(snap.contracts), snap.spot, 0.1, reason
        )
        await redis.xadd(keys.CHAIN_STREAM, entry(ptr))  # type: ignore[arg-type]
    spot_ts = session.chain[1][0].ts_ns + 7 * MS
    await redis.hset(keys.SPOT_LATEST, mapping={"SPX": "5901.25", "SPX:ts_ns": str(spot_ts)})
    path = tmp_path / "f.mrec.gz"
    stop = asyncio.Event()
    streams = list(rp.FEEDS.values())
    with rp.RecordingWriter(path, streams, 1) as w:
        task = asyncio.create_task(
            rp.record_follow(redis, streams, w, stop, "$", reorder_window_s=0.0, block_ms=20)
        )
        await asyncio.sleep(0.05)  # the follower takes its "$" position
        live = session.chain[1][0].contracts[:3]
        t = session.chain[1][0].ts_ns + 100 * MS
        frame = json.dumps(
            [{"ev": "Q", "sym": c.cid, "bp": 1.0, "ap": 1.2, "t": t // MS} for c in live]
        )
        await redis.xadd(keys.WS_STREAM, {WS_RECV_FIELD: str(t), WS_PAYLOAD_FIELD: frame})
        await asyncio.sleep(0.1)
        stop.set()
        stats = await asyncio.wait_for(task, 5)
    assert stats.records == {keys.CHAIN_STREAM: 1, keys.WS_STREAM: 2}
    _, it = rp.read_recording(path)
    records = list(it)
    first, spot, ws = records
    assert first.stream == keys.CHAIN_STREAM and first.blob is not None
    assert first.t_ns == session.chain[1][0].ts_ns  # the newest snapshot, with its blob
    v = json.loads(dict(spot.fields)[WS_PAYLOAD_FIELD])
    assert v == [{"ev": "V", "T": "I:SPX", "val": 5901.25, "t": spot_ts // MS}]
    assert first.t_ns <= spot.t_ns <= ws.t_ns

    await redis.flushall()
    reg = CollectorRegistry()
    opts = rp.ReplayOptions(processors=["normalizer", "hydrator"])
    await rp.replay_file(redis, path, opts, replay_settings(settings, 0), reg)
    assert metric_sum(reg, "massive_hydrator_applied_total") == 3
    assert metric_sum(reg, "massive_hydrator_geometry_miss_total") == 0
    assert await redis.hget(keys.SPOT_LATEST, "SPX") == b"5901.25"


# --- comparing two replays -----------------------------------------------------------------
def write_output(
    path: Path,
    diffs: list[tuple[str, dict[str, Any]]],
    models: dict[str, Any],
    checkpoints: dict[int, dict[str, Any]] | None = None,
) -> str:
    """An output file; ``checkpoints``: the checkpoint saved after diff #i (a snapshot)."""
    from processors.ops.replay_compare import OutputEntry, OutputHeader

    w = rp.FrameWriter(path)
    w.frame(msgspec.msgpack.encode(OutputHeader(created_ns=1)))
    for i, (stream, d) in enumerate(diffs):
        w.frame(
            msgspec.msgpack.encode(OutputEntry("diff", stream, f"{i}-0", msgspec.json.encode(d)))
        )
        if checkpoints and i in checkpoints:
            ck = msgspec.json.encode(checkpoints[i])
            w.frame(msgspec.msgpack.encode(OutputEntry("checkpoint", stream, f"{i}-0", ck)))
    for k, m in models.items():
        w.frame(msgspec.msgpack.encode(OutputEntry("model", k, "", msgspec.json.encode(m))))
    w.close()
    return str(path)


def test_compare_reports_the_first_difference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fly = keys.heatmap_diffs_stream("butterfly", "SPX")
    tile = "SPX:2025-11-24:butterfly:5900-5910-5920:C"

    def diff(v: int, debit: float, **extra: Any) -> tuple[str, dict[str, Any]]:
        d = {"symbol": "SPX", "kind": "heatmap:butterfly", "epoch": "e1", "version": v,
             "prev_version": v - 1, "ts_ns": v, "changed": {tile: {"debit": debit}},
             "removed": [], "meta": {}, **extra}  # fmt: skip
        return fly, d

    model = {"symbol": "SPX", "kind": "heatmap:butterfly", "epoch": "e1", "version": 3,
             "ts_ns": 3, "items": {tile: {"debit": 2.0}}, "meta": {}}  # fmt: skip
    mkey = keys.heatmap_model("SPX", "butterfly")
    base = [diff(1, 1.0), diff(2, 1.5), diff(3, 2.0)]
    a = write_output(tmp_path / "a.mout.gz", base, {mkey: {**model, "diff_id": "3-0"}})
    # Stream ids and the latency field differ run to run: ignored.
    same = [diff(1, 1.0, prev_id="9-0", src_recv_ts_ns=5), diff(2, 1.5), diff(3, 2.0)]
    b = write_output(tmp_path / "b.mout.gz", same, {mkey: {**model, "diff_id": "77-0"}})
    assert rp.replay_main(["--compare", a, b]) == 0
    assert "identical: 3 diffs" in capsys.readouterr().out

    other = [diff(1, 1.0), diff(2, 1.55), diff(3, 2.0)]
    c = write_output(tmp_path / "c.mout.gz", other, {mkey: model})
    assert rp.replay_main(["--compare", a, c]) == 1
    out = capsys.readouterr().out
    assert f"first difference: {fly} entry #1: SPX v2 (heatmap:butterfly): " in out
    assert f".changed.{tile}.debit: 1.5 != 1.55" in out

    short = write_output(tmp_path / "d.mout.gz", base[:2], {mkey: model})
    assert rp.replay_main(["--compare", a, short]) == 1
    assert "entry #2: B ends after 2 diffs" in capsys.readouterr().out
    moved = write_output(tmp_path / "e.mout.gz", base, {mkey: {**model, "version": 4}})
    assert rp.replay_main(["--compare", a, moved]) == 1
    assert f"first difference: {mkey}: .version: 3 != 4" in capsys.readouterr().out
    assert rp.replay_main(["--compare", a, str(tmp_path / "missing.mout.gz")]) == 1
    assert "no such file" in capsys.readouterr().err

    # A snapshot version's diff carries no items: its saved checkpoint is compared.
    snap = {**diff(1, 1.0)[1], "changed": {}, "snapshot": True}
    ck = {**model, "version": 1, "ts_ns": 1, "items": {tile: {"debit": 1.0}}}
    first = [(fly, snap), *base[1:]]
    f = write_output(tmp_path / "f.mout.gz", first, {mkey: model}, {0: {**ck, "diff_id": "0-0"}})
    g = write_output(tmp_path / "g.mout.gz", first, {mkey: model}, {0: {**ck, "diff_id": "5-0"}})
    assert rp.replay_main(["--compare", f, g]) == 0
    assert "identical: 3 diffs" in (out := capsys.readouterr().out)
    assert "1 snapshot checkpoints" in out and "without a checkpoint" not in out
    bad = {**ck, "items": {tile: {"debit": 1.25}}}
    h = write_output(tmp_path / "h.mout.gz", first, {mkey: model}, {0: bad})
    assert rp.replay_main(["--compare", f, h]) == 1
    out = capsys.readouterr().out
    assert f"first difference: {fly} entry #0: checkpoint: .items.{tile}.debit: 1.0 != 1.25" in out
    none = write_output(tmp_path / "i.mout.gz", first, {mkey: model})
    assert rp.replay_main(["--compare", f, none]) == 0
    assert "1 snapshot versions without a checkpoint on one side" in capsys.readouterr().out


# --- a simulator session, recorded mid-session -----------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_simulator_session_recorded_midway_replays_causally_like_lockstep(
    settings: RuntimeSettings, tmp_path: Path, pipeline_env: None
) -> None:
    from processors.ops import replay_compare as rc
    from simulator.server import SimConfig, SimServer
    from tests import harness as h

    srv = h.redis_server()
    sim = SimServer(SimConfig(seed=5, symbols=("SPX",), events_per_s=400.0))
    await sim.start()
    r = Redis.from_url(srv.url)
    path = tmp_path / "sim.mrec.gz"
    try:
        env = h.sim_env(sim.rest_url, sim.ws_url, sim.config.api_key)
        async with h.pipeline(srv.url, tmp_path / "logs", ("normalizer", *h.INGEST), env):
            await h.wait_epoch(r)
            await asyncio.sleep(1.0)  # mid-session: snapshots and frames already flowed
            stop = asyncio.Event()
            streams = list(rp.FEEDS.values())

            class Counting(rp.RecordingWriter):
                chains = 0
                first_ns = last_ns = 0

                def write(self, rec: rp.Record) -> None:
                    super().write(rec)
                    self.chains += rec.stream == keys.CHAIN_STREAM
                    self.first_ns = self.first_ns or rec.t_ns
                    self.last_ns = rec.t_ns

            with Counting(path, streams, 1) as w:
                task = asyncio.create_task(rp.record_follow(r, streams, w, stop, "$"))

                async def long_enough() -> bool:
                    # the initial chain and two live ones, over 6 s of the session's own time
                    return w.chains >= 3 and w.last_ns - w.first_ns >= 6_000_000_000

                await eventually(long_enough, timeout_s=90)
                stop.set()
                await asyncio.wait_for(task, 10)
    finally:
        await r.aclose()
        await sim.stop()
    _, it = rp.read_recording(path)
    records = list(it)
    assert records[0].stream == keys.CHAIN_STREAM  # self-contained
    assert sum(r.stream == keys.CHAIN_STREAM for r in records) >= 3
    runs = []
    regs = []
    redis = Redis.from_url(srv.url)
    try:
        for i, mode in enumerate(("causal", "lockstep")):
            regs.append(CollectorRegistry())
            out = tmp_path / f"{mode}.mout.gz"
            opts = rp.ReplayOptions(mode=mode, processors=list(MODEL_PATH), timeout_s=60.0)
            await replay_to_file(redis, path, out, opts, replay_settings(settings, i), regs[-1])
            runs.append(out)
    finally:
        await redis.aclose()
        srv.stop()
    res = await rc.compare(rc.open_source(str(runs[0])), rc.open_source(str(runs[1])))
    assert res.difference is None, str(res.difference)
    assert sum(res.diffs.values()) > 10
    for reg in regs:
        assert metric_sum(reg, "massive_hydrator_applied_total") > 100
        assert metric_sum(reg, "massive_hydrator_geometry_miss_total") == expected_misses(records)


async def test_a_range_from_the_middle_starts_with_the_snapshot_then_current(
    redis: Redis, session: Session
) -> None:
    """``record --since P`` of a live session: entry ids are receive times, as live."""
    for seq, (recv, payload) in enumerate(session.ws, 1):
        fields = {WS_RECV_FIELD: str(recv), WS_PAYLOAD_FIELD: payload}
        await redis.xadd(keys.WS_STREAM, fields, id=f"{recv // MS}-{seq}")  # type: ignore[arg-type]
    for snap, reason in session.chain:
        key = keys.chain_snapshot(snap.symbol, snap.ts_ns)
        await redis.set(key, encode_snapshot(snap), ex=600)
        ptr = ChainPointer(
            snap.symbol, key, snap.ts_ns, len(snap.contracts), snap.spot, 0.1, reason
        )
        await redis.xadd(keys.CHAIN_STREAM, entry(ptr), id=f"{snap.ts_ns // MS}-0")  # type: ignore[arg-type]
    for tick in session.spot:
        await redis.xadd(keys.SPOT_STREAM, entry(tick), id=f"{tick.ts_ns // MS}-0")  # type: ignore[arg-type]
    (cut,) = [s for s, _ in session.chain if s.ts_ns == T0 + 12 * 400 * MS]  # the re-seed
    start = cut.ts_ns + 100 * MS
    records, stats = await rp.record_range(redis, list(rp.FEEDS.values()), f"{start // MS}ms")
    head, rest = records[:2], records[2:]
    assert head[0].stream == keys.CHAIN_STREAM and head[0].t_ns == cut.ts_ns
    assert head[0].blob == encode_snapshot(cut)
    tick = max((x for x in session.spot if x.ts_ns < start), key=lambda x: x.ts_ns)
    v = json.loads(dict(head[1].fields)[WS_PAYLOAD_FIELD])
    assert v == [{"ev": "V", "T": "I:SPX", "val": tick.value, "t": tick.ts_ns // MS}]
    assert rest and all(r.t_ns >= start for r in rest)
    assert len(rest) == sum(1 for t, _ in session.ws if t >= start) + sum(
        1 for s, _ in session.chain if s.ts_ns >= start
    ) + sum(1 for x in session.spot if x.ts_ns >= start)
    assert sum(stats.records.values()) == len(records)


async def test_a_processor_that_fails_ends_the_replay_with_its_name(
    redis: Redis,
    settings: RuntimeSettings,
    recording: Path,
    pipeline_env: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A skipped GEX build would make the replay differ from the next run: the replay stops
    (one line from the CLI), it does not carry on without it."""
    from processors.gex.calculator import GexBuilder
    from streams.clock import ReplayAborted

    calls = 0
    tick = GexBuilder.tick

    async def failing(self: GexBuilder) -> None:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise RuntimeError("boom")
        await tick(self)

    monkeypatch.setattr(GexBuilder, "tick", failing)
    opts = rp.ReplayOptions(processors=["normalizer", "gex"], timeout_s=10.0)
    with pytest.raises(ReplayAborted, match="gex"):
        await rp.replay_file(redis, recording, opts, replay_settings(settings, 0))


async def test_a_consumer_that_never_finishes_its_batch_ends_the_replay_with_its_group(
    redis: Redis,
    settings: RuntimeSettings,
    recording: Path,
    pipeline_env: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The driver waits for in-process consumers to finish what they read before it asks
    Redis whether the groups caught up; one that never does ends the replay at
    ``timeout_s``, naming its group, instead of waiting forever."""
    from processors.epochs.normalizer import Normalizer

    async def hangs(self: Normalizer, entries: object) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(Normalizer, "handle", hangs)
    opts = rp.ReplayOptions(processors=["normalizer", "hydrator"], timeout_s=1.0)
    with pytest.raises(TimeoutError, match=keys.NORMALIZER_GROUP):
        await rp.replay_file(redis, recording, opts, replay_settings(settings, 0))


def test_the_cli_reports_a_failed_processor_in_one_line(
    redis_server: RedisServer,
    tmp_path: Path,
    pipeline_env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from processors.gex.calculator import GexBuilder

    async def failing(self: GexBuilder) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(GexBuilder, "tick", failing)
    path = tmp_path / "s.mrec.gz"

    async def make() -> None:
        a = Redis.from_url(redis_server.url)
        await a.flushall()
        await Session().write(a)
        records, _ = await rp.record_range(a, list(rp.FEEDS.values()))
        with rp.RecordingWriter(path, list(rp.FEEDS.values()), 1) as w:
            for rec in records:
                w.write(rec)
        await a.flushall()
        await a.aclose()

    asyncio.run(make())
    args = [str(path), "--redis-url", redis_server.url, "--run", "normalizer", "gex"]
    assert rp.replay_main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "gex stopped during the replay" in err
    assert err.count("\n") == 1  # one error line; the traceback goes to the log
