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
from processors import replay as rp
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
from tests.util import RedisServer

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


def test_replay_clock_is_stepwise_or_paced_and_never_goes_back() -> None:
    c = rp.ReplayClock(T0)
    assert (c.time_ns(), c.monotonic()) == (T0, 0.0)
    c.set(T0 + 2 * 10**9)
    assert (c.time_ns(), c.monotonic()) == (T0 + 2 * 10**9, 2.0)
    c.set(T0)  # never backwards
    assert c.time_ns() == T0 + 2 * 10**9
    paced = rp.ReplayClock(T0, speed=1000.0)
    a = paced.time_ns()
    time.sleep(0.01)
    assert paced.time_ns() - a >= 9 * 10**9  # ~10 ms real at 1000x = ~10 s


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


# --- determinism through the whole pipeline ---------------------------------------------------
PIPELINE = list(MODEL_PATH)


def model_keys() -> list[str]:
    out = [keys.heatmap_model("SPX", s) for s in keys.STRATEGIES]
    return [*out, keys.gex_model("SPX"), keys.gex_model_calls("SPX"), keys.gex_model_puts("SPX")]


def diff_streams() -> list[str]:
    return [*(keys.heatmap_diffs_stream(s) for s in keys.STRATEGIES), keys.GEX_DIFFS_STREAM]


async def published(redis: Redis) -> dict[str, Any]:
    """Every published diff (stream order) and the final models, minus what Redis assigns
    at run time (entry ids: diff_id, and prev_id, the id of the diff a diff follows)."""
    out: dict[str, Any] = {}
    for s in diff_streams():
        out[s] = [
            {k.decode(): msgspec.json.decode(v) for k, v in f.items()}
            for _, f in await redis.xrange(s)
        ]
        for d in out[s]:
            d.get("d", {}).pop("prev_id", None)
    for k in model_keys():
        raw = await redis.get(k)
        if raw is not None:
            m = msgspec.json.decode(raw)
            m.pop("diff_id", None)
            out[k] = m
    return out


@pytest.fixture
def pipeline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Clock-driven loops wake often (real time) so --settle-s can be short; leases outlive
    # the replay (their TTL is Redis real time, renewals follow the replay clock).
    monkeypatch.setenv("MASSIVE_PUBLISHER_TICK_MS", "10")
    # Small changes are held until a time boundary of the (replay) clock: both publish
    # conditions occur, and the held entries stay pending in the publisher group.
    monkeypatch.setenv("MASSIVE_PUBLISHER_MIN_CHANGED_PCT", "20")
    monkeypatch.setenv("MASSIVE_PUBLISHER_MAX_INTERVAL_MS", "1000")
    monkeypatch.setenv("MASSIVE_PUBLISHER_LEASE_TTL_MS", "600000")
    monkeypatch.setenv("MASSIVE_PUBLISHER_RENEW_MS", "1000")
    monkeypatch.setenv("MASSIVE_GEX_POLL_S", "0.03")
    monkeypatch.setenv("MASSIVE_GEX_LEASE_TTL_MS", "600000")
    monkeypatch.setenv("MASSIVE_GEX_SYMBOLS", "SPX")


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
async def test_same_recording_replayed_twice_publishes_identical_versions(
    redis: Redis, settings: RuntimeSettings, recording: Path, pipeline_env: None
) -> None:
    opts = rp.ReplayOptions(
        speed=None,
        lockstep=True,
        settle_s=0.1,
        drain_s=3.0,
        drain_step_s=0.5,
        timeout_s=30.0,
        processors=PIPELINE,
    )
    runs = []
    registries = []
    for run in range(2):
        await redis.flushall()
        s = RuntimeSettings(
            redis_url=settings.redis_url,
            consumer=f"replay-{run}",
            block_ms=20,
            min_idle_ms=60_000,
            reclaim_interval_s=60.0,
            grace_s=5.0,
        )
        registries.append(CollectorRegistry())
        stats = await rp.replay_file(redis, recording, opts, s, registries[-1])
        assert sum(stats.records.values()) == Session().n_records
        runs.append(await published(redis))
    first, second = runs
    # Non-trivial: every model published several versions, across two epochs.
    for s in diff_streams():
        versions = [d["d"]["version"] for d in first[s]]
        assert len(versions) >= 2, (s, versions)
        assert versions == sorted(versions)
    epochs = {d["d"]["epoch"] for s in diff_streams() for d in first[s]}
    assert len(epochs) == 2
    for s in keys.STRATEGIES:
        model = first[keys.heatmap_model("SPX", s)]
        assert model["items"] and model["epoch"] in epochs
        assert model["version"] == first[keys.heatmap_diffs_stream(s)][-1]["d"]["version"]
    assert first[keys.gex_model("SPX")]["items"]
    conditions = {
        c: sum(
            registries[0].get_sample_value(
                "massive_publishes_total", {"strategy": s, "condition": c}
            )
            or 0
            for s in keys.STRATEGIES
        )
        for c in ("value", "time")
    }
    assert conditions["value"] > 0 and conditions["time"] > 0, conditions
    # The guarantee.
    assert second.keys() == first.keys()
    for k in first:
        assert second[k] == first[k], k


@pytest.mark.slow
def test_cli_replay_runs_processors_in_process_with_the_recording_clock(
    redis_server: RedisServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``replay FILE --lockstep --run normalizer``: the normalizer builds the epochs of the
    recorded chain snapshots, stamped with recorded times (not the wall clock)."""
    import redis as sync_redis

    # The CLI defaults these (setdefault) for --run; keep that out of other tests.
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
    args = [str(path), "--redis-url", url, "--as-fast-as-possible", "--lockstep", "--settle-s", "0"]
    assert rp.replay_main([*args, "--run", "normalizer"]) == 0
    assert f"replayed {path}: {len(session.chain)} records" in capsys.readouterr().out
    r = sync_redis.Redis.from_url(url)
    try:
        eid = r.hget(keys.EPOCH_ACTIVE, "SPX")
        assert eid is not None
        meta = r.hgetall(keys.epoch_meta(eid.decode()))
        last_chain = session.chain[-1][0]
        assert meta[b"state"] == b"active"
        # Promoted at the recorded receive time of the snapshot that changed the topology.
        assert int(meta[b"promoted_ns"]) == last_chain.ts_ns
        assert int(meta[b"n_contracts"]) == len(last_chain.contracts)
        (g,) = r.xinfo_groups(keys.CHAIN_STREAM)
        assert (g["lag"], g["pending"]) == (0, 0)
    finally:
        r.close()
