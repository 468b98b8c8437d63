"""Benchmark: one full GEX build over the WHOLE chain (default: the simulator's SPX chain,
~21,800 contracts over every expiration, SPX AM monthlies and SPXW PM weeklies).

The chain: the simulator's REST items (greeks and IV omitted where the provider omits them),
parsed by the REST parser and turned into the columnar GEX source the normalizer writes.
Measured per build (what the gex processor does with a new source): decode the source,
prepare (validation, the time basis fitted per settlement group, IVs imputed along the smile,
greeks re-priced), compute (per strike and per expiry aggregation, walls, the gamma profile
and zero gamma for all expiries, 0DTE and every expiry), and the JSON of the three published
values (model with its meta, legacy calls and puts). A spot-only rebuild (the prepared chain
re-timed) is timed too. With ``--redis`` it also times the processor's whole build on a
private redis-server: read of the source and spot, the math, serialization and the Lua
publish (model + legacy keys + diff + levels history).
Run: ``.venv/bin/python bench/gex_build.py [--symbol SPX] [--repeat 15] [--redis]``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from processors.gex import exposure as gex_math  # noqa: E402
from schemas import massive_rest as mr  # noqa: E402
from schemas.messages import (  # noqa: E402
    PublishedModel,
    decode_gex_source,
    encode_gex_source,
)
from simulator.server import SimConfig, SimServer  # noqa: E402
from streams.clock import NY  # noqa: E402

NOW = dt.datetime(2026, 3, 17, 11, 0, tzinfo=NY)  # Tuesday 11:00 New York


def make_source(symbol: str, now_ns: int) -> tuple[bytes, float, int]:
    """(GexSource blob, spot, REST items) of the simulator's whole chain at ``now_ns``."""
    sim = SimServer(SimConfig(seed=1, symbols=(symbol,)), clock=lambda: now_ns)
    st = sim.market.indices[symbol]
    items = [sim._item(c, st) for c in sim.market.by_symbol[symbol]]
    page = mr.parse_chain_page(msgspec.json.encode({"status": "OK", "results": items}), symbol)
    src = gex_math.source_from_contracts(symbol, now_ns, st.value, page.contracts)
    return encode_gex_source(src), st.value, len(items)


def serialize(symbol: str, now_ns: int, res: gex_math.GexResult, chain: gex_math.Chain) -> int:
    meta: dict[str, Any] = {
        "levels": {"all": res.levels.as_dict(), "0dte": res.levels_0dte.as_dict()},
        "totals": res.totals(),
        "expiry": res.expiry_table(),
        "profile": res.profile_dict(),
        "coverage": chain.coverage(),
        "expiries": chain.expiries,
    }
    model = PublishedModel(symbol, "gex", "e", 1, now_ns, res.items(), meta)
    blobs = [
        msgspec.json.encode(model),
        msgspec.json.encode({"symbol": symbol, "expirations": res.legacy_calls}),
        msgspec.json.encode({"symbol": symbol, "expirations": res.legacy_puts}),
    ]
    return sum(len(b) for b in blobs)


def build_once(
    blob: bytes, spot: float, now_ns: int, params: gex_math.Params
) -> tuple[int, dict[str, float], gex_math.Chain]:
    t0 = time.perf_counter()
    src = decode_gex_source(blob)
    cols = gex_math.source_columns(src)
    t1 = time.perf_counter()
    chain = gex_math.prepare(cols, now_ns, params, snap_spot=src.spot, snap_ns=src.ts_ns)
    t2 = time.perf_counter()
    res = gex_math.compute(chain, spot, params)
    t3 = time.perf_counter()
    size = serialize(src.symbol, now_ns, res, chain)
    t4 = time.perf_counter()
    marks = dict(decode=t1 - t0, prepare=t2 - t1, compute=t3 - t2, serialize=t4 - t3)
    marks["total"] = t4 - t0
    return size, marks, chain


def spot_only(chain: gex_math.Chain, spot: float, now_ns: int, params: gex_math.Params) -> float:
    t0 = time.perf_counter()
    ch = gex_math.retime(chain, now_ns + 2 * 10**9, params)
    res = gex_math.compute(ch, spot + 0.5, params)
    serialize("X", now_ns, res, ch)
    return time.perf_counter() - t0


