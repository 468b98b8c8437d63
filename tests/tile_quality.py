"""What the heatmap and GEX publish on a live simulator run, measured (issue 19 acceptance):
every vertical and butterfly tile carries ``debit_natural`` and ``tradable``; no tile with
convexity >= 0.99 is untradable; bound flags (executable arbitrage) stay <= 0.5 % of tiles;
with default settings the GEX model covers the whole chain (every expiration named).

``run`` starts the simulated market and the real processors in this process (chain-poller,
ws-ingest, normalizer, hydrator, the tile builders, gex) on a private Redis with default
settings, lets them run, then reads every staged tile (the exact bytes the publishers
publish) and the GEX models. Used by tests/test_tile_quality.py (small) and
bench/tile_quality.py (longer, prints figures).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from processors.registry import load
from schemas import keys
from schemas.heatmap import split_staged
from schemas.keys import STRATEGIES
from simulator.server import SimConfig, SimServer
from streams.local_redis import RedisServer
from streams.processor import Deps, Processor
from streams.redis_client import connect
from streams.runner import run_processors
from streams.settings import RuntimeSettings

_raw = msgspec.json.Decoder(dict[str, Any])
_NEG_ZERO = re.compile(rb"-0(\.0+)?(?![0-9.eE])")


@dataclass
class StrategyStats:
    tiles: int = 0
    with_fields: int = 0  # carry both debit_natural and tradable
    tradable: int = 0
    convex_99: int = 0  # convexity >= 0.99
    convex_99_untradable: int = 0
    bound: int = 0  # below_bound / above_bound: executable arbitrage
    mid_bound: int = 0  # mid_below_bound / mid_above_bound
    no_price: int = 0
    negative_zero: int = 0  # a -0.0 anywhere in the published bytes
    untradable_one_sided: int = 0  # every leg at a fresh mid, some quote not two-sided
    untradable_stale: int = 0  # some leg without a fresh quote
    long_decimals: int = 0  # a leg price with more than 6 decimals
    last_leg_ages_s: list[int] = field(default_factory=list)  # legs priced from a trade

    def share(self, n: int) -> float:
        return n / self.tiles if self.tiles else 0.0


@dataclass
class GexCheck:
    scope: str
    contracts: int
    listed: list[str]  # the simulated chain's expirations (not settled)
    model: list[str]  # meta.expiries
    legacy_calls: list[str]  # expirations named by massive:gex:model:{SYM}:calls
    zero_gamma: float | None
    zero_gamma_0dte: float | None


@dataclass
class Report:
    seconds: float
    ws_applied: int
    by_strategy: dict[str, StrategyStats]
    gex: dict[str, GexCheck]


def _decimals(x: float) -> int:
    s = repr(x)
    return len(s.split(".")[1]) if "." in s and "e" not in s else 0


def measure(staged: dict[bytes, bytes]) -> StrategyStats:
    st = StrategyStats()
    for raw in staged.values():
        _, js = split_staged(raw)
        v = _raw.decode(js)
        st.tiles += 1
        st.with_fields += "debit_natural" in v and "tradable" in v
        tradable = v.get("tradable") is True
        st.tradable += tradable
        conv = v.get("convexity")
        if conv is not None and conv >= 0.99:
            st.convex_99 += 1
            st.convex_99_untradable += not tradable
        flags = set(v.get("flags", ()))
        st.bound += bool(flags & {"below_bound", "above_bound"})
        st.mid_bound += bool(flags & {"mid_below_bound", "mid_above_bound"})
        st.no_price += "no_price" in flags
        st.negative_zero += _NEG_ZERO.search(js) is not None
        if not tradable:
            fresh = all(src == "mid" for _q, _p, src in v["legs"])
            st.untradable_one_sided += fresh
            st.untradable_stale += not fresh
        for _qty, px, src in v["legs"]:
            if px is not None and _decimals(px) > 6:
                st.long_decimals += 1
            if src == "last" and v.get("age_s") is not None:
                st.last_leg_ages_s.append(int(v["age_s"]))
    return st


async def _gex_scope(redis: Redis, symbol: str) -> str | None:
    raw = await redis.get(keys.gex_model(symbol))
    if raw is None:
        return None
    return str(_raw.decode(raw)["meta"]["coverage"]["scope"])


async def _gex_check(redis: Redis, sim: SimServer, symbol: str) -> GexCheck:
    m = _raw.decode(await redis.get(keys.gex_model(symbol)) or b"{}")
    calls = _raw.decode(await redis.get(keys.gex_model_calls(symbol)) or b"{}")
    now = sim.clock()
    listed = sorted({c.exp_s for c in sim.market.by_symbol[symbol] if c.settle_ns > now})
    meta = m["meta"]
    return GexCheck(
        scope=meta["coverage"]["scope"],
        contracts=meta["coverage"]["contracts"],
        listed=listed,
        model=meta["expiries"],
        legacy_calls=sorted(calls["expirations"]),
        zero_gamma=meta["levels"]["all"]["zero_gamma"],
        zero_gamma_0dte=meta["levels"]["0dte"]["zero_gamma"],
    )


@contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def _warm_up(
    redis: Redis, symbols: tuple[str, ...], task: asyncio.Task[None], timeout_s: float
) -> None:
    """Wait until every strategy's staging and the full GEX scope are installed for every
    symbol (a processor that failed raises here)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if task.done():
            task.result()
        ready = 0
        for sym in symbols:
            for strat in STRATEGIES:
                ready += bool(await redis.hget(keys.heatmap_manifest(sym, strat), "epoch"))
            ready += (await _gex_scope(redis, sym)) == "full"
        if ready == len(symbols) * (len(STRATEGIES) + 1):
            return
        if time.monotonic() > deadline:
            raise TimeoutError("staging not installed within the warm-up")
        await asyncio.sleep(0.2)


