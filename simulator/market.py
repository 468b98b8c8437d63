"""Seeded market model for the simulated Massive API.

* One spot random walk per index (mean-reverting to its start level so the strike grid stays
  centred over long runs), advanced by :meth:`Market.advance` with the market clock.
* A volatility surface ``iv = atm(T) + skew*x + curvature*x^2`` with
  ``x = log(K/F) / sqrt(max(T, t_floor))`` and a term structure
  ``atm(T) = long + (short - long) * exp(-T / 0.25)``, floored.
* Black-Scholes prices and greeks (delta, gamma per $1; theta per calendar day; vega per vol
  point) for European index options with configurable ``r`` and ``q``.
* A chain per index: monthly AM root (SPX, NDX: third Fridays) and a PM root (SPXW, NDXP: every
  trading day for the first ``n_daily`` sessions incl. 0DTE, then Fridays, then month ends).
  Strikes: fine step near the money, 5x step out to a wide band.
* Stocks and ETFs (``kind="equity"``: SPY, QQQ, IWM, AAPL, MSFT and any other ticker as a
  generic stock): one root (the ticker), PM-settled, American. Expirations: ETFs list dailies
  for the first ``n_daily`` sessions, then Fridays and the monthlies; stocks list Fridays
  (weeklies) and the third-Friday monthlies. Strike spacing by price level
  (:func:`equity_step`). American-style values: the Black-Scholes value with the
  underlying's dividend yield, floored at intrinsic value (early exercise); greeks are the
  European ones (close to the American ones except for deep in-the-money puts, whose gamma
  is small). The stock itself trades on the ``/stocks`` feed (``T``/``Q``).
* Quotes around the model price with a price-dependent spread on the exchange's tick grid
  (0.05 below 3.00, 0.10 from 3.00), open interest peaking near ATM and at round strikes.
* Poisson trades and quotes at a total rate, biased to short-dated near-ATM contracts.

Everything random comes from one ``random.Random(seed)`` and is consumed only by
:meth:`Market.advance`, :meth:`Market.generate` and listing changes, never by reads, so
the same seed and the same sequence of clock values give the same events whatever the REST
traffic. Pricing is lazy and cached per market tick (``version``).
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Any

from schemas.ticker import encode
from streams.clock import NY

NS = 1_000_000_000
YEAR_S = 365.0 * 86400.0
TRADING_YEAR_S = 252.0 * 6.5 * 3600.0

# NYSE full-day closures (the simulator's calendar); weekends are always closed.
HOLIDAYS = frozenset(
    dt.date.fromisoformat(d)
    for d in (
        "2025-01-01",
        "2025-01-20",
        "2025-02-17",
        "2025-04-18",
        "2025-05-26",
        "2025-06-19",
        "2025-07-04",
        "2025-09-01",
        "2025-11-27",
        "2025-12-25",
        "2026-01-01",
        "2026-01-19",
        "2026-02-16",
        "2026-04-03",
        "2026-05-25",
        "2026-06-19",
        "2026-07-03",
        "2026-09-07",
        "2026-11-26",
        "2026-12-25",
        "2027-01-01",
        "2027-01-18",
        "2027-02-15",
        "2027-03-26",
        "2027-05-31",
        "2027-06-18",
        "2027-07-05",
        "2027-09-06",
        "2027-11-25",
        "2027-12-24",
        "2028-01-17",
        "2028-02-21",
        "2028-04-14",
        "2028-05-29",
        "2028-06-19",
        "2028-07-04",
        "2028-09-04",
        "2028-11-23",
        "2028-12-25",
    )
)


def is_trading_day(d: dt.date) -> bool:
    return d.weekday() < 5 and d not in HOLIDAYS


def next_trading_day(d: dt.date) -> dt.date:
    while not is_trading_day(d):
        d += dt.timedelta(days=1)
    return d


def prev_trading_day(d: dt.date) -> dt.date:
    while not is_trading_day(d):
        d -= dt.timedelta(days=1)
    return d


def third_friday(year: int, month: int) -> dt.date:
    first = dt.date(year, month, 1)
    return first + dt.timedelta(days=(4 - first.weekday()) % 7 + 14)


def month_end(year: int, month: int) -> dt.date:
    nxt = dt.date(year + month // 12, month % 12 + 1, 1)
    return prev_trading_day(nxt - dt.timedelta(days=1))


def ns_at(d: dt.date, hh: int, mm: int) -> int:
    return int(dt.datetime(d.year, d.month, d.day, hh, mm, tzinfo=NY).timestamp()) * NS


def session_date(now_ns: int) -> dt.date:
    """Trading session the clock belongs to: today if before 16:00 NY on a trading day,
    else the next trading day (so a simulator started at night or on a weekend trades the
    next session, with its 0DTE)."""
    local = dt.datetime.fromtimestamp(now_ns / NS, NY)
    d = local.date()
    if is_trading_day(d) and local.hour < 16:
        return d
    return next_trading_day(d + dt.timedelta(days=1))


# --- Black-Scholes ----------------------------------------------------------------------
_SQRT2 = math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def norm_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / _SQRT2)


def norm_pdf(x: float) -> float:
    return _INV_SQRT2PI * math.exp(-0.5 * x * x)


@dataclass(frozen=True, slots=True)
class Greeks:
    price: float
    delta: float  # per $1 of the underlying
    gamma: float  # per $1
    theta: float  # per calendar day
    vega: float  # per 1 vol point (0.01)


def black_scholes(
    spot: float, strike: float, t: float, vol: float, r: float, q: float, call: bool
) -> Greeks:
    """European option value and greeks (continuous dividend yield ``q``)."""
    sq = math.sqrt(t)
    vs = vol * sq
    d1 = (math.log(spot / strike) + (r - q + 0.5 * vol * vol) * t) / vs
    d2 = d1 - vs
    dq = math.exp(-q * t)
    dr = math.exp(-r * t)
    pdf = norm_pdf(d1)
    gamma = dq * pdf / (spot * vs)
    vega = spot * dq * pdf * sq / 100.0
    decay = -spot * dq * pdf * vol / (2.0 * sq)
    if call:
        n1, n2 = norm_cdf(d1), norm_cdf(d2)
        price = spot * dq * n1 - strike * dr * n2
        delta = dq * n1
        theta = decay - r * strike * dr * n2 + q * spot * dq * n1
    else:
        n1, n2 = norm_cdf(-d1), norm_cdf(-d2)
        price = strike * dr * n2 - spot * dq * n1
        delta = -dq * n1
        theta = decay + r * strike * dr * n2 - q * spot * dq * n1
    return Greeks(max(price, 0.0), delta, gamma, theta / 365.0, vega)


def tick_size(price: float) -> float:
    return 0.05 if price < 3.0 else 0.10


def round_down_tick(x: float) -> float:
    if x <= 0:
        return 0.0
    t = tick_size(x)
    return round(math.floor(x / t + 1e-9) * t, 2)


def round_up_tick(x: float) -> float:
    t = tick_size(x)
    return round(math.ceil(x / t - 1e-9) * t, 2)


def bid_ask(price: float) -> tuple[float, float]:
    """Quote around a model value: half spread ~0.4 % + a tick, on the tick grid."""
    half = 0.004 * price + 0.5 * tick_size(price)
    bid = round_down_tick(price - half)
    ask = round_up_tick(price + half)
    if ask <= bid:
        ask = round(bid + tick_size(bid), 2)
    return bid, max(ask, 0.05)


# --- configuration ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class IndexSpec:
    symbol: str  # "SPX"
    name: str  # "S&P 500"
    spot: float
    monthly_root: str  # AM-settled third Fridays
    pm_root: str  # PM-settled dailies / weeklies / month ends
    step: float  # fine strike step near the money
    atm_short: float  # ATM vol at T -> 0
    atm_long: float  # ATM vol for long maturities
    skew: float = -0.20  # d iv / d x, x = log(K/F)/sqrt(T)
    curvature: float = 0.08
    oi_scale: float = 4000.0
    exchange: int = 302
    band_scale: float = 1.0  # multiplies the strike bands (NDX lists a narrower grid)
    kind: str = "index"  # index | equity (a stock or ETF: one PM root, American, /stocks)
    q: float | None = None  # dividend yield (None: MarketConfig.q)
    dailies: bool = False  # an equity listing daily expirations (the big ETFs)
    coarse_mult: float = 5.0  # the wide band's step = coarse_mult x step

    @property
    def is_equity(self) -> bool:
        return self.kind == "equity"


def equity_step(price: float, etf: bool) -> float:
    """Listed strike spacing by price level: ETFs 0.5 below 50 then 1; stocks 0.5 below 25,
    1 below 50, 2.5 below 200, 5 above."""
    if etf:
        return 0.5 if price < 50 else 1.0
    if price < 25:
        return 0.5
    if price < 50:
        return 1.0
    return 2.5 if price < 200 else 5.0


def equity(
    symbol: str,
    name: str,
    spot: float,
    atm_short: float,
    atm_long: float,
    *,
    etf: bool = False,
    q: float = 0.0,
    oi_scale: float = 800.0,
) -> IndexSpec:
    """A stock or ETF: root = ticker, strikes spaced by price level, a flatter skew."""
    return IndexSpec(
        symbol,
        name,
        spot,
        symbol,
        symbol,
        equity_step(spot, etf),
        atm_short,
        atm_long,
        skew=-0.12 if etf else -0.06,
        curvature=0.05,
        oi_scale=oi_scale,
        exchange=301,
        kind="equity",
        q=q,
        dailies=etf,
        coarse_mult=5.0 if etf else 2.0,
        band_scale=1.0 if etf else 3.0,  # a stock lists strikes further out, in % of spot
    )


def generic_equity(symbol: str) -> IndexSpec:
    """Any other ticker: a stock at a level derived from its name (20..520), so
    ``simulate --symbols XYZ`` serves a chain for any symbol, the same one every run."""
    h = int.from_bytes(hashlib.blake2b(symbol.encode(), digest_size=4).digest(), "little")
    spot = 20.0 + round((h % 50_000) / 100.0, 2)
    return equity(symbol, symbol, spot, 0.35, 0.32, oi_scale=300.0)


SPX = IndexSpec("SPX", "S&P 500", 6000.0, "SPX", "SPXW", 5.0, 0.13, 0.18)
NDX = IndexSpec(
    "NDX",
    "Nasdaq-100",
    21000.0,
    "NDX",
    "NDXP",
    25.0,
    0.17,
    0.22,
    oi_scale=600.0,
    exchange=308,
    band_scale=0.5,
)


SPY = equity("SPY", "SPDR S&P 500 ETF", 600.0, 0.13, 0.18, etf=True, q=0.012, oi_scale=3000.0)
QQQ = equity("QQQ", "Invesco QQQ", 520.0, 0.17, 0.22, etf=True, q=0.006, oi_scale=1500.0)
IWM = equity("IWM", "iShares Russell 2000 ETF", 230.0, 0.2, 0.23, etf=True, q=0.012)
AAPL = equity("AAPL", "Apple Inc.", 230.0, 0.26, 0.27, q=0.004, oi_scale=1500.0)
MSFT = equity("MSFT", "Microsoft Corp.", 430.0, 0.24, 0.26, q=0.007, oi_scale=1000.0)


@dataclass(frozen=True, slots=True)
class MarketConfig:
    indices: tuple[IndexSpec, ...] = (SPX, NDX, SPY, QQQ, IWM, AAPL, MSFT)
    r: float = 0.04
    q: float = 0.013
    vol_floor: float = 0.05
    n_daily: int = 12  # PM-root expirations on each of the first n trading days (incl. 0DTE)
    weekly_weeks: int = 10  # then PM-root Fridays out to this many weeks
    month_ends: int = 6  # PM-root month-end expirations
    monthlies: int = 10  # AM-root third-Friday expirations
    fine_band: tuple[float, float] = (0.05, 0.08)  # fine-step band, fraction of spot (min, max)
    wide_band: tuple[float, float] = (0.10, 0.35)  # coarse-step band (5 x step)
    band_sigmas: tuple[float, float] = (2.5, 5.0)  # band = sigmas * atm * sqrt(T), clipped
    walk_speed: float = 1.0  # random-walk time multiplier (1 = real-time index volatility)
    reversion_half_life_s: float = 3600.0
    quote_fraction: float = 0.8  # share of events that are quotes (when quotes are on)


# --- contracts --------------------------------------------------------------------------
@dataclass(slots=True)
class Contract:
    ticker: str
    symbol: str
    root: str
    expiry: dt.date
    call: bool
    strike: float
    settle_ns: int  # AM roots settle at the open, PM roots at the close
    oi: int
    # lazily refreshed model values (valid for ``version``)
    version: int = -1
    model: Greeks | None = None
    iv: float = 0.0
    # quote state (REST last_quote / WS Q)
    bid: float = 0.0
    ask: float = 0.0
    bid_size: int = 0
    ask_size: int = 0
    quote_ts: int = 0
    # last trade (absent if never traded)
    trade_price: float | None = None
    trade_size: int = 0
    trade_ts: int = 0
    # day bar
    day_open: float = 0.0
    day_high: float = 0.0
    day_low: float = 0.0
    day_volume: int = 0
    day_notional: float = 0.0
    prev_close: float | None = None
    day_ts: int = 0
    # sort keys
    exp_s: str = ""

    @property
    def contract_type(self) -> str:
        return "call" if self.call else "put"


@dataclass(frozen=True, slots=True)
class TruthContract:
    """One contract as the simulated market itself prices it (see :meth:`Market.truth`)."""

    ticker: str
    root: str
    expiry: str  # YYYY-MM-DD
    call: bool
    strike: float
    settle_ns: int
    settled: bool  # settlement instant at or before the market clock
    oi: int
    iv: float  # the smile's IV at the current spot (unrounded)
    t_years: float  # the market's own time to settlement (Market.years_to)


@dataclass(frozen=True, slots=True)
class Truth:
    """The simulated market's own convention and numbers at its current clock: every
    contract priced with Black-Scholes at ``spot`` with ``iv``, ``t_years``, ``r`` and ``q``
    (continuous), so tests can compare derived levels with what the market really is."""

    symbol: str
    now_ns: int
    spot: float
    r: float
    q: float
    contracts: list[TruthContract]


@dataclass(slots=True)
class IndexState:
    spec: IndexSpec
    value: float
    open: float
    high: float
    low: float
    prev_close: float
    ts: int


@dataclass(slots=True)
class Event:
    """One generated market event, already in the provider's WS shape (ms timestamps)."""

    kind: str  # "T" | "Q" | "V"
    key: str  # option ticker, index ticker ("I:SPX") or stock ticker ("AAPL")
    payload: dict[str, Any]
    market: str = "options"  # the WS cluster carrying it: options | indices | stocks


