"""Gamma exposure (GEX) math: pure functions, no I/O (DESIGN.md "Models", issue 6).

Conventions
-----------
* Per contract, in shares of the underlying: ``gex = gamma * OI * 100``. Dollar gamma per 1 %
  move: ``gex * S**2 * 0.01`` (USD of delta change for a 1 % move of the index).
* Dealer sign convention for "net": calls positive, puts negative. In the model items ``puts``
  is therefore <= 0 and ``net = calls + puts``. The legacy ``:calls``/``:puts`` keys keep the
  old system's convention (both sides positive magnitudes).
* Contracts are summed (never overwritten) per strike and per expiry across roots
  (SPX AM monthlies + SPXW PM weeklies at the same strike/expiry add up).
* Walls: call wall = strike of max call GEX, put wall = strike of max |put GEX|,
  absolute-gamma strike = strike of max ``calls + |puts|``. Ties go to the lowest strike.
* Zero gamma: Black-Scholes gamma re-priced with each contract's IV over a spot grid
  (``spot * (1 +- range)``), net dollar GEX computed at every grid spot; the sign change whose
  bracket is nearest to the current spot is refined by bisection (then a final linear
  interpolation). No crossing -> ``None`` plus the reason.
* Time to expiry: expiry date 16:00 America/New_York (AM-settled roots SPX/NDX: 09:30 of the
  expiry day) minus the clock, in years of 365 days, floored at ``min_t_s`` seconds.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import numpy as np
import numpy.typing as npt

from schemas.messages import GexRow

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]

NY = ZoneInfo("America/New_York")
SECONDS_PER_YEAR = 365.0 * 86400.0
CONTRACT_MULTIPLIER = 100.0
AM_SETTLED_ROOTS = frozenset({"SPX", "NDX"})  # monthlies; SPXW / NDXP are PM-settled
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_CHUNK = 4096  # contracts per block of the (grid x contracts) matrix


@dataclass(frozen=True, slots=True)
class Params:
    rate: float = 0.0  # continuously compounded risk-free rate used for re-pricing
    div_yield: float = 0.0  # continuous dividend yield of the index
    min_t_s: float = 300.0  # floor of time to expiry (seconds)
    grid_range_pct: float = 15.0  # zero-gamma search: spot +- this many percent
    grid_step_pct: float = 0.25  # grid spacing (percent of spot)
    tol_points: float = 0.01  # bisection stops when the bracket is narrower (index points)

    def __post_init__(self) -> None:
        if not (0 < self.grid_step_pct <= self.grid_range_pct < 100):
            raise ValueError("need 0 < grid_step_pct <= grid_range_pct < 100")
        if self.min_t_s <= 0 or self.tol_points <= 0:
            raise ValueError("min_t_s and tol_points must be > 0")


# --- time ---------------------------------------------------------------------------------
@lru_cache(maxsize=4096)
def expiry_ns(expiry: str, root: str) -> int:
    """Settlement instant (ns since epoch) of an option expiring on ``expiry`` (YYYY-MM-DD)."""
    d = dt.date.fromisoformat(expiry)
    hh, mm = (9, 30) if root in AM_SETTLED_ROOTS else (16, 0)
    return int(dt.datetime(d.year, d.month, d.day, hh, mm, tzinfo=NY).timestamp()) * 10**9


def ny_date(now_ns: int) -> str:
    """Calendar date in New York at ``now_ns`` (what "0DTE" means)."""
    return dt.datetime.fromtimestamp(now_ns / 1e9, tz=NY).date().isoformat()


def year_fraction(settle_ns: int, now_ns: int, min_t_s: float) -> float:
    return max((settle_ns - now_ns) / 1e9, min_t_s) / SECONDS_PER_YEAR


def strike_key(strike: float) -> str:
    """``6850.0 -> "6850"``, ``6852.5 -> "6852.5"`` (no truncation of fractional strikes)."""
    return f"{strike:.10g}"


# --- input ---------------------------------------------------------------------------------
# A projection row as a plain tuple (GexRow is array-encoded, so the JSON is the same):
# (root, expiry, strike, right, gamma, oi, iv, ts_ns). Tuples transpose into columns in C.
RowTuple = tuple[str, str, float, str, float | None, float | None, float | None, int]
_rows_decoder = msgspec.json.Decoder(list[RowTuple])
_row_decoder = msgspec.json.Decoder(RowTuple)


def decode_rows(values: Iterable[bytes]) -> tuple[list[RowTuple], dict[str, int]]:
    """Decode the values of ``HGETALL epoch:{eid}:gex`` (GexRow JSON) into row tuples;
    undecodable or invalid values are counted under ``undecodable``."""
    vals = list(values)
    try:  # fast path: one decode call for the whole projection
        return _rows_decoder.decode(b"[" + b",".join(vals) + b"]"), {}
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    rows: list[RowTuple] = []
    bad = 0
    for v in vals:
        try:
            rows.append(_row_decoder.decode(v))
        except (msgspec.DecodeError, msgspec.ValidationError):
            bad += 1
    return rows, ({"undecodable": bad} if bad else {})


@dataclass(slots=True)
class Chain:
    """Struct of arrays over the usable contracts of one symbol's GEX projection."""

    strike: F64
    is_call: B
    gamma: F64
    oi: F64
    iv: F64  # NaN where unusable (missing, <= 0)
    t_years: F64
    settle_ns: I64  # settlement instant per contract (t_years is derived from it and the clock)
    zero_dte: B
    exp_idx: I64
    expiries: list[str]  # sorted; exp_idx indexes this list
    today: str  # New York date used for the 0DTE view
    n_input: int = 0
    n_missing_greeks: int = 0
    n_missing_iv: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    src_ts_ns: int = 0  # newest row ts (the chain snapshot behind the projection)

    @property
    def n(self) -> int:
        return int(self.strike.shape[0])


