"""``massive-pipeline simulate``: run the simulated Massive API until SIGINT/SIGTERM.

Scenarios (applied over time on top of the live market):

* ``open`` (default): market open, events flowing.
* ``closed``: market closed; REST answers with the last values, WS sends no events.
* ``silence``: the WebSocket goes quiet for ``--silence-s`` (10 s) every ``--period-s`` (60 s).
* ``new-listing``: a new strike for each symbol after ``--listing-after-s`` (30 s), a new
  expiry after twice that.
* ``burst429``: every ``--burst-every-s`` (20 s) the next ``--burst-n`` (5) REST requests get 429.
* ``malformed``: every 5 s the next 3 WS data frames are malformed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

from simulator.server import SimConfig, SimServer
from streams.logs import add_secret, setup_logging
from streams.retry import sleep_or_stop

log = logging.getLogger("simulator")

SCENARIOS = ("open", "closed", "silence", "new-listing", "burst429", "malformed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="massive-pipeline simulate", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rate", type=float, default=200.0, help="WS events per second (T+Q)")
    p.add_argument("--no-quotes", action="store_true", help="trades only on the WebSocket")
    p.add_argument(
        "--api-key",
        default=os.environ.get("MASSIVE_API_KEY") or "sim-key",
        help="the key clients must send (default: MASSIVE_API_KEY, else sim-key)",
    )
    p.add_argument(
        "--symbols",
        default="SPX,NDX",
        help="underlyings: indices (SPX, NDX) and stocks/ETFs (SPY, QQQ, IWM, AAPL, any ticker)",
    )
    p.add_argument("--scenario", choices=SCENARIOS, default="open")
    p.add_argument("--walk-speed", type=float, default=1.0, help="spot random-walk time scale")
    p.add_argument("--max-connections", type=int, default=None)
    p.add_argument("--silence-s", type=float, default=10.0)
    p.add_argument("--period-s", type=float, default=60.0)
    p.add_argument("--listing-after-s", type=float, default=30.0)
    p.add_argument("--burst-every-s", type=float, default=20.0)
    p.add_argument("--burst-n", type=int, default=5)
    p.add_argument("--duration-s", type=float, default=None, help="exit after this long")
    p.add_argument("--log-level", default="INFO")
    return p


async def _closed(srv: SimServer, args: argparse.Namespace, stop: asyncio.Event) -> None:
    srv.set_market_open(False)
    await stop.wait()


async def _silence(srv: SimServer, args: argparse.Namespace, stop: asyncio.Event) -> None:
    quiet = min(args.silence_s, args.period_s)
    while not await sleep_or_stop(stop, args.period_s - quiet):
        log.info("scenario silence: WS quiet for %.0f s", quiet)
        srv.set_silent(True)
        stopping = await sleep_or_stop(stop, quiet)
        srv.set_silent(False)
        if stopping:
            return


async def _new_listing(srv: SimServer, args: argparse.Namespace, stop: asyncio.Event) -> None:
    if await sleep_or_stop(stop, args.listing_after_s):
        return
    for sym in srv.market.indices:
        log.info("scenario new-listing: %s new strike %s", sym, srv.list_new_strike(sym))
    if await sleep_or_stop(stop, args.listing_after_s):
        return
    for sym in srv.market.indices:
        new = srv.list_new_expiry(sym)
        log.info("scenario new-listing: %s new expiry, %d contracts", sym, len(new))
    await stop.wait()


async def _burst429(srv: SimServer, args: argparse.Namespace, stop: asyncio.Event) -> None:
    while not await sleep_or_stop(stop, args.burst_every_s):
        log.info("scenario burst429: next %d requests answer 429", args.burst_n)
        srv.fail_next(args.burst_n, status=429)


async def _malformed(srv: SimServer, args: argparse.Namespace, stop: asyncio.Event) -> None:
    while not await sleep_or_stop(stop, 5.0):
        srv.inject_malformed(3)


_SCENARIOS: dict[str, Callable[[SimServer, argparse.Namespace, asyncio.Event], Awaitable[None]]] = {
    "closed": _closed,
    "silence": _silence,
    "new-listing": _new_listing,
    "burst429": _burst429,
    "malformed": _malformed,
}


async def run_scenario(srv: SimServer, args: argparse.Namespace, stop: asyncio.Event) -> None:
    """Drive ``srv`` according to ``args.scenario`` until ``stop`` is set (sleeps end early
    when stopping)."""
    scenario = _SCENARIOS.get(args.scenario)
    if scenario is None:
        await stop.wait()
    else:
        await scenario(srv, args, stop)


async def serve(args: argparse.Namespace) -> int:
    cfg = SimConfig(
        seed=args.seed,
        api_key=args.api_key,
        symbols=tuple(s.strip().upper() for s in args.symbols.split(",") if s.strip()),
        events_per_s=args.rate,
        quotes=not args.no_quotes,
        max_connections=args.max_connections,
    )
    if args.walk_speed != 1.0:
        from dataclasses import replace

        cfg = replace(cfg, market=replace(cfg.market, walk_speed=args.walk_speed))
    srv = SimServer(cfg)
    await srv.start(host=args.host, port=args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    print(f"REST {srv.rest_url}", flush=True)
    print(f"WS   {srv.ws_url}/options  {srv.ws_url}/indices  {srv.ws_url}/stocks", flush=True)
    print(f"API key {cfg.api_key!r}; scenario {args.scenario}", flush=True)
    n = {s: len(c) for s, c in srv.market.by_symbol.items()}
    print(f"contracts {n}; session {srv.market.session}", flush=True)
    driver = asyncio.create_task(run_scenario(srv, args, stop))
    try:
        if args.duration_s is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.duration_s)
            stop.set()
        else:
            await stop.wait()
    finally:
        stop.set()
        await driver
        await srv.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    setup_logging(args.log_level)
    add_secret(args.api_key)
    try:
        return asyncio.run(serve(args))
    except OSError as exc:
        print(f"simulate: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