async def _measure_strategy(redis: Redis, symbols: tuple[str, ...], strat: str) -> StrategyStats:
    """One strategy's staged tiles measured, summed over the symbols."""
    total = StrategyStats()
    for sym in symbols:
        st = measure(await redis.hgetall(keys.heatmap_staging(sym, strat)))
        for f in dataclasses.fields(StrategyStats):
            setattr(total, f.name, getattr(total, f.name) + getattr(st, f.name))
    return total


async def run(
    duration_s: float,
    *,
    symbols: tuple[str, ...] = ("SPX",),
    seed: int = 1,
    rate: float = 400.0,
    n_expiries: int = 5,
    warmup_timeout_s: float = 120.0,
) -> Report:
    """Run the ingest and heatmap path against the simulator for ``duration_s`` after every
    strategy's staging is installed, then measure every staged tile."""
    srv = await asyncio.to_thread(RedisServer().start)
    sim = SimServer(SimConfig(seed=seed, symbols=symbols, events_per_s=rate))
    await sim.start("127.0.0.1", 0)
    env = {
        "MASSIVE_REDIS_URL": srv.url,
        "MASSIVE_POLLER_REST_URL": sim.rest_url,
        "MASSIVE_POLLER_API_KEY": sim.config.api_key,
        "MASSIVE_SYMBOLS": ",".join(symbols),
        "MASSIVE_WS_URL": sim.ws_url,
        "MASSIVE_WS_API_KEY": sim.config.api_key,
        "MASSIVE_WS_MARKET_HOURS": "always",
        "MASSIVE_TILES_N_EXPIRIES": str(n_expiries),
    }
    redis = connect(srv.url, max_connections=128)
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    try:
        with _env(env):
            settings = RuntimeSettings(redis_url=srv.url, consumer="tile-quality", symbols=symbols)
            deps = Deps(redis=redis, settings=settings, registry=CollectorRegistry())
            specs = ["chain-poller", "ws-ingest", "normalizer", "hydrator"]
            specs += [f"tile-builder:{s}" for s in STRATEGIES]
            specs.append("gex")
            procs: list[Processor] = [load(s, deps) for s in specs]
        task = asyncio.create_task(run_processors(deps, procs, stop, install_signals=False))
        await _warm_up(redis, symbols, task, warmup_timeout_s)
        t0 = time.monotonic()
        while time.monotonic() - t0 < duration_s:
            if task.done():
                task.result()
            await asyncio.sleep(0.2)
        applied = sum(
            deps.registry.get_sample_value("massive_hydrator_applied_total", {"kind": k}) or 0.0
            for k in ("quote", "trade")
        )
        out = {strat: await _measure_strategy(redis, symbols, strat) for strat in STRATEGIES}
        gex = {sym: await _gex_check(redis, sim, sym) for sym in symbols}
        return Report(time.monotonic() - t0, int(applied), out, gex)
    finally:
        stop.set()
        if task is not None:
            with contextlib.suppress(Exception):  # the measurement is what matters here
                await asyncio.wait_for(task, 30)
        await redis.aclose()
        await sim.stop()
        srv.stop()


def summary(r: Report) -> list[str]:
    lines = [f"ran {r.seconds:.0f} s after warm-up; WS events applied {r.ws_applied}"]
    for sym, g in r.gex.items():
        lines.append(
            f"{sym} GEX: scope {g.scope}, {g.contracts} contracts, expirations named "
            f"{len(g.legacy_calls)} (model {len(g.model)}) of {len(g.listed)} listed, "
            f"zero gamma {g.zero_gamma} (0DTE {g.zero_gamma_0dte})"
        )
    for strat, s in r.by_strategy.items():
        ages = s.last_leg_ages_s
        med = f"{statistics.median(ages):.0f} s" if ages else "-"
        lines.append(
            f"{strat:>9}: tiles {s.tiles}, with debit_natural+tradable {s.with_fields}, "
            f"tradable {s.tradable} ({100 * s.share(s.tradable):.1f} %; untradable: one-sided "
            f"quote {s.untradable_one_sided}, stale leg {s.untradable_stale}), convexity>=0.99 "
            f"{s.convex_99} (untradable {s.convex_99_untradable}), bound flags {s.bound} "
            f"({100 * s.share(s.bound):.3f} %), mid-bound flags {s.mid_bound} "
            f"({100 * s.share(s.mid_bound):.2f} %), no_price {s.no_price}, -0.0 "
            f"{s.negative_zero}, >6 decimals {s.long_decimals}, legs from trades "
            f"{len(ages)} (median tile age {med})"
        )
    return lines
