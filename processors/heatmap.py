"""Convexity heatmap tile math: pure functions, no I/O (used by the tile builders, the
reference full rebuild, tests and benchmarks).

Topology (``build_grid``)
    The grid of one (epoch, symbol, strategy) comes from the epoch's frozen contract set
    alone (the cids encode root, expiry, right and strike). Per expiry ONE root is used so
    AM- and PM-settled contracts never mix in a spread: the root with the most contracts,
    ties going to the PM-settled weekly root (SPXW, NDXP). Expirations: the epoch's
    expiries sorted ascending, expired ones (before today, America/New_York) dropped, the
    first ``n_expiries`` kept (0DTE first when listed). Legs are looked up by exact strike:
    a tile exists only when every leg exists in the topology; a tile whose legs exist but
    lack prices is still produced (``no_price`` flag), so the tile set of an epoch is
    fixed and "structurally complete" is well defined.

Strategies (``w`` = width, strikes in the id ascending)
    single     C(K) or P(K)                         id SPX:2026-11-24:single:6000:C
    vertical   call C(K) - C(K+w); put P(K) - P(K-w) id SPX:...:vertical:6000-6010:C
               (long the anchor K; for puts the long leg is the upper strike)
    butterfly  X(K-w) - 2 X(K) + X(K+w), X = C or P  id SPX:...:butterfly:6000-6010-6020:C

A dirty contract at strike K therefore touches: single K; vertical calls anchored at K and
K-w, puts anchored at K and K+w; butterflies centered at K-w, K, K+w, for every width.

Leg prices
    ``as_of`` = the newest event time (contract ts_ns) over the tile's legs. A leg is priced
    at its quote mid when the quote is fresh, i.e. ``as_of - quote_ts <= max_quote_age``;
    otherwise at its last trade; with no trade, at the stale mid (source ``mid_stale``).
    Staleness is measured against ``as_of`` (data time), not the wall clock, so a tile is a
    deterministic function of its legs' stored values: any replica, any redelivery, and the
    reference rebuild compute the same bytes. Recorded: per-leg source and price time,
    ``age_ns = as_of - oldest price time used``, ``stale = age_ns > max_quote_age``,
    ``px_src`` (mid | last | mixed | none) and ``src`` (ws if any leg came from the WS).

Values (spreads; ``d`` = debit)
    max_profit = w - d, max_loss = d, r2r = (w - d) / d (None when d <= 0).
    No-arbitrage bounds 0 <= d <= w: ``below_bound`` (d < 0, a credit for a payoff that is
    never negative) and ``above_bound`` (d > w, paying more than the maximum payoff) are
    flagged, values kept as computed (not hidden or clipped); d == 0 is flagged
    ``zero_debit``.
    Singles: debit = the option price; max_loss = price; puts max_profit = K - price,
    r2r = (K - price) / price; calls max_profit = None (unbounded), r2r = None.

Convexity score (spreads)
    convexity = max_profit / (max_profit + max_loss) = 1 - d / w, clamped to [0, 1].
    The share of the spread's payoff range that is upside: 1 = free (or paid to hold) a
    payoff of up to w, 0 = paying the whole width. It is strictly decreasing in the debit,
    normalised by the width (a 5-wide and a 50-wide butterfly, or any two strikes, are on
    the same scale), equals r2r / (1 + r2r) when d > 0 (so it ranks exactly like
    reward-to-risk but stays finite), and is defined for every priced tile: 1.0 when
    d <= 0 (with the bound flag), 0.0 when d >= w. Unpriced tiles: None (``no_price``).
    Singles have no width to normalise by: convexity None.
    (The old MarketSwarm "convexity" compared a debit with neighbours looked up under keys
    that never matched, so it degenerated to a constant plus an efficiency term; this one
    depends on the tile alone.)

Admission clock ``seq`` = sum over the legs of the contract's ``quote_ts + trade_ts``
(absent = 0). Each of the two only changes with a strictly newer timestamp of its own kind
(DESIGN invariant 4, admission per kind), so any leg update, quote or trade, strictly
increases the sum. Neither the max leg ts (the tile's ``ts``) nor a sum of the contracts'
``ts_ns`` (= max(quote_ts, trade_ts)) would do: a quote older than the contract's newest
trade (or a trade older than its newest quote; REST re-seeds and the WS interleave like
that) changes the values without moving ``ts_ns``, and the recomputed tile would be refused
as "equal". Staging admits a tile only when its seq is strictly greater than the staged
one.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from math import floor as _floor
from zoneinfo import ZoneInfo

from schemas import ticker
from schemas.heatmap import NS_PER_S, Leg, Tile, TileView, ViewLeg, encode_view

STRATEGIES = ("single", "vertical", "butterfly")
EPS = 1e-9
NY = ZoneInfo("America/New_York")
PM_ROOTS = ("SPXW", "NDXP")

# Contract hash fields a tile needs, in this order (see LegQuote.from_values).
LEG_FIELDS = ("bid", "ask", "mid", "quote_ts", "last", "trade_ts", "ts_ns", "src")


def fmt_strike(strike: float) -> str:
    return str(int(strike)) if float(strike).is_integer() else repr(float(strike))


def tile_id(symbol: str, expiry: str, strategy: str, strikes: Sequence[float], right: str) -> str:
    return f"{symbol}:{expiry}:{strategy}:{'-'.join(fmt_strike(s) for s in strikes)}:{right}"


def market_date(now_ns: int) -> dt.date:
    """Today's date in New York (expiry dates are exchange dates)."""
    return dt.datetime.fromtimestamp(now_ns / 1e9, NY).date()