async def redis_build(
    symbol: str, blob: bytes, spot: float, now_ns: int, repeat: int
) -> tuple[list[float], list[float]]:
    """GexBuilder.build (read, math, serialize, publish) against a private Redis:
    (builds of a new source, spot-only builds)."""
    from prometheus_client import CollectorRegistry
    from redis.asyncio import Redis

    from processors.gex.calculator import GexBuilder, GexSettings
    from schemas import keys
    from streams.clock import ManualClock
    from streams.local_redis import RedisServer
    from streams.processor import Deps
    from streams.settings import RuntimeSettings

    srv = RedisServer().start()
    redis = Redis.from_url(srv.url)
    try:
        eid = "bench"
        await redis.hset(
            keys.epoch_meta(symbol, eid), mapping={"symbol": symbol, "spot": repr(spot)}
        )
        await redis.hset(keys.SPOT_LATEST, mapping={symbol: repr(spot), f"{symbol}:ts_ns": 1})
        await redis.set(keys.epoch_active(symbol), eid)
        rt = RuntimeSettings(redis_url=srv.url, consumer="bench")
        clock = ManualClock(now_ns)
        deps = Deps(redis=redis, settings=rt, registry=CollectorRegistry(), clock=clock)
        gs = GexSettings(lease_ttl_ms=3_600_000)  # no renewals in the bench
        b = GexBuilder(deps, gs, symbol)
        src = decode_gex_source(blob)
        new_source, spot_moves = [], []
        for i in range(repeat + 1):
            ts = now_ns + i  # a new source each time (the normalizer's newer snapshot)
            renamed = encode_gex_source(msgspec.structs.replace(src, ts_ns=ts))
            await redis.hset(keys.gex_source(symbol), mapping={"ts_ns": ts, "data": renamed})
            clock.advance(2.5)
            t0 = time.perf_counter()
            if i == 0:
                await b.tick()  # lease + first publish
                continue
            outcome = await b.build(symbol, eid, b.state[symbol], clock.monotonic())
            new_source.append(time.perf_counter() - t0)
            assert outcome == "published", outcome
        for i in range(repeat):
            await redis.hset(keys.SPOT_LATEST, symbol, repr(spot + 0.25 * (i + 1)))
            clock.advance(2.5)
            t0 = time.perf_counter()
            outcome = await b.build(symbol, eid, b.state[symbol], clock.monotonic())
            spot_moves.append(time.perf_counter() - t0)
            assert outcome == "published", outcome
        return new_source, spot_moves
    finally:
        await redis.aclose()
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--symbol", default="SPX")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--redis", action="store_true", help="also time the processor build")
    args = ap.parse_args()
    now_ns = int(NOW.timestamp()) * 10**9
    blob, spot, n_items = make_source(args.symbol, now_ns)
    params = gex_math.Params()
    size, _, chain = build_once(blob, spot, now_ns, params)  # warm-up
    res = gex_math.compute(chain, spot, params)
    cov = chain.coverage()
    print(
        f"chain: {n_items} contracts ({len(blob) / 1e6:.2f} MB source), "
        f"{len(chain.expiries)} expirations, {chain.g_fit.shape[0]} settlement groups "
        f"({int(chain.g_fit.sum())} with the basis fitted), {res.strikes.shape[0]} strikes, "
        f"0DTE contracts {int(chain.zero_dte.sum())}; coverage {cov}"
    )
    print(f"levels(all): {res.levels.as_dict()}")
    print(f"levels(0dte): {res.levels_0dte.as_dict()}")
    runs = [build_once(blob, spot, now_ns, params) for _ in range(args.repeat)]
    for part in ("decode", "prepare", "compute", "serialize", "total"):
        xs = [r[1][part] * 1000 for r in runs]
        print(
            f"{part:>9}: median {statistics.median(xs):7.1f} ms  min {min(xs):7.1f} ms  "
            f"max {max(xs):7.1f} ms"
        )
    print(f"published bytes (model + calls + puts): {size}")
    spot_runs = [spot_only(chain, spot, now_ns, params) * 1000 for _ in range(args.repeat)]
    print(f"spot-only rebuild (re-time + compute + serialize): median "
          f"{statistics.median(spot_runs):.1f} ms")  # fmt: skip
    med = statistics.median(r[1]["total"] * 1000 for r in runs)
    print(f"RESULT gex_build_ms_median={med:.1f} target<=200 {'OK' if med <= 200 else 'OVER'}")
    if args.redis:
        fresh, moves = asyncio.run(redis_build(args.symbol, blob, spot, now_ns, args.repeat))
        for label, xs_s, tag in (
            ("new source (decode + prepare)", fresh, "gex_processor_build_ms_median"),
            ("spot-only (prepared chain re-timed)", moves, "gex_processor_spot_build_ms_median"),
        ):
            xs = [x * 1000 for x in xs_s]
            print(
                f"processor build with Redis, {label}: read + math + serialize + Lua publish: "
                f"median {statistics.median(xs):.1f} ms  min {min(xs):.1f} ms  "
                f"max {max(xs):.1f} ms"
            )
            print(f"RESULT {tag}={statistics.median(xs):.1f}")


if __name__ == "__main__":
    main()
