"""Heatmap publisher RSS under steady diffs, sampled fast enough to catch checkpoint writes.

    nice -n 5 .venv/bin/python bench/publisher_rss.py [--strategy butterfly] [--duration 180]
        [--warmup 30] [--sample-s 0.2] [--dirty 100] [--batch-s 0.1]
        [--promote-s 0] [--env MASSIVE_PUBLISHER_CHECKPOINT_MS=5000 ...]

Starts its own redis-server (tests.util.RedisServer), seeds a 20,000-contract SPX epoch
(20 expiries x 500 strikes x C/P; the 5 front expiries tiled, as in bench/e2e_load.py:
~49k butterfly tiles), installs the strategy's tiles with an in-process TileBuilder, then
runs ``publisher:<strategy>`` as its own process (``python -m processors.ops.cli run``).
Every ``--batch-s`` the bench reprices ``--dirty`` contracts (70 % among the 1,000 nearest
spot on the 2 front expiries) and feeds them to the builder, whose tile deltas the
publisher publishes (a diff every max_interval_ms, a checkpoint every checkpoint_ms);
``--promote-s`` installs a new epoch (strikes and spot 5 points away) that often. A
thread reads the publisher's VmRSS from /proc every ``--sample-s``. Prints the RSS
min/max and max/min - 1 after ``--warmup`` s (the issue-14 flatness figure), percentiles,
and the versions and checkpoints published.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from processors.heatmap.tile_builder import TileBuilder, TileSettings
from schemas import keys
from schemas.messages import ChainContract, DirtyEntry, entry
from streams.processor import Deps
from streams.redis_client import connect
from streams.settings import RuntimeSettings
from tests.factories import option_chain, queue_ws_quotes, seed_epoch
from tests.util import RedisServer

ROOT = Path(__file__).resolve().parents[1]
NOW = 1_764_000_000_000_000_000


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Sampler(threading.Thread):
    """(monotonic s, RSS MB) of ``pid`` every ``every_s``: a thread, so the bench's own
    event loop (the tile builder's batches) does not delay the samples."""

    def __init__(self, pid: int, every_s: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            r = rss_mb(self.pid)
            if r is not None:
                self.samples.append((time.monotonic(), r))

    def peak_since(self, t0: float) -> float | None:
        """The highest sample taken from monotonic ``t0`` on (None: none yet)."""
        return max((r for t, r in self.samples if t >= t0), default=None)


def chain_axes() -> tuple[list[str], list[float]]:
    """The bench chain's 20 daily expiries and 500 strikes 5 points apart around 6,000."""
    d0 = dt.date(2026, 12, 1)
    exps = [(d0 + dt.timedelta(days=i)).isoformat() for i in range(20)]
    return exps, [6000.0 - 5 * 250 + 5 * i for i in range(500)]


async def epoch(
    redis: Redis, eid: str, exps: list[str], strikes: list[float], shift: float
) -> tuple[list[ChainContract], list[str], list[str]]:
    """Seed and activate epoch ``eid`` (strikes and spot moved by ``shift``): its contracts,
    the tiled ones and the 1,000 nearest spot on the 2 front expiries."""
    spot = 6000 + shift
    chain = option_chain("SPXW", exps, [k + shift for k in strikes], spot=spot, asof="2026-11-28")
    await seed_epoch(redis, eid, "SPX", chain, spot=spot, now_ns=NOW)
    tiled = [c.cid for c in chain if c.expiry in exps[:5]]
    by_dist = sorted((c for c in chain if c.expiry in exps[:2]), key=lambda c: abs(c.strike - spot))
    return chain, tiled, [c.cid for c in by_dist[:1000]]


def start_publisher(strategy: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "processors.ops.cli", "run", f"publisher:{strategy}"],
        cwd=ROOT,
        env=env,
    )


def print_promotions(
    promotions: list[float], samples: list[tuple[float, float]], t_start: float
) -> None:
    if not promotions:
        return
    print("promotion at s: RSS max 5 s before / peak 10 s after / min 10-30 s after (MB)")
    for x in promotions:
        rel = [(t - t_start - x, m) for t, m in samples]
        before = max((m for d, m in rel if -5 <= d < 0), default=0.0)
        peak = max((m for d, m in rel if 0 <= d <= 10), default=0.0)
        settled = min((m for d, m in rel if 10 < d <= 30), default=0.0)
        print(f"  {x:5.0f}: {before:.1f} / {peak:.1f} / {settled:.1f}")


async def main(args: argparse.Namespace) -> None:
    srv = RedisServer().start()
    proc: subprocess.Popen[bytes] | None = None
    try:
        redis = connect(srv.url)
        exps, strikes = chain_axes()
        eid, shift = "bench0", 0.0
        chain, tiled, near = await epoch(redis, eid, exps, strikes, shift)
        strategy = args.strategy
        cfg = TileSettings(n_expiries=5, drop_expired=False)
        settings = RuntimeSettings(redis_url=srv.url, consumer="bench-builder")
        deps = Deps(redis=redis, settings=settings, registry=CollectorRegistry())
        b = TileBuilder(deps, strategy, cfg)
        ts = NOW
        await b.handle([(b"1-0", entry(DirtyEntry("SPX", eid, [], ts, reason="epoch")))])
        n_tiles = await redis.hlen(keys.heatmap_staging("SPX", strategy))
        print(f"epoch: {len(chain)} contracts, {n_tiles} {strategy} tiles (5 expiries tiled)")
        env = {
            **os.environ,
            "MASSIVE_REDIS_URL": srv.url,
            "MASSIVE_SYMBOLS": "SPX",
            "MASSIVE_LOG_LEVEL": "WARNING",
        }
        for kv in args.env:
            k, _, v = kv.partition("=")
            env[k] = v
        proc = start_publisher(strategy, env)
        ver_k = keys.heatmap_version("SPX", strategy)
        while not await redis.get(ver_k):
            if proc.poll() is not None:
                raise SystemExit(f"publisher exited: {proc.returncode}")
            await asyncio.sleep(0.1)
        sampler = Sampler(proc.pid, args.sample_s)
        sampler.start()
        rng = random.Random(42)
        t_start = time.monotonic()
        v0 = int(await redis.get(ver_k) or 0)
        ckpt_versions: set[int] = set()
        r = 2
        model_k = keys.heatmap_model("SPX", strategy)
        promotions: list[float] = []  # bench seconds when each new epoch was installed
        while time.monotonic() - t_start < args.duration:
            t_batch = time.monotonic()
            if args.promote_s and t_batch - t_start >= args.promote_s * (len(promotions) + 1):
                # a promotion: a new epoch, strikes and spot 5 points away (as a spot move
                # does), installed by the builder; the publisher's "complete" publish follows
                eid, shift = f"bench{len(promotions) + 1}", 5.0 - shift
                chain, tiled, near = await epoch(redis, eid, exps, strikes, shift)
                await b.handle(
                    [(f"{r}-0".encode(), entry(DirtyEntry("SPX", eid, [], ts, reason="epoch")))]
                )
                r += 1
                promotions.append(time.monotonic() - t_start)
            batch = list(
                {
                    rng.choice(near) if rng.random() < 0.7 else rng.choice(tiled)
                    for _ in range(args.dirty)
                }
            )
            pipe = redis.pipeline(transaction=False)
            ts = queue_ws_quotes(pipe, "SPX", eid, batch, rng, ts)
            await pipe.execute()
            await b.handle([(f"{r}-0".encode(), entry(DirtyEntry("SPX", eid, batch, ts)))])
            r += 1
            if r % 20 == 0:  # the checkpointed version: a few bytes of the model key's head
                head: bytes = await redis.getrange(model_k, 0, 200)  # type: ignore[assignment]
                i = head.find(b'"version":')
                if i >= 0:
                    ckpt_versions.add(int(head[i + 10 :].split(b",")[0]))
            await asyncio.sleep(max(0.0, args.batch_s - (time.monotonic() - t_batch)))
        sampler.stop.set()
        sampler.join()
        v1 = int(await redis.get(ver_k) or 0)
        if proc.poll() is not None:
            raise SystemExit(f"publisher exited: {proc.returncode}")
        after = [m for t, m in sampler.samples if t - t_start >= args.warmup]
        allr = [m for _, m in sampler.samples]
        q = statistics.quantiles(after, n=100)
        print(
            f"{args.duration:.0f} s, {r - 2} batches of {args.dirty} dirty, versions {v0}->{v1}"
            f" ({(v1 - v0) / args.duration:.1f}/s),"
            f" checkpointed versions seen: {len(ckpt_versions)}"
        )
        print(
            f"RSS whole run {min(allr):.1f}-{max(allr):.1f} MB; after {args.warmup:.0f} s"
            f" warm-up ({len(after)} samples every {args.sample_s} s): min {min(after):.1f}"
            f" p50 {q[49]:.1f} p99 {q[98]:.1f} max {max(after):.1f} MB,"
            f" max/min-1 {100 * (max(after) / min(after) - 1):.1f} %"
        )
        print_promotions(promotions, sampler.samples, t_start)
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        await redis.aclose()
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        srv.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--strategy", default="butterfly")
    ap.add_argument("--duration", type=float, default=180)
    ap.add_argument("--warmup", type=float, default=30)
    ap.add_argument("--sample-s", type=float, default=0.2)
    ap.add_argument("--dirty", type=int, default=100)
    ap.add_argument("--batch-s", type=float, default=0.1)
    ap.add_argument("--promote-s", type=float, default=0, help="a new epoch every N s (0: none)")
    ap.add_argument("--env", action="append", default=[], metavar="MASSIVE_X=V")
    asyncio.run(main(ap.parse_args()))