def _floats(col: tuple[float | None, ...]) -> F64:
    if None in col:
        return np.array([math.nan if v is None else v for v in col], dtype=np.float64)
    return np.array(col, dtype=np.float64)


def prepare(
    rows: Iterable[GexRow | RowTuple],
    now_ns: int,
    params: Params = Params(),
    rejected: Mapping[str, int] | None = None,
) -> Chain:
    """Validate rows and build the arrays. Rows without gamma or OI (None/NaN) are counted in
    ``n_missing_greeks`` and skipped; malformed rows are counted in ``rejected`` by reason."""
    rej: dict[str, int] = dict(rejected or {})
    tuples = [r if isinstance(r, tuple) else msgspec.structs.astuple(r) for r in rows]
    n = len(tuples)
    cols: list[tuple[Any, ...]] = list(zip(*tuples, strict=True)) if n else [()] * 8
    roots, exps, strikes, rights, gammas, ois, ivs, tss = cols
    strike = _floats(strikes)
    gamma = _floats(gammas)
    oi = _floats(ois)
    iv = _floats(ivs)
    is_call = np.array([x == "C" for x in rights], dtype=np.bool_)
    is_put = np.array([x == "P" for x in rights], dtype=np.bool_)
    src_ts = max(tss, default=0)
    # settlement instant per distinct (expiry, root) pair; one dict lookup per row
    pairs = list(zip(exps, roots, strict=True))
    distinct = sorted(set(pairs))
    pair_index = {pr: i for i, pr in enumerate(distinct)}
    pair_settle = np.empty(len(distinct), dtype=np.int64)
    for i, pr in enumerate(distinct):
        try:
            pair_settle[i] = expiry_ns(*pr)
        except ValueError:
            pair_settle[i] = -1
    pidx = np.fromiter((pair_index[pr] for pr in pairs), dtype=np.int64, count=n)
    settle = pair_settle[pidx]

    bad_right = ~(is_call | is_put)
    with np.errstate(invalid="ignore"):
        bad_strike = ~bad_right & ~(np.isfinite(strike) & (strike > 0))
        bad_expiry = ~bad_right & ~bad_strike & (settle < 0)
        malformed = bad_right | bad_strike | bad_expiry
        missing = ~malformed & (np.isnan(gamma) | np.isnan(oi))
        bad_greek = (
            ~malformed
            & ~missing
            & ~(np.isfinite(gamma) & np.isfinite(oi) & (gamma >= 0) & (oi >= 0))
        )
        ok = ~(malformed | missing | bad_greek)
        iv_ok = np.isfinite(iv) & (iv > 0)
    for reason, mask in (
        ("bad_right", bad_right),
        ("bad_strike", bad_strike),
        ("bad_expiry", bad_expiry),
        ("bad_greek", bad_greek),
    ):
        k = int(mask.sum())
        if k:
            rej[reason] = rej.get(reason, 0) + k
    # expiries of the usable rows, sorted; exp_idx indexes that list
    pair_exp = [pr[0] for pr in distinct]
    used = np.unique(pidx[ok])
    expiries = sorted({pair_exp[i] for i in used.tolist()})
    e_index = {e: i for i, e in enumerate(expiries)}
    pair_to_exp = np.array([e_index.get(e, -1) for e in pair_exp], dtype=np.int64)
    exp_idx = pair_to_exp[pidx[ok]] if n else np.zeros(0, dtype=np.int64)
    today = ny_date(now_ns)
    if today in e_index:
        zero_dte = exp_idx == e_index[today]
    else:
        zero_dte = np.zeros(exp_idx.shape[0], dtype=np.bool_)
    t_s = np.maximum((settle[ok] - now_ns).astype(np.float64) / 1e9, params.min_t_s)
    return Chain(
        strike=strike[ok],
        is_call=is_call[ok],
        gamma=gamma[ok],
        oi=oi[ok],
        iv=np.where(iv_ok, iv, math.nan)[ok],
        t_years=t_s / SECONDS_PER_YEAR,
        settle_ns=settle[ok],
        zero_dte=zero_dte,
        exp_idx=exp_idx,
        expiries=expiries,
        today=today,
        n_input=n + sum((rejected or {}).values()),
        n_missing_greeks=int(missing.sum()),
        n_missing_iv=int((ok & ~iv_ok).sum()),
        rejected=rej,
        src_ts_ns=src_ts,
    )


