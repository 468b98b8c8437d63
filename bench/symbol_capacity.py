"""Per-symbol cost on Redis and how many symbols one Redis node holds (issue 18).

Runs the live pipeline on the simulator with the symbols given (default SPX,SPY,QQQ,AAPL:
an index, two ETFs, a stock): chain-poller, ws-ingest, normalizer,
hydrator, tile-builder and publisher per strategy, gex, monitor (stream retention), every
processor in its OWN process (tests/harness.py), a private redis-server. Two phases:

1. **quiet** (``--quiet-rate`` simulated events/s, default 50): once every symbol has an
   active epoch and every model is published, over ``--duration`` seconds: Redis CPU
   (``INFO cpu`` used_cpu_user + used_cpu_sys, delta) = the fixed cost of the symbols (window
   snapshots every few seconds re-seeding the epoch, whole-chain fetches for GEX, GEX builds,
   publishes) plus the few events; then the memory of every key, attributed to its symbol
   (``MEMORY USAGE`` per key: the active epoch's keys, staging tiles, published models, GEX
   source, levels history, snapshot blobs) or to the shared streams.
2. **load**: raw WS frames at exactly ``--load-rate`` events/s (default 5000;
   ``tests.harness.LoadReplayer``: 80 % quotes, 70 % of events on the 1,000 contracts
   nearest spot) over the symbols' epochs, on top of the quiet feed: Redis CPU from the
   start of the window until every consumer group has drained (on a loaded machine the tile
   builders fall behind; their work is the events' cost too), minus the quiet rate for the
   drain time, per second of window; events received = ``massive_hydrator_events_total``.

Figures: per symbol, window contracts (the epoch) and whole-chain contracts (the GEX source);
bytes per symbol and per 1k contracts; Redis CPU per symbol and per 1k window contracts
(quiet); Redis CPU per 1k events/s (load minus quiet, over the received event rate); and the
capacity of one node at 5k events/s: ``floor((cpu_budget - cpu(5k events/s)) / cpu per
symbol)`` and ``floor(mem_budget / bytes per symbol)``, the smaller of the two. Budgets:
``--cpu-budget`` (0.7 of Redis's one core) and ``--mem-budget-gb`` (16). The CPU per symbol
is the mean over the symbols run (their chains differ: see the table).

The machine is shared (2 vCPUs, other jobs): the processors compete for CPU, so the
figures are those of a contended machine; the load average is printed with them.

    .venv/bin/python bench/symbol_capacity.py [--symbols SPX,SPY,QQQ,AAPL] [--duration 60]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import math
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis.asyncio import Redis

from processors import INGEST, MODEL_PATH
from schemas import keys
from simulator.server import SimConfig, SimServer
from streams.redis_client import as_str
from tests import harness as h

PROCS = (*INGEST, *MODEL_PATH, "monitor")
STRATEGIES = keys.STRATEGIES


async def redis_cpu_s(r: Redis) -> float:
    info = await r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def published(r: Redis, symbols: list[str]) -> bool:
    names = [keys.heatmap_model(s, st) for s in symbols for st in STRATEGIES]
    names += [keys.gex_model(s) for s in symbols]
    have = await r.exists(*names)
    return int(have) == len(names)


async def wait_for(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not within {timeout_s:.0f}s")
        await asyncio.sleep(0.5)


async def memory_by_owner(
    r: Redis, symbols: list[str]
) -> tuple[dict[str, dict[str, int]], dict[str, int], dict[str, dict[str, int]]]:
    """Bytes per symbol and kind (epoch, tiles, models, gex, blob_window, blob_full) and per
    shared group, from MEMORY USAGE of every key; and the number of keys per symbol and kind."""
    active = {s: as_str(await r.get(keys.epoch_active(s))) for s in symbols}
    eid_of = {keys.epoch_key_prefix(sym, eid): sym for sym, eid in active.items()}
    per_sym: dict[str, dict[str, int]] = {s: defaultdict(int) for s in symbols}
    counts: dict[str, dict[str, int]] = {s: defaultdict(int) for s in symbols}
    shared: dict[str, int] = defaultdict(int)
    batch: list[str] = []

    async def flush() -> None:
        pipe = r.pipeline(transaction=False)
        for k in batch:
            pipe.memory_usage(k, samples=0)
        for k, n in zip(batch, await pipe.execute(), strict=True):
            owner, kind = owner_of(k, symbols, eid_of)
            if owner in per_sym:
                per_sym[owner][kind] += int(n or 0)
                counts[owner][kind] += 1
            else:
                shared[owner] += int(n or 0)
        batch.clear()

    async for raw in r.scan_iter(count=5000):
        batch.append(as_str(raw))
        if len(batch) >= 2000:
            await flush()
    if batch:
        await flush()
    return (
        {s: dict(v) for s, v in per_sym.items()},
        dict(shared),
        {s: dict(v) for s, v in counts.items()},
    )


def owner_of(key: str, symbols: list[str], eid_of: dict[str, str]) -> tuple[str, str]:
    """(symbol or shared group, kind) of a key."""
    if key.startswith("epoch:{"):
        at = key.index("}:") + 2
        prefix = key[: key.index(":", at) + 1]
        return eid_of.get(prefix, "retired epochs"), "epoch"
    for sym in symbols:
        if key.startswith(f"heatmap:{{{sym}}}:"):
            return sym, "tiles"
        if key.startswith(f"massive:chain:snapshot:{{{sym}}}:full:"):
            return sym, "blob_full"
        if key.startswith(f"massive:chain:snapshot:{{{sym}}}:"):
            return sym, "blob_window"
        if "stream" in key or ":diffs" in key or key.startswith("massive:tiles:"):
            return "streams", ""
        if f":{{{sym}}}:" in key or key.endswith(f":{{{sym}}}"):
            if key.startswith("massive:gex:"):
                return sym, "gex"
            return sym, "models"
    if "stream" in key or ":diffs" in key or key.startswith("massive:tiles:"):
        return "streams", ""
    return "other", ""


async def window_interval_s(r: Redis, symbol: str) -> float:
    """Median time between the symbol's window snapshots (chain pointers)."""
    from schemas.messages import ChainPointer, from_entry

    ts = [
        x.ts_ns
        for _i, f in await r.xrange(keys.CHAIN_STREAM)
        if (x := from_entry(f, ChainPointer)).symbol == symbol and x.scope == "window"
    ]
    gaps = sorted(b - a for a, b in itertools.pairwise(ts))
    return gaps[len(gaps) // 2] / 1e9 if gaps else math.nan


async def contracts(r: Redis, symbols: list[str]) -> dict[str, tuple[int, int]]:
    """(window contracts of the active epoch, whole-chain contracts of the GEX source)."""
    from schemas.messages import decode_gex_source

    out = {}
    for sym in symbols:
        eid = as_str(await r.get(keys.epoch_active(sym)))
        n_win = int(await r.scard(keys.epoch_contracts(sym, eid)))
        data = await r.hget(keys.gex_source(sym), "data")
        n_full = len(decode_gex_source(data).strike) // 8 if isinstance(data, bytes) else 0
        out[sym] = (n_win, n_full)
    return out


async def phase(
    r: Redis, p: h.Pipeline, duration_s: float, load: Any = None, base_cpu: float = 0.0
) -> tuple[float, float, float]:
    """(Redis CPU s per s of the window, hydrator events received per s, load average);
    ``load`` (a coroutine) runs during it. With a load, the work its events cause is counted
    to the end: Redis CPU until every consumer group has drained (the builders may be behind
    on a loaded machine), minus ``base_cpu`` (the quiet rate) for the drain time."""
    from processors.ops.replay import busy_groups

    starts = {s: pr.starts for s, pr in p.procs.items()}
    ev0 = h.metric_sum(await p.metrics("hydrator"), "massive_hydrator_events_total")
    cpu0, t0 = await redis_cpu_s(r), time.monotonic()
    if load is not None:
        await load
    else:
        await asyncio.sleep(duration_s)
    t1 = time.monotonic()
    ev1 = h.metric_sum(await p.metrics("hydrator"), "massive_hydrator_events_total")
    behind = {f"{g.group}": (g.lag or 0) + g.pending for g in await busy_groups(r)}
    print(f"  backlog at the end of the window (entries per group): {behind or 'none'}")
    drain_s = 0.0
    if load is not None:
        deadline = time.monotonic() + 180
        while await busy_groups(r) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        drain_s = time.monotonic() - t1
        print(f"  drained in {drain_s:.1f} s", flush=True)
    cpu1 = await redis_cpu_s(r)
    restarted = [s for s, pr in p.procs.items() if pr.starts != starts[s]]
    if restarted:
        raise SystemExit(f"processors restarted during the window: {restarted} (logs {p.log_dir})")
    window = t1 - t0
    return (cpu1 - cpu0 - base_cpu * drain_s) / window, (ev1 - ev0) / window, os.getloadavg()[0]


async def load_cids(r: Redis, symbols: list[str], n_hot: int) -> tuple[list[str], list[str]]:
    """Every contract of the symbols' active epochs, and the ``n_hot`` nearest to spot."""
    from schemas import ticker

    cids: list[str] = []
    dist: list[tuple[float, str]] = []
    for sym in symbols:
        eid = as_str(await r.get(keys.epoch_active(sym)))
        spot = float(as_str(await r.hget(keys.SPOT_LATEST, sym)))
        mine = sorted(as_str(c) for c in await r.smembers(keys.epoch_contracts(sym, eid)))
        cids += mine
        dist += [(abs(ticker.parse(c).strike / spot - 1), c) for c in mine]
    return cids, [c for _d, c in sorted(dist)[:n_hot]]


async def main(args: argparse.Namespace) -> None:
    symbols = [s.strip().upper() for s in args.symbols.split(",") if s.strip()]
    srv = h.redis_server()
    sim = SimServer(SimConfig(seed=7, symbols=tuple(symbols), events_per_s=args.quiet_rate))
    await sim.start()
    r = Redis.from_url(srv.url)
    joined = ",".join(symbols)
    env = h.sim_env(
        sim.rest_url,
        sim.ws_url,
        sim.config.api_key,
        MASSIVE_SYMBOLS=joined,
        # production cadences and windows (the harness's defaults are test-sized)
        MASSIVE_POLLER_EXPIRATIONS="5",
        MASSIVE_POLLER_BAND_POINTS="0",
        MASSIVE_POLLER_MIN_INTERVAL_S="5",
        MASSIVE_GEX_INTERVAL_S="2",
        MASSIVE_POLLER_FULL_INTERVAL_S=str(args.full_interval_s),
        MASSIVE_WS_INDICES="true",
        MASSIVE_LOG_LEVEL="WARNING",
    )
    t_start = dt.datetime.now(dt.UTC)
    logs = Path(args.log_dir or tempfile.mkdtemp(prefix="symbol-capacity-"))
    print(f"# processor logs in {logs}", flush=True)
    try:
        async with h.pipeline(srv.url, logs, PROCS, extra_env=env) as p:

            async def ready() -> bool:
                active = [await r.exists(keys.epoch_active(s)) for s in symbols]
                full = [await r.exists(keys.gex_source(s)) for s in symbols]
                return all(active) and all(full) and await published(r, symbols)

            await wait_for(ready, 300, "epochs, GEX sources and models of every symbol")
            await asyncio.sleep(5)  # the first full-chain GEX builds settle
            quiet_cpu, quiet_ev, quiet_load = await phase(r, p, args.duration)
            per_sym_mem, shared_mem, key_counts = await memory_by_owner(r, symbols)
            intervals = {s: await window_interval_s(r, s) for s in symbols}
            n = await contracts(r, symbols)
            used = int((await r.info("memory"))["used_memory"])
            # load: raw WS frames at exactly --load-rate events/s over the symbols'
            # epochs (tests/harness.LoadReplayer: 80 % quotes, 70 % on the 1,000
            # contracts nearest spot), on top of the simulator's quiet feed
            cids, hot = await load_cids(r, symbols, 1000)
            rep = h.LoadReplayer(cids, hot)
            await rep.run(r, args.load_rate, 5.0, 0.05)  # warm-up
            run = rep.run(r, args.load_rate, args.duration, 0.05)
            load_cpu, load_ev, load_load = await phase(r, p, args.duration, run, quiet_cpu)
    finally:
        await r.aclose()
        await sim.stop()
        srv.stop()
    print_report(args, symbols, t_start, n, per_sym_mem, shared_mem, used,
                 (quiet_cpu, quiet_ev, quiet_load), (load_cpu, load_ev, load_load))  # fmt: skip
    print_blobs(args, symbols, per_sym_mem, key_counts, intervals)


def print_report(
    args: argparse.Namespace,
    symbols: list[str],
    t_start: dt.datetime,
    n: dict[str, tuple[int, int]],
    per_sym_mem: dict[str, dict[str, int]],
    shared_mem: dict[str, int],
    used: int,
    quiet: tuple[float, float, float],
    load: tuple[float, float, float],
) -> None:
    mb = 1024 * 1024
    print(f"# symbol capacity  {t_start:%Y-%m-%d %H:%M} UTC  {platform.node()}  "
          f"{os.cpu_count()} CPUs  python {platform.python_version()}")  # fmt: skip
    print("# shared machine: the processors and other jobs compete for the same cores")
    print(f"symbols {symbols}; {args.duration:.0f} s per phase; "
          f"Redis used_memory {used / mb:.1f} MB")  # fmt: skip
    print("symbol  window  full-chain   MB: epoch  tiles  models   gex  blobs  total"
          "   KB/1k window (epoch+tiles+models)  KB/1k full chain (gex+blobs)")  # fmt: skip
    tot_b = 0
    for sym in symbols:
        w, f = n[sym]
        m = dict(per_sym_mem.get(sym, {}))
        m["blobs"] = m.pop("blob_window", 0) + m.pop("blob_full", 0)
        b = sum(m.values())
        tot_b += b
        win_b = m.get("epoch", 0) + m.get("tiles", 0) + m.get("models", 0)
        full_b = m.get("gex", 0) + m.get("blobs", 0)
        cols = " ".join(
            f"{m.get(k, 0) / mb:6.2f}" for k in ("epoch", "tiles", "models", "gex", "blobs")
        )
        per_k_win = win_b / 1024 / max(w / 1000, 1e-9)
        per_k_full = full_b / 1024 / max(f / 1000, 1e-9)
        print(f"{sym:6} {w:7d} {f:11d}   {cols} {b / mb:6.2f}   "
              f"{per_k_win:10.0f}   {per_k_full:10.0f}")  # fmt: skip
    q_cpu, q_ev, q_load = quiet
    l_cpu, l_ev, l_load = load
    print(f"load average during the phases: quiet {q_load:.1f}, load {l_load:.1f}")
    per_sym_cpu = q_cpu / len(symbols)
    win = sum(n[s][0] for s in symbols)
    print(f"quiet: Redis CPU {100 * q_cpu:.1f} % of a core for {len(symbols)} symbols "
          f"({q_ev:.0f} events/s received, load {q_load:.1f}): {100 * per_sym_cpu:.2f} % per "
          f"symbol, {100 * q_cpu / (win / 1000):.2f} % per 1k window contracts")  # fmt: skip
    ev_cpu = l_cpu - q_cpu  # the events' share of Redis, measured at l_ev events/s
    ev_cpu_per_k = ev_cpu / ((l_ev - q_ev) / 1000) if l_ev > q_ev else math.nan
    print(f"load: Redis CPU {100 * l_cpu:.1f} % at {l_ev:.0f} events/s received "
          f"(load {l_load:.1f}): {100 * ev_cpu_per_k:.2f} % of a core per 1k events/s")  # fmt: skip
    mem_per_sym = tot_b / len(symbols)
    by_cpu = math.floor((args.cpu_budget - ev_cpu) / per_sym_cpu) if per_sym_cpu > 0 else 0
    by_mem = math.floor(args.mem_budget_gb * 1024**3 / mem_per_sym) if mem_per_sym else 0
    print(f"one node at {l_ev:.0f} events/s: events {100 * ev_cpu:.1f} % of a core; CPU budget "
          f"{100 * args.cpu_budget:.0f} % -> {by_cpu} symbols; memory {args.mem_budget_gb:.0f} GB "
          f"/ {mem_per_sym / mb:.1f} MB -> {by_mem} symbols; capacity {min(by_cpu, by_mem)} "
          f"symbols like these")  # fmt: skip


def print_blobs(
    args: argparse.Namespace,
    symbols: list[str],
    per_sym_mem: dict[str, dict[str, int]],
    key_counts: dict[str, dict[str, int]],
    intervals: dict[str, float],
) -> None:
    """The snapshot blobs held at the measurement, and what their TTLs keep once the run is
    longer than them (``snapshot_ttl_s`` / the measured interval x the mean blob)."""
    from processors.ingest.chain_poller import PollerSettings

    ps = PollerSettings()
    kb = 1024
    for sym in symbols:
        m, c = per_sym_mem.get(sym, {}), key_counts.get(sym, {})
        nw, nf = c.get("blob_window", 0), c.get("blob_full", 0)
        mean_w = m.get("blob_window", 0) / nw if nw else 0.0
        mean_f = m.get("blob_full", 0) / nf if nf else 0.0
        every = intervals.get(sym, math.nan)
        held = ps.snapshot_ttl_s / every * mean_w if every > 0 else math.nan
        full_held = ps.full_snapshot_ttl_s / args.full_interval_s * mean_f
        print(f"{sym:6} blobs now: window {nw} x {mean_w / kb:.0f} KB, whole chain {nf} x "
              f"{mean_f / kb:.0f} KB; at their TTLs: window {ps.snapshot_ttl_s} s / {every:.1f} s"
              f" x {mean_w / kb:.0f} KB = {held / kb / kb:.1f} MB, whole chain "
              f"{ps.full_snapshot_ttl_s} s / {args.full_interval_s:.0f} s x "
              f"{mean_f / kb:.0f} KB = {full_held / kb / kb:.1f} MB")  # fmt: skip


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--symbols", default="SPX,SPY,QQQ,AAPL")
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--quiet-rate", type=float, default=50.0)
    ap.add_argument("--load-rate", type=float, default=5000.0)
    ap.add_argument("--cpu-budget", type=float, default=0.7)
    ap.add_argument("--mem-budget-gb", type=float, default=16.0)
    ap.add_argument("--log-dir", default="")
    ap.add_argument("--full-interval-s", type=float, default=30.0, help="whole-chain cadence")
    asyncio.run(main(ap.parse_args()))
