"""``massive-pipeline epoch inspect``: active epochs, states, counts, ages, dirty backlog.

Reads only (connects with ``RuntimeSettings.redis_url`` from the environment):
``massive:epoch:active:{<SYM>}``, ``massive:epoch:index:{<SYM>}`` (MASSIVE_SYMBOLS) and each
indexed epoch's meta, the SCARD of
its topology SET (must equal ``n_contracts``), the TTL of its meta (retired epochs expire),
a carry from the previous epoch that a crash left unfinished (``carry_from`` in the meta),
and the consumer groups of ``massive:contracts:dirty:{<SYM>}`` (lag, pending). ``--json`` prints the
same as one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from schemas import keys
from streams import admin
from streams.logs import one_line
from streams.redis_client import CONNECT_ERRORS, admin_client, as_str, unreachable
from streams.settings import RuntimeSettings, SettingsError, from_env


@dataclass(frozen=True, slots=True)
class EpochRow:
    eid: str
    symbol: str
    state: str  # active | warming | retired | missing (pointer without meta)
    is_active: bool
    n_contracts: int | None
    topology: int  # SCARD of epoch:{<SYM>}:<eid>:contracts
    expiries: list[str]
    age_s: float | None  # since created
    promoted_age_s: float | None
    snapshot_age_s: float | None
    ttl_s: int  # TTL of the meta key (-1: none, -2: gone)
    consistent: bool  # n_contracts == topology SCARD
    carry_from: str | None  # set: the carry of the previous epoch's WS values did not finish


@dataclass(frozen=True, slots=True)
class Report:
    active: dict[str, str]
    epochs: list[EpochRow]
    dirty: list[admin.GroupLag]
    dirty_length: int


def _age(now_ns: int, v: str | None) -> float | None:
    return None if not v else round((now_ns - int(v)) / 1e9, 3)


async def collect(redis: Redis, symbols: Iterable[str], now_ns: int | None = None) -> Report:
    """The epochs of ``symbols`` (each symbol's pointer and index: one slot per symbol)."""
    now = time.time_ns() if now_ns is None else now_ns
    syms = sorted(dict.fromkeys(symbols))
    pipe = redis.pipeline(transaction=False)
    for sym in syms:
        pipe.get(keys.epoch_active(sym))
        pipe.zrange(keys.epoch_index(sym), 0, -1)
    got = await pipe.execute()
    active: dict[str, str] = {}
    pairs: list[tuple[str, str]] = []  # (symbol, eid)
    for i, sym in enumerate(syms):
        cur, indexed = got[2 * i], got[2 * i + 1]
        pairs += [(sym, as_str(e)) for e in indexed]
        if cur is not None:
            active[sym] = as_str(cur)
            if (sym, active[sym]) not in pairs:
                pairs.append((sym, active[sym]))
    pipe = redis.pipeline(transaction=False)
    for sym, e in pairs:
        pipe.hgetall(keys.epoch_meta(sym, e))
        pipe.scard(keys.epoch_contracts(sym, e))
        pipe.ttl(keys.epoch_meta(sym, e))
    res = await pipe.execute()
    live = set(active.values())
    rows = []
    for i, (sym, e) in enumerate(pairs):
        meta = {as_str(k): as_str(v) for k, v in res[3 * i].items()}
        card, ttl = int(res[3 * i + 1]), int(res[3 * i + 2])
        n = int(meta["n_contracts"]) if meta.get("n_contracts") else None
        rows.append(
            EpochRow(
                eid=e,
                symbol=meta.get("symbol") or sym,
                state=meta.get("state", "missing"),
                is_active=e in live,
                n_contracts=n,
                topology=card,
                expiries=[x for x in meta.get("expiries", "").split(",") if x],
                age_s=_age(now, meta.get("created_ns")),
                promoted_age_s=_age(now, meta.get("promoted_ns")),
                snapshot_age_s=_age(now, meta.get("snapshot_ts_ns")),
                ttl_s=ttl,
                consistent=n == card,
                carry_from=meta.get("carry_from") or None,
            )
        )
    rows.sort(key=lambda r: (r.symbol, not r.is_active, r.age_s if r.age_s is not None else 0.0))
    dirty: list[admin.GroupLag] = []
    length = 0
    for sym in syms:
        stream = keys.contracts_dirty_stream(sym)
        try:
            dirty += await admin.lag(redis, [stream])
            length += int(await redis.xlen(stream))
        except ResponseError:  # the stream does not exist yet
            pass
    return Report(active=active, epochs=rows, dirty=dirty, dirty_length=length)


def _fmt_age(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 120:
        return f"{v:.1f}s"
    if v < 7200:
        return f"{v / 60:.1f}m"
    return f"{v / 3600:.1f}h"


def render(rep: Report) -> str:
    out = []
    if not rep.epochs:
        out.append("no epochs (massive:epoch:index:{<SYM>}, massive:epoch:active:{<SYM>} empty)")
    else:
        out.append(
            f"{'symbol':6} {'epoch':16} {'state':8} {'act':3} {'contracts':>9} {'topology':>8} "
            f"{'exp':>3} {'age':>7} {'promoted':>8} {'snapshot':>8} {'ttl':>5}"
        )
        for r in rep.epochs:
            flag = "" if r.consistent else "  !! n_contracts != topology"
            if r.carry_from and r.state == "active":
                flag += f"  !! carry from {r.carry_from} pending (runs with the next snapshot)"
            out.append(
                f"{r.symbol:6} {r.eid:16} {r.state:8} {'*' if r.is_active else '':3} "
                f"{r.n_contracts if r.n_contracts is not None else '-':>9} {r.topology:>8} "
                f"{len(r.expiries):>3} {_fmt_age(r.age_s):>7} {_fmt_age(r.promoted_age_s):>8} "
                f"{_fmt_age(r.snapshot_age_s):>8} {r.ttl_s if r.ttl_s >= 0 else '-':>5}{flag}"
            )
    out.append("")
    out.append(f"dirty backlog (massive:contracts:dirty:{{<SYM>}}, length {rep.dirty_length}):")
    if not rep.dirty:
        out.append("  no consumer groups")
    for g in rep.dirty:
        lag = "?" if g.lag is None else str(g.lag)
        out.append(
            f"  {g.stream} group {g.group:24} lag {lag:>8} pending {g.pending:>6} "
            f"consumers {g.consumers}"
        )
    return "\n".join(out)


async def _inspect(url: str, symbols: Iterable[str], as_json: bool) -> int:
    r = admin_client(url)
    try:
        rep = await collect(r, symbols)
    finally:
        await r.aclose()
    if as_json:
        print(orjson.dumps(asdict(rep), option=orjson.OPT_INDENT_2).decode())
    else:
        print(render(rep))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="massive-pipeline epoch", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    ins = sub.add_parser("inspect", help="active epochs, states, counts, ages, dirty backlog")
    ins.add_argument("--json", action="store_true", help="print one JSON document")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        settings = from_env(RuntimeSettings)
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_inspect(settings.redis_url, settings.symbols, args.json))
    except CONNECT_ERRORS as exc:
        print(unreachable(settings.redis_url, exc), file=sys.stderr)
        return 2
    except Exception as exc:  # a Redis error reply etc.: report, do not trace back
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