def retime(chain: Chain, now_ns: int, params: Params = Params()) -> Chain:
    """The same chain seen at another clock time (time to expiry and the 0DTE view), so an
    unchanged projection need not be decoded and validated again."""
    t_s = np.maximum((chain.settle_ns - now_ns).astype(np.float64) / 1e9, params.min_t_s)
    today = ny_date(now_ns)
    if today in chain.expiries:
        zero_dte = chain.exp_idx == chain.expiries.index(today)
    else:
        zero_dte = np.zeros(chain.exp_idx.shape[0], dtype=np.bool_)
    return dataclasses.replace(
        chain, t_years=t_s / SECONDS_PER_YEAR, zero_dte=zero_dte, today=today
    )


# --- zero gamma ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ZeroGamma:
    level: float | None
    reason: str | None  # why level is None
    crossings: int  # sign changes of net GEX on the grid


class _Curve:
    """Net dollar GEX (calls +, puts -) as a function of a hypothetical spot ``s``:
    ``sum_i sign_i * OI_i * 100 * gamma_BS(s; K_i, T_i, iv_i) * s**2 * 0.01``."""

    def __init__(self, strike: F64, t: F64, iv: F64, signed_oi: F64, p: Params) -> None:
        sst = iv * np.sqrt(t)
        self.inv = 1.0 / sst
        # d1 = (ln s - c) / (iv sqrt T), c = ln K - (r - q + iv^2/2) T
        self.c = np.log(strike) - (p.rate - p.div_yield + 0.5 * iv * iv) * t
        # gamma * sign * OI * 100 = w * exp(-d1^2/2) / s
        self.w = signed_oi * CONTRACT_MULTIPLIER * np.exp(-p.div_yield * t) * self.inv
        self.w *= _INV_SQRT_2PI

    def __call__(self, spots: F64) -> F64:
        ln_s = np.log(spots)[:, None]
        acc = np.zeros(spots.shape[0], dtype=np.float64)
        n = self.c.shape[0]
        for lo in range(0, n, _CHUNK):
            hi = min(n, lo + _CHUNK)
            d = ln_s - self.c[None, lo:hi]
            d *= self.inv[None, lo:hi]
            np.square(d, out=d)
            d *= -0.5
            np.exp(d, out=d)
            # einsum, not `@`: a BLAS gemv spawns OpenBLAS threads, which on a busy or
            # CPU-limited node made this 10-50x slower (measured); einsum stays on one core.
            acc += np.einsum("ij,j->i", d, self.w[lo:hi])
        # shares gamma = acc / s; dollar per 1 % = shares * s^2 * 0.01
        return acc * spots * 0.01


