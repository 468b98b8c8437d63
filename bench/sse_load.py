"""SSE fan-out load: N concurrent SSE clients on loopback, one publisher writing versioned
diffs at a fixed rate; reports the delivery delay (diff ts_ns set at publish -> receipt by
the client) as p50/p99/max and checks that every client got every diff once, in order.

    .venv/bin/python bench/sse_load.py [--clients 200] [--diffs 200] [--rate 20]

The gateway runs in its own process (``massive-pipeline run sse-gateway``) against a private
redis-server, so clients and server do not share an event loop. The clients are minimal
asyncio socket readers (an HTTP client library would add its own parsing cost to the delay).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field

import httpx
import orjson
from redis.asyncio import Redis

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.sse_publisher import ModelWriter
from tests.util import RedisServer, free_port

KIND = "heatmap:butterfly"


@dataclass
class LoadResult:
    clients: int
    diffs: int
    received: int
    lost: int
    out_of_order: int
    delays_ms: list[float] = field(default_factory=list)
    connect_s: float = 0.0

    def pct(self, q: float) -> float:
        if not self.delays_ms:
            return float("nan")
        s = sorted(self.delays_ms)
        return s[min(len(s) - 1, int(q * len(s)))]

    @property
    def p50_ms(self) -> float:
        return self.pct(0.50)

    @property
    def p99_ms(self) -> float:
        return self.pct(0.99)

    @property
    def max_ms(self) -> float:
        return max(self.delays_ms) if self.delays_ms else float("nan")


class _Reader:
    def __init__(self) -> None:
        self.snapshot = asyncio.Event()
        self.done = asyncio.Event()
        self.target = 1 << 62
        self.versions: list[int] = []
        self.delays_ms: list[float] = []
        self.task: asyncio.Task[None] | None = None

    async def run(self, host: str, port: int, path: str) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        buf = b""
        try:
            while True:
                chunk = await reader.read(1 << 16)
                if not chunk:
                    return
                now = time.time_ns()
                buf += chunk
                *frames, buf = buf.split(b"\r\n\r\n")
                for fr in frames:
                    if b"event: diff" in fr:
                        data = fr[fr.index(b"data: ") + 6 :]
                        d = orjson.loads(data)
                        self.versions.append(d["version"])
                        self.delays_ms.append((now - d["ts_ns"]) / 1e6)
                        if len(self.versions) >= self.target:
                            self.done.set()
                    elif b"event: snapshot" in fr:
                        self.snapshot.set()
        finally:
            writer.close()


async def run_load(
    redis: Redis,
    base_url: str,
    clients: int = 200,
    diffs: int = 200,
    rate_hz: float = 20.0,
    symbol: str = "SPX",
) -> LoadResult:
    url = httpx.URL(base_url)
    host, port = url.host, url.port or 80
    writer = ModelWriter(redis)
    await writer.publish(symbol, KIND, "bench", {"t0": {"v": 0}}, ts_ns=time.time_ns())
    readers = [_Reader() for _ in range(clients)]
    path = f"/sse/heatmap/butterfly?symbol={symbol}"
    t0 = time.monotonic()
    for r in readers:
        r.task = asyncio.create_task(r.run(host, port, path))
    try:
        try:
            await asyncio.wait_for(asyncio.gather(*(r.snapshot.wait() for r in readers)), 60)
        except TimeoutError:
            n_ok = sum(r.snapshot.is_set() for r in readers)
            errs = [r.task.exception() for r in readers if r.task and r.task.done()]
            msg = f"only {n_ok}/{clients} clients got a snapshot; {errs[:3]}"
            raise RuntimeError(msg) from None
        connect_s = time.monotonic() - t0
        v0 = writer.models[(symbol, KIND)].version
        period = 1.0 / rate_hz
        for r in readers:
            r.target = diffs
        start = time.monotonic()
        for i in range(diffs):
            await writer.publish(
                symbol, KIND, "bench", {f"t{i % 50}": {"v": i}}, ts_ns=time.time_ns()
            )
            delay = start + (i + 1) * period - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in readers)), 10)
    finally:
        for r in readers:
            if r.task is not None:
                r.task.cancel()
        await asyncio.gather(*(r.task for r in readers if r.task), return_exceptions=True)
    expected = list(range(v0 + 1, v0 + diffs + 1))
    res = LoadResult(clients, diffs, 0, 0, 0, connect_s=connect_s)
    for r in readers:
        res.received += len(r.versions)
        res.lost += len(set(expected) - set(r.versions))
        res.out_of_order += int(r.versions != sorted(r.versions))
        res.delays_ms += r.delays_ms
    return res


async def _main(args: argparse.Namespace) -> None:
    srv = RedisServer().start()
    port = free_port()
    env = dict(
        os.environ,
        MASSIVE_REDIS_URL=srv.url,
        MASSIVE_SSE_HOST="127.0.0.1",
        MASSIVE_SSE_PORT=str(port),
        MASSIVE_LOG_LEVEL="WARNING",
    )
    exe = os.path.join(os.path.dirname(sys.executable), "massive-pipeline")
    proc = await asyncio.create_subprocess_exec(exe, "run", "sse-gateway", env=env)
    redis = Redis.from_url(srv.url)
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(200):
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
        res = await run_load(redis, f"http://127.0.0.1:{port}", args.clients, args.diffs, args.rate)
        print(
            f"sse_load clients={res.clients} diffs={res.diffs} rate={args.rate}/s "
            f"received={res.received}/{res.clients * res.diffs} lost={res.lost} "
            f"out_of_order_clients={res.out_of_order} connect_all={res.connect_s:.2f}s "
            f"delay_ms p50={res.p50_ms:.2f} p99={res.p99_ms:.2f} max={res.max_ms:.2f}"
        )
    finally:
        await redis.aclose()
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
        srv.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--diffs", type=int, default=200)
    p.add_argument("--rate", type=float, default=20.0, help="diffs per second")
    asyncio.run(_main(p.parse_args()))


if __name__ == "__main__":
    main()
