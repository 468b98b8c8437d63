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

Leg prices (``price_leg``: the one rule, mirrored by tile_vec.py)
    ``as_of`` = the newest event time over the tile's legs (contract ts_ns). A quote's age
    is its own: ``as_of`` minus when it was last *received* (``LegQuote.received``: its WS
    event or the chain snapshot that confirmed it, ``quote_rx_ts``, the later), never whether
    it changed. A quote received within ``max_quote_age`` is used at its mid; otherwise the
    last trade when it is newer than the quote; otherwise the stale mid (source ``mid_stale``,
    flag ``stale_quote``): a stale quote beats a much older trade. Leg prices are rounded to
    1e-6 (a mid of two ticks is exact to that). Staleness is judged against ``as_of`` (data
    time), not the wall clock, so a tile is a function of its legs' stored values (the
    normalizer notifies a contract whose quote a snapshot confirmed, so tiles are recomputed
    when that can change). Recorded: per-leg source and price time, ``age_ns = as_of -
    oldest price time used`` (how long the prices have stood), ``stale`` = some leg's
    information is older than ``max_quote_age`` (a quote not received, a trade not made
    within it), ``px_src`` (mid | last | mixed | none) and ``src`` (ws if any leg came from
    the WS).

Tradability
    A leg is tradable when its mid is fresh (above) and its quote two-sided (bid > 0,
    ask >= bid); a tile when every leg is. ``debit_natural`` = what buying the tile costs at
    the natural price: the ask on long legs, the bid on short legs (None when a leg has no
    bid/ask).

Values (spreads; ``d`` = the mid debit)
    max_profit = w - d, max_loss = d, r2r = (w - d) / d (None when d <= 0 or untradable).
    Bounds: a long spread pays between 0 and w (a single put between 0 and K).
    ``below_bound`` / ``above_bound`` mean an *executable* arbitrage on a tradable tile:
    buying at the natural price costs less than 0, or selling at it (longs at the bid,
    shorts at the ask) brings more than w. A mid debit outside [0, w] alone is the milder
    ``mid_below_bound`` / ``mid_above_bound`` (quote noise on wide quotes), d == 0 is
    ``zero_debit``; values are kept as computed (not hidden or clipped).
    Singles: debit = the option price; max_loss = price; puts max_profit = K - price,
    r2r = (K - price) / price; calls max_profit = None (unbounded), r2r = None.

Convexity score (spreads)
    convexity = max_profit / (max_profit + max_loss) = 1 - d / w, clamped to [0, 1], for a
    tradable tile; None when untradable (a leg without a fresh two-sided quote) or unpriced.
    The share of the spread's payoff range that is upside: 1 = free (or paid to hold) a
    payoff of up to w, 0 = paying the whole width. It is strictly decreasing in the debit,
    normalised by the width (a 5-wide and a 50-wide butterfly, or any two strikes, are on
    the same scale), equals r2r / (1 + r2r) when d > 0 (so it ranks exactly like
    reward-to-risk but stays finite). The executable cost is ``debit_natural``.
    Singles have no width to normalise by: convexity None.
    (The old MarketSwarm "convexity" compared a debit with neighbours looked up under keys
    that never matched, so it degenerated to a constant plus an efficiency term; this one
    depends on the tile alone.)

