"""``massive-pipeline import-flatfiles``: the provider's historical flat files -> a recording
(``processors/ops/replay.py`` format) that replays like one made live, so a past session can be
backtested through the same pipeline.

Inputs (Massive flat files, one gzip CSV per day and dataset, columns named in a header row
and resolved by name, so their order does not matter; uncompressed CSV is read too):

* options trades (``us_options_opra/trades_v1``): ``ticker, conditions, correction,
  exchange, price, sip_timestamp, size``;
* options quotes (``us_options_opra/quotes_v1``): ``ticker, ask_exchange, ask_price,
  ask_size, bid_exchange, bid_price, bid_size, sequence_number, sip_timestamp``.

Units: prices in dollars (index points for SPX/NDX options), sizes in contracts,
``sip_timestamp`` in nanoseconds since the epoch (the time the SIP received the event; what
the WebSocket sends as ``t`` in milliseconds). Needed columns: trades ``ticker``, ``price``,
``size``, ``sip_timestamp``; quotes ``ticker``, ``bid_price``, ``ask_price``,
``sip_timestamp``; the others are carried when present.

What the recording holds:

* per symbol, one chain snapshot before the first event: the topology is the contracts that
  appear in the files (not expired on ``--date``), or the contracts of ``--chain`` (a saved
  ``/v3/snapshot/options/I:SPX`` response: one page, or a JSON list of pages), which also
  brings implied volatility, greeks, open interest and the index level. The snapshot's own
  quotes and trades are dropped: the day's prices come from the files (a snapshot taken
  after the close would otherwise be newer than every event and shadow them). Without
  ``--chain`` there is no open interest, and GEX reports every contract as missing greeks
  rather than inventing any; its index level then comes from ``--spot SPX=5900.25``
  (without one GEX has no spot and builds nothing).
* the trades and quotes as WebSocket frames (``T`` / ``Q`` events, ``t`` = the SIP time in
  ms) in SIP-timestamp order, one frame per millisecond, received at the last event's SIP
  time. The WebSocket's millisecond ``t`` cannot order two events of a contract within one
  millisecond, and admission keeps the first of equal timestamps, so only the last quote
  and the last trade of each contract in each millisecond are kept (counted as
  ``superseded``): the state at the end of that millisecond.

Reading is a stream: rows are filtered by ticker prefix on the raw line before any parsing
(a day's file holds every underlying), the kept rows are sorted in runs of ``--run-rows`` and
spilled to temporary files, and the runs are merged by SIP time (``heapq.merge``), so memory
is bounded by the run size whatever the file size or its row order. Malformed rows (wrong
column count, unparsable ticker, price, size or timestamp, negative values) and trades
carrying a correction are counted by reason, the first few logged, and skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import gzip
import heapq
import json
import logging
import math
import os
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgspec

from processors.ops.replay import Record, RecordingWriter
from schemas import keys, ticker
from schemas import symbols as syms
from schemas.massive_rest import RestDecodeError, parse_chain_page
from schemas.messages import (
    WS_PAYLOAD_FIELD,
    WS_RECV_FIELD,
    ChainContract,
    ChainPointer,
    ChainSnapshot,
    encode_snapshot,
    entry,
)
from streams.clock import NY
from streams.logs import setup_logging
from streams.settings import RuntimeSettings, SettingsError, from_env

logger = logging.getLogger(__name__)

MS = 1_000_000
TRADE, QUOTE = 0, 1
TRADE_COLUMNS = ("ticker", "conditions", "correction", "exchange", "price", "sip_timestamp", "size")
QUOTE_COLUMNS = (
    "ticker",
    "ask_exchange",
    "ask_price",
    "ask_size",
    "bid_exchange",
    "bid_price",
    "bid_size",
    "sequence_number",
    "sip_timestamp",
)
_REQUIRED = {
    TRADE: ("ticker", "price", "size", "sip_timestamp"),
    QUOTE: ("ticker", "bid_price", "ask_price", "sip_timestamp"),
}
MAX_EVENTS_PER_FRAME = 1000
_LOGGED_PER_REASON = 5

# A kept row, as spilled and merged: (sip ns, kind, sequence, ticker, a, b, c, d, e, f)
# trade: a=price b=size c=exchange d=condition; quote: a=bid b=ask c=bid size d=ask size
# e=bid exchange f=ask exchange.
Row = tuple[int, int, int, str, float, float, int, int, int, int]


class FlatFileError(ValueError):
    """A file that cannot be imported at all (missing, no header, a needed column absent)."""


@dataclass
class ImportStats:
    rows: Counter[str] = field(default_factory=Counter)  # read / kept / filtered, per file kind
    skipped: Counter[str] = field(default_factory=Counter)  # malformed etc., by reason
    superseded: int = 0
    events: Counter[str] = field(default_factory=Counter)  # T / Q written
    frames: int = 0
    contracts: Counter[str] = field(default_factory=Counter)  # per symbol, in the topology
    runs: int = 0

    def skip(self, reason: str, kind: str, detail: str) -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] <= _LOGGED_PER_REASON:
            logger.warning("%s row skipped (%s): %s", kind, reason, detail[:200])


# --- reading ---------------------------------------------------------------------------
def _open_text(path: str | Path) -> IO[str]:
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    if gz:
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def prefixes(symbols: Iterable[str]) -> tuple[str, ...]:
    """Ticker prefixes of the listed option roots of ``symbols`` by their specs
    (schemas/symbols.py: SPX -> O:SPX, O:SPXW; AAPL -> O:AAPL, which also covers AAPL1)."""
    known = syms.registry()
    return tuple(sorted({f"O:{root}" for s in symbols for root in known.spec(s).roots}))


class _Reader:
    """Rows of one flat file for the wanted symbols, in file order (see the module doc)."""

    def __init__(
        self,
        path: str | Path,
        kind: int,
        symbols: frozenset[str],
        day: dt.date,
        stats: ImportStats,
    ) -> None:
        self.path = str(path)
        self.kind = kind
        self.name = "trades" if kind == TRADE else "quotes"
        self.symbols = symbols
        self.day = day
        self.stats = stats
        self.pfx = prefixes(symbols)
        self.tickers: dict[str, ticker.OptionTicker] = {}  # parsed, wanted, not expired
        self._bad_tickers: dict[str, str] = {}  # ticker -> reason it is skipped
        # the session in SIP nanoseconds (New York calendar day)
        start = dt.datetime.combine(day, dt.time(), NY)
        self._day_ns = (
            int(start.timestamp()) * 1_000_000_000,
            int((start + dt.timedelta(days=1)).timestamp()) * 1_000_000_000,
        )

    def rows(self) -> Iterator[Row]:
        try:
            f = _open_text(self.path)
        except OSError as exc:
            raise FlatFileError(f"{self.path}: {exc}") from None
        with f:
            header_line = f.readline()
            if not header_line.strip():
                raise FlatFileError(f"{self.path}: empty file (no header row)")
            header = [h.strip() for h in next(csv.reader([header_line]))]
            col = {h: i for i, h in enumerate(header)}
            missing = [c for c in _REQUIRED[self.kind] if c not in col]
            if missing:
                raise FlatFileError(
                    f"{self.path}: not a {self.name} flat file: no column(s) {', '.join(missing)}"
                    f" (header: {','.join(header)})"
                )
            for line in self._wanted(f):
                # one record per line (a stray quote never swallows the next lines); options
                # files have no quoted fields, so the split is the common path
                text = line.rstrip("\r\n")
                fields = text.split(",") if '"' not in text else next(csv.reader([text]), [])
                row = self._parse(fields, col, len(header))
                if row is not None:
                    self.stats.rows[f"{self.name}_kept"] += 1
                    yield row

    def _wanted(self, f: IO[str]) -> Iterator[str]:
        """Lines whose ticker starts with a wanted prefix, before any CSV parsing."""
        pfx = self.pfx
        read = filtered = 0
        try:
            for line in f:
                read += 1
                if line.startswith(pfx):
                    yield line
                else:
                    filtered += 1
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise FlatFileError(f"{self.path}: unreadable after {read} rows: {exc}") from None
        finally:
            self.stats.rows[f"{self.name}_read"] += read
            self.stats.rows[f"{self.name}_filtered_out"] += filtered

    def _ticker(self, cid: str, line: str) -> ticker.OptionTicker | None:
        t = self.tickers.get(cid)
        if t is not None:
            return t
        bad = self._bad_tickers.get(cid)
        if bad is not None:
            self.stats.skipped[bad] += 1
            return None
        try:
            t = ticker.parse(cid)
        except ticker.TickerError as exc:
            self._bad_tickers[cid] = "bad_ticker"
            self.stats.skip("bad_ticker", self.name, f"{exc}: {line}")
            return None
        if t.symbol not in self.symbols:  # a longer root sharing the prefix
            self._bad_tickers[cid] = "other_underlying"
            self.stats.skipped["other_underlying"] += 1
            return None
        spec = syms.registry().spec(t.symbol)
        if spec.adjusted == "skip" and spec.classify(t.root) != syms.STANDARD:
            self._bad_tickers[cid] = "adjusted_deliverable"
            self.stats.skipped["adjusted_deliverable"] += 1
            return None
        if t.expiry < self.day:
            self._bad_tickers[cid] = "expired"
            self.stats.skipped["expired"] += 1
            return None
        self.tickers[cid] = t
        return t

    def _parse(self, fields: list[str], col: dict[str, int], n: int) -> Row | None:
        name = self.name
        if len(fields) != n:
            self.stats.skip("columns", name, f"{len(fields)} fields, expected {n}: {fields}")
            return None
        cid = fields[col["ticker"]]
        if self._ticker(cid, ",".join(fields)) is None:
            return None
        try:
            ts = int(fields[col["sip_timestamp"]])
        except ValueError:
            self.stats.skip("bad_timestamp", name, ",".join(fields))
            return None
        if not self._day_ns[0] <= ts < self._day_ns[1]:
            self.stats.skip("other_date", name, ",".join(fields))
            return None
        try:
            if self.kind == TRADE:
                return self._trade(cid, ts, fields, col)
            return self._quote(cid, ts, fields, col)
        except ValueError as exc:
            self.stats.skip("bad_number", name, f"{exc}: {','.join(fields)}")
            return None

    def _trade(self, cid: str, ts: int, f: list[str], col: dict[str, int]) -> Row | None:
        corr = _opt_int(f, col, "correction")
        if corr:
            self.stats.skip("corrected", self.name, ",".join(f))
            return None
        price = _price(f[col["price"]])
        size = _size(f[col["size"]])
        exchange = _opt_int(f, col, "exchange")
        cond = _opt_int(f, col, "conditions")
        return (ts, TRADE, 0, cid, price, float(size), exchange, cond, 0, 0)

    def _quote(self, cid: str, ts: int, f: list[str], col: dict[str, int]) -> Row | None:
        bid, ask = _price(f[col["bid_price"]]), _price(f[col["ask_price"]])
        bs = _size(f[col["bid_size"]]) if "bid_size" in col else 0
        asz = _size(f[col["ask_size"]]) if "ask_size" in col else 0
        seq = _opt_int(f, col, "sequence_number")
        bx, ax = _opt_int(f, col, "bid_exchange"), _opt_int(f, col, "ask_exchange")
        return (ts, QUOTE, seq, cid, bid, ask, bs, asz, bx, ax)


def _price(s: str) -> float:
    x = float(s)
    if not math.isfinite(x) or x < 0 or x > 1e9:
        raise ValueError(f"price {s!r}")
    return x


def _size(s: str) -> int:
    x = float(s)  # sizes are integers, some files write them as 1.0
    if not math.isfinite(x) or x < 0 or x != int(x) or x > 2**31:
        raise ValueError(f"size {s!r}")
    return int(x)


def _opt_int(f: list[str], col: dict[str, int], name: str) -> int:
    i = col.get(name)
    if i is None or f[i] == "":
        return 0
    return int(f[i])


# --- bounded-memory sort -----------------------------------------------------------------
_LEN = struct.Struct(">I")
_row_enc = msgspec.msgpack.Encoder()
_rows_dec = msgspec.msgpack.Decoder(list[Row])


def _spill(rows: list[Row], tmp: str, stats: ImportStats, chunk: int = 1024) -> str:
    rows.sort()
    fd, path = tempfile.mkstemp(prefix="massive-flatfile-run-", dir=tmp)
    with os.fdopen(fd, "wb", buffering=1 << 20) as f:
        for i in range(0, len(rows), chunk):
            payload = _row_enc.encode(rows[i : i + chunk])
            f.write(_LEN.pack(len(payload)))
            f.write(payload)
    stats.runs += 1
    return path


def _run(path: str) -> Iterator[Row]:
    with open(path, "rb", buffering=1 << 20) as f:
        while head := f.read(_LEN.size):
            (n,) = _LEN.unpack(head)
            yield from _rows_dec.decode(f.read(n))


def sorted_rows(
    sources: Iterable[Iterator[Row]], tmp: str, run_rows: int, stats: ImportStats
) -> Iterator[Row]:
    """Every row of ``sources`` in (SIP time, kind, sequence, ...) order, holding at most
    ``run_rows`` rows in memory."""
    runs: list[str] = []
    buf: list[Row] = []
    try:
        for src in sources:
            for row in src:
                buf.append(row)
                if len(buf) >= run_rows:
                    runs.append(_spill(buf, tmp, stats))
                    buf = []
        buf.sort()
        yield from heapq.merge(buf, *(_run(p) for p in runs))
    finally:
        for p in runs:
            with contextlib.suppress(OSError):
                os.unlink(p)


# --- recording ---------------------------------------------------------------------------
def load_chain(
    path: str | Path, symbols: frozenset[str]
) -> tuple[list[ChainContract], dict[str, float]]:
    """Contracts (quotes/trades dropped, see the module doc) and index levels of a saved
    chain snapshot: one response page, or a JSON list of pages."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise FlatFileError(f"--chain {path}: {exc}") from None
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise FlatFileError(f"--chain {path}: not JSON: {exc}") from None
    pages = doc if isinstance(doc, list) else [doc]
    out: dict[str, ChainContract] = {}
    spots: dict[str, float] = {}
    for i, page in enumerate(pages):
        try:
            p = parse_chain_page(json.dumps(page))
        except RestDecodeError as exc:
            raise FlatFileError(f"--chain {path} page {i}: {exc}") from None
        for rej in p.rejections:
            logger.warning("--chain: contract rejected (%s): %s", rej.reason, rej.detail)
        for c in p.contracts:
            sym = ticker.parse(c.cid).symbol
            if sym not in symbols:
                continue
            out[c.cid] = msgspec.structs.replace(
                c, bid=None, ask=None, last=None, last_size=None, quote_ts_ns=None, trade_ts_ns=None
            )
            if p.underlying_value is not None:
                spots.setdefault(sym, p.underlying_value)
    return sorted(out.values(), key=lambda c: c.cid), spots


