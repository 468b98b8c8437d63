"""Record / replay throughput.

1. Feed path: N synthetic WS frames (plus chain pointers with blobs) recorded to a .mrec.gz
   file, then fed as fast as possible into an empty Redis (``replay --feed``): records/s
   of each phase and the file size.
2. Pipeline replay, causal (the default) and lockstep (the reference) side by side: a
   simulator recording (SPX and NDX, default rate; made here with ``simulate``, the
   chain-poller, ws-ingest, the normalizer and ``record --follow``, or ``--recording``)
   replayed through normalizer, hydrator, the three tile builders and publishers and GEX on
   the recording's clock: wall time, times real time, records/s, instants, and whether the
   two outputs (every diff, the final models) are identical.

Starts its own redis-server (and simulator and processes when it records).

    .venv/bin/python bench/replay_throughput.py [--n 100000] [--seconds 60]
        [--recording FILE] [--skip-lockstep] [--step-ms 250]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from processors import MODEL_PATH
from processors import replay as rp
from processors import replay_compare as rc
from schemas import keys
from schemas.messages import (
    WS_PAYLOAD_FIELD,
    WS_RECV_FIELD,
    ChainPointer,
    ChainSnapshot,
    encode_snapshot,
    entry,
)
from streams.redis_client import connect
from streams.settings import RuntimeSettings
from tests.factories import option_chain
from tests.util import RedisServer, free_port

T0 = 1_764_000_000_000_000_000
PY = sys.executable


# --- 1. feed path ------------------------------------------------------------------------
async def fill(r: Redis, n: int, chains: int) -> None:
    contracts = option_chain(
        "SPXW",
        ["2025-11-24", "2025-11-25"],
        [5800.0 + 5 * i for i in range(80)],
        spot=5900.0,
        asof="2025-11-24",
    )
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        c = contracts[i % len(contracts)]
        t = T0 + i * 1_000_000
        frame = json.dumps(
            [{"ev": "Q", "sym": c.cid, "bp": 1.05, "ap": 1.25, "bs": 3, "as": 4, "t": t // 10**6}]
        ).encode()
        pipe.xadd(keys.WS_STREAM, {WS_RECV_FIELD: str(t), WS_PAYLOAD_FIELD: frame})
        if len(pipe) >= 1000:
            await pipe.execute()
    for j in range(chains):
        ts = T0 + j * n * 1_000_000 // max(chains, 1)
        snap = ChainSnapshot("SPX", ts, 5900.0, contracts)
        key = keys.chain_snapshot("SPX", ts)
        pipe.set(key, encode_snapshot(snap))
        pipe.xadd(keys.CHAIN_STREAM, entry(ChainPointer("SPX", key, ts, len(contracts))))  # type: ignore[arg-type]
    await pipe.execute()


async def feed_path(url: str, n: int, chains: int, tmp: Path) -> None:
    r = Redis.from_url(url)
    path = tmp / "feed.mrec.gz"
    try:
        await r.flushall()
        await fill(r, n, chains)
        total = n + chains
        t0 = time.perf_counter()
        records, _ = await rp.record_range(r, list(rp.FEEDS.values()))
        with rp.RecordingWriter(path, list(rp.FEEDS.values()), T0) as w:
            for rec in records:
                w.write(rec)
        rec_s = time.perf_counter() - t0
        size = path.stat().st_size
        await r.flushall()
        t0 = time.perf_counter()
        _, it = rp.read_recording(path)
        stats = await rp.replay_records(r, it, speed=None)
        rep_s = time.perf_counter() - t0
        assert sum(stats.records.values()) == total
        print(f"records: {total} ({n} WS frames, {chains} chain pointers+blobs)")
        print(
            f"record (XRANGE + GET blobs + sort + gzip msgpack): {rec_s:.2f} s, "
            f"{total / rec_s:,.0f} records/s"
        )
        print(f"file: {size / 1e6:.2f} MB, {size / total:.1f} B/record")
        print(
            f"feed as fast as possible (pipelined, 500 per round trip): {rep_s:.2f} s, "
            f"{total / rep_s:,.0f} records/s"
        )
    finally:
        await r.aclose()


# --- 2. a simulator recording ------------------------------------------------------------
def simulator_recording(url: str, seconds: float, out: Path, logs: Path) -> None:
    """simulate + chain-poller + ws-ingest + normalizer, then ``record --follow``."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASSIVE_")}
    env.update(
        MASSIVE_REDIS_URL=url,
        MASSIVE_LOG_LEVEL="WARNING",
        MASSIVE_POLLER_API_KEY="sim-key",
        MASSIVE_POLLER_REST_URL=f"http://127.0.0.1:{port}",
        MASSIVE_WS_API_KEY="sim-key",
        MASSIVE_WS_URL=f"ws://127.0.0.1:{port}",
        MASSIVE_WS_MARKET_HOURS="always",
    )
    cli = [PY, "-m", "processors.cli"]
    procs = []
    try:
        with open(logs / "sim.log", "wb") as log:
            sim = [*cli, "simulate", "--port", str(port)]
            procs.append(subprocess.Popen(sim, env=env, stdout=log, stderr=log))
        time.sleep(1.5)
        with open(logs / "ingest.log", "wb") as log:
            run = [*cli, "run", "chain-poller", "ws-ingest", "normalizer"]
            procs.append(subprocess.Popen(run, env=env, stderr=log))
        time.sleep(3.0)  # first snapshots, epochs and subscriptions: the recording starts live
        rec = [*cli, "record", "-o", str(out), "--follow", "--duration", str(seconds)]
        subprocess.run(rec, env=env, check=True, stdout=subprocess.DEVNULL)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


