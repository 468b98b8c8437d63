"""Tile builder RSS through full builds (new epochs), one step vs in chunks.

    nice -n 5 .venv/bin/python bench/tile_build_rss.py [--strategy butterfly ...]
        [--chunks 0,4096] [--epochs 4] [--sample-s 0.02]

For each strategy and each ``MASSIVE_TILES_BUILD_CHUNK`` of ``--chunks`` (0 = the whole epoch
in one step, i.e. the build before chunking) it starts its own redis-server
(tests.util.RedisServer), seeds a 20,000-contract SPX epoch (bench/publisher_rss.py's: 20
expiries x 500 strikes x C/P, the 5 front expiries tiled), runs ``tile-builder:<strategy>`` as
its own process (``python -m processors.ops.cli run``), which full-builds it at start, then
promotes ``--epochs`` more epochs (strikes and spot 5 points away, as a spot move does), each
announced on the dirty stream like the normalizer does. A thread reads the builder's VmRSS
every ``--sample-s``. Per build it prints the RSS peak while building and the RSS once the
build was installed; then the largest peak and the RSS after the last build.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from publisher_rss import Sampler, chain_axes, epoch  # bench/publisher_rss.py
from redis.asyncio import Redis

from schemas import keys
from schemas.messages import DirtyEntry, entry
from streams import producer
from streams.redis_client import connect
from tests.util import RedisServer

ROOT = Path(__file__).resolve().parents[1]
NOW = 1_764_000_000_000_000_000


def start_builder(strategy: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "processors.ops.cli", "run", f"tile-builder:{strategy}"],
        cwd=ROOT,
        env=env,
    )


async def installed(redis: Redis, strategy: str, eid: str, proc: subprocess.Popen[bytes]) -> None:
    man = keys.heatmap_manifest("SPX", strategy)
    while (await redis.hget(man, "epoch")) != eid.encode():
        if proc.poll() is not None:
            raise SystemExit(f"tile builder exited: {proc.returncode}")
        await asyncio.sleep(0.05)


async def run(strategy: str, chunk: int, args: argparse.Namespace) -> tuple[float, float]:
    srv = RedisServer().start()
    proc: subprocess.Popen[bytes] | None = None
    try:
        redis = connect(srv.url)
        exps, strikes = chain_axes()
        await epoch(redis, "bench0", exps, strikes, 0.0)
        env = {
            **os.environ,
            "MASSIVE_REDIS_URL": srv.url,
            "MASSIVE_SYMBOLS": "SPX",
            "MASSIVE_LOG_LEVEL": "WARNING",
            "MASSIVE_TILES_N_EXPIRIES": "5",
            "MASSIVE_TILES_DROP_EXPIRED": "false",
            "MASSIVE_TILES_BUILD_CHUNK": str(chunk or 10**9),
        }
        proc = start_builder(strategy, env)
        sampler = Sampler(proc.pid, args.sample_s)
        sampler.start()
        marks = [time.monotonic()]
        await installed(redis, strategy, "bench0", proc)
        marks.append(time.monotonic())
        n_tiles = await redis.hlen(keys.heatmap_staging("SPX", strategy))
        label = chunk or "whole"
        print(f"{strategy} chunk={label}: {n_tiles} tiles per epoch")
        shift = 0.0
        for i in range(1, args.epochs + 1):
            eid, shift = f"bench{i}", 5.0 - shift
            await epoch(redis, eid, exps, strikes, shift)
            await asyncio.sleep(1.0)  # an idle second: the settled RSS before the build
            marks.append(time.monotonic())
            fields = entry(DirtyEntry("SPX", eid, [], NOW + i, reason="epoch"))
            await producer.xadd(redis, keys.contracts_dirty_stream("SPX"), fields)  # type: ignore[arg-type]
            await installed(redis, strategy, eid, proc)
            marks.append(time.monotonic())
        await asyncio.sleep(2.0)
        sampler.stop.set()
        sampler.join()
        s = sampler.samples
        peaks: list[float] = []
        for j in range(0, len(marks) - 1, 2):
            t0, t1 = marks[j], marks[j + 1]
            peak = max((m for t, m in s if t0 <= t <= t1 + 0.2), default=0.0)
            after = [m for t, m in s if t > t1 + 0.2]
            settled = after[min(len(after) - 1, int(0.8 / args.sample_s))] if after else 0.0
            peaks.append(peak)
            print(f"  build {len(peaks)}: peak {peak:6.1f} MB, after {settled:6.1f} MB")
        last = s[-1][1]
        print(f"  max peak {max(peaks):.1f} MB, RSS after the last build {last:.1f} MB")
        return max(peaks), last
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        srv.stop()


async def main(args: argparse.Namespace) -> None:
    print(f"# {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}, {os.cpu_count()} cpu")
    table: list[tuple[str, str, float, float]] = []
    for strategy in args.strategy or ["single", "vertical", "butterfly"]:
        for chunk in (int(c) for c in args.chunks.split(",")):
            peak, last = await run(strategy, chunk, args)
            table.append((strategy, str(chunk or "whole"), peak, last))
    print("strategy   chunk   max peak MB   after MB")
    for strategy, chunk, peak, last in table:
        print(f"{strategy:10} {chunk:>6} {peak:12.1f} {last:10.1f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--strategy", action="append", choices=["single", "vertical", "butterfly"])
    ap.add_argument("--chunks", default="0,4096")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--sample-s", type=float, default=0.02)
    asyncio.run(main(ap.parse_args()))
