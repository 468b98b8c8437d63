"""record / replay throughput: fill massive:ws:stream with N WS frames (plus chain pointers
with their blobs), record them to a .mrec.gz file, then replay the file as fast as possible
into an empty Redis. Prints records/s for each phase and the file size. Starts its own
redis-server.

    .venv/bin/python bench/replay_throughput.py [--n 100000] [--chains 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from redis.asyncio import Redis

from processors import replay as rp
from schemas import keys
from schemas.messages import (
    WS_PAYLOAD_FIELD,
    WS_RECV_FIELD,
    ChainPointer,
    ChainSnapshot,
    encode_snapshot,
    entry,
)
from tests.factories import option_chain
from tests.util import RedisServer

T0 = 1_764_000_000_000_000_000


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


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--chains", type=int, default=20)
    args = ap.parse_args()
    srv = RedisServer().start()
    r = Redis.from_url(srv.url)
    path = os.path.join(tempfile.mkdtemp(prefix="massive-bench-"), "b.mrec.gz")
    try:
        await fill(r, args.n, args.chains)
        total = args.n + args.chains
        t0 = time.perf_counter()
        records, _ = await rp.record_range(r, list(rp.FEEDS.values()))
        with rp.RecordingWriter(path, list(rp.FEEDS.values()), T0) as w:
            for rec in records:
                w.write(rec)
        rec_s = time.perf_counter() - t0
        size = await asyncio.to_thread(os.path.getsize, path)
        await r.flushall()
        t0 = time.perf_counter()
        _, it = rp.read_recording(path)
        stats = await rp.replay_records(r, it, speed=None)
        rep_s = time.perf_counter() - t0
        assert (
            sum(stats.records.values())
            == total
            == await r.xlen(keys.WS_STREAM) + await r.xlen(keys.CHAIN_STREAM)
        )
        print(f"records: {total} ({args.n} WS frames, {args.chains} chain pointers+blobs)")
        print(
            f"record (XRANGE + GET blobs + sort + gzip msgpack): {rec_s:.2f} s, "
            f"{total / rec_s:,.0f} records/s"
        )
        print(f"file: {size / 1e6:.2f} MB, {size / total:.1f} B/record")
        print(
            f"replay as fast as possible (pipelined, 500 per round trip): {rep_s:.2f} s, "
            f"{total / rep_s:,.0f} records/s"
        )
    finally:
        await r.aclose()
        srv.stop()
        os.unlink(path)


if __name__ == "__main__":
    asyncio.run(main())