def select_expiries(expiries: Iterable[str], today: dt.date | None, n: int) -> list[str]:
    """Sorted expiries, those before ``today`` dropped, first ``n`` kept (0DTE first)."""
    iso = today.isoformat() if today is not None else ""
    return sorted(e for e in set(expiries) if e >= iso)[: max(n, 0)]


@dataclass(frozen=True, slots=True)
class TileSpec:
    """A tile's structure: which contracts with which signed quantities."""

    id: str
    symbol: str
    expiry: str
    strategy: str
    right: str
    strikes: tuple[float, ...]
    width: float
    legs: tuple[tuple[str, float, int], ...]  # (cid, strike, qty)


@dataclass(slots=True)
class Grid:
    """Every tile of one (epoch, symbol, strategy) and the reverse index cid -> tiles."""

    symbol: str
    strategy: str
    expiries: list[str]
    specs: dict[str, TileSpec] = field(default_factory=dict)
    by_cid: dict[str, list[TileSpec]] = field(default_factory=dict)
    ignored: int = 0  # contracts of the epoch outside the grid (other root/expiry/symbol)
    roots: dict[str, str] = field(default_factory=dict)  # expiry -> the option root tiled

    def add(self, spec: TileSpec) -> None:
        self.specs[spec.id] = spec
        for cid, _, _ in spec.legs:
            self.by_cid.setdefault(cid, []).append(spec)

    def affected(self, cids: Iterable[str]) -> dict[str, TileSpec]:
        """Tiles using any of ``cids`` (deduplicated)."""
        out: dict[str, TileSpec] = {}
        for cid in cids:
            for spec in self.by_cid.get(cid, ()):
                out[spec.id] = spec
        return out

    def leg_cids(self, specs: Iterable[TileSpec]) -> list[str]:
        seen: dict[str, None] = {}
        for spec in specs:
            for cid, _, _ in spec.legs:
                seen[cid] = None
        return list(seen)


def _milli(strike: float) -> int:
    return round(strike * 1000)


