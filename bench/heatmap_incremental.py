"""Heatmap tile builder: incremental update vs full rebuild on a 20,000-contract epoch.

    .venv/bin/python bench/heatmap_incremental.py [--expiries 20] [--strikes 500]
        [--dirty 100] [--rounds 10] [--strategies butterfly,vertical,single]

Starts its own redis-server (tests.util.RedisServer), seeds one epoch (SPXW dailies,
5-point strikes around 6000, Black-Scholes-priced quotes and trades: tests.factories
.option_chain), tiles EVERY expiry of it (n_expiries = all) with the default SPX widths
(5..50 step 5), then per strategy prints:
  full reference   reference_full_build: read all contract hashes + compute all tiles
  full install     the production full build (compute + temp hash + atomic rename)
  incremental      one batch of --dirty random dirty contracts through TileBuilder.handle:
                   active-epoch check, leg reads, tile math, admission Lua, tile delta XADD
                   (median of --rounds; contract updates happen outside the timed part)
  ratio            full reference / incremental (target >= 50x)
  tiles/s          tiles recomputed per second by one builder process in the incremental path
  dirty/s          dirty contracts absorbed per second at that batch size (compare with the
                   5,000 WS events/s target: one event dirties one contract)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import CollectorRegistry

from processors.heatmap.tile_builder import TileBuilder, TileSettings
from schemas import keys
from schemas.messages import DirtyEntry, entry
from streams.processor import Deps
from streams.redis_client import connect
from streams.settings import RuntimeSettings
from tests.factories import option_chain, queue_ws_quotes, seed_epoch
from tests.heatmap_reference import reference_full_build
from tests.util import RedisServer

NOW = 1_764_000_000_000_000_000


async def main(args: argparse.Namespace) -> None:
    srv = RedisServer().start()
    try:
        redis = connect(srv.url)
        d0 = dt.date(2026, 12, 1)
        exps = [(d0 + dt.timedelta(days=i)).isoformat() for i in range(args.expiries)]
        strikes = [6000 - 5 * (args.strikes // 2) + 5 * i for i in range(args.strikes)]
        t0 = time.perf_counter()
        chain = option_chain("SPXW", exps, strikes, spot=6000, asof="2026-11-28")
        await seed_epoch(redis, "bench", "SPX", chain, spot=6000, now_ns=NOW)
        cids = [c.cid for c in chain]
        print(
            f"epoch: {len(cids)} contracts ({args.expiries} expiries x {args.strikes} strikes"
            f" x C/P), seeded in {time.perf_counter() - t0:.1f}s"
        )
        cfg = TileSettings(n_expiries=args.expiries, drop_expired=False)
        print(f"widths SPX: {cfg.widths_spx}; dirty per batch: {args.dirty}; rounds: {args.rounds}")
        print(
            f"{'strategy':<10} {'tiles':>8} {'full ref s':>10} {'install s':>10} "
            f"{'incr ms':>8} {'tiles/batch':>11} {'ratio':>7} {'tiles/s':>9} {'dirty/s':>8}"
        )
        rng = random.Random(42)
        ts = NOW
        for strategy in args.strategies.split(","):
            settings = RuntimeSettings(redis_url=srv.url, consumer=f"bench-{strategy}")
            deps = Deps(redis=redis, settings=settings, registry=CollectorRegistry())
            b = TileBuilder(deps, strategy, cfg)
            t0 = time.perf_counter()
            await b.handle([(b"1-0", entry(DirtyEntry("SPX", "bench", [], ts, reason="epoch")))])
            install_s = time.perf_counter() - t0
            n_tiles = await redis.hlen(keys.heatmap_staging("SPX", strategy))
            ref_times = []
            for _ in range(2):
                t0 = time.perf_counter()
                ref = await reference_full_build(redis, "bench", "SPX", strategy, cfg, NOW)
                ref_times.append(time.perf_counter() - t0)
                assert len(ref) == n_tiles
            full_s = min(ref_times)
            inc_times, inc_tiles = [], []
            for r in range(args.rounds):
                batch = rng.sample(cids, args.dirty)
                pipe = redis.pipeline(transaction=False)
                ts = queue_ws_quotes(pipe, "SPX", "bench", batch, rng, ts)
                await pipe.execute()
                msg = DirtyEntry("SPX", "bench", batch, ts, recv_ts_ns=ts)
                before = b.m_computed.labels(strategy, "incremental")._value.get()
                t0 = time.perf_counter()
                await b.handle([(f"{r + 2}-0".encode(), entry(msg))])
                inc_times.append(time.perf_counter() - t0)
                inc_tiles.append(b.m_computed.labels(strategy, "incremental")._value.get() - before)
            inc_s = statistics.median(inc_times)
            tiles_per_batch = statistics.median(inc_tiles)
            print(
                f"{strategy:<10} {n_tiles:>8} {full_s:>10.3f} {install_s:>10.3f} "
                f"{inc_s * 1000:>8.2f} {tiles_per_batch:>11.0f} {full_s / inc_s:>6.0f}x "
                f"{sum(inc_tiles) / sum(inc_times):>9.0f} {args.dirty / inc_s:>8.0f}"
            )
        await redis.aclose()
    finally:
        srv.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--expiries", type=int, default=20)
    ap.add_argument("--strikes", type=int, default=500)
    ap.add_argument("--dirty", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--strategies", default="butterfly,vertical,single")
    asyncio.run(main(ap.parse_args()))