Admission clock ``seq`` = sum over the legs of the contract's ``quote_ts + trade_ts +
quote_rx_ts`` (absent = 0). Each only changes with a strictly newer timestamp of its own kind
(DESIGN invariant 4, admission per kind; a snapshot only moves quote_rx_ts forward), so any
leg update, quote, trade or confirmation, strictly increases the sum. Neither the max leg
ts (the tile's ``ts``) nor a sum of the contracts'
``ts_ns`` (= max(quote_ts, trade_ts)) would do: a quote older than the contract's newest
trade (or a trade older than its newest quote; REST re-seeds and the WS interleave like
that) changes the values without moving ``ts_ns``, and the recomputed tile would be refused
as "equal". Staging admits a tile only when its seq is strictly greater than the staged
one.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from math import floor as _floor
from typing import NamedTuple

from schemas import symbols, ticker
from schemas.heatmap import NS_PER_S, TileView, ViewLeg, encode_view
from schemas.keys import STRATEGIES
from streams.clock import NY

EPS = 1e-9

# Contract hash fields a tile needs, in this order (see LegQuote.from_values).
LEG_FIELDS = ("bid", "ask", "mid", "quote_ts", "last", "trade_ts", "ts_ns", "src", "quote_rx_ts")


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


def _parse_own(
    symbol: str, cids: Iterable[str]
) -> tuple[list[tuple[str, ticker.OptionTicker]], int]:
    """The parsed contracts of ``symbol`` among ``cids``, and how many others were ignored."""
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
    return parsed, ignored


def _root_per_expiry(
    symbol: str, parsed: Iterable[tuple[str, ticker.OptionTicker]]
) -> dict[str, str]:
    """One root per expiry: most contracts, ties to the PM-settled weekly root (by the
    symbol's spec), then to a standard root over an adjusted one."""
    spec = symbols.registry().spec(symbol)

    def rank(root: str, n: int) -> tuple[int, bool, bool, str]:
        return n, spec.settlement(root) == "PM", spec.classify(root) == symbols.STANDARD, root

    counts: dict[tuple[str, str], int] = {}
    for _, t in parsed:
        key = (t.expiry.isoformat(), t.root)
        counts[key] = counts.get(key, 0) + 1
    root_of: dict[str, str] = {}
    for (exp, root), n in counts.items():
        cur = root_of.get(exp)
        if cur is None or rank(root, n) > rank(cur, counts[(exp, cur)]):
            root_of[exp] = root
    return root_of


def _line_tiles(
    symbol: str,
    strategy: str,
    exp: str,
    right: str,
    line: dict[int, tuple[str, float]],
    widths: Sequence[float],
) -> Iterator[TileSpec]:
    """The tiles of ``strategy`` on one (expiry, right) strike line (milli-strike -> (cid,
    strike)), in strike order then width order."""
    legs: tuple[tuple[str, float, int], ...]
    strikes: tuple[float, ...]
    for m, (cid, k) in sorted(line.items()):
        if strategy == "single":
            legs = ((cid, k, 1),)
            yield TileSpec(
                tile_id(symbol, exp, "single", (k,), right),
                symbol,
                exp,
                "single",
                right,
                (k,),
                0.0,
                legs,
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
            yield TileSpec(
                tile_id(symbol, exp, strategy, strikes, right),
                symbol,
                exp,
                strategy,
                right,
                strikes,
                float(w),
                legs,
            )


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
    parsed, ignored = _parse_own(symbol, cids)
    root_of = _root_per_expiry(symbol, parsed)
    expiries = select_expiries(root_of, today, n_expiries)
    keep = set(expiries)
    # (expiry, right) -> milli-strike -> (cid, strike)
    lines: dict[tuple[str, str], dict[int, tuple[str, float]]] = {}
    for cid, t in parsed:
        exp = t.expiry.isoformat()
        if exp not in keep or root_of[exp] != t.root:
            ignored += 1
            continue
        lines.setdefault((exp, t.right), {})[_milli(t.strike)] = (cid, t.strike)
    if not widths and strategy != "single":  # from the listed strike spacing
        widths = symbols.derive_widths([k for _, k in ln.values()] for ln in lines.values())
    grid = Grid(
        symbol=symbol,
        strategy=strategy,
        expiries=expiries,
        ignored=ignored,
        roots={e: root_of[e] for e in expiries},
    )
    for (exp, right), line in sorted(lines.items()):
        for spec in _line_tiles(symbol, strategy, exp, right, line, widths):
            grid.add(spec)
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
    quote_rx: int | None = None  # when the quote was last confirmed by a chain snapshot

    @property
    def received(self) -> int:
        """When the quote was last received: its own event time or the chain snapshot that
        last confirmed it, the later (0 without a quote)."""
        q, r = self.quote_ts or 0, self.quote_rx or 0
        return q if q >= r else r

    @classmethod
    def from_values(cls, values: Sequence[bytes | str | None]) -> LegQuote | None:
        """Parse the HMGET of LEG_FIELDS; None when the hash does not exist (all absent).
        Unparsable or non-finite numbers count as absent (raises nothing)."""
        if all(v is None for v in values):
            return None
        vals = list(values) + [None] * (len(LEG_FIELDS) - len(values))
        bid, ask, mid, qts, last, tts, ts, src, rx = vals[: len(LEG_FIELDS)]
        b, a, m = _num(bid), _num(ask), _num(mid)
        if m is None and b is not None and a is not None:
            m = (b + a) / 2
        q, t = _int(qts), _int(tts)
        ts_ns = _int(ts)
        if ts_ns is None:
            ts_ns = max(q or 0, t or 0)
        s = (src.decode() if isinstance(src, bytes) else src) or "chain"
        return cls(b, a, m, q, _num(last), t, ts_ns, s, _int(rx) if q is not None else None)

    @classmethod
    def from_joined(cls, joined: bytes) -> LegQuote | None:
        """Fast path for lua/fetch.lua's "|"-joined LEG_FIELDS values; anything unusual
        (bad or non-finite numbers, wrong arity) goes through ``from_values``."""
        parts = joined.split(b"|")
        try:
            b, a, m, qts, last, tts, ts, src, rx = parts
            bid = float(b) if b else None
            ask = float(a) if a else None
            mid = float(m) if m else None
            lst = float(last) if last else None
            q = int(qts) if qts else None
            t = int(tts) if tts else None
            ts_ns = int(ts) if ts else max(q or 0, t or 0)
            received = int(rx) if rx and q is not None else None
        except ValueError:
            return cls.from_values(parts)
        if not math.isfinite((bid or 0.0) + (ask or 0.0) + (mid or 0.0) + (lst or 0.0)):
            return cls.from_values(parts)
        if mid is None and bid is not None and ask is not None:
            mid = (bid + ask) / 2
        return cls(bid, ask, mid, q, lst, t, ts_ns, src.decode() if src else "chain", received)


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


class LegPrice(NamedTuple):
    """How one leg is priced in a tile (see :func:`price_leg`, the rule)."""

    px: float | None  # rounded to 1e-6
    src: str  # mid | last | mid_stale | none
    ts: int  # time of the price (quote or trade event time; 0 unknown)
    tradable: bool  # a two-sided quote received within the max age
    info_ts: int  # when the information was last known current (quote: received)


def price_leg(q: LegQuote | None, as_of: int, max_age_ns: int) -> LegPrice:
    """THE leg rule (the vectorised path in tile_vec.py mirrors it, byte-equal):

    * a quote's age is its own: ``as_of`` minus when it was last *received*
      (``LegQuote.received``: the WS event, or the chain snapshot that confirmed it), not
      when it last changed;
    * a quote received within ``max_age_ns``: its mid;
    * else the last trade when it is newer than the quote (or there is no quote);
    * else the stale mid (``mid_stale``; the tile is flagged ``stale_quote``): a stale quote
      is better information than an older trade;
    * tradable = the mid is fresh and the quote is two-sided (bid > 0, ask >= bid).
    """
    if q is None:
        return _NO_PRICE
    mid = q.mid
    rx = q.received
    qts = q.quote_ts or 0
    if mid is not None and q.quote_ts is not None and as_of - rx <= max_age_ns:
        b, a = q.bid, q.ask
        two = b is not None and a is not None and b > 0 and a >= b
        return LegPrice(_r6(mid), "mid", qts, two, rx)
    tts = q.trade_ts or 0
    if q.last is not None and (mid is None or tts > rx):
        return LegPrice(_r6(q.last), "last", tts, False, tts)
    if mid is not None:
        return LegPrice(_r6(mid), "mid_stale", qts, False, rx)
    return _NO_PRICE


_NO_PRICE = LegPrice(None, "none", 0, False, 0)


def _r6(x: float) -> float:
    """``x`` rounded to 6 decimals, half up; never -0.0. Values here are prices and ratios
    (|x| well below 2**53 / 1e6, so the product is exact enough)."""
    return _floor(x * 1e6 + 0.5) / 1e6


# Flags in the order they are listed (tile_vec keeps the same bits).
FLAG_ORDER = (
    "stale_quote",
    "above_bound",
    "below_bound",
    "mid_above_bound",
    "mid_below_bound",
    "zero_debit",
)


@dataclass(frozen=True, slots=True)
class _Priced:
    """A tile's legs priced (``staged_value``; also the readable reference of the tests,
    tests/heatmap_reference.py)."""

    legs: list[LegPrice]
    as_of: int
    seq: int
    debit: float | None
    natural: float | None  # buy at the natural price: longs at the ask, shorts at the bid
    natural_sell: float | None  # sell at the natural price: longs at the bid, shorts at the ask
    tradable: bool
    px_src: str
    age: int | None
    stale: bool  # a leg's price information is older than the max age
    ws: bool
    stale_quote: bool


def _clock(qs: Sequence[LegQuote | None]) -> tuple[int, int]:
    """(as_of, seq) of a tile's legs: the newest leg time, and the admission clock, which
    grows with any input: quote, trade, and quote confirmation."""
    as_of = seq = 0
    for q in qs:
        if q is not None:
            seq += (q.quote_ts or 0) + (q.trade_ts or 0) + (q.quote_rx or 0)
            if q.ts_ns > as_of:
                as_of = q.ts_ns
    return as_of, seq


def _natural(
    legs: Sequence[tuple[str, float, int]], qs: Sequence[LegQuote | None]
) -> tuple[float | None, float | None]:
    """(buy, sell): the tile's natural prices, None unless every leg has a two-sided quote."""
    buy = sell = 0.0
    for (_, _, qty), q in zip(legs, qs, strict=True):
        if q is None or q.bid is None or q.ask is None:
            return None, None
        buy += qty * (q.ask if qty > 0 else q.bid)
        sell += qty * (q.bid if qty > 0 else q.ask)
    return buy, sell


def _price_tile(spec: TileSpec, quotes: Mapping[str, LegQuote | None], max_age_ns: int) -> _Priced:
    qs = [quotes.get(leg[0]) for leg in spec.legs]
    as_of, seq = _clock(qs)
    buy, sell = _natural(spec.legs, qs)
    ws = any(q is not None and q.src == "ws" for q in qs)
    legs: list[LegPrice] = []
    debit: float | None = 0.0
    px_src = ""
    oldest: int | None = None
    info: int | None = None
    stale_quote = False
    tradable = True
    for (_, _, qty), q in zip(spec.legs, qs, strict=True):
        lp = price_leg(q, as_of, max_age_ns)
        legs.append(lp)
        tradable = tradable and lp.tradable
        if lp.px is None:
            debit = None
            continue
        if lp.src == "mid_stale":
            stale_quote = True
        if debit is None:
            continue
        debit += qty * lp.px
        kind = "last" if lp.src == "last" else "mid"
        px_src = kind if px_src in ("", kind) else "mixed"
        if oldest is None or lp.ts < oldest:
            oldest = lp.ts
        if info is None or lp.info_ts < info:
            info = lp.info_ts
    age: int | None = None
    stale = False
    if debit is None:
        px_src = "none"
    elif oldest is not None and info is not None:
        age = as_of - oldest
        stale = as_of - info > max_age_ns
    return _Priced(
        legs, as_of, seq, debit, buy, sell, tradable, px_src, age, stale, ws, stale_quote
    )


def _values(
    spec: TileSpec, p: _Priced
) -> tuple[float, float | None, float, float | None, float | None, list[str]]:
    """(debit, max_profit, max_loss, r2r, convexity, flags) of a priced tile (``p.debit``
    not None), rounded to 6 decimals half up (``_r6``: a float product and floor instead of
    ``round(x, 6)``, which formats digits and costs ~4x as much on this hot path; no -0.0
    comes out: stable JSON).

    Bounds: the payoff of a long spread lies in [0, w] (a single put's in [0, K]).
    ``below_bound``/``above_bound`` = an *executable* arbitrage on fresh two-sided quotes:
    buying at the natural price costs less than 0, or selling at it brings more than the
    maximum payoff. ``mid_below_bound``/``mid_above_bound``: only the mid debit is outside
    (quote noise, wide quotes), ``zero_debit``: a mid debit of 0. Convexity and r2r are
    null unless the tile is tradable."""
    d = p.debit
    assert d is not None
    flags: list[str] = ["stale_quote"] if p.stale_quote else []
    max_profit: float | None = None
    r2r = conv = None
    cap: float | None = None  # the maximum payoff
    if spec.strategy == "single":
        max_loss = d
        if spec.right == "P":
            cap = spec.strikes[0]
            max_profit = cap - d
    else:
        cap = spec.width
        max_profit, max_loss = cap - d, d
        if p.tradable:
            conv = _r6(min(1.0, max(0.0, 1.0 - d / cap)))
    sell = p.natural_sell
    if p.tradable and cap is not None and sell is not None and sell > cap + EPS:
        flags.append("above_bound")
    if p.tradable and p.natural is not None and p.natural < -EPS:
        flags.append("below_bound")
    if cap is not None and d > cap + EPS:
        flags.append("mid_above_bound")
    if d < -EPS:
        flags.append("mid_below_bound")
    elif abs(d) <= EPS:
        flags.append("zero_debit")
    if max_profit is not None and d > EPS and p.tradable:
        r2r = _r6(max_profit / d)
    return (
        _r6(d),
        _r6(max_profit) if max_profit is not None else None,
        _r6(max_loss),
        r2r,
        conv,
        flags,
    )


def staged_value(
    spec: TileSpec, quotes: Mapping[str, LegQuote | None], max_quote_age_ns: int
) -> bytes:
    """The staging value of the tile (``<seq>:`` + its published view): the per-tile path of
    the builders (small batches, values the arrays cannot hold). Property tests hold it
    byte-equal to the readable reference (tests/heatmap_reference.py) and to the vectorised
    path (tile_vec.py)."""
    p = _price_tile(spec, quotes, max_quote_age_ns)
    vlegs = [ViewLeg(qty, lp.px, lp.src) for (_, _, qty), lp in zip(spec.legs, p.legs, strict=True)]
    if p.debit is None:
        flags, max_profit, max_loss, r2r, conv = ["no_price"], None, None, None, None
        debit = None
    else:
        debit, max_profit, max_loss, r2r, conv, flags = _values(spec, p)
    legs = spec.legs
    if len(legs) > 1 and legs[0][1] > legs[-1][1]:
        vlegs.reverse()  # publish in strike order (see schemas.heatmap.view)
    v = TileView(
        legs=vlegs,
        debit=debit,
        debit_natural=_r6(p.natural) if p.natural is not None else None,
        max_profit=max_profit,
        max_loss=max_loss,
        r2r=r2r,
        convexity=conv,
        tradable=p.tradable,
        age_s=p.age // NS_PER_S if p.age is not None else None,
        stale=p.stale,
        px_src=p.px_src,
        src="ws" if p.ws else "chain",
        flags=flags,
    )
    return b"%d:%b" % (p.seq, encode_view(v))