def build_grid(
    symbol: str,
    strategy: str,
    cids: Iterable[str],
    widths: Sequence[float],
    *,
    today: dt.date | None,
    n_expiries: int,
) -> Grid:
    """Enumerate every tile of ``strategy`` over the topology ``cids`` (see module doc)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    parsed: list[tuple[str, ticker.OptionTicker]] = []
    ignored = 0
    for cid in cids:
        try:
            t = ticker.parse(cid)
        except ticker.TickerError:
            ignored += 1
            continue
        if t.symbol != symbol:
            ignored += 1
            continue
        parsed.append((cid, t))
    # One root per expiry: most contracts, ties to the PM-settled weekly root.
    counts: dict[tuple[str, str], int] = {}
    for _, t in parsed:
        key = (t.expiry.isoformat(), t.root)
        counts[key] = counts.get(key, 0) + 1
    root_of: dict[str, str] = {}
    for (exp, root), n in counts.items():
        cur = root_of.get(exp)
        if cur is None or (n, root in PM_ROOTS, root) > (counts[(exp, cur)], cur in PM_ROOTS, cur):
            root_of[exp] = root
    expiries = select_expiries(root_of, today, n_expiries)
    keep = set(expiries)
    # (expiry, right) -> milli-strike -> (cid, strike)
    lines: dict[tuple[str, str], dict[int, tuple[str, float]]] = {}
    legs: tuple[tuple[str, float, int], ...]
    strikes: tuple[float, ...]
    for cid, t in parsed:
        exp = t.expiry.isoformat()
        if exp not in keep or root_of[exp] != t.root:
            ignored += 1
            continue
        lines.setdefault((exp, t.right), {})[_milli(t.strike)] = (cid, t.strike)
    grid = Grid(
        symbol=symbol,
        strategy=strategy,
        expiries=expiries,
        ignored=ignored,
        roots={e: root_of[e] for e in expiries},
    )
    for (exp, right), line in sorted(lines.items()):
        for m, (cid, k) in sorted(line.items()):
            if strategy == "single":
                grid.add(
                    TileSpec(
                        tile_id(symbol, exp, "single", (k,), right),
                        symbol,
                        exp,
                        "single",
                        right,
                        (k,),
                        0.0,
                        ((cid, k, 1),),
                    )
                )
                continue
            for w in widths:
                mw = _milli(w)
                if mw <= 0:
                    continue
                if strategy == "vertical":
                    other = line.get(m + mw if right == "C" else m - mw)
                    if other is None:
                        continue
                    legs = ((cid, k, 1), (other[0], other[1], -1))
                    strikes = (k, other[1]) if right == "C" else (other[1], k)
                else:
                    lo, hi = line.get(m - mw), line.get(m + mw)
                    if lo is None or hi is None:
                        continue
                    legs = ((lo[0], lo[1], 1), (cid, k, -2), (hi[0], hi[1], 1))
                    strikes = (lo[1], k, hi[1])
                grid.add(
                    TileSpec(
                        tile_id(symbol, exp, strategy, strikes, right),
                        symbol,
                        exp,
                        strategy,
                        right,
                        strikes,
                        float(w),
                        legs,
                    )
                )
    return grid


@dataclass(frozen=True, slots=True)
class LegQuote:
    """The pricing-relevant values of one contract hash (None = absent)."""

    bid: float | None
    ask: float | None
    mid: float | None
    quote_ts: int | None
    last: float | None
    trade_ts: int | None
    ts_ns: int
    src: str

    @classmethod
    def from_values(cls, values: Sequence[bytes | str | None]) -> LegQuote | None:
        """Parse the HMGET of LEG_FIELDS; None when the hash does not exist (all absent).
        Unparsable or non-finite numbers count as absent (raises nothing)."""
        if all(v is None for v in values):
            return None
        bid, ask, mid, qts, last, tts, ts, src = values
        b, a, m = _num(bid), _num(ask), _num(mid)
        if m is None and b is not None and a is not None:
            m = (b + a) / 2
        q, t = _int(qts), _int(tts)
        ts_ns = _int(ts)
        if ts_ns is None:
            ts_ns = max(q or 0, t or 0)
        s = (src.decode() if isinstance(src, bytes) else src) or "chain"
        return cls(b, a, m, q, _num(last), t, ts_ns, s)

    @classmethod
    def from_joined(cls, joined: bytes) -> LegQuote | None:
        """Fast path for lua/fetch.lua's "|"-joined LEG_FIELDS values; anything unusual
        (bad or non-finite numbers, wrong arity) goes through ``from_values``."""
        parts = joined.split(b"|")
        try:
            b, a, m, qts, last, tts, ts, src = parts
            bid = float(b) if b else None
            ask = float(a) if a else None
            mid = float(m) if m else None
            lst = float(last) if last else None
            q = int(qts) if qts else None
            t = int(tts) if tts else None
            ts_ns = int(ts) if ts else max(q or 0, t or 0)
        except ValueError:
            return cls.from_values(parts)
        if not math.isfinite((bid or 0.0) + (ask or 0.0) + (mid or 0.0) + (lst or 0.0)):
            return cls.from_values(parts)
        if mid is None and bid is not None and ask is not None:
            mid = (bid + ask) / 2
        return cls(bid, ask, mid, q, lst, t, ts_ns, src.decode() if src else "chain")


def _num(v: bytes | str | None) -> float | None:
    if v is None or v == b"" or v == "":
        return None
    try:
        x = float(v)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _int(v: bytes | str | None) -> int | None:
    if v is None or v == b"" or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        try:
            x = float(v)
        except ValueError:
            return None
        return int(x) if math.isfinite(x) else None


def price_leg(q: LegQuote | None, as_of: int, max_age_ns: int) -> tuple[float | None, str, int]:
    """(price, source, price time) of one leg (see module doc)."""
    if q is None:
        return None, "none", 0
    if q.mid is not None and q.quote_ts is not None and as_of - q.quote_ts <= max_age_ns:
        return q.mid, "mid", q.quote_ts
    if q.last is not None:
        return q.last, "last", q.trade_ts or 0
    if q.mid is not None:
        return q.mid, "mid_stale", q.quote_ts or 0
    return None, "none", 0


def _r6(x: float) -> float:
    """``x`` rounded to 6 decimals, half up; never -0.0. Values here are prices and ratios
    (|x| well below 2**53 / 1e6, so the product is exact enough)."""
    return _floor(x * 1e6 + 0.5) / 1e6


def _values(
    spec: TileSpec, d: float, stale_quote: bool
) -> tuple[float, float | None, float, float | None, float | None, list[str]]:
    """(debit, max_profit, max_loss, r2r, convexity, flags) of a priced tile with debit
    ``d`` (see the module doc), rounded to 6 decimals half up (``_r6``: a float product and
    floor instead of ``round(x, 6)``, which formats digits and costs ~4x as much on this hot
    path; no -0.0 comes out: stable JSON)."""
    flags: list[str] = ["stale_quote"] if stale_quote else []
    max_profit: float | None = None
    r2r = conv = None
    if spec.strategy == "single":
        k = spec.strikes[0]
        max_loss = d
        if spec.right == "P":
            max_profit = k - d
            if d > k + EPS:
                flags.append("above_bound")
    else:
        w = spec.width
        max_profit, max_loss = w - d, d
        conv = _r6(min(1.0, max(0.0, 1.0 - d / w)))
        if d > w + EPS:
            flags.append("above_bound")
    if d < -EPS:
        flags.append("below_bound")
    elif abs(d) <= EPS:
        flags.append("zero_debit")
    if max_profit is not None and d > EPS:
        r2r = _r6(max_profit / d)
    return (
        _r6(d),
        _r6(max_profit) if max_profit is not None else None,
        _r6(max_loss),
        r2r,
        conv,
        flags,
    )


def compute_tile(
    spec: TileSpec,
    quotes: Mapping[str, LegQuote | None],
    epoch: str,
    max_quote_age_ns: int,
) -> Tile:
    # Hot path (runs for every recomputed tile): plain loops, no helper calls.
    qs = [quotes.get(leg[0]) for leg in spec.legs]
    as_of = seq = 0
    for q in qs:
        if q is not None:
            t = q.ts_ns
            seq += (q.quote_ts or 0) + (q.trade_ts or 0)
            if t > as_of:
                as_of = t
    legs: list[Leg] = []
    debit: float | None = 0.0
    px_src = ""
    oldest: int | None = None
    ws = stale_quote = False
    for (cid, k, qty), q in zip(spec.legs, qs, strict=True):
        if q is None:
            legs.append(Leg(cid, k, qty, None, "none", 0))
            debit = None
            continue
        if q.src == "ws":
            ws = True
        mid = q.mid
        qts = q.quote_ts
        if mid is not None and qts is not None and as_of - qts <= max_quote_age_ns:
            px, src, pts, kind = mid, "mid", qts, "mid"
        elif q.last is not None:
            px, src, pts, kind = q.last, "last", q.trade_ts or 0, "last"
        elif mid is not None:
            px, src, pts, kind = mid, "mid_stale", qts or 0, "mid"
            stale_quote = True
        else:
            legs.append(Leg(cid, k, qty, None, "none", 0))
            debit = None
            continue
        legs.append(Leg(cid, k, qty, px, src, pts))
        if debit is None:
            continue
        debit += qty * px
        px_src = kind if px_src in ("", kind) else "mixed"
        if oldest is None or pts < oldest:
            oldest = pts
    age: int | None = None
    if debit is None:
        flags, max_profit, max_loss, r2r, conv = ["no_price"], None, None, None, None
        px_src = "none"
    else:
        age = as_of - oldest if oldest is not None else None
        debit, max_profit, max_loss, r2r, conv, flags = _values(spec, debit, stale_quote)
    return Tile(
        id=spec.id,
        symbol=spec.symbol,
        epoch=epoch,
        expiry=spec.expiry,
        strategy=spec.strategy,
        right=spec.right,
        strikes=list(spec.strikes),
        width=spec.width,
        legs=legs,
        debit=debit,
        max_profit=max_profit,
        max_loss=max_loss,
        r2r=r2r,
        convexity=conv,
        ts=as_of,
        seq=seq,
        age_ns=age,
        stale=age is not None and age > max_quote_age_ns,
        px_src=px_src,
        src="ws" if ws else "chain",
        flags=flags,
    )


def compute_all(
    grid: Grid, quotes: Mapping[str, LegQuote | None], epoch: str, max_quote_age_ns: int
) -> dict[str, Tile]:
    return {tid: compute_tile(s, quotes, epoch, max_quote_age_ns) for tid, s in grid.specs.items()}


def staged_value(
    spec: TileSpec, quotes: Mapping[str, LegQuote | None], max_quote_age_ns: int
) -> bytes:
    """The staging value of the tile, ``schemas.heatmap.stage_value(compute_tile(...))``,
    computed without the intermediate ``Tile``/``Leg`` records: the production path of the
    tile builders (incremental and full builds). ``compute_tile`` stays the readable
    reference (reference full rebuild, tests); a property test holds the two byte-equal."""
    legs = spec.legs
    qs = [quotes.get(leg[0]) for leg in legs]
    as_of = seq = 0
    for q in qs:
        if q is not None:
            t = q.ts_ns
            seq += (q.quote_ts or 0) + (q.trade_ts or 0)
            if t > as_of:
                as_of = t
    vlegs: list[ViewLeg] = []
    debit: float | None = 0.0
    px_src = ""
    oldest: int | None = None
    ws = stale_quote = False
    for (_, _, qty), q in zip(legs, qs, strict=True):
        if q is None:
            vlegs.append(ViewLeg(qty, None, "none"))
            debit = None
            continue
        if q.src == "ws":
            ws = True
        mid = q.mid
        qts = q.quote_ts
        if mid is not None and qts is not None and as_of - qts <= max_quote_age_ns:
            px, src, pts, kind = mid, "mid", qts, "mid"
        elif q.last is not None:
            px, src, pts, kind = q.last, "last", q.trade_ts or 0, "last"
        elif mid is not None:
            px, src, pts, kind = mid, "mid_stale", qts or 0, "mid"
            stale_quote = True
        else:
            vlegs.append(ViewLeg(qty, None, "none"))
            debit = None
            continue
        vlegs.append(ViewLeg(qty, px, src))
        if debit is None:
            continue
        debit += qty * px
        px_src = kind if px_src in ("", kind) else "mixed"
        if oldest is None or pts < oldest:
            oldest = pts
    age: int | None = None
    if debit is None:
        flags, max_profit, max_loss, r2r, conv = ["no_price"], None, None, None, None
        px_src = "none"
    else:
        age = as_of - oldest if oldest is not None else None
        debit, max_profit, max_loss, r2r, conv, flags = _values(spec, debit, stale_quote)
    if len(legs) > 1 and legs[0][1] > legs[-1][1]:
        vlegs.reverse()  # publish in strike order (see schemas.heatmap.view)
    v = TileView(
        legs=vlegs,
        debit=debit,
        max_profit=max_profit,
        max_loss=max_loss,
        r2r=r2r,
        convexity=conv,
        age_s=age // NS_PER_S if age is not None else None,
        stale=age is not None and age > max_quote_age_ns,
        px_src=px_src,
        src="ws" if ws else "chain",
        flags=flags,
    )
    return b"%d:%b" % (seq, encode_view(v))
