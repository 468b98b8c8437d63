"""``massive-pipeline demo``: the whole pipeline in one process on the simulated market.

Starts the simulator (Massive's REST + WebSocket formats, seeded market) in-process, points
chain-poller and ws-ingest at it, and runs every processor with ``run_processors``:
chain-poller, ws-ingest, normalizer, hydrator, tile-builder and publisher per strategy, gex,
monitor and sse-gateway (the dashboard). Redis: ``MASSIVE_REDIS_URL`` when set and
reachable, otherwise a private ``redis-server`` on a free port (removed on exit).
Runs until Ctrl-C (or ``--duration-s``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Sequence

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import RedisError

from processors import MODEL_PATH
from processors.registry import load
from streams.local_redis import RedisServer
from streams.logs import setup_logging
from streams.processor import Deps, Processor
from streams.redis_client import connect
from streams.runner import run_processors, task_group
from streams.settings import RuntimeSettings, SettingsError, from_env

logger = logging.getLogger("demo")

DEMO_PROCESSORS = (
    "chain-poller",
    "ws-ingest",
    *MODEL_PATH,
    "monitor",
    "sse-gateway",
)


async def reachable(url: str, timeout_s: float = 1.0) -> bool:
    r = Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return bool(await asyncio.wait_for(r.ping(), timeout_s))
    except (RedisError, OSError, TimeoutError):
        return False
    finally:
        await r.aclose()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="massive-pipeline demo", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="dashboard bind address")
    p.add_argument("--port", type=int, default=8000, help="dashboard port")
    p.add_argument("--sim-port", type=int, default=0, help="simulator port (0 = free port)")
    p.add_argument(
        "--symbols",
        default="SPX,NDX,SPY",
        help="underlyings: indices (SPX, NDX) and stocks/ETFs (SPY, AAPL, any ticker)",
    )
    p.add_argument("--seed", type=int, default=1, help="simulated market seed")
    p.add_argument("--rate", type=float, default=200.0, help="simulated WS events per second")
    p.add_argument("--duration-s", type=float, default=None, help="exit after this long")
    p.add_argument("--log-level", default=os.environ.get("MASSIVE_LOG_LEVEL", "INFO"))
    return p


def demo_env(
    rest_url: str, ws_url: str, api_key: str, redis_url: str, args: argparse.Namespace
) -> tuple[dict[str, str], dict[str, str]]:
    """Env settings of the processors: data source = the simulator (forced), the rest
    defaults unless the user already set them."""
    forced = {
        "MASSIVE_REDIS_URL": redis_url,
        "MASSIVE_POLLER_REST_URL": rest_url,
        "MASSIVE_POLLER_API_KEY": api_key,
        "MASSIVE_WS_URL": ws_url,
        "MASSIVE_WS_API_KEY": api_key,
        "MASSIVE_SSE_HOST": args.host,
        "MASSIVE_SSE_PORT": str(args.port),
    }
    defaults = {
        "MASSIVE_SYMBOLS": args.symbols,
        "MASSIVE_WS_MARKET_HOURS": "always",  # the simulated market never closes
        "MASSIVE_LOG_LEVEL": args.log_level,
    }
    return forced, defaults


async def _demo_redis() -> tuple[str, RedisServer | None]:
    """MASSIVE_REDIS_URL when it answers, else a private redis-server (returned to stop)."""
    env_url = os.environ.get("MASSIVE_REDIS_URL")
    if env_url and await reachable(env_url):
        print(f"redis: {env_url} (MASSIVE_REDIS_URL)", flush=True)
        return env_url, None
    if env_url:
        print(f"redis: {env_url} unreachable, starting a private redis-server", flush=True)
    private = await asyncio.to_thread(RedisServer().start)
    print(f"redis: private redis-server at {private.url}", flush=True)
    return private.url, private


async def _announce(procs: list[Processor], args: argparse.Namespace) -> None:
    """Print the processors and, once the gateway is bound, the dashboard's address."""
    gw = next((p for p in procs if p.name == "sse-gateway"), None)
    for _ in range(3000):  # the gateway binds within a few seconds (or the run fails)
        if gw is None or gw.ready:
            break
        await asyncio.sleep(0.1)
    names = ", ".join(p.name for p in procs)
    print(f"processors: {names}", flush=True)
    if gw is not None:
        host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
        print(f"dashboard: http://{host}:{args.port}/  (Ctrl-C to stop)", flush=True)


async def _set_after(event: asyncio.Event, seconds: float) -> None:
    await asyncio.sleep(seconds)
    event.set()


async def _demo(args: argparse.Namespace) -> int:
    from simulator.server import SimConfig, SimServer

    redis_url, private = await _demo_redis()

    symbols = tuple(s.strip().upper() for s in args.symbols.split(",") if s.strip())
    sim = SimServer(SimConfig(seed=args.seed, symbols=symbols, events_per_s=args.rate))
    deps: Deps | None = None
    try:
        await sim.start("127.0.0.1", args.sim_port)
        print(f"simulator: REST {sim.rest_url}  WS {sim.ws_url}", flush=True)
        forced, defaults = demo_env(sim.rest_url, sim.ws_url, sim.config.api_key, redis_url, args)
        os.environ.update(forced)
        for k, v in defaults.items():
            os.environ.setdefault(k, v)
        settings = from_env(RuntimeSettings)
        deps = Deps(
            redis=connect(settings.redis_url, max_connections=512),
            settings=settings,
            registry=CollectorRegistry(),
        )
        procs: list[Processor] = [load(spec, deps) for spec in DEMO_PROCESSORS]
        stop = asyncio.Event()
        async with task_group() as tg:
            helpers = [tg.create_task(_announce(procs, args))]
            if args.duration_s is not None:
                helpers.append(tg.create_task(_set_after(stop, args.duration_s)))
            try:
                await run_processors(deps, procs, stop)
            finally:
                for t in helpers:
                    t.cancel()
        return 0
    finally:
        with contextlib.suppress(Exception):
            await sim.stop()
        if deps is not None:
            await deps.redis.aclose()
        if private is not None:
            private.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    setup_logging(args.log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per REST page otherwise
    try:
        return asyncio.run(_demo(args))
    except KeyboardInterrupt:
        return 0
    except (SettingsError, RuntimeError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