# --- 3. pipeline replay --------------------------------------------------------------------
async def replay(
    url: str, path: Path, mode: str, step_ms: float, out: Path
) -> tuple[rp.ReplayStats, float]:
    redis = connect(url)
    await redis.flushall()
    settings = RuntimeSettings(redis_url=url, consumer=f"bench-{mode}", log_level="WARNING")
    opts = rp.ReplayOptions(mode=mode, processors=list(MODEL_PATH), step_ms=step_ms)
    w = rc.OutputWriter(out)
    cpu0 = time.process_time()
    try:
        stats = await rp.replay_file(
            redis, path, opts, settings, CollectorRegistry(), on_instant=lambda: w.collect(redis)
        )
        await w.finish(redis)
    finally:
        w.close()
        await redis.aclose()
    return stats, time.process_time() - cpu0


async def pipeline_replays(url: str, path: Path, step_ms: float, lockstep: bool, tmp: Path) -> None:
    _, it = rp.read_recording(path)
    n = sum(1 for _ in it)
    print(f"\nrecording {path}: {n} records")
    modes = ["causal", "lockstep"] if lockstep else ["causal"]
    outs: dict[str, Path] = {}
    print(
        f"{'mode':9} {'wall s':>8} {'x real time':>12} {'records/s':>10} {'instants':>9} "
        f"{'replayer CPU s':>15}"
    )
    for mode in modes:
        outs[mode] = tmp / f"{mode}.mout.gz"
        st, cpu = await replay(url, path, mode, step_ms, outs[mode])
        print(
            f"{mode:9} {st.wall_s:8.2f} {st.span_s / st.wall_s:11.1f}x "
            f"{sum(st.records.values()) / st.wall_s:10,.0f} {st.instants:9d} {cpu:15.1f}"
        )
    if lockstep:
        res = await rc.compare(
            rc.open_source(str(outs["causal"])), rc.open_source(str(outs["lockstep"]))
        )
        if res.difference is None:
            print(f"causal == lockstep: {sum(res.diffs.values())} diffs, {res.models} final models")
        else:
            print(f"causal != lockstep: {res.difference}")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000, help="feed path: WS frames")
    ap.add_argument("--chains", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60.0, help="simulator recording length")
    ap.add_argument("--recording", type=Path, help="replay this recording instead")
    ap.add_argument("--skip-lockstep", action="store_true")
    ap.add_argument("--skip-feed", action="store_true")
    ap.add_argument("--step-ms", type=float, default=rp.DEFAULT_STEP_MS)
    args = ap.parse_args()
    # Leases: their TTL runs in Redis real time while the clock is the recording's.
    for var in ("MASSIVE_PUBLISHER_LEASE_TTL_MS", "MASSIVE_GEX_LEASE_TTL_MS"):
        os.environ.setdefault(var, str(rp.LONG_LEASE_MS))
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    srv = RedisServer().start()
    tmp = Path(tempfile.mkdtemp(prefix="massive-bench-replay-"))
    try:
        if not args.skip_feed:
            await feed_path(srv.url, args.n, args.chains, tmp)
        path = args.recording
        if path is None:
            path = tmp / "sim.mrec.gz"
            print(f"\nrecording {args.seconds:.0f} s of the simulator (SPX, NDX, default rate)")
            simulator_recording(srv.url, args.seconds, path, tmp)
        await pipeline_replays(srv.url, path, args.step_ms, not args.skip_lockstep, tmp)
    finally:
        srv.stop()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    from processors.cli import run_loop

    run_loop(main())  # uvloop, as the CLI
