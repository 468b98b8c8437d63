"""Consumer throughput of the streams runtime: pre-fill N entries, consume them with one
GroupConsumer (XREADGROUP COUNT 500, pipelined XACK, msgspec decode of each entry), stop when
XINFO GROUPS shows every entry read and none pending. Starts its own redis-server.

    .venv/bin/python bench/consumer_throughput.py [--n 200000] [--rounds 3]

``--cluster``: the same consumer on a private 3-master Redis Cluster, with the processors'
cluster client (``redis+cluster://``: hiredis packing, stream slots found locally) and with
redis-py's plain RedisCluster (pure-Python packing, ``COMMAND GETKEYS`` per XREADGROUP),
interleaved: what the cluster client's two changes are worth.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from typing import cast

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import msgspec
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from streams.consumer import Entry, GroupConsumer
from streams.redis_client import connect
from streams.spec import StreamSpec
from tests.redis_cluster import LocalCluster
from tests.util import RedisServer

STREAM = "bench:consumer"
PAYLOAD = (
    b'{"sym":"O:SPXW261124C06000000","p":12.35,"s":3,"t":1764000000123,"q":%d,"x":4,'
    b'"c":[209,219],"e":"2026-11-24","k":"call","u":"I:SPX","z":"CBOE"}'
)


class Trade(msgspec.Struct):
    sym: str
    p: float
    s: int
    t: int
    q: int


async def prefill(r: Redis, n: int) -> None:
    await r.delete(STREAM)
    for start in range(0, n, 1000):
        pipe = r.pipeline(transaction=False)
        for i in range(start, min(n, start + 1000)):
            pipe.xadd(STREAM, {b"d": PAYLOAD % i})
        await pipe.execute()


async def one_round(
    url: str, n: int, rnd: int, count: int, plain_cluster: bool = False
) -> tuple[float, float]:
    # the processors' client (hiredis command packing), or redis-py's own cluster client
    r = plain_cluster_client(url) if plain_cluster else connect(url)
    group = f"g{rnd}"
    await r.xgroup_create(STREAM, group, id="0")
    dec = msgspec.json.Decoder(Trade)
    checksum = 0

    async def handle(entries: list[Entry]) -> None:
        nonlocal checksum
        for _, f in entries:
            checksum += dec.decode(f[b"d"]).q

    spec = StreamSpec(STREAM, group, "c1", count=count, block_ms=100, reclaim_interval_s=3600)
    c = GroupConsumer(r, spec, handle, CollectorRegistry(), "bench")
    stop = asyncio.Event()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    task = asyncio.create_task(c.run(stop))
    while True:
        await asyncio.sleep(0.01)
        g = next(x for x in await r.xinfo_groups(STREAM) if x["name"] == group.encode())
        if g["entries-read"] == n and g["pending"] == 0:
            break
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    stop.set()
    await task
    assert checksum == n * (n - 1) // 2, "lost or duplicated entries"
    await r.aclose()
    return n / elapsed, cpu


def plain_cluster_client(url: str) -> Redis:
    seed = url.replace("redis+cluster://", "redis://")
    return cast(Redis, RedisCluster.from_url(seed))


async def cluster_main(n: int, rounds: int, count: int) -> None:
    cluster = LocalCluster(masters=3).start()
    try:
        r = connect(cluster.url)
        await prefill(r, n)
        await r.aclose()
        fast, plain = [], []
        for i in range(rounds):
            rate, cpu = await one_round(cluster.url, n, i, count)
            fast.append(rate)
            print(
                f"round {i + 1}: cluster, our client {rate:,.0f} msgs/s  (python cpu {cpu:.2f} s)"
            )
            rate, cpu = await one_round(cluster.url, n, 100 + i, count, plain_cluster=True)
            plain.append(rate)
            print(f"round {i + 1}: cluster, plain redis-py {rate:,.0f} msgs/s  (cpu {cpu:.2f} s)")
        print(
            f"consumer throughput on a 3-master cluster, N={n:,}, COUNT {count}: our client "
            f"median {statistics.median(fast):,.0f} msgs/s, redis-py's RedisCluster "
            f"{statistics.median(plain):,.0f} msgs/s  [{platform.machine()}, "
            f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}]"
        )
    finally:
        cluster.stop()


async def raw_round(url: str, n: int, rnd: int, count: int) -> tuple[float, float]:
    """The reference loop of reference/runtime.md (no runtime): XACK of the previous batch
    pipelined with the next XREADGROUP, decode each entry. Same machine, same moment."""
    r = Redis.from_url(url)
    group = f"raw{rnd}"
    await r.xgroup_create(STREAM, group, id="0")
    dec = msgspec.json.Decoder(Trade)
    checksum = 0
    prev: list[bytes] = []
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    seen = 0
    while seen < n or prev:
        pipe = r.pipeline(transaction=False)
        if prev:
            pipe.xack(STREAM, group, *prev)
        pipe.xreadgroup(group, "c1", {STREAM: ">"}, count=count, block=100)
        res = (await pipe.execute())[-1]
        prev = []
        if res:
            for eid, f in res[0][1]:
                checksum += dec.decode(f[b"d"]).q
                prev.append(eid)
            seen += len(res[0][1])
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    assert checksum == n * (n - 1) // 2
    await r.aclose()
    return n / elapsed, cpu


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--count", type=int, default=500, help="XREADGROUP COUNT")
    ap.add_argument("--cluster", action="store_true", help="on a 3-master cluster (see above)")
    a = ap.parse_args()
    if a.cluster:
        await cluster_main(a.n, a.rounds, a.count)
        return
    srv = RedisServer().start()
    try:
        r = Redis.from_url(srv.url)
        await prefill(r, a.n)
        await r.aclose()
        rates, raw_rates = [], []
        for i in range(a.rounds):  # interleaved, so both see the same machine load
            rate, cpu = await one_round(srv.url, a.n, i, a.count)
            rates.append(rate)
            print(f"round {i + 1}: runtime {rate:,.0f} msgs/s  (python cpu {cpu:.2f} s)")
            rate, cpu = await raw_round(srv.url, a.n, i, a.count)
            raw_rates.append(rate)
            print(f"round {i + 1}: raw loop {rate:,.0f} msgs/s  (python cpu {cpu:.2f} s)")
        print(f"raw redis-py reference loop: median {statistics.median(raw_rates):,.0f} msgs/s")
        print(
            f"consumer throughput, one consumer, N={a.n:,}, COUNT {a.count}: "
            f"median {statistics.median(rates):,.0f} msgs/s  "
            f"[{platform.machine()}, {os.cpu_count()} cpus, python "
            f"{platform.python_version()}]"
        )
    finally:
        srv.stop()


if __name__ == "__main__":
    asyncio.run(main())