def topology_from(tickers: dict[str, ticker.OptionTicker]) -> list[ChainContract]:
    return [
        ChainContract(cid=cid, expiry=t.expiry.isoformat(), strike=t.strike, right=t.right)
        for cid, t in sorted(tickers.items())
    ]


def _chain_record(
    symbol: str, ts_ns: int, spot: float | None, contracts: list[ChainContract]
) -> Record:
    snap = ChainSnapshot(symbol=symbol, ts_ns=ts_ns, spot=spot, contracts=contracts)
    key = keys.chain_snapshot(symbol, ts_ns)
    ptr = ChainPointer(symbol, key, ts_ns, len(contracts), spot, 0.0, "flatfile")
    return Record(ts_ns, keys.CHAIN_STREAM, list(entry(ptr).items()), key, encode_snapshot(snap))


def _event(row: Row) -> dict[str, Any]:
    ts, kind, seq, cid, a, b, c, d, e, f = row
    if kind == TRADE:
        ev: dict[str, Any] = {"ev": "T", "sym": cid, "p": a, "s": int(b), "t": ts // MS}
        if c:
            ev["x"] = c
        if d:
            ev["c"] = [d]
        return ev
    ev = {"ev": "Q", "sym": cid, "bp": a, "ap": b, "bs": c, "as": d, "t": ts // MS}
    if e:
        ev["bx"] = e
    if f:
        ev["ax"] = f
    if seq:
        ev["q"] = seq
    return ev


def frames(rows: Iterable[Row], stats: ImportStats) -> Iterator[tuple[int, bytes]]:
    """(receive time ns, WS frame JSON): rows grouped by SIP millisecond, the last event per
    (contract, kind) of each millisecond kept."""
    enc = msgspec.json.encode
    cur_ms: int | None = None
    last: dict[tuple[str, int], Row] = {}

    def flush() -> Iterator[tuple[int, bytes]]:
        evs = sorted(last.values())
        for i in range(0, len(evs), MAX_EVENTS_PER_FRAME):
            part = evs[i : i + MAX_EVENTS_PER_FRAME]
            for r in part:
                stats.events["T" if r[1] == TRADE else "Q"] += 1
            stats.frames += 1
            yield part[-1][0], enc([_event(r) for r in part])

    for row in rows:
        ms = row[0] // MS
        if ms != cur_ms:
            if last:
                yield from flush()
            cur_ms, last = ms, {}
        k = (row[3], row[1])
        if k in last:
            stats.superseded += 1
        last[k] = row
    if last:
        yield from flush()


def import_flatfiles(
    out: str | Path,
    day: dt.date,
    symbols: Sequence[str],
    trades: str | Path | None,
    quotes: str | Path | None,
    chain: str | Path | None = None,
    spots: dict[str, float] | None = None,
    run_rows: int = 500_000,
    tmp_dir: str | None = None,
) -> ImportStats:
    """Write the recording ``out`` (see the module doc); returns what was read and kept."""
    syms = frozenset(symbols)
    stats = ImportStats()
    readers = [
        _Reader(p, kind, syms, day, stats)
        for p, kind in ((trades, TRADE), (quotes, QUOTE))
        if p is not None
    ]
    if not readers:
        raise FlatFileError("nothing to import: give --trades and/or --quotes")
    contracts: dict[str, list[ChainContract]] = {}
    levels = dict(spots or {})
    if chain is not None:
        listed, chain_spots = load_chain(chain, syms)
        for c in listed:
            contracts.setdefault(ticker.parse(c.cid).symbol, []).append(c)
        for s, v in chain_spots.items():
            levels.setdefault(s, v)
    with tempfile.TemporaryDirectory(prefix="massive-flatfiles-", dir=tmp_dir) as tmp:
        merged = sorted_rows((r.rows() for r in readers), tmp, run_rows, stats)
        first = next(merged, None)  # every file read and its runs spilled by now
        if first is None:
            raise FlatFileError(
                f"no {'/'.join(sorted(syms))} trades or quotes on {day} in the files"
            )
        if chain is None:
            seen: dict[str, ticker.OptionTicker] = {}
            for r in readers:
                seen.update(r.tickers)
            for c in topology_from(seen):
                contracts.setdefault(ticker.parse(c.cid).symbol, []).append(c)
        t0 = first[0] - MS  # the snapshots come just before the first event
        header_streams = [keys.CHAIN_STREAM, keys.WS_STREAM]
        with RecordingWriter(out, header_streams, time.time_ns()) as w:
            for sym in sorted(contracts):
                w.write(_chain_record(sym, t0, levels.get(sym), contracts[sym]))
                stats.contracts[sym] = len(contracts[sym])
            for recv, frame in frames(_prepend(first, merged), stats):
                fields = [(WS_RECV_FIELD, str(recv).encode()), (WS_PAYLOAD_FIELD, frame)]
                w.write(Record(recv, keys.WS_STREAM, fields))
    return stats


def _prepend(first: Row, rest: Iterator[Row]) -> Iterator[Row]:
    yield first
    yield from rest


# --- CLI ---------------------------------------------------------------------------------
def _spot_arg(arg: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in arg.split(","):
        sym, sep, val = part.partition("=")
        try:
            v = float(val)
        except ValueError:
            v = math.nan
        if not sep or not sym.strip() or not math.isfinite(v) or v <= 0:
            raise argparse.ArgumentTypeError(f"--spot {arg!r}: expected SYM=LEVEL[,SYM=LEVEL]")
        out[sym.strip().upper()] = v
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="massive-pipeline import-flatfiles",
        description="Turn Massive options trades/quotes flat files (gzip CSV) into a recording "
        "that `massive-pipeline replay` plays through the pipeline.",
    )
    p.add_argument(
        "--date", required=True, type=dt.date.fromisoformat, help="the session, YYYY-MM-DD"
    )
    p.add_argument("--symbols", default="SPX", help="comma separated index symbols (default SPX)")
    p.add_argument("--trades", help="options trades flat file (.csv.gz or .csv)")
    p.add_argument("--quotes", help="options quotes flat file (.csv.gz or .csv)")
    p.add_argument(
        "--chain",
        help="saved /v3/snapshot/options/I:SPX response (one page or a JSON list of pages): "
        "topology, IV, greeks, open interest, index level",
    )
    p.add_argument("--spot", type=_spot_arg, help="index level(s) without --chain: SPX=5900.25")
    p.add_argument("--out", "-o", help="recording to write (default: <date>-<symbols>.mrec.gz)")
    p.add_argument(
        "--run-rows",
        type=int,
        default=500_000,
        help="rows sorted in memory per run before spilling to a temporary file",
    )
    return p


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(list(argv))
    try:
        settings = from_env(RuntimeSettings)
        known = syms.configure(settings.symbol_specs, settings.symbols)
    except (SettingsError, syms.SymbolSpecError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    symbols = [s.strip().upper() for s in args.symbols.split(",") if s.strip()]
    unknown = [s for s in symbols if not s.isalnum() or not known.spec(s).roots]
    if unknown or not symbols:
        print(
            f"error: --symbols: unknown {unknown or 'none'} (a symbol with listed option roots "
            "in its spec: SPX, NDX, RUT, SPY, AAPL, ...)",
            file=sys.stderr,
        )
        return 2
    if args.run_rows < 1:
        print("error: --run-rows must be >= 1", file=sys.stderr)
        return 2
    out = args.out or f"{args.date}-{'-'.join(symbols)}.mrec.gz"
    t0 = time.perf_counter()
    try:
        st = import_flatfiles(
            out, args.date, symbols, args.trades, args.quotes, args.chain, args.spot, args.run_rows
        )
    except FlatFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    took = time.perf_counter() - t0
    rows = " ".join(f"{k}={v}" for k, v in sorted(st.rows.items()))
    skipped = " ".join(f"{k}={v}" for k, v in sorted(st.skipped.items())) or "none"
    print(
        f"imported {out} in {took:.1f} s: {rows}; skipped {skipped}; "
        f"{st.superseded} superseded within their millisecond; "
        f"{st.events['T']} trades + {st.events['Q']} quotes in {st.frames} frames; "
        f"contracts {dict(st.contracts)}; {st.runs} sorted runs spilled"
    )
    return 0
