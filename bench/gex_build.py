"""Benchmark: one full GEX build for a realistic ~20,000-contract SPX chain.

Chain: spot 6800, SPXW daily expiries (business days) plus SPX AM monthlies on third Fridays,
~40 expiries; strikes 5 apart over a band that widens with DTE up to +-20 %; calls and
puts; IV with a put skew; gamma from Black-Scholes at that IV; OI log-normal; a seeded RNG.

Measured per build (what the gex processor does after HGETALL): decode the projection values,
validate and build arrays, aggregate per strike/expiry, walls, zero gamma (all + 0DTE views,
grid + bisection), model items, legacy calls/puts maps, and JSON serialization of the three
published values. With ``--redis`` it also times the processor's whole build on a private
redis-server: HGETALL of the projection + spot, the math, serialization and the Lua publish
(model + legacy keys + diff), with one OI changed before each build so every build publishes.
Run: ``.venv/bin/python bench/gex_build.py [--contracts 20000] [--repeat 15] [--redis]``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import random
import statistics
import sys
import time
from pathlib import Path

import msgspec

from processors import gex_math
from schemas import ticker
from schemas.messages import GexRow, PublishedModel

NOW = dt.datetime(2026, 3, 16, 11, 0, tzinfo=gex_math.NY)  # Monday 11:00 New York
SPOT = 6800.0
ROOT = Path(__file__).resolve().parents[1]


def _third_friday(d: dt.date) -> dt.date:
    first = d.replace(day=1)
    return first + dt.timedelta(days=(4 - first.weekday()) % 7 + 14)


def make_chain(target: int, seed: int = 7) -> dict[bytes, bytes]:
    """HGETALL-like mapping cid -> GexRow JSON with about ``target`` contracts."""
    rng = random.Random(seed)
    days: list[dt.date] = []
    d = NOW.date()
    while len(days) < 40:
        if d.weekday() < 5:
            days.append(d)
        d += dt.timedelta(days=1)
    # band half-width per expiry ~ 1 % + b*dte, capped at 20 %; solve b for the target
    dtes = [max((x - NOW.date()).days, 0) for x in days]
    roots = [["SPXW"] + (["SPX"] if x == _third_friday(x) else []) for x in days]

    def count(b: float) -> int:
        n = 0
        for dte, rs in zip(dtes, roots, strict=True):
            half = min(0.20, 0.01 + b * dte) * SPOT
            n += (2 * int(half // 5) + 1) * 2 * len(rs)
        return n

    lo_b, hi_b = 0.0, 0.2
    for _ in range(40):
        mid = (lo_b + hi_b) / 2
        lo_b, hi_b = (mid, hi_b) if count(mid) < target else (lo_b, mid)
    b = hi_b
    now_ns = int(NOW.timestamp() * 1e9)
    out: dict[bytes, bytes] = {}
    enc = msgspec.json.Encoder()
    for day, dte, rs in zip(days, dtes, roots, strict=True):
        half = min(0.20, 0.01 + b * dte) * SPOT
        k0 = round(SPOT / 5) * 5
        n = int(half // 5)
        for root in rs:
            t = gex_math.year_fraction(gex_math.expiry_ns(day.isoformat(), root), now_ns, 300)
            for j in range(-n, n + 1):
                k = float(k0 + 5 * j)
                m = math.log(k / SPOT)
                iv = max(0.06, 0.16 - 0.5 * m + 1.5 * m * m)
                d1 = (math.log(SPOT / k) + 0.5 * iv * iv * t) / (iv * math.sqrt(t))
                gamma = math.exp(-0.5 * d1 * d1) / (SPOT * iv * math.sqrt(2 * math.pi * t))
                for right in ("C", "P"):
                    oi = float(int(rng.lognormvariate(6.0, 1.5)))
                    cid = ticker.encode(root, day, right, k)
                    row = GexRow(root, day.isoformat(), k, right, gamma, oi, iv, now_ns)
                    out[cid.encode()] = enc.encode(row)
    return out


def build_once(
    values: list[bytes], now_ns: int, params: gex_math.Params
) -> tuple[int, dict[str, float]]:
    marks: dict[str, float] = {}
    t0 = time.perf_counter()
    rows, rejected = gex_math.decode_rows(values)
    t1 = time.perf_counter()
    chain = gex_math.prepare(rows, now_ns, params, rejected)
    t2 = time.perf_counter()
    res = gex_math.compute(chain, SPOT, params)
    t3 = time.perf_counter()
    items = res.items()
    meta = {
        "levels": {"all": res.levels.as_dict(), "0dte": res.levels_0dte.as_dict()},
        "totals": res.totals(),
        "expiries": chain.expiries,
    }
    model = PublishedModel("SPX", "gex", "e", 1, now_ns, items, meta)
    blobs = [
        msgspec.json.encode(model),
        msgspec.json.encode({"symbol": "SPX", "expirations": res.legacy_calls}),
        msgspec.json.encode({"symbol": "SPX", "expirations": res.legacy_puts}),
    ]
    t4 = time.perf_counter()
    marks.update(decode=t1 - t0, prepare=t2 - t1, compute=t3 - t2, serialize=t4 - t3)
    marks["total"] = t4 - t0
    return sum(len(b) for b in blobs), marks


async def redis_build(chain: dict[bytes, bytes], repeat: int) -> tuple[list[float], list[float]]:
    """Time GexBuilder.build (read, math, serialize, publish) against a private Redis:
    (builds after an OI change, builds after a spot-only change)."""
    sys.path.insert(0, str(ROOT))
    from prometheus_client import CollectorRegistry
    from redis.asyncio import Redis

    from processors.gex import GexBuilder, GexSettings
    from schemas import keys
    from streams.clock import SystemClock
    from streams.processor import Deps
    from streams.settings import RuntimeSettings
    from tests.util import RedisServer

    srv = RedisServer().start()
    redis = Redis.from_url(srv.url)
    try:
        eid = "bench"
        items = list(chain.items())
        for i in range(0, len(items), 2000):
            await redis.hset(keys.epoch_gex(eid), mapping=dict(items[i : i + 2000]))  # type: ignore[arg-type]
        await redis.hset(keys.epoch_meta(eid), mapping={"symbol": "SPX", "spot": repr(SPOT)})
        await redis.hset(keys.SPOT_LATEST, mapping={"SPX": repr(SPOT), "SPX:ts_ns": 1})
        await redis.hset(keys.EPOCH_ACTIVE, "SPX", eid)
        rt = RuntimeSettings(redis_url=srv.url, consumer="bench")
        deps = Deps(redis=redis, settings=rt, registry=CollectorRegistry(), clock=SystemClock())
        gs = GexSettings(symbols=("SPX",), lease_ttl_ms=3_600_000)  # no renewals in the bench
        b = GexBuilder(deps, gs, ("SPX",))
        await b.tick()  # lease + first publish
        st = b.state["SPX"]
        cid, raw = items[len(items) // 2]
        row = msgspec.json.decode(raw, type=GexRow)
        out = []
        for i in range(repeat):
            changed = msgspec.structs.replace(row, oi=(row.oi or 0) + i + 1)
            await redis.hset(keys.epoch_gex(eid), cid, msgspec.json.encode(changed))
            t0 = time.perf_counter()
            outcome = await b.build("SPX", eid, st, time.monotonic())
            out.append(time.perf_counter() - t0)
            assert outcome == "published", outcome
        spot_only = []
        for i in range(repeat):
            await redis.hset(keys.SPOT_LATEST, "SPX", repr(SPOT + 0.25 * (i + 1)))
            t0 = time.perf_counter()
            outcome = await b.build("SPX", eid, st, time.monotonic())
            spot_only.append(time.perf_counter() - t0)
            assert outcome == "published", outcome
        return out, spot_only
    finally:
        await redis.aclose()
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contracts", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--redis", action="store_true", help="also time the processor build")
    args = ap.parse_args()
    chain = make_chain(args.contracts)
    values = list(chain.values())
    now_ns = int(NOW.timestamp() * 1e9)
    params = gex_math.Params()
    rows, _ = gex_math.decode_rows(values)
    prep = gex_math.prepare(rows, now_ns, params)
    res = gex_math.compute(prep, SPOT, params)
    print(
        f"chain: {len(values)} contracts, {len(prep.expiries)} expiries, "
        f"{res.strikes.shape[0]} strikes, 0DTE contracts {int(prep.zero_dte.sum())}"
    )
    print(f"levels(all): {res.levels.as_dict()}")
    print(f"levels(0dte): {res.levels_0dte.as_dict()}")
    n_grid = 2 * round(params.grid_range_pct / params.grid_step_pct) + 1
    print(
        f"zero-gamma grid: {n_grid} spots (+-{params.grid_range_pct}% step {params.grid_step_pct}%)"
    )
    build_once(values, now_ns, params)  # warm-up
    runs = [build_once(values, now_ns, params) for _ in range(args.repeat)]
    size = runs[0][0]
    for part in ("decode", "prepare", "compute", "serialize", "total"):
        xs = [r[1][part] * 1000 for r in runs]
        print(
            f"{part:>9}: median {statistics.median(xs):7.1f} ms  min {min(xs):7.1f} ms  "
            f"max {max(xs):7.1f} ms"
        )
    print(f"published bytes (model + calls + puts): {size}")
    med = statistics.median(r[1]["total"] * 1000 for r in runs)
    print(f"RESULT gex_build_ms_median={med:.1f} target<=200 {'OK' if med <= 200 else 'OVER'}")
    if args.redis:
        oi_change, spot_change = asyncio.run(redis_build(chain, args.repeat))
        for label, runs_s, tag in (
            ("OI changed (decode + prepare)", oi_change, "gex_processor_build_ms_median"),
            (
                "spot-only (prepared chain reused)",
                spot_change,
                "gex_processor_spot_build_ms_median",
            ),
        ):
            xs = [x * 1000 for x in runs_s]
            med = statistics.median(xs)
            print(
                f"processor build with Redis, {label}: HGETALL + math + serialize + Lua "
                f"publish: median {med:.1f} ms  min {min(xs):.1f} ms  max {max(xs):.1f} ms"
            )
            print(f"RESULT {tag}={med:.1f}")


if __name__ == "__main__":
    main()