def zero_gamma(
    strike: F64, t_years: F64, iv: F64, signed_oi: F64, spot: float, params: Params = Params()
) -> ZeroGamma:
    """Spot level where re-priced net dollar GEX crosses zero (nearest crossing to ``spot``)."""
    use = np.isfinite(iv) & (signed_oi != 0)
    if not use.any():
        return ZeroGamma(None, "no contracts with both IV and non-zero OI", 0)
    curve = _Curve(strike[use], t_years[use], iv[use], signed_oi[use], params)
    n = round(params.grid_range_pct / params.grid_step_pct)
    grid = spot * (1.0 + np.arange(-n, n + 1, dtype=np.float64) * (params.grid_step_pct / 100))
    g = curve(grid)
    sg = np.sign(g)
    exact = np.flatnonzero(sg == 0)
    change = np.flatnonzero(sg[:-1] * sg[1:] < 0)
    crossings = int(exact.shape[0] + change.shape[0])
    if crossings == 0:
        side = "positive" if g[0] > 0 else "negative"
        return ZeroGamma(
            None,
            f"no sign change of net GEX within +-{params.grid_range_pct:g}% of spot "
            f"(net {side} throughout)",
            0,
        )
    # candidate brackets (lo, hi) and their distance to spot
    cands: list[tuple[float, float, float]] = []
    for i in exact.tolist():
        at = float(grid[i])  # a numpy scalar would not serialize
        cands.append((abs(at - spot), at, at))
    for i in change.tolist():
        lo, hi = float(grid[i]), float(grid[i + 1])
        dist = 0.0 if lo <= spot <= hi else min(abs(lo - spot), abs(hi - spot))
        cands.append((dist, lo, hi))
    _, lo, hi = min(cands)
    if lo == hi:
        return ZeroGamma(round(lo, 2), None, crossings)
    f_lo = float(curve(np.array([lo]))[0])
    f_hi = float(curve(np.array([hi]))[0])
    while hi - lo > params.tol_points:
        mid = 0.5 * (lo + hi)
        f_mid = float(curve(np.array([mid]))[0])
        if f_mid == 0.0:
            return ZeroGamma(round(mid, 2), None, crossings)
        if (f_mid < 0) == (f_lo < 0):
            lo, f_lo = mid, f_mid
        else:
            hi, f_hi = mid, f_mid
    level = lo - f_lo * (hi - lo) / (f_hi - f_lo)
    return ZeroGamma(round(level, 2), None, crossings)


# --- aggregation ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Levels:
    call_wall: float | None
    put_wall: float | None
    abs_gamma_strike: float | None
    zero_gamma: float | None
    zero_gamma_reason: str | None
    zero_gamma_crossings: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "call_wall": self.call_wall,
            "put_wall": self.put_wall,
            "abs_gamma_strike": self.abs_gamma_strike,
            "zero_gamma": self.zero_gamma,
            "zero_gamma_reason": self.zero_gamma_reason,
            "zero_gamma_crossings": self.zero_gamma_crossings,
        }


@dataclass(frozen=True, slots=True)
class GexResult:
    spot: float
    dollar_spot: float  # spot used for the dollar values
    strikes: F64  # unique, ascending
    n_per_strike: I64
    calls: F64  # shares, >= 0
    puts: F64  # shares, <= 0
    calls_0dte: F64
    puts_0dte: F64
    levels: Levels
    levels_0dte: Levels
    legacy_calls: dict[str, dict[str, float]]  # expiry -> strike -> shares (positive)
    legacy_puts: dict[str, dict[str, float]]

    @property
    def dollar_factor(self) -> float:
        return self.dollar_spot * self.dollar_spot * 0.01

    def totals(self) -> dict[str, dict[str, float]]:
        f = self.dollar_factor
        out: dict[str, dict[str, float]] = {}
        for view, c, p in (
            ("all", self.calls, self.puts),
            ("0dte", self.calls_0dte, self.puts_0dte),
        ):
            tc, tp = float(c.sum()), float(p.sum())
            out[view] = {
                "calls": round(tc, 6),
                "puts": round(tp, 6),
                "net": round(tc + tp, 6),
                "calls_usd": round(tc * f, 2),
                "puts_usd": round(tp * f, 2),
                "net_usd": round((tc + tp) * f, 2),
            }
        return out

    def items(self) -> dict[str, dict[str, float]]:
        """Model items keyed by strike string (see module docstring for units and signs)."""
        f = self.dollar_factor
        cols: dict[str, list[float]] = {}
        for name, arr in (
            ("calls", self.calls),
            ("puts", self.puts),
            ("net", self.calls + self.puts),
            ("calls_0dte", self.calls_0dte),
            ("puts_0dte", self.puts_0dte),
            ("net_0dte", self.calls_0dte + self.puts_0dte),
        ):
            cols[name] = np.round(arr, 6).tolist()
            cols[name + "_usd"] = np.round(arr * f, 2).tolist()
        order = (
            "calls",
            "puts",
            "net",
            "calls_0dte",
            "puts_0dte",
            "net_0dte",
            "calls_usd",
            "puts_usd",
            "net_usd",
            "calls_0dte_usd",
            "puts_0dte_usd",
            "net_0dte_usd",
        )
        strikes = self.strikes.tolist()
        counts = self.n_per_strike.tolist()
        out: dict[str, dict[str, float]] = {}
        for i, k in enumerate(strikes):
            item: dict[str, float] = {"strike": k}
            for name in order:
                item[name] = cols[name][i]
            item["n"] = counts[i]
            out[strike_key(k)] = item
        return out


