"""Ingestion benchmarks (starts its own redis-server and servers; prints figures).

1. REST decode: parse_chain_page on real 250-item pages from the simulator (items/s).
2. chain-poller cycle against the local simulator: filtered SPX+NDX chains, all pages.
3. ws-ingest end to end: a local WS server blasts N frames of E trade events right after
   auth; time until every frame is in massive:ws:stream (frames/s, events/s, batch sizes).

    .venv/bin/python bench/ingest.py [--frames 20000] [--events 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx
import orjson
import websockets
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from processors.ingest.chain_poller import ChainPoller, PollerSettings
from processors.ingest.ws_ingest import WsIngest, WsSettings
from schemas import keys
from schemas import massive_rest as mr
from simulator.server import SimConfig, SimServer
from streams.processor import Deps
from streams.settings import RuntimeSettings
from tests.util import RedisServer


async def bench_rest(srv: SimServer, rounds: int) -> None:
    async with httpx.AsyncClient() as c:
        r = await c.get(
            f"{srv.rest_url}/v3/snapshot/options/I:SPX",
            params={"limit": "250", "apiKey": "sim-key"},
        )
    body = r.content
    n_items = len(mr.parse_chain_page(body).contracts)
    reps = 200
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            mr.parse_chain_page(body, "SPX")
        rates.append(reps * n_items / (time.perf_counter() - t0))
    print(
        f"REST decode: {n_items}-item page ({len(body) / 1024:.0f} KiB): "
        f"median {statistics.median(rates):,.0f} items/s ({', '.join(f'{x:,.0f}' for x in rates)})"
    )


async def bench_poller(srv: SimServer, deps: Deps, rounds: int) -> None:
    p = ChainPoller(deps, PollerSettings(api_key="sim-key", rest_url=srv.rest_url))
    async with p.rest.client() as client:
        for i in range(rounds):
            t0 = time.perf_counter()
            res = await p.cycle(client, "bench")
            dt = time.perf_counter() - t0
            desc = ", ".join(
                f"{r.symbol} {r.scope} {len(r.contracts)} contracts/{r.pages} pages "
                f"{r.seconds:.3f}s"
                for r in res
            )
            print(f"poller cycle {i + 1}: {dt:.3f}s ({desc})")
        t0 = time.perf_counter()
        full = await p.full_cycle(client, {}, "bench")
        desc = ", ".join(f"{r.symbol} {len(r.contracts)} contracts/{r.pages} pages" for r in full)
        print(f"whole chain for GEX: {time.perf_counter() - t0:.3f}s ({desc})")


async def bench_ws(redis: Redis, url: str, frames: int, events: int, rounds: int) -> None:
    ev = {"ev": "T", "sym": "O:SPXW261130C06000000", "x": 65, "p": 1.5, "s": 1, "c": [209]}
    frame = orjson.dumps([{**ev, "t": 1764000000000 + i, "q": i} for i in range(events)])
    go = asyncio.Event()

    async def handler(ws: websockets.ServerConnection) -> None:
        await ws.send('[{"ev":"status","status":"connected","message":"Connected Successfully"}]')
        await ws.recv()
        await ws.send('[{"ev":"status","status":"auth_success","message":"authenticated"}]')
        if ws.request is not None and ws.request.path == "/options":
            await go.wait()
            for _ in range(frames):
                await ws.send(frame.decode())
        await ws.wait_closed()

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        for i in range(rounds):
            await redis.flushall()
            go.clear()
            deps = Deps(redis, RuntimeSettings(redis_url=url, consumer="b"), CollectorRegistry())
            w = WsIngest(
                deps,
                WsSettings(api_key="k", url=f"ws://127.0.0.1:{port}", market_hours="never"),
            )
            stop = asyncio.Event()
            task = asyncio.create_task(w.run(stop))
            while not w.ready:  # noqa: ASYNC110 (bench: poll readiness)
                await asyncio.sleep(0.01)
            t0 = time.perf_counter()
            go.set()
            while await redis.xlen(keys.WS_STREAM) < frames:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            dt = time.perf_counter() - t0
            hist = deps.registry.get_sample_value("massive_ws_ingest_write_batch_frames_sum") or 0
            cnt = deps.registry.get_sample_value("massive_ws_ingest_write_batch_frames_count") or 1
            stop.set()
            await task
            print(
                f"ws-ingest round {i + 1}: {frames} frames x {events} events "
                f"({len(frame)} B) in {dt:.3f}s = {frames / dt:,.0f} frames/s, "
                f"{frames * events / dt:,.0f} events/s, mean XADD batch {hist / cnt:.0f} frames"
            )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--events", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cpus")
    rs = RedisServer().start()
    try:
        redis = Redis.from_url(rs.url)
        srv = SimServer(SimConfig(seed=1, api_key="sim-key", events_per_s=0.0))
        await srv.start()
        try:
            await bench_rest(srv, a.rounds)
            deps = Deps(redis, RuntimeSettings(redis_url=rs.url, consumer="b"), CollectorRegistry())
            await bench_poller(srv, deps, a.rounds)
        finally:
            await srv.stop()
        await bench_ws(redis, rs.url, a.frames, a.events, a.rounds)
        await redis.aclose()
    finally:
        rs.stop()


if __name__ == "__main__":
    asyncio.run(main())
