"""``massive-pipeline``: run processors, inspect and reset consumer-group offsets, and the
subcommands contributed by other modules (simulate, epoch, record, replay, import-flatfiles,
demo)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from redis.exceptions import ResponseError

from processors import registry
from schemas import symbols
from streams import admin
from streams.logs import redact, setup_logging
from streams.processor import Deps, FatalError
from streams.redis_client import CONNECT_ERRORS, admin_client, connect, unreachable
from streams.runner import run_processors
from streams.settings import RuntimeSettings, SettingsError, check_env, from_env

# Subcommands implemented elsewhere: name -> "module:function" taking argv.
EXTERNAL = {
    "simulate": "simulator.cli:main",
    "epoch": "processors.ops.epoch_cli:main",
    "record": "processors.ops.replay:record_main",
    "replay": "processors.ops.replay:replay_main",
    "import-flatfiles": "processors.ops.flatfiles:main",
    "demo": "processors.ops.demo:main",
    "migrate-keys": "processors.ops.migrate_keys:main",
}


def make_deps(settings: RuntimeSettings) -> Deps:
    return Deps(
        redis=connect(settings.redis_url),
        settings=settings,
        registry=CollectorRegistry(),
    )


def run_loop(coro: Coroutine[Any, Any, None], event_loop: str = "uvloop") -> None:
    """``asyncio.run`` on the configured event loop (Python 3.11's asyncio.run has no
    loop_factory; asyncio.Runner does)."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if event_loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(coro)


async def _run(names: Sequence[str], settings: RuntimeSettings) -> None:
    deps = make_deps(settings)
    try:
        procs = [registry.load(n, deps) for n in names]
        await run_processors(deps, procs)
    finally:
        await deps.redis.aclose()


async def _offsets_reset(settings: RuntimeSettings, stream: str, group: str, to: str) -> None:
    r = admin_client(settings.redis_url)
    try:
        pos, er = await admin.reset_offset(r, stream, group, to)
        print(f"stream={stream} group={group} last-delivered-id={pos} entries-read={er}")
        for g in await admin.lag(r, [stream]):
            if g.group == group:
                print(f"lag={g.lag} pending={g.pending} length={g.length}")
    finally:
        await r.aclose()


async def _lag(settings: RuntimeSettings, streams: list[str] | None) -> None:
    r = admin_client(settings.redis_url)
    try:
        rows = await admin.lag(r, streams or None)
    finally:
        await r.aclose()
    print(f"{'stream':40} {'group':22} {'length':>9} {'lag':>9} {'pending':>8} {'consumers':>9}")
    for g in rows:
        lag_s = "?" if g.lag is None else str(g.lag)
        print(
            f"{g.stream:40} {g.group:22} {g.length:>9} {lag_s:>9} {g.pending:>8} {g.consumers:>9}"
        )


# Errors printed on one line (exit code 2) instead of a traceback: what the user must fix.
SAID = (FatalError, ValueError, SettingsError, ResponseError)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        check_env()  # every settings class is registered: processors.registry imports them
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if argv and argv[0] in EXTERNAL:
        mod, _, fn = EXTERNAL[argv[0]].partition(":")
        func = getattr(importlib.import_module(mod), fn)
        rc: int = func(argv[1:])
        return rc
    args = _parser().parse_args(argv)
    try:
        settings = from_env(RuntimeSettings)
        # MASSIVE_SYMBOL_SPECS: a bad spec fails here, with its name
        symbols.configure(settings.symbol_specs, settings.symbols)
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except symbols.SymbolSpecError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    return _dispatch(args, settings)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="massive-pipeline", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser(
        "run",
        help="run processors, e.g. run normalizer hydrator",
        description="Run processors in one process until SIGTERM/SIGINT.",
        epilog="processors:\n" + registry.describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "processors", nargs="+", metavar="processor", help="name[:arg], e.g. tile-builder:butterfly"
    )
    off = sub.add_parser("offsets", help="consumer-group offsets")
    off_sub = off.add_subparsers(dest="offcmd", required=True)
    reset = off_sub.add_parser("reset", help="XGROUP SETID ... ENTRIESREAD n")
    reset.add_argument("--stream", required=True)
    reset.add_argument("--group", required=True)
    reset.add_argument("--to", required=True, help="0 | $ | <id> | <millis>ms | ISO-8601 time")
    lag = sub.add_parser("lag", help="XINFO GROUPS of the pipeline's streams")
    lag.add_argument("streams", nargs="*")
    for name in EXTERNAL:
        sub.add_parser(name, help=f"see massive-pipeline {name} --help")
    return p


def _dispatch(args: argparse.Namespace, settings: RuntimeSettings) -> int:
    """Run the parsed command; a said error (or several) is one line each and exit 2."""
    try:
        if args.cmd == "run":
            run_loop(_run(args.processors, settings), settings.event_loop)
        elif args.cmd == "offsets":
            asyncio.run(_offsets_reset(settings, args.stream, args.group, args.to))
        elif args.cmd == "lag":
            asyncio.run(_lag(settings, args.streams))
    except SAID as exc:  # e.g. the provider refused the API key: said, not traced
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except ExceptionGroup as group:  # several processors failed: each one said
        said, rest = group.split(SAID)
        if rest is not None or said is None:
            raise
        for leaf in _leaves(said):
            print(f"error: {redact(str(leaf))}", file=sys.stderr)
        return 2
    except CONNECT_ERRORS as exc:
        if args.cmd == "run":
            raise  # processors survive outages in-process; one that gave up is a bug
        print(unreachable(settings.redis_url, exc), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