@dataclass(slots=True)
class _Sampler:
    cum: list[float] = field(default_factory=list)
    contracts: list[Contract] = field(default_factory=list)


class Market:
    """The simulated market. Not thread safe; used from one event loop."""

    def __init__(
        self,
        seed: int = 1,
        symbols: tuple[str, ...] = ("SPX", "NDX"),
        config: MarketConfig | None = None,
        now_ns: int = 0,
        events_per_s: float = 200.0,
        quotes: bool = True,
    ) -> None:
        self.config = config or MarketConfig()
        self.rng = random.Random(seed)
        self.events_per_s = events_per_s
        self.quotes = quotes
        specs = {s.symbol: s for s in self.config.indices}
        for sym in symbols:  # any other ticker: a generic stock
            if sym not in specs:
                if not sym.isalpha() or not sym.isupper() or len(sym) > 5:
                    raise ValueError(f"no spec for symbol {sym!r} (a stock ticker is A-Z)")
                specs[sym] = generic_equity(sym)
        self.now_ns = now_ns
        self.version = 0
        self.session = session_date(now_ns)
        self.open_ns = ns_at(self.session, 9, 30)
        self.close_ns = ns_at(self.session, 16, 0)
        self.indices: dict[str, IndexState] = {}
        self.contracts: dict[str, Contract] = {}
        self.by_symbol: dict[str, list[Contract]] = {}
        self.topology_version = 0
        self._seq = 0
        self.seed = seed
        self.start_ns = now_ns
        self._ymd: dict[dt.date, str] = {}
        self._samplers: dict[str, _Sampler] = {}
        self._sampler_spot: dict[str, float] = {}
        self.pinned: dict[str, float] = {}  # symbol -> spot held still (set_spot)
        for sym in symbols:
            spec = specs[sym]
            prev = round(spec.spot * (1.0 + self.rng.gauss(0.0, 0.006)), 2)
            self.indices[sym] = IndexState(
                spec, spec.spot, spec.spot, spec.spot, spec.spot, prev, now_ns
            )
            self.by_symbol[sym] = []
            for root, exp in self.expirations(spec):
                for k in self.strikes(spec, exp):
                    for call in (True, False):
                        self._add(spec, root, exp, k, call)
        self._sort_chains()

    # --- calendar and grid --------------------------------------------------------------
    def expirations(self, spec: IndexSpec) -> list[tuple[str, dt.date]]:
        if spec.is_equity:
            return [(spec.pm_root, e) for e in self.equity_expirations(spec)]
        cfg = self.config
        pm: set[dt.date] = set()
        d = self.session
        for _ in range(cfg.n_daily):
            pm.add(d)
            d = next_trading_day(d + dt.timedelta(days=1))
        horizon = self.session + dt.timedelta(weeks=cfg.weekly_weeks)
        f = self.session + dt.timedelta(days=(4 - self.session.weekday()) % 7)
        while f <= horizon:
            pm.add(prev_trading_day(f))
            f += dt.timedelta(weeks=1)
        y, m = self.session.year, self.session.month
        n = 0
        while n < cfg.month_ends:
            me = month_end(y, m)
            if me >= self.session:
                pm.add(me)
                n += 1
            y, m = (y + 1, 1) if m == 12 else (y, m + 1)
        am: list[dt.date] = []
        y, m = self.session.year, self.session.month
        while len(am) < cfg.monthlies:
            tf = prev_trading_day(third_friday(y, m))
            if tf >= self.session:
                am.append(tf)
                pm.add(tf)  # SPXW also lists the third Friday (PM)
            y, m = (y + 1, 1) if m == 12 else (y, m + 1)
        out = [(spec.monthly_root, e) for e in am] + [(spec.pm_root, e) for e in pm]
        return sorted(out, key=lambda x: (x[1], x[0]))

    def equity_expirations(self, spec: IndexSpec) -> list[dt.date]:
        """ETFs: dailies for the first ``n_daily`` sessions; every stock and ETF: Fridays out
        to ``weekly_weeks`` (weeklies) and ``monthlies`` third Fridays."""
        cfg = self.config
        out: set[dt.date] = set()
        d = self.session
        for _ in range(cfg.n_daily if spec.dailies else 0):
            out.add(d)
            d = next_trading_day(d + dt.timedelta(days=1))
        horizon = self.session + dt.timedelta(weeks=cfg.weekly_weeks)
        f = self.session + dt.timedelta(days=(4 - self.session.weekday()) % 7)
        while f <= horizon:
            out.add(prev_trading_day(f))
            f += dt.timedelta(weeks=1)
        y, m, n = self.session.year, self.session.month, 0
        while n < cfg.monthlies:
            tf = prev_trading_day(third_friday(y, m))
            if tf >= self.session:
                out.add(tf)
                n += 1
            y, m = (y + 1, 1) if m == 12 else (y, m + 1)
        return sorted(e for e in out if e >= self.session)

    def is_monthly(self, spec: IndexSpec, root: str, expiry: dt.date) -> bool:
        if spec.is_equity:
            return expiry == prev_trading_day(third_friday(expiry.year, expiry.month))
        return root == spec.monthly_root

    def q_of(self, spec: IndexSpec) -> float:
        return self.config.q if spec.q is None else spec.q

    def settle_ns(self, root: str, spec: IndexSpec, expiry: dt.date) -> int:
        if root == spec.monthly_root and not spec.is_equity:
            return ns_at(expiry, 9, 30)
        return ns_at(expiry, 16, 0)

    def years_to(self, settle_ns: int) -> float:
        """Time to settlement, the market's IV/T convention: calendar time in 365-day years
        from the market clock clamped into the session [09:30, 15:45] New York (pre-market
        and at night it prices as at the open; 0DTE keeps at least 15 minutes), floored at
        60 s. A real provider has its own convention; the GEX builder backs it out of the
        published gamma (processors/gex/exposure.py)."""
        now = min(max(self.now_ns, self.open_ns), self.close_ns - 15 * 60 * NS)
        return max(settle_ns - now, 60 * NS) / NS / YEAR_S

    def atm_vol(self, spec: IndexSpec, t: float) -> float:
        return spec.atm_long + (spec.atm_short - spec.atm_long) * math.exp(-t / 0.25)

    def strikes(self, spec: IndexSpec, expiry: dt.date) -> list[float]:
        cfg = self.config
        s = spec.spot
        t = max((ns_at(expiry, 16, 0) - ns_at(self.session, 9, 30)) / NS / YEAR_S, 1 / 365)
        sig = self.atm_vol(spec, t) * math.sqrt(t)
        fine = min(max(cfg.band_sigmas[0] * sig, cfg.fine_band[0]), cfg.fine_band[1]) * s
        wide = min(max(cfg.band_sigmas[1] * sig, cfg.wide_band[0]), cfg.wide_band[1]) * s
        fine, wide = fine * spec.band_scale, wide * spec.band_scale
        step, coarse = spec.step, spec.step * spec.coarse_mult
        centre = round(s / coarse) * coarse
        out: set[float] = set()
        k = centre - math.floor(wide / coarse) * coarse
        while k <= centre + wide:
            out.add(k)
            k += coarse
        k = centre - math.floor(fine / step) * step
        while k <= centre + fine:
            out.add(k)
            k += step
        return sorted(x for x in out if x > 0)

    # --- topology -------------------------------------------------------------------------
    def _add(
        self, spec: IndexSpec, root: str, expiry: dt.date, strike: float, call: bool
    ) -> Contract:
        milli = round(strike * 1000)
        if abs(milli - strike * 1000) > 1e-6 or not 0 < milli < 10**8:
            ticker = encode(root, expiry, "C" if call else "P", strike)  # raises the reason
        ymd = self._ymd.get(expiry)
        if ymd is None:
            ymd = self._ymd[expiry] = expiry.strftime("%y%m%d")
        ticker = f"O:{root}{ymd}{'C' if call else 'P'}{milli:08d}"
        settle = self.settle_ns(root, spec, expiry)
        c = Contract(
            ticker=ticker,
            symbol=spec.symbol,
            root=root,
            expiry=expiry,
            call=call,
            strike=strike,
            settle_ns=settle,
            oi=0,
            exp_s=expiry.isoformat(),
        )
        self.contracts[ticker] = c
        self.by_symbol[spec.symbol].append(c)
        return c

    def _sort_chains(self) -> None:
        for lst in self.by_symbol.values():
            lst.sort(key=lambda c: c.ticker)
        self.topology_version += 1
        self._samplers.clear()

    def _open_interest(self, c: Contract, rng: random.Random) -> int:
        spec = self.indices[c.symbol].spec
        root, expiry, k, call, settle = c.root, c.expiry, c.strike, c.call, c.settle_ns
        t = max(settle - self.open_ns, 3600 * NS) / NS / YEAR_S
        sig = self.atm_vol(spec, t) * math.sqrt(t)
        x = math.log(k / spec.spot) / max(sig, 0.01)
        otm = (x > 0) == call  # out of the money side of this contract
        base = math.exp(-0.5 * (x / (1.6 if otm else 0.9)) ** 2) + 0.01
        if not call and x < 0:
            base *= 1.8  # put demand below spot (hedging)
        for mult, fac in ((100, 2.5), (50, 1.6), (25, 1.25)):
            if abs(k / mult - round(k / mult)) < 1e-9 * k:
                base *= fac
                break
        if spec.is_equity:
            if self.is_monthly(spec, root, expiry):
                base *= 3.0
        elif root == spec.monthly_root or expiry == month_end(expiry.year, expiry.month):
            base *= 3.0
        base *= 0.25 + min(t * 12.0, 1.5)  # open interest accumulates with listing age
        noise = math.exp(rng.gauss(0.0, 0.35))
        return int(spec.oi_scale * base * noise)

    def _contract_rng(self, ticker: str) -> random.Random:
        h = hashlib.blake2b(f"{self.seed}:{ticker}".encode(), digest_size=8).digest()
        return random.Random(int.from_bytes(h, "little"))

    def _seed_history(self, c: Contract) -> None:
        """First touch of a contract: open interest, a quote, a previous close and for some
        contracts a trade earlier in today's session. Randomness comes from a generator keyed
        by (seed, ticker), so the result does not depend on which contract is touched first."""
        assert c.model is not None
        rng = self._contract_rng(c.ticker)
        c.oi = self._open_interest(c, rng)
        price = c.model.price
        c.bid, c.ask = bid_ask(price)
        c.bid_size, c.ask_size = rng.randint(1, 150), rng.randint(1, 150)
        c.quote_ts = self.now_ns
        spec = self.indices[c.symbol].spec
        t = self.years_to(c.settle_ns)
        x = abs(math.log(c.strike / spec.spot)) / max(self.atm_vol(spec, t) * math.sqrt(t), 0.01)
        p_traded = min(0.95, 0.9 * math.exp(-0.5 * (x / 2.0) ** 2) + 0.02) if price >= 0.05 else 0
        if rng.random() < min(1.0, p_traded + 0.1) and price >= 0.05:
            c.prev_close = round_down_tick(price * math.exp(rng.gauss(0.0, 0.08))) or 0.05
        else:  # listed yesterday too: closed at its value (no draw: the stream stays the same)
            c.prev_close = round_down_tick(price) or 0.05
        if rng.random() < p_traded:
            px = round_down_tick(price * math.exp(rng.gauss(0.0, 0.03))) or 0.05
            lag = rng.randint(1, 3 * 3600)
            c.trade_price, c.trade_size = px, rng.randint(1, 20)
            c.trade_ts = max(self.start_ns - lag * NS + rng.randint(0, 999_999), 1)
            vol = rng.randint(c.trade_size, c.trade_size + 2000)
            c.day_open = round_down_tick(px * math.exp(rng.gauss(0.0, 0.1))) or 0.05
            c.day_high = max(c.day_open, px) * (1 + abs(rng.gauss(0, 0.03)))
            c.day_low = min(c.day_open, px) * (1 - abs(rng.gauss(0, 0.03)))
            c.day_high, c.day_low = round_up_tick(c.day_high), round_down_tick(c.day_low)
            c.day_volume = vol
            c.day_notional = vol * (c.day_open + px) / 2
            c.day_ts = ns_at(self.session, 0, 0)

    def list_new_strike(self, symbol: str, strike: float | None = None) -> list[str]:
        """List one new strike (call and put) on the nearest PM expiry: ``strike``, or one
        step above its highest strike. Returns the new tickers."""
        spec = self.indices[symbol].spec
        near = min(c.expiry for c in self.by_symbol[symbol] if c.root == spec.pm_root)
        listed = {c.strike for c in self.by_symbol[symbol] if c.expiry == near}
        k = max(listed) + spec.step if strike is None else float(strike)
        if k in listed:
            raise ValueError(f"{symbol} strike {k} is already listed on {near}")
        new = [self._add(spec, spec.pm_root, near, k, call) for call in (True, False)]
        return self._finish_listing(new)

    def list_new_expiry(self, symbol: str, expiry: dt.date | None = None) -> list[str]:
        """List a new PM expiration (``expiry``, or one week after the last one) with its
        strike grid."""
        spec = self.indices[symbol].spec
        listed = {c.expiry for c in self.by_symbol[symbol]}
        if expiry is not None:
            if expiry in listed:
                raise ValueError(f"{symbol} expiry {expiry} is already listed")
            exp = expiry
        else:
            last = max(listed)
            exp = prev_trading_day(last + dt.timedelta(days=7))
            if exp <= last:
                exp = next_trading_day(last + dt.timedelta(days=1))
        new = [
            self._add(spec, spec.pm_root, exp, k, call)
            for k in self.strikes(spec, exp)
            for call in (True, False)
        ]
        return self._finish_listing(new)

    def _finish_listing(self, new: list[Contract]) -> list[str]:
        self._sort_chains()
        return [c.ticker for c in new]

    # --- pricing --------------------------------------------------------------------------
    def implied_vol(self, c: Contract, spot: float, t: float) -> float:
        spec = self.indices[c.symbol].spec
        fwd = spot * math.exp((self.config.r - self.q_of(spec)) * t)
        x = math.log(c.strike / fwd) / math.sqrt(max(t, 2.0 / 365.0))
        iv = self.atm_vol(spec, t) + spec.skew * x + spec.curvature * x * x
        return min(max(iv, self.config.vol_floor), 3.0)

    def refresh(self, c: Contract) -> Contract:
        """Bring the contract's model values (and a quote that moved by a tick) to the
        current market tick. Consumes no randomness."""
        if c.version == self.version:
            return c
        spot = self.indices[c.symbol].value
        t = self.years_to(c.settle_ns)
        iv = self.implied_vol(c, spot, t)
        spec = self.indices[c.symbol].spec
        c.model = black_scholes(spot, c.strike, t, iv, self.config.r, self.q_of(spec), c.call)
        if spec.is_equity:  # American: never worth less than exercising now
            intrinsic = max(spot - c.strike if c.call else c.strike - spot, 0.0)
            if intrinsic > c.model.price:
                c.model = dataclasses.replace(c.model, price=intrinsic)
        c.iv = iv
        if c.version < 0:
            self._seed_history(c)
        elif self.now_ns > c.quote_ts:
            bid, ask = bid_ask(c.model.price)
            if (bid, ask) != (c.bid, c.ask):
                c.bid, c.ask, c.quote_ts = bid, ask, self.now_ns
        c.version = self.version
        return c

    def truth(self, symbol: str) -> Truth:
        """Every contract of ``symbol`` with the IV of the smile at the current spot and the
        market's own time to settlement (see :class:`Truth`). Refreshes the contracts
        (consumes no randomness, like every read)."""
        st = self.indices[symbol]
        out: list[TruthContract] = []
        for c in self.by_symbol[symbol]:
            self.refresh(c)
            out.append(
                TruthContract(
                    ticker=c.ticker,
                    root=c.root,
                    expiry=c.exp_s,
                    call=c.call,
                    strike=c.strike,
                    settle_ns=c.settle_ns,
                    settled=c.settle_ns <= self.now_ns,
                    oi=c.oi,
                    iv=c.iv,
                    t_years=self.years_to(c.settle_ns),
                )
            )
        return Truth(symbol, self.now_ns, st.value, self.config.r, self.q_of(st.spec), out)

    # --- time -----------------------------------------------------------------------------
    def advance(self, now_ns: int) -> None:
        """Move the spots to ``now_ns`` (mean-reverting random walk) and start a new tick."""
        if now_ns <= self.now_ns:
            return
        dt_s = (now_ns - self.now_ns) / NS
        self.now_ns = now_ns
        self.version += 1
        k = math.log(2.0) / self.config.reversion_half_life_s
        for st in self.indices.values():
            spec = st.spec
            if spec.symbol in self.pinned:
                st.value = self.pinned[spec.symbol]
                st.high, st.low = max(st.high, st.value), min(st.low, st.value)
                st.ts = now_ns
                continue
            sd = self.atm_vol(spec, 30 / 365) * math.sqrt(
                dt_s * self.config.walk_speed / TRADING_YEAR_S
            )
            drift = -k * dt_s * math.log(st.value / spec.spot)
            st.value = round(st.value * math.exp(drift + sd * self.rng.gauss(0.0, 1.0)), 2)
            st.high, st.low = max(st.high, st.value), min(st.low, st.value)
            st.ts = now_ns

    def set_spot(self, symbol: str, value: float | None) -> None:
        """Hold ``symbol``'s index at ``value`` from now on (None: let it walk again);
        options reprice at the next tick."""
        if value is None:
            self.pinned.pop(symbol, None)
            return
        if not value > 0:
            raise ValueError(f"spot must be > 0, got {value}")
        st = self.indices[symbol]
        self.pinned[symbol] = st.value = round(float(value), 2)
        st.high, st.low = max(st.high, st.value), min(st.low, st.value)
        self.version += 1

    def resync(self, now_ns: int) -> None:
        """Jump the clock without a random-walk step or events (after a closed period or a
        stalled loop)."""
        if now_ns > self.now_ns:
            self.now_ns = now_ns
            self.version += 1
            for st in self.indices.values():
                st.ts = now_ns

    # --- event generation -----------------------------------------------------------------
    def _sampler(self, symbol: str) -> _Sampler:
        spot = self.indices[symbol].value
        smp = self._samplers.get(symbol)
        spec = self.indices[symbol].spec
        if smp is not None and abs(self._sampler_spot[symbol] / spot - 1) < 0.002:
            return smp
        smp = _Sampler()
        total = 0.0
        for c in self.by_symbol[symbol]:
            t = self.years_to(c.settle_ns)
            sig = self.atm_vol(spec, t) * math.sqrt(t)
            x = math.log(c.strike / spot) / max(sig, 0.004)
            w = math.exp(-0.5 * x * x) / (max(sig, 0.004) * (1.0 + 50.0 * t)) + 1e-4
            total += w
            smp.cum.append(total)
            smp.contracts.append(c)
        self._samplers[symbol] = smp
        self._sampler_spot[symbol] = spot
        return smp

    def _pick(self) -> Contract:
        syms = list(self.by_symbol)
        # the larger chain trades more; weight by chain size
        sizes = [len(self.by_symbol[s]) for s in syms]
        r = self.rng.random() * sum(sizes)
        i = 0
        while r >= sizes[i] and i < len(sizes) - 1:
            r -= sizes[i]
            i += 1
        smp = self._sampler(syms[i])
        u = self.rng.random() * smp.cum[-1]
        return smp.contracts[min(bisect.bisect_right(smp.cum, u), len(smp.contracts) - 1)]

    def generate(self, now_ns: int) -> list[Event]:
        """Advance to ``now_ns`` and draw the Poisson number of trades and quotes that
        happened since the previous call, stamped inside ``(previous now, now]``."""
        start = self.now_ns
        span = now_ns - start
        if span <= 0:
            return []
        lam = self.events_per_s * span / NS
        n = self._poisson(lam)
        times = sorted(start + 1 + int(self.rng.random() * (span - 1)) for _ in range(n))
        self.advance(now_ns)
        out: list[Event] = []
        for ts in times:
            c = self.refresh(self._pick())
            if self.quotes and self.rng.random() < self.config.quote_fraction:
                out.append(self._quote(c, ts))
            else:
                out.append(self._trade(c, ts))
        return out

    def _poisson(self, lam: float) -> int:
        if lam <= 0:
            return 0
        if lam > 50:
            return max(0, round(self.rng.gauss(lam, math.sqrt(lam))))
        limit, k, p = math.exp(-lam), 0, self.rng.random()
        while p > limit:
            k += 1
            p *= self.rng.random()
        return k

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _quote(self, c: Contract, ts: int) -> Event:
        assert c.model is not None
        price = c.model.price * math.exp(self.rng.gauss(0.0, 0.002))
        c.bid, c.ask = bid_ask(price)
        c.bid_size, c.ask_size = self.rng.randint(1, 250), self.rng.randint(1, 250)
        # the event is the newest quote: a re-quote stamped with this tick by refresh() just
        # before (same generate call, never observed) must not make it look older
        c.quote_ts = ts
        x = self.indices[c.symbol].spec.exchange
        payload = {
            "ev": "Q",
            "sym": c.ticker,
            "bx": x,
            "ax": x,
            "bp": c.bid,
            "ap": c.ask,
            "bs": c.bid_size,
            "as": c.ask_size,
            "t": ts // 1_000_000,
            "q": self._next_seq(),
        }
        return Event("Q", c.ticker, payload)

    def _trade(self, c: Contract, ts: int) -> Event:
        bid, ask = c.bid, c.ask
        if bid <= 0:
            px = ask
        else:
            u = self.rng.random()
            px = bid if u < 0.35 else ask if u < 0.7 else round_down_tick((bid + ask) / 2) or bid
        size = min(int(self.rng.expovariate(1 / 6.0)) + 1, 500)
        c.trade_price, c.trade_size, c.trade_ts = px, size, ts
        if c.day_volume == 0:
            c.day_open = c.day_high = c.day_low = px
        c.day_high, c.day_low = max(c.day_high, px), min(c.day_low, px)
        c.day_volume += size
        c.day_notional += size * px
        c.day_ts = ns_at(self.session, 0, 0)
        payload = {
            "ev": "T",
            "sym": c.ticker,
            "x": self.indices[c.symbol].spec.exchange,
            "p": px,
            "s": size,
            "c": [209],
            "t": ts // 1_000_000,
            "q": self._next_seq(),
        }
        return Event("T", c.ticker, payload)

    def index_values(self) -> list[Event]:
        """One ``V`` event per index at the current tick."""
        return [
            Event(
                "V",
                f"I:{s}",
                {"ev": "V", "val": st.value, "T": f"I:{s}", "t": self.now_ns // 1_000_000},
                "indices",
            )
            for s, st in self.indices.items()
            if not st.spec.is_equity
        ]

    def stock_events(self) -> list[Event]:
        """A ``Q`` (one cent either side) and a ``T`` (at the price) per stock or ETF at the
        current tick, in the ``/stocks`` shapes. Draws no randomness."""
        out: list[Event] = []
        t = self.now_ns // 1_000_000
        for s, st in self.indices.items():
            if not st.spec.is_equity:
                continue
            bid, ask = round(st.value - 0.01, 2), round(st.value + 0.01, 2)
            quote = {
                "ev": "Q", "sym": s, "bx": 11, "bp": bid, "bs": 3, "ax": 12, "ap": ask,
                "as": 2, "c": 1, "i": [604], "t": t, "q": self._next_seq(), "z": 3,
            }  # fmt: skip
            trade = {
                "ev": "T", "sym": s, "x": 4, "i": str(self._next_seq()), "z": 3,
                "p": st.value, "s": 100, "c": [0], "t": t, "q": self._seq,
            }  # fmt: skip
            out += [Event("Q", s, quote, "stocks"), Event("T", s, trade, "stocks")]
        return out