def _walls(strikes: F64, calls: F64, puts: F64) -> tuple[float | None, float | None, float | None]:
    def arg(v: F64) -> float | None:
        if v.shape[0] == 0 or not (v > 0).any():
            return None
        return float(strikes[int(np.argmax(v))])

    ap = np.abs(puts)
    return arg(calls), arg(ap), arg(calls + ap)


def _legacy(
    chain: Chain, sidx: I64, strikes: F64, shares: F64, mask: B
) -> dict[str, dict[str, float]]:
    ns = strikes.shape[0]
    ne = len(chain.expiries)
    cell = chain.exp_idx[mask] * ns + sidx[mask]
    vals = np.bincount(cell, weights=shares[mask], minlength=ne * ns).reshape(ne, ns)
    present = (np.bincount(cell, minlength=ne * ns) > 0).reshape(ne, ns)
    keys = np.array([strike_key(k) for k in strikes.tolist()], dtype=object)
    out: dict[str, dict[str, float]] = {}
    for e in range(ne):
        idx = np.flatnonzero(present[e])
        if idx.shape[0]:
            out[chain.expiries[e]] = dict(
                zip(keys[idx].tolist(), np.round(vals[e, idx], 6).tolist(), strict=True)
            )
    return out


def compute(
    chain: Chain, spot: float, params: Params = Params(), dollar_spot: float | None = None
) -> GexResult:
    """Aggregate GEX per strike (all expiries and 0DTE), levels, zero gamma, legacy maps."""
    if not (math.isfinite(spot) and spot > 0):
        raise ValueError(f"spot must be a positive number, got {spot!r}")
    ds = spot if dollar_spot is None else dollar_spot
    shares = chain.gamma * chain.oi * CONTRACT_MULTIPLIER
    strikes, sidx = np.unique(chain.strike, return_inverse=True)
    sidx = sidx.astype(np.int64).reshape(-1)
    ns = strikes.shape[0]
    put = ~chain.is_call

    def per_strike(mask: B) -> F64:
        return np.bincount(sidx[mask], weights=shares[mask], minlength=ns).astype(np.float64)

    calls = per_strike(chain.is_call)
    puts = -per_strike(put)
    calls0 = per_strike(chain.is_call & chain.zero_dte)
    puts0 = -per_strike(put & chain.zero_dte)
    counts = np.bincount(sidx, minlength=ns).astype(np.int64)

    signed_oi = np.where(chain.is_call, chain.oi, -chain.oi)
    zg = zero_gamma(chain.strike, chain.t_years, chain.iv, signed_oi, spot, params)
    z0 = chain.zero_dte
    if z0.any():
        zg0 = zero_gamma(
            chain.strike[z0], chain.t_years[z0], chain.iv[z0], signed_oi[z0], spot, params
        )
    else:
        zg0 = ZeroGamma(None, f"no contracts expiring today ({chain.today})", 0)
    lv = Levels(*_walls(strikes, calls, puts), zg.level, zg.reason, zg.crossings)
    lv0 = Levels(*_walls(strikes, calls0, puts0), zg0.level, zg0.reason, zg0.crossings)
    return GexResult(
        spot=spot,
        dollar_spot=ds,
        strikes=strikes,
        n_per_strike=counts,
        calls=calls,
        puts=puts,
        calls_0dte=calls0,
        puts_0dte=puts0,
        levels=lv,
        levels_0dte=lv0,
        legacy_calls=_legacy(chain, sidx, strikes, shares, chain.is_call),
        legacy_puts=_legacy(chain, sidx, strikes, shares, put),
    )
