"""Gamma exposure (GEX) math: pure functions, no I/O (DESIGN.md "Models", issues 6 and 19).

Conventions (README "Reading the numbers" has the same with a worked example)
-----------------------------------------------------------------------------
* Dealer position convention: dealers are long the calls and short the puts of the open
  interest, so every exposure is ``position * greek * OI * m`` with position +1 for a call
  and -1 for a put. Gamma: calls positive, puts negative, ``net = calls + puts``. Delta, vanna
  and charm use the same position sign (a put's delta is negative, so short puts add positive
  delta). The legacy ``:calls``/``:puts`` keys keep the old system's convention (both sides
  positive magnitudes).
* ``m`` is the contract's multiplier: the provider's ``shares_per_contract`` (100 for a
  standard contract), else ``Params.multiplier`` (the symbol's spec).
* Units: gamma exposure in shares of the underlying per 1 point (``gamma * OI * m``) and in USD
  per 1 % move (``shares * S**2 * 0.01``); delta exposure in shares and USD (``shares * S``);
  vanna exposure in USD of delta per +1 vol point; charm exposure in USD of delta per calendar
  day that passes.
* Contracts are summed (never overwritten) per strike and per expiry across roots (SPX AM
  monthlies + SPXW PM weeklies at the same strike/expiry add up); each keeps its own
  settlement instant: expiry date 16:00 America/New_York, 09:30 for the AM-settled roots of
  the symbol's spec (SPX/NDX/RUT monthlies). Contracts past settlement are excluded
  (``expired``).
* Exercise style: index options are European; stock and ETF options are American, and every
  greek we compute ourselves (gamma where the provider gave none, delta/vanna/charm, the
  zero-gamma sweep) is the European Black-Scholes one with the symbol's dividend yield and
  rate where no basis is fitted. That is an approximation: the early-exercise premium is
  nil for calls on a non-dividend stock, small for calls on low-yield ETFs and for
  out-of-the-money puts, and largest for deep in-the-money puts, whose gamma is near zero
  anyway. Where the provider gives gamma (its own American model) per-strike GEX uses it.
* Time basis. The provider computed its IV and gamma on its own clock (the simulator: trading
  time from the open; a real provider: its own convention), and an IV only makes sense with
  the T it was implied on. So per settlement group (expiry date x settlement time) the
  provider's own basis is backed out of its gamma: ``ln gamma_i = c - ln(S0 iv_i sqrt(2 pi
  tau)) - d1_i**2 / 2`` with ``d1_i = (ln(S0/K_i) + beta + iv_i**2 tau / 2) / (iv_i sqrt(tau))``
  is fitted over the group's contracts (weighted Gauss-Newton) for ``tau`` (years),
  ``beta = ln(F/S0)`` (forward) and ``c = ln(exp(-q tau))`` (discount of the carry), at the
  snapshot's spot S0. As the clock moves on, tau shrinks by the elapsed time and beta, c in
  proportion. A group whose fit is poor (weighted RMS relative gamma error above
  ``fit_max_err``), has fewer than 6 contracts with gamma and IV, or no snapshot spot, falls
  back to the wall clock (365-day years, floored at ``min_t_s``) with ``rate``/``div_yield``;
  ``t_basis="clock"`` forces that. The per-group choice is published.
* IV: the provider's where given; else interpolated along the group's smile in
  log-moneyness ``ln(K/F)`` (calls and puts pooled, out-of-the-money side preferred at a
  strike listed with both), linearly inside the listed wings; beyond them extrapolated with
  the wing's least-squares slope over its outer 5 points, never below the group's lowest
  provider IV (nor ``iv_floor``) and never above ``iv_cap``. Counted (``imputed_iv``).
* Per-strike exposures are valued at the snapshot: provider gamma where given, else
  Black-Scholes gamma at S0 with the fitted basis and the (imputed) IV; delta, vanna and charm
  are re-priced the same way, at the snapshot's instant rounded down to ``value_step_s`` (a
  re-seed of the same values a few seconds later re-prices to the same numbers). They
  change only with a new snapshot; dollar values use ``dollar_spot``.
* Walls: call wall = strike of max call GEX, put wall = strike of max |put GEX|,
  absolute-gamma strike = strike of max ``calls + |puts|``, key strikes = the
  ``key_strikes`` largest ``calls + |puts|`` strikes (descending). Ties go to the lowest strike.
* Zero gamma and the gamma profile: Black-Scholes gamma re-priced with each contract's IV
  (sticky strike) and its group's basis at hypothetical spots ``spot * (1 +- range)``, net
  dollar GEX at every grid spot (the profile); the sign change whose bracket is nearest to the
  current spot is refined by bisection (then a final linear interpolation). No crossing ->
  ``None`` plus the reason. Computed for all expiries, for 0DTE and per expiry.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from array import array
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from schemas import symbols
from schemas.messages import ChainContract, GexRow, GexSource
from streams.clock import NY

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]

SECONDS_PER_YEAR = 365.0 * 86400.0
CONTRACT_MULTIPLIER = 100.0  # the default of Params.multiplier
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_LN_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_CHUNK = 4096  # contracts per block of the (grid x contracts) matrix
_erfc = np.frompyfunc(math.erfc, 1, 1)
# Fit weights: a provider gamma is known to ~5e-9 (8 decimals) and the model to ~0.1 %.
_GAMMA_QUANTUM = 5e-9
_MODEL_REL_ERR = 1e-3
_FIT_ITERATIONS = 12
_PRIOR_SD = 0.01  # weak priors on beta and c (in their own units) where data are thin
_WING_POINTS = 5
_SIG = 5  # significant digits of re-priced exposures in the published model
_FIT_MIN_CONTRACTS = 6  # twice the parameters: fewer points would fit anything


@dataclass(frozen=True, slots=True)
class Params:
    rate: float = 0.0  # carry used where the basis is not fitted (t_basis=clock or fallback)
    div_yield: float = 0.0  # continuous dividend yield of the index (same)
    min_t_s: float = 300.0  # floor of time to expiry (seconds)
    grid_range_pct: float = 15.0  # zero-gamma search: spot +- this many percent
    grid_step_pct: float = 0.25  # grid spacing (percent of spot)
    tol_points: float = 0.01  # bisection stops when the bracket is narrower (index points)
    t_basis: str = "fit"  # fit: back the provider's basis out of its gamma | clock
    fit_max_err: float = 0.02  # accept a fitted basis up to this RMS relative gamma error
    iv_floor: float = 0.01
    iv_cap: float = 5.0
    key_strikes: int = 5
    value_step_s: float = 60.0  # re-priced per-strike values: snapshot instant rounded down
    # shares per contract where a row does not carry the provider's shares_per_contract
    # (the symbol's standard multiplier, schemas/symbols.py)
    multiplier: float = CONTRACT_MULTIPLIER

    def __post_init__(self) -> None:
        if not (0 < self.grid_step_pct <= self.grid_range_pct < 100):
            raise ValueError("need 0 < grid_step_pct <= grid_range_pct < 100")
        if self.min_t_s <= 0 or self.tol_points <= 0:
            raise ValueError("min_t_s and tol_points must be > 0")
        if self.t_basis not in ("fit", "clock"):
            raise ValueError(f"t_basis must be fit or clock, got {self.t_basis!r}")
        if not (0 < self.iv_floor < self.iv_cap) or self.fit_max_err <= 0:
            raise ValueError("need 0 < iv_floor < iv_cap and fit_max_err > 0")
        if self.key_strikes < 0 or self.value_step_s < 0:
            raise ValueError("key_strikes and value_step_s must be >= 0")
        if not self.multiplier > 0:
            raise ValueError("multiplier must be > 0")


# --- time ---------------------------------------------------------------------------------
@lru_cache(maxsize=4096)
def expiry_ns(expiry: str, root: str) -> int:
    """Settlement instant (ns since epoch) of an option expiring on ``expiry`` (YYYY-MM-DD):
    the open (09:30 New York) for the AM-settled roots of its symbol's spec (SPX, NDX, RUT
    monthlies), else the close (16:00; weeklies, dailies, XSP, stocks and ETFs)."""
    d = dt.date.fromisoformat(expiry)
    known = symbols.registry()
    am = known.spec(known.symbol_of_root(root)).settlement(root) == "AM"
    hh, mm = (9, 30) if am else (16, 0)
    return int(dt.datetime(d.year, d.month, d.day, hh, mm, tzinfo=NY).timestamp()) * 10**9


def ny_date(now_ns: int) -> str:
    """Calendar date in New York at ``now_ns`` (what "0DTE" means)."""
    return dt.datetime.fromtimestamp(now_ns / 1e9, tz=NY).date().isoformat()


def year_fraction(settle_ns: int, now_ns: int, min_t_s: float) -> float:
    return max((settle_ns - now_ns) / 1e9, min_t_s) / SECONDS_PER_YEAR


def strike_key(strike: float) -> str:
    """``6850.0 -> "6850"``, ``6852.5 -> "6852.5"`` (no truncation of fractional strikes)."""
    return f"{strike:.10g}"


def _clean(x: float, nd: int) -> float:
    """``x`` rounded to ``nd`` decimals, never -0.0 (stable JSON)."""
    return round(x, nd) + 0.0


def _clean_list(a: F64, nd: int) -> list[float]:
    out: list[float] = (np.round(a, nd) + 0.0).tolist()  # + 0.0 turns -0.0 into 0.0
    return out


def _significant(a: F64, digits: int, below: float = 0.0) -> list[float]:
    """Each value to ``digits`` significant digits (shortest float repr), |x| < ``below``
    as 0, never -0.0: time-valued figures that a few seconds of decay should not rewrite."""
    return [0.0 if abs(v) < below or v == 0 else float(f"{v:.{digits}g}") + 0.0 for v in a.tolist()]


# --- input ---------------------------------------------------------------------------------
# A projection row as a plain tuple (GexRow is array-encoded, so the JSON is the same):
# (root, expiry, strike, right, gamma, oi, iv, ts_ns). Tuples transpose into columns in C.
RowTuple = tuple[str, str, float, str, float | None, float | None, float | None, int]
_rows_decoder = msgspec.json.Decoder(list[RowTuple])
_row_decoder = msgspec.json.Decoder(RowTuple)


def decode_rows(values: Iterable[bytes]) -> tuple[list[RowTuple], dict[str, int]]:
    """Decode the values of ``HGETALL epoch:{<SYM>}:<eid>:gex`` (GexRow JSON) into row tuples;
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


@dataclass(frozen=True, slots=True)
class Columns:
    """A chain as columns: the input of :func:`prepare`. Roots and expiries are codes into
    their lists; absent numbers are NaN; ``right`` is 1 call, 0 put, -1 anything else."""

    roots: list[str]
    root: I64
    expiries: list[str]
    expiry: I64
    strike: F64
    right: npt.NDArray[np.int8]
    gamma: F64
    oi: F64
    iv: F64
    ts_ns: int  # newest row time (the snapshot behind the chain)
    mult: F64 | None = None  # shares_per_contract (NaN / None: Params.multiplier)

    @property
    def n(self) -> int:
        return int(self.strike.shape[0])


def _floats(col: tuple[float | None, ...]) -> F64:
    if None in col:
        return np.array([math.nan if v is None else v for v in col], dtype=np.float64)
    return np.array(col, dtype=np.float64)


def _codes(col: tuple[str, ...]) -> tuple[list[str], I64]:
    names = sorted(set(col))
    index = {x: i for i, x in enumerate(names)}
    return names, np.fromiter((index[x] for x in col), dtype=np.int64, count=len(col))


def _right_codes(rights: Iterable[str], n: int) -> npt.NDArray[np.int8]:
    return np.fromiter((1 if x == "C" else 0 if x == "P" else -1 for x in rights), np.int8, n)


def columns(rows: Iterable[GexRow | RowTuple]) -> Columns:
    """GEX projection rows (GexRow or its tuple) -> :class:`Columns`."""
    tuples = [r if isinstance(r, tuple) else msgspec.structs.astuple(r) for r in rows]
    n = len(tuples)
    cols: list[tuple[Any, ...]] = list(zip(*tuples, strict=True)) if n else [()] * 8
    roots_c, exps_c, strikes, rights, gammas, ois, ivs, tss = cols
    roots, root = _codes(roots_c)
    expiries, expiry = _codes(exps_c)
    right = _right_codes(rights, n)
    return Columns(
        roots=roots,
        root=root,
        expiries=expiries,
        expiry=expiry,
        strike=_floats(strikes),
        right=right,
        gamma=_floats(gammas),
        oi=_floats(ois),
        iv=_floats(ivs),
        ts_ns=max(tss, default=0),
    )


def _occ_root(cid: str) -> str:
    """``O:SPXW260316C06800000`` -> ``SPXW``."""
    return cid[2:-15]


def source_from_contracts(
    symbol: str, ts_ns: int, spot: float | None, contracts: Iterable[ChainContract]
) -> GexSource:
    """A chain snapshot's contracts -> the compact columnar GEX source (the normalizer writes
    it for a full-chain snapshot; the GEX builder decodes it with numpy, no per-row work).
    One pass into typed arrays: ``contracts`` may be a generator decoding a contract at a time,
    so a whole chain of decoded contracts (12 MB at 20k) need never exist."""
    nan = math.nan
    root_ix: dict[str, int] = {}  # first-seen codes, sorted by name at the end
    exp_ix: dict[str, int] = {}
    root, expiry, right = array("h"), array("h"), array("b")
    strike, gamma, oi, iv, mult = (array("d") for _ in range(5))
    has_mult = False
    for c in contracts:
        root.append(root_ix.setdefault(_occ_root(c.cid), len(root_ix)))
        expiry.append(exp_ix.setdefault(c.expiry, len(exp_ix)))
        right.append(1 if c.right == "C" else 0 if c.right == "P" else -1)
        strike.append(c.strike)
        gamma.append(nan if c.gamma is None else c.gamma)
        oi.append(nan if c.oi is None else c.oi)
        iv.append(nan if c.iv is None else c.iv)
        mult.append(nan if c.shares is None else c.shares)
        has_mult = has_mult or c.shares is not None
    root_names, root_codes = _sorted_codes(root_ix, root)
    exp_names, exp_codes = _sorted_codes(exp_ix, expiry)
    return GexSource(
        symbol=symbol,
        ts_ns=ts_ns,
        spot=spot,
        roots=root_names,
        expiries=exp_names,
        root=root_codes,
        expiry=exp_codes,
        strike=strike.tobytes(),
        right=right.tobytes(),
        gamma=gamma.tobytes(),
        oi=oi.tobytes(),
        iv=iv.tobytes(),
        mult=mult.tobytes() if has_mult else b"",
    )


def _sorted_codes(first_seen: dict[str, int], codes: array[int]) -> tuple[list[str], bytes]:
    """Codes given in first-seen order -> the names sorted and the codes into them (int16)."""
    names = sorted(first_seen)
    remap = np.empty(len(names), dtype=np.int16)
    for new, name in enumerate(names):
        remap[first_seen[name]] = new
    return names, remap[np.frombuffer(codes, dtype=np.int16)].tobytes()


def source_columns(src: GexSource) -> Columns:
    """Decode the columns of a GEX source (read-only numpy views of its bytes)."""
    n = len(src.strike) // 8
    arrays = (src.root, src.expiry, src.right, src.gamma, src.oi, src.iv)
    if (
        len(src.root) != 2 * n
        or len(src.expiry) != 2 * n
        or len(src.right) != n
        or any(len(a) != 8 * n for a in arrays[3:])
        or len(src.mult) not in (0, 8 * n)
    ):
        raise ValueError("GEX source columns have different lengths")
    root = np.frombuffer(src.root, dtype=np.int16).astype(np.int64)
    expiry = np.frombuffer(src.expiry, dtype=np.int16).astype(np.int64)
    if n and (
        root.min() < 0 or root.max() >= len(src.roots) or expiry.min() < 0
        or expiry.max() >= len(src.expiries)
    ):  # fmt: skip
        raise ValueError("GEX source codes out of range")
    return Columns(
        roots=src.roots,
        root=root,
        expiries=src.expiries,
        expiry=expiry,
        strike=np.frombuffer(src.strike, dtype=np.float64),
        right=np.frombuffer(src.right, dtype=np.int8),
        gamma=np.frombuffer(src.gamma, dtype=np.float64),
        oi=np.frombuffer(src.oi, dtype=np.float64),
        iv=np.frombuffer(src.iv, dtype=np.float64),
        ts_ns=src.ts_ns,
        mult=np.frombuffer(src.mult, dtype=np.float64) if src.mult else None,
    )


# --- Black-Scholes pieces -------------------------------------------------------------------
def _ncdf(x: F64) -> F64:
    out: F64 = 0.5 * np.asarray(_erfc(-x / math.sqrt(2.0)), dtype=np.float64)
    return out


@dataclass(frozen=True, slots=True)
class _Greeks:
    gamma: F64  # per 1 point of the index
    delta: F64  # of the option itself (calls > 0, puts < 0)
    vanna: F64  # d delta / d vol (per 1.00 of vol)
    charm: F64  # d delta / d t (per year that passes)


def _bs(s: float, k: F64, tau: F64, iv: F64, b: F64, q: F64, call: B) -> _Greeks:
    """European greeks with carry ``b`` (forward = s e^{b tau}) and yield ``q``."""
    sq = np.sqrt(tau)
    v = iv * sq
    d1 = (np.log(s / k) + (b + 0.5 * iv * iv) * tau) / v
    d2 = d1 - v
    dq = np.exp(-q * tau)
    pdf = np.exp(-0.5 * d1 * d1) * _INV_SQRT_2PI
    n1 = _ncdf(d1)
    gamma = dq * pdf / (s * v)
    delta = np.where(call, dq * n1, dq * (n1 - 1.0))
    vanna = -dq * pdf * d2 / iv
    # charm = -d delta / d tau; calls: q e^{-q tau} N(d1) - e^{-q tau} pdf (2 b tau - d2 v) /
    # (2 tau v); puts: the call's minus q e^{-q tau}
    base = q * dq * n1 - dq * pdf * (2.0 * b * tau - d2 * v) / (2.0 * tau * v)
    charm = np.where(call, base, base - q * dq)
    return _Greeks(gamma, delta, vanna, charm)


# --- the prepared chain -----------------------------------------------------------------------
@dataclass(slots=True)
class Chain:
    """Struct of arrays over the usable contracts of one symbol's chain, sorted by
    (settlement group, strike, right); groups are sorted by (expiry, settlement)."""

    strike: F64
    is_call: B
    oi: F64
    gamma: F64  # at the snapshot: provider gamma, else re-priced (see module doc)
    has_gamma: B  # provider gamma given
    iv: F64  # used IV: provider's or imputed
    imputed: B
    delta: F64  # option delta at the snapshot (re-priced)
    vanna: F64
    charm: F64
    mult: F64  # shares per contract (the provider's shares_per_contract)
    grp: I64  # settlement group per contract
    exp_idx: I64  # index into expiries per contract
    t_years: F64  # time to settlement on the group's basis at ``now_ns``
    zero_dte: B
    # per settlement group
    g_expiry: I64
    g_settle_ns: I64
    g_root_am: B  # AM-settled group
    g_tau: F64  # years at snap_ns (fitted or clock)
    g_t: F64  # years at now_ns (g_tau minus the time elapsed since the snapshot, floored)
    g_b: F64  # carry per year: forward = S e^{b tau}
    g_q: F64  # discount of the carry per year
    g_fit: B  # basis backed out of the provider's gamma
    g_fit_err: F64  # weighted RMS relative gamma error of the fit (NaN: not fitted)
    expiries: list[str]  # sorted; exp_idx indexes this list
    today: str  # New York date used for the 0DTE view
    now_ns: int
    snap_ns: int  # instant the provider's greeks refer to
    snap_spot: float | None
    n_input: int = 0
    n_missing_greeks: int = 0  # rows without provider gamma (re-priced when they have OI)
    n_missing_iv: int = 0  # rows without provider IV (imputed when possible)
    rejected: dict[str, int] = field(default_factory=dict)  # malformed rows by reason
    excluded: dict[str, int] = field(default_factory=dict)  # well-formed, left out, by reason
    src_ts_ns: int = 0  # newest row ts (the chain snapshot behind the projection)

    @property
    def n(self) -> int:
        return int(self.strike.shape[0])

    @property
    def n_imputed_iv(self) -> int:
        return int(self.imputed.sum())

    def expiry_slice(self, e: int) -> tuple[int, int]:
        lo = int(np.searchsorted(self.exp_idx, e, side="left"))
        hi = int(np.searchsorted(self.exp_idx, e, side="right"))
        return lo, hi

    def coverage(self) -> dict[str, Any]:
        return {
            "contracts": self.n,
            "expirations": len(self.expiries),
            "imputed_iv": self.n_imputed_iv,
            "repriced_gamma": int((~self.has_gamma).sum()),
            "excluded": dict(sorted(self.excluded.items())),
            "rejected": dict(sorted(self.rejected.items())),
        }


def _count(d: dict[str, int], reason: str, mask: B) -> None:
    k = int(mask.sum())
    if k:
        d[reason] = d.get(reason, 0) + k


def prepare(
    rows: Columns | Iterable[GexRow | RowTuple],
    now_ns: int,
    params: Params = Params(),
    rejected: Mapping[str, int] | None = None,
    snap_spot: float | None = None,
    snap_ns: int | None = None,
) -> Chain:
    """Validate rows, back out each settlement group's time basis, fill missing IVs along
    the smile and value every contract at the snapshot (see the module doc).

    ``snap_spot``/``snap_ns``: the index level and instant the provider's greeks refer to
    (default: no fitted basis / the newest row ts). Malformed rows are counted in
    ``rejected`` by reason; well-formed rows left out (no OI, expired, no IV anywhere on
    their smile and no gamma) in ``excluded``."""
    cols = rows if isinstance(rows, Columns) else columns(rows)
    rej: dict[str, int] = dict(rejected or {})
    exc: dict[str, int] = {}
    n = cols.n
    strike, gamma, oi, iv = cols.strike, cols.gamma, cols.oi, cols.iv
    is_call = cols.right == 1
    is_put = cols.right == 0
    src_ts = cols.ts_ns
    snap = snap_ns if snap_ns is not None else (src_ts or now_ns)
    # settlement instant per distinct (expiry, root) pair
    n_roots = max(len(cols.roots), 1)
    pair_code, pidx = np.unique(cols.expiry * n_roots + cols.root, return_inverse=True)
    pidx = pidx.astype(np.int64).reshape(-1)
    distinct = [(cols.expiries[c // n_roots], cols.roots[c % n_roots]) for c in pair_code.tolist()]
    pair_settle = np.empty(len(distinct), dtype=np.int64)
    for i, pr in enumerate(distinct):
        try:
            pair_settle[i] = expiry_ns(*pr)
        except ValueError:
            pair_settle[i] = -1
    settle = pair_settle[pidx] if n else np.zeros(0, dtype=np.int64)

    bad_right = ~(is_call | is_put)
    with np.errstate(invalid="ignore"):
        bad_strike = ~bad_right & ~(np.isfinite(strike) & (strike > 0))
        bad_expiry = ~bad_right & ~bad_strike & (settle < 0)
        malformed = bad_right | bad_strike | bad_expiry
        gamma_given = ~np.isnan(gamma)
        bad_greek = ~malformed & (
            (gamma_given & ~(np.isfinite(gamma) & (gamma >= 0))) | (np.isinf(oi) | (oi < 0))
        )
        ok = ~(malformed | bad_greek)
        iv_ok = np.isfinite(iv) & (iv > 0)
        has_gamma = gamma_given & ok
    for reason, mask in (
        ("bad_right", bad_right),
        ("bad_strike", bad_strike),
        ("bad_expiry", bad_expiry),
        ("bad_greek", bad_greek),
    ):
        _count(rej, reason, mask)
    no_oi = ok & np.isnan(oi)
    expired = ok & ~no_oi & (settle <= now_ns)
    _count(exc, "no_oi", no_oi)
    _count(exc, "expired", expired)
    n_missing_greeks = int((ok & ~gamma_given).sum())
    n_missing_iv = int((ok & ~iv_ok).sum())
    keep = ok & ~no_oi & ~expired

    # settlement groups = distinct (expiry, settle) among kept rows, sorted
    pair_exp = [pr[0] for pr in distinct]
    kept_pairs = np.unique(pidx[keep])
    group_keys = sorted({(pair_exp[i], int(pair_settle[i])) for i in kept_pairs.tolist()})
    g_index = {gk: g for g, gk in enumerate(group_keys)}
    pair_to_group = np.array(
        [g_index.get((pair_exp[i], int(pair_settle[i])), -1) for i in range(len(distinct))],
        dtype=np.int64,
    )
    expiries = sorted({e for e, _ in group_keys})
    e_index = {e: i for i, e in enumerate(expiries)}
    ng = len(group_keys)
    g_expiry = np.array([e_index[e] for e, _ in group_keys], dtype=np.int64)
    g_settle = np.array([s for _, s in group_keys], dtype=np.int64)
    g_am = np.array([expiry_ns(e, "SPX") == s for e, s in group_keys], dtype=np.bool_).reshape(ng)

    idx = np.flatnonzero(keep)
    grp = pair_to_group[pidx[idx]] if n else np.zeros(0, dtype=np.int64)
    order = np.lexsort((~is_call[idx], strike[idx], grp))
    idx, grp = idx[order], grp[order]
    k_s, call_s = strike[idx], is_call[idx]
    oi_s, gamma_s, iv_s = oi[idx], gamma[idx], iv[idx]
    mult_s = np.full(idx.shape[0], params.multiplier)
    if cols.mult is not None:
        given = cols.mult[idx]
        with np.errstate(invalid="ignore"):
            mult_s = np.where(np.isfinite(given) & (given > 0), given, mult_s)
    hasg_s, ivok_s = has_gamma[idx], iv_ok[idx]

    # --- basis per group: clock first, then the fit where it holds -------------------------
    tau0 = np.maximum((g_settle - snap).astype(np.float64) / 1e9, params.min_t_s)
    tau0 /= SECONDS_PER_YEAR
    g_tau = tau0.copy()
    g_b = np.full(ng, params.rate - params.div_yield)
    g_q = np.full(ng, params.div_yield)
    g_fit = np.zeros(ng, dtype=np.bool_)
    g_err = np.full(ng, math.nan)
    if params.t_basis == "fit" and snap_spot is not None and ng:
        use = hasg_s & ivok_s & (gamma_s > 0)
        fit = _fit_basis(
            snap_spot, k_s[use], iv_s[use], gamma_s[use], grp[use], ng, tau0, g_b, g_q, params
        )
        g_tau = np.where(fit.ok, fit.tau, g_tau)
        g_b = np.where(fit.ok, fit.b, g_b)
        g_q = np.where(fit.ok, fit.q, g_q)
        g_fit, g_err = fit.ok, fit.err

    # --- IV along each group's smile --------------------------------------------------------
    s_ref = snap_spot if snap_spot is not None else (float(np.median(k_s)) if n else 1.0)
    lnk = np.log(k_s / s_ref) - (g_b * g_tau)[grp]  # ln(K/F)
    iv_used, imputed = _impute_iv(lnk, iv_s, ivok_s, call_s, grp, ng, params)
    no_smile = ~np.isfinite(iv_used) & ~hasg_s
    unpriced = ~np.isfinite(iv_used) & hasg_s  # provider gamma only: in per-strike GEX
    _count(exc, "no_iv", no_smile)
    if no_smile.any():
        live = ~no_smile
        k_s, oi_s, gamma_s, iv_used = k_s[live], oi_s[live], gamma_s[live], iv_used[live]
        call_s, imputed, hasg_s = call_s[live], imputed[live], hasg_s[live]
        grp, unpriced, mult_s = grp[live], unpriced[live], mult_s[live]

    # --- value every contract at the snapshot ----------------------------------------------
    # at the snapshot's instant rounded down to value_step_s: re-seeds of the same values
    # within a step re-price to the same numbers (no republish for seconds of decay)
    step_ns = int(params.value_step_s * 1e9)
    ahead = (snap % step_ns) / 1e9 / SECONDS_PER_YEAR if step_ns > 0 else 0.0
    tau_c, b_c, q_c = g_tau[grp] + ahead, g_b[grp], g_q[grp]
    nc = k_s.shape[0]
    delta = np.zeros(nc)
    vanna = np.zeros(nc)
    charm = np.zeros(nc)
    gamma_at = np.where(hasg_s, gamma_s, 0.0)
    priced = ~unpriced
    if priced.any():  # without a snapshot spot: valued around the chain's middle strike
        gk = _bs(
            s_ref, k_s[priced], tau_c[priced], iv_used[priced], b_c[priced], q_c[priced],
            call_s[priced],
        )  # fmt: skip
        delta[priced], vanna[priced], charm[priced] = gk.delta, gk.vanna, gk.charm
        gamma_at[priced] = np.where(hasg_s[priced], gamma_s[priced], gk.gamma)
    iv_used = np.where(unpriced, math.nan, iv_used)

    chain = Chain(
        strike=k_s,
        is_call=call_s,
        oi=oi_s,
        gamma=gamma_at,
        has_gamma=hasg_s,
        iv=iv_used,
        imputed=imputed,
        delta=delta,
        vanna=vanna,
        charm=charm,
        mult=mult_s,
        grp=grp,
        exp_idx=g_expiry[grp] if ng else np.zeros(0, dtype=np.int64),
        t_years=np.zeros(nc),
        zero_dte=np.zeros(nc, dtype=np.bool_),
        g_expiry=g_expiry,
        g_settle_ns=g_settle,
        g_root_am=g_am,
        g_tau=g_tau,
        g_t=g_tau,
        g_b=g_b,
        g_q=g_q,
        g_fit=g_fit,
        g_fit_err=g_err,
        expiries=expiries,
        today=ny_date(now_ns),
        now_ns=now_ns,
        snap_ns=snap,
        snap_spot=snap_spot,
        n_input=n + sum((rejected or {}).values()),
        n_missing_greeks=n_missing_greeks,
        n_missing_iv=n_missing_iv,
        rejected=rej,
        excluded=exc,
        src_ts_ns=src_ts,
    )
    return retime(chain, now_ns, params)


def retime(chain: Chain, now_ns: int, params: Params = Params()) -> Chain:
    """The same chain seen at another clock time: time to settlement on each group's basis
    (shrunk by the time elapsed since the snapshot), the 0DTE view, and contracts that
    settled in between dropped (``excluded.expired``)."""
    live_g = chain.g_settle_ns > now_ns
    ch = chain
    if not live_g.all():  # settled groups leave, with their contracts and expiries
        keep = live_g[ch.grp]
        exc = dict(ch.excluded)
        _count(exc, "expired", ~keep)
        per_contract = (
            "strike", "is_call", "oi", "gamma", "has_gamma", "iv", "imputed", "delta",
            "vanna", "charm", "mult", "t_years", "zero_dte",
        )  # fmt: skip
        per_group = ("g_settle_ns", "g_root_am", "g_tau", "g_t", "g_b", "g_q", "g_fit")
        new_g = np.cumsum(live_g) - 1
        used_e = np.unique(ch.g_expiry[live_g])
        new_e = np.full(len(ch.expiries), -1, dtype=np.int64)
        new_e[used_e] = np.arange(used_e.shape[0])
        grp = new_g[ch.grp[keep]]
        g_expiry = new_e[ch.g_expiry[live_g]]
        ch = dataclasses.replace(
            ch,
            excluded=exc,
            grp=grp,
            exp_idx=g_expiry[grp],
            g_expiry=g_expiry,
            g_fit_err=ch.g_fit_err[live_g],
            expiries=[ch.expiries[e] for e in used_e.tolist()],
            **{f: getattr(ch, f)[keep] for f in per_contract},
            **{f: getattr(ch, f)[live_g] for f in per_group},
        )
    elapsed = (now_ns - ch.snap_ns) / 1e9 / SECONDS_PER_YEAR
    floor = params.min_t_s / SECONDS_PER_YEAR
    g_t = np.maximum(ch.g_tau - elapsed, floor)
    today = ny_date(now_ns)
    if today in ch.expiries:
        zero_dte = ch.exp_idx == ch.expiries.index(today)
    else:
        zero_dte = np.zeros(ch.exp_idx.shape[0], dtype=np.bool_)
    return dataclasses.replace(
        ch, t_years=g_t[ch.grp], g_t=g_t, zero_dte=zero_dte, today=today, now_ns=now_ns
    )


@dataclass(frozen=True, slots=True)
class _Fit:
    tau: F64
    b: F64
    q: F64
    err: F64
    ok: B


def _fit_basis(
    s0: float,
    k: F64,
    iv: F64,
    gamma: F64,
    grp: I64,
    ng: int,
    tau0: F64,
    b0: F64,
    q0: F64,
    p: Params,
) -> _Fit:
    """Weighted Gauss-Newton per group for (ln tau, beta, c) in
    ``ln gamma = c - ln(s0 iv sqrt(2 pi tau)) - d1^2/2`` (module doc), all groups at once.
    A group whose numbers stop being finite is frozen and rejected."""
    u = np.log(tau0)
    beta = b0 * tau0
    c = -q0 * tau0
    beta_p, c_p = beta.copy(), c.copy()
    m = np.log(s0 / k)
    y = np.log(gamma) + np.log(s0 * iv) + _LN_SQRT_2PI
    # 1 / (model error^2 + (quantum / gamma)^2), written so a tiny gamma cannot overflow
    w = gamma * gamma / ((_MODEL_REL_ERR * gamma) ** 2 + _GAMMA_QUANTUM**2)
    wp = 1.0 / _PRIOR_SD**2
    n_g = np.bincount(grp, minlength=ng)
    alive = n_g >= _FIT_MIN_CONTRACTS

    def sums(x: F64) -> F64:
        out: F64 = np.bincount(grp, weights=x, minlength=ng).astype(np.float64)
        return out

    def residual(u_: F64, beta_: F64, c_: F64) -> tuple[F64, F64, F64]:
        v = iv * np.exp(0.5 * u_[grp])
        mb = m + beta_[grp]
        d1 = mb / v + 0.5 * v
        r = y - (c_[grp] - 0.5 * u_[grp] - 0.5 * d1 * d1)
        ju = -0.5 - d1 * (-mb / (2.0 * v) + 0.25 * v)
        jb = -d1 / v
        return r, ju, jb

    with np.errstate(all="ignore"):
        for _ in range(_FIT_ITERATIONS):
            r, ju, jb = residual(u, beta, c)
            jac = (ju, jb, np.ones_like(ju))
            a = np.empty((ng, 3, 3))
            g = np.empty((ng, 3))
            for i in range(3):
                g[:, i] = sums(w * jac[i] * r)
                for j in range(i, 3):
                    a[:, i, j] = a[:, j, i] = sums(w * jac[i] * jac[j])
            # weak priors keep beta and c where thin data cannot place them
            a[:, 1, 1] += wp
            a[:, 2, 2] += wp
            a[:, 0, 0] += 1e-9
            g[:, 1] -= wp * (beta - beta_p)
            g[:, 2] -= wp * (c - c_p)
            alive &= np.isfinite(a).all(axis=(1, 2)) & np.isfinite(g).all(axis=1)
            step = np.zeros((ng, 3))
            try:
                step[alive] = np.linalg.solve(a[alive], g[alive][..., None])[..., 0]
            except np.linalg.LinAlgError:  # one degenerate group: solve them one by one
                for i in np.flatnonzero(alive).tolist():
                    try:
                        step[i] = np.linalg.solve(a[i], g[i])
                    except np.linalg.LinAlgError:
                        alive[i] = False
            du = np.clip(step[:, 0], -0.7, 0.7)  # at most a factor 2 in tau per iteration
            u, beta, c = u + du, beta + step[:, 1], c + step[:, 2]
            if not alive.any() or float(np.abs(step[alive]).max()) < 1e-10:
                break
        r, _, _ = residual(u, beta, c)
        wr = w / (1.0 + w * _MODEL_REL_ERR**2)  # back to plain relative-error weights
        err = np.sqrt(sums(np.where(np.isfinite(r), wr * r * r, np.inf)) / sums(wr))
        tau = np.exp(u)
    err = np.where(alive, err, math.nan)
    ok = (
        alive
        & np.isfinite(err)
        & (err <= p.fit_max_err)
        & (tau >= p.min_t_s / SECONDS_PER_YEAR)
        & (tau <= 3.0 * tau0 + 1.0 / 365.0)
    )
    return _Fit(tau, beta / tau, -c / tau, err, ok)


def _impute_iv(
    lnk: F64, iv: F64, iv_ok: B, is_call: B, grp: I64, ng: int, p: Params
) -> tuple[F64, B]:
    """Provider IV where given, else interpolated along the group's smile (module doc)."""
    out = np.where(iv_ok, iv, math.nan)
    imputed = np.zeros(iv.shape[0], dtype=np.bool_)
    bounds = np.searchsorted(grp, np.arange(ng + 1))
    for g in range(ng):
        lo, hi = int(bounds[g]), int(bounds[g + 1])
        known = iv_ok[lo:hi]
        missing = ~known
        if not missing.any() or not known.any():
            continue
        k_all, c_all = lnk[lo:hi], is_call[lo:hi]
        k_known, v_known = k_all[known], iv[lo:hi][known]
        otm = (k_known >= 0) == c_all[known]
        # one point per strike: the out-of-the-money side when both are listed (then the
        # lower IV, so duplicated contracts give the same smile in any input order)
        order = np.lexsort((v_known, ~otm, k_known))
        k_sorted, v_sorted = k_known[order], v_known[order]
        first = np.ones(k_sorted.shape[0], dtype=np.bool_)
        first[1:] = k_sorted[1:] != k_sorted[:-1]
        xs, ys = k_sorted[first], v_sorted[first]
        floor = max(p.iv_floor, float(ys.min()))
        q = k_all[missing]
        val = np.interp(q, xs, ys)
        if xs.shape[0] >= 2:
            nw = min(_WING_POINTS, xs.shape[0])
            left = _slope(xs[:nw], ys[:nw])
            right = _slope(xs[-nw:], ys[-nw:])
            below, above = q < xs[0], q > xs[-1]
            val = np.where(below, ys[0] + min(left, 0.0) * (q - xs[0]), val)
            val = np.where(above, ys[-1] + right * (q - xs[-1]), val)
        val = np.clip(val, floor, p.iv_cap)
        seg = out[lo:hi]
        seg[missing] = val
        imputed[lo:hi][missing] = True
    return out, imputed


def _slope(x: F64, y: F64) -> float:
    """Least-squares slope of y on x (x distinct)."""
    dx = x - x.mean()
    return float((dx * (y - y.mean())).sum() / (dx * dx).sum())


# --- the sweep over hypothetical spots --------------------------------------------------------
class _Sweep:
    """Net dollar GEX (position-signed) as a function of a hypothetical spot ``s``, for any
    contiguous range of the chain's contracts:
    ``sum_i pos_i * OI_i * mult_i * gamma_BS(s; K_i, tau_i, iv_i, b, q) * s**2 * 0.01``."""

    def __init__(self, ch: Chain) -> None:
        use = np.isfinite(ch.iv) & (ch.oi != 0)
        self.use = use
        iv = np.where(use, ch.iv, 1.0)
        t = ch.t_years
        b, q = ch.g_b[ch.grp], ch.g_q[ch.grp]
        sst = iv * np.sqrt(t)
        self.inv = 1.0 / sst
        # d1 = (ln s - cst) / (iv sqrt T), cst = ln K - (b + iv^2/2) T
        self.cst = np.log(ch.strike) - (b + 0.5 * iv * iv) * t
        pos_oi = np.where(ch.is_call, ch.oi, -ch.oi)
        self.w = np.where(use, pos_oi, 0.0) * ch.mult * np.exp(-q * t) * self.inv
        self.w *= _INV_SQRT_2PI

    def at(self, lo: int, hi: int, spots: F64) -> F64:
        ln_s = np.log(spots)[:, None]
        acc = np.zeros(spots.shape[0], dtype=np.float64)
        for a in range(lo, hi, _CHUNK):
            b = min(hi, a + _CHUNK)
            d = ln_s - self.cst[None, a:b]
            d *= self.inv[None, a:b]
            np.square(d, out=d)
            d *= -0.5
            np.exp(d, out=d)
            # einsum, not `@`: a BLAS gemv spawns OpenBLAS threads, which on a busy or
            # CPU-limited node made this 10-50x slower (measured); einsum stays on one core.
            acc += np.einsum("ij,j->i", d, self.w[a:b])
        # shares gamma = acc / s; dollar per 1 % = shares * s^2 * 0.01
        return acc * spots * 0.01

    def per_group(self, bounds: I64, spots: F64) -> F64:
        """(groups x spots) curves, one per contiguous block [bounds[g], bounds[g+1])."""
        ng = bounds.shape[0] - 1
        out = np.zeros((ng, spots.shape[0]))
        ln_s = np.log(spots)[:, None]
        n = int(bounds[-1])
        for a in range(0, n, _CHUNK):
            b = min(n, a + _CHUNK)
            d = ln_s - self.cst[None, a:b]
            d *= self.inv[None, a:b]
            np.square(d, out=d)
            d *= -0.5
            np.exp(d, out=d)
            d *= self.w[None, a:b]
            inner = bounds[(bounds > a) & (bounds < b)] - a
            starts = np.unique(np.concatenate(([0], inner)))
            groups = np.searchsorted(bounds, starts + a, side="right") - 1
            out[groups] += np.add.reduceat(d, starts, axis=1).T
        out *= (spots * 0.01)[None, :]
        return out


@dataclass(frozen=True, slots=True)
class ZeroGamma:
    level: float | None
    reason: str | None  # why level is None
    crossings: int  # sign changes of net GEX on the grid


def _zero_crossing(
    grid: F64, g: F64, spot: float, f: Callable[[float], float], p: Params, empty: str | None
) -> ZeroGamma:
    """Crossing of the curve ``g`` (sampled on ``grid``) nearest to spot, refined on ``f``."""
    if empty is not None:
        return ZeroGamma(None, empty, 0)
    sg = np.sign(g)
    exact = np.flatnonzero(sg == 0)
    change = np.flatnonzero(sg[:-1] * sg[1:] < 0)
    crossings = int(exact.shape[0] + change.shape[0])
    if crossings == 0:
        side = "positive" if g[0] > 0 else "negative"
        return ZeroGamma(
            None,
            f"no sign change of net GEX within +-{p.grid_range_pct:g}% of spot "
            f"(net {side} throughout)",
            0,
        )
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
        return ZeroGamma(_clean(lo, 2), None, crossings)
    f_lo, f_hi = f(lo), f(hi)
    while hi - lo > p.tol_points:
        mid = 0.5 * (lo + hi)
        f_mid = f(mid)
        if f_mid == 0.0:
            return ZeroGamma(_clean(mid, 2), None, crossings)
        if (f_mid < 0) == (f_lo < 0):
            lo, f_lo = mid, f_mid
        else:
            hi, f_hi = mid, f_mid
    level = lo - f_lo * (hi - lo) / (f_hi - f_lo)
    return ZeroGamma(_clean(level, 2), None, crossings)


# --- aggregation ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Levels:
    call_wall: float | None
    put_wall: float | None
    abs_gamma_strike: float | None
    key_strikes: list[float]
    zero_gamma: float | None
    zero_gamma_reason: str | None
    zero_gamma_crossings: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "call_wall": self.call_wall,
            "put_wall": self.put_wall,
            "abs_gamma_strike": self.abs_gamma_strike,
            "key_strikes": self.key_strikes,
            "zero_gamma": self.zero_gamma,
            "zero_gamma_reason": self.zero_gamma_reason,
            "zero_gamma_crossings": self.zero_gamma_crossings,
        }


@dataclass(frozen=True, slots=True)
class ExpiryStats:
    expiry: str
    settlement: str  # AM | PM | AM+PM
    n: int
    calls: float  # shares
    puts: float
    t_years: list[float]  # per settlement group, at now
    t_basis: list[str]  # fit | clock, per settlement group
    imputed_iv: int
    zero_gamma: ZeroGamma


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
    delta: F64  # position-signed delta exposure per strike (shares)
    vanna: F64  # position-signed d delta / d vol per strike (shares per 1.00 of vol)
    charm: F64  # position-signed d delta / d t per strike (shares per year)
    levels: Levels
    levels_0dte: Levels
    by_expiry: list[ExpiryStats]
    grid: F64  # hypothetical spots of the profile
    profile: F64  # net dollar GEX per 1 % at each grid spot, all expiries
    profile_0dte: F64
    legacy_calls: dict[str, dict[str, float]]  # expiry -> strike -> shares (positive)
    legacy_puts: dict[str, dict[str, float]]

    @property
    def dollar_factor(self) -> float:
        return self.dollar_spot * self.dollar_spot * 0.01

    def totals(self) -> dict[str, dict[str, float]]:
        f = self.dollar_factor
        ds = self.dollar_spot
        out: dict[str, dict[str, float]] = {}
        for view, c, p in (
            ("all", self.calls, self.puts),
            ("0dte", self.calls_0dte, self.puts_0dte),
        ):
            tc, tp = float(c.sum()), float(p.sum())
            out[view] = {
                "calls": _clean(tc, 6),
                "puts": _clean(tp, 6),
                "net": _clean(tc + tp, 6),
                "calls_usd": _clean(tc * f, 2),
                "puts_usd": _clean(tp * f, 2),
                "net_usd": _clean((tc + tp) * f, 2),
            }
        d, va, ch = float(self.delta.sum()), float(self.vanna.sum()), float(self.charm.sum())
        g = _significant(np.array([d, d * ds, va * ds * 0.01, ch * ds / 365.0]), _SIG)
        out["all"] |= dict(zip(("delta", "delta_usd", "vanna_usd", "charm_usd"), g, strict=True))
        return out

    def expiry_table(self) -> dict[str, dict[str, Any]]:
        f = self.dollar_factor
        out: dict[str, dict[str, Any]] = {}
        for e in self.by_expiry:
            out[e.expiry] = {
                "settlement": e.settlement,
                "n": e.n,
                "calls": _clean(e.calls, 6),
                "puts": _clean(e.puts, 6),
                "net": _clean(e.calls + e.puts, 6),
                "calls_usd": _clean(e.calls * f, 2),
                "puts_usd": _clean(e.puts * f, 2),
                "net_usd": _clean((e.calls + e.puts) * f, 2),
                "zero_gamma": e.zero_gamma.level,
                "zero_gamma_reason": e.zero_gamma.reason,
                "t_years": [_clean(t, 6) for t in e.t_years],
                "t_basis": e.t_basis,
                "imputed_iv": e.imputed_iv,
            }
        return out

    def profile_dict(self) -> dict[str, list[float]]:
        """The gamma profile for a chart: 4 significant digits (a few seconds of time decay
        do not republish it)."""
        return {
            "spot": _clean_list(self.grid, 2),
            "all": _significant(self.profile, 4, below=1.0),
            "0dte": _significant(self.profile_0dte, 4, below=1.0),
        }

    def items(self) -> dict[str, dict[str, float]]:
        """Model items keyed by strike string (see module docstring for units and signs)."""
        f = self.dollar_factor
        ds = self.dollar_spot
        cols: dict[str, list[float]] = {}
        for name, arr in (
            ("calls", self.calls),
            ("puts", self.puts),
            ("net", self.calls + self.puts),
            ("calls_0dte", self.calls_0dte),
            ("puts_0dte", self.puts_0dte),
            ("net_0dte", self.calls_0dte + self.puts_0dte),
        ):
            cols[name] = _clean_list(arr, 6)
            cols[name + "_usd"] = _clean_list(arr * f, 2)
        # re-priced exposures: 5 significant digits (time decay between two snapshots of the
        # same values would otherwise rewrite every strike)
        cols["delta"] = _significant(self.delta, _SIG)
        cols["delta_usd"] = _significant(self.delta * ds, _SIG, below=0.5)
        cols["vanna_usd"] = _significant(self.vanna * ds * 0.01, _SIG, below=0.5)
        cols["charm_usd"] = _significant(self.charm * ds / 365.0, _SIG, below=0.5)
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
            "delta",
            "delta_usd",
            "vanna_usd",
            "charm_usd",
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


def _walls(
    strikes: F64, calls: F64, puts: F64, n_key: int
) -> tuple[float | None, float | None, float | None, list[float]]:
    def arg(v: F64) -> float | None:
        if v.shape[0] == 0 or not (v > 0).any():
            return None
        return float(strikes[int(np.argmax(v))])

    ap = np.abs(puts)
    tot = calls + ap
    # largest first, ties to the lowest strike (stable sort on the negated total)
    top = np.argsort(-tot, kind="stable")[:n_key]
    key = [float(strikes[i]) for i in top.tolist() if tot[i] > 0]
    return arg(calls), arg(ap), arg(tot), key


def _legacy(
    chain: Chain, sidx: I64, strikes: F64, shares: F64, mask: B
) -> dict[str, dict[str, float]]:
    """expiry -> strike -> shares; every expiry of the chain is named (empty when it has no
    contract of that side)."""
    ns = strikes.shape[0]
    ne = len(chain.expiries)
    cell = chain.exp_idx[mask] * ns + sidx[mask]
    vals = np.bincount(cell, weights=shares[mask], minlength=ne * ns).reshape(ne, ns)
    present = (np.bincount(cell, minlength=ne * ns) > 0).reshape(ne, ns)
    keys = np.array([strike_key(k) for k in strikes.tolist()], dtype=object)
    out: dict[str, dict[str, float]] = {}
    for e in range(ne):
        idx = np.flatnonzero(present[e])
        out[chain.expiries[e]] = dict(
            zip(keys[idx].tolist(), _clean_list(vals[e, idx], 6), strict=True)
        )
    return out


def compute(
    chain: Chain, spot: float, params: Params = Params(), dollar_spot: float | None = None
) -> GexResult:
    """Aggregate GEX per strike (all expiries and 0DTE) and per expiry, delta/vanna/charm
    exposure, walls, the gamma profile and zero gamma (all, 0DTE, per expiry)."""
    if not (math.isfinite(spot) and spot > 0):
        raise ValueError(f"spot must be a positive number, got {spot!r}")
    ds = spot if dollar_spot is None else dollar_spot
    shares = chain.gamma * chain.oi * chain.mult
    strikes, sidx = np.unique(chain.strike, return_inverse=True)
    sidx = sidx.astype(np.int64).reshape(-1)
    ns = strikes.shape[0]
    put = ~chain.is_call
    pos_oi = np.where(chain.is_call, chain.oi, -chain.oi) * chain.mult

    def per_strike(weights: F64, mask: B | None = None) -> F64:
        if mask is None:
            out: F64 = np.bincount(sidx, weights=weights, minlength=ns).astype(np.float64)
            return out
        return np.bincount(sidx[mask], weights=weights[mask], minlength=ns).astype(np.float64)

    calls = per_strike(shares, chain.is_call)
    puts = -per_strike(shares, put)
    calls0 = per_strike(shares, chain.is_call & chain.zero_dte)
    puts0 = -per_strike(shares, put & chain.zero_dte)
    delta = per_strike(pos_oi * chain.delta)
    vanna = per_strike(pos_oi * chain.vanna)
    charm = per_strike(pos_oi * chain.charm)
    counts = np.bincount(sidx, minlength=ns).astype(np.int64)

    # the sweep: per-group curves on the grid, then views as sums of groups
    sweep = _Sweep(chain)
    n_steps = round(params.grid_range_pct / params.grid_step_pct)
    steps = np.arange(-n_steps, n_steps + 1, dtype=np.float64)
    grid: F64 = spot * (1.0 + steps * (params.grid_step_pct / 100))
    ng = chain.g_expiry.shape[0]
    g_bounds = np.searchsorted(chain.grp, np.arange(ng + 1)).astype(np.int64)
    curves = sweep.per_group(g_bounds, grid) if ng else np.zeros((0, grid.shape[0]))

    def view(g_lo: int, g_hi: int, none_reason: str) -> tuple[F64, ZeroGamma]:
        c_lo, c_hi = int(g_bounds[g_lo]), int(g_bounds[g_hi])
        curve = curves[g_lo:g_hi].sum(axis=0)
        live = g_hi > g_lo and bool(sweep.use[c_lo:c_hi].any())
        empty = None if live else none_reason

        def f(s: float) -> float:
            return float(sweep.at(c_lo, c_hi, np.array([s]))[0])

        return curve, _zero_crossing(grid, curve, spot, f, params, empty)

    prof, zg = view(0, ng, "no contracts with both IV and non-zero OI")
    today_e = chain.expiries.index(chain.today) if chain.today in chain.expiries else -1
    g_exp_bounds = np.searchsorted(chain.g_expiry, np.arange(len(chain.expiries) + 1))
    by_expiry: list[ExpiryStats] = []
    prof0 = np.zeros_like(grid)
    zg0 = ZeroGamma(None, f"no contracts expiring today ({chain.today})", 0)
    for e, exp in enumerate(chain.expiries):
        g_lo, g_hi = int(g_exp_bounds[e]), int(g_exp_bounds[e + 1])
        curve, z = view(g_lo, g_hi, "no contracts with both IV and non-zero OI")
        if e == today_e:
            prof0, zg0 = curve, z
        c_lo, c_hi = int(g_bounds[g_lo]), int(g_bounds[g_hi])
        sl = slice(c_lo, c_hi)
        sh = shares[sl]
        is_c = chain.is_call[sl]
        am = chain.g_root_am[g_lo:g_hi]
        settle = "AM+PM" if am.any() and not am.all() else ("AM" if am.all() else "PM")
        t_now = chain.g_t[g_lo:g_hi]
        by_expiry.append(
            ExpiryStats(
                expiry=exp,
                settlement=settle,
                n=c_hi - c_lo,
                calls=float(sh[is_c].sum()),
                puts=-float(sh[~is_c].sum()),
                t_years=t_now.tolist(),
                t_basis=["fit" if x else "clock" for x in chain.g_fit[g_lo:g_hi].tolist()],
                imputed_iv=int(chain.imputed[sl].sum()),
                zero_gamma=z,
            )
        )
    lv = Levels(*_walls(strikes, calls, puts, params.key_strikes), zg.level, zg.reason,
                zg.crossings)  # fmt: skip
    lv0 = Levels(*_walls(strikes, calls0, puts0, params.key_strikes), zg0.level, zg0.reason,
                 zg0.crossings)  # fmt: skip
    return GexResult(
        spot=spot,
        dollar_spot=ds,
        strikes=strikes,
        n_per_strike=counts,
        calls=calls,
        puts=puts,
        calls_0dte=calls0,
        puts_0dte=puts0,
        delta=delta,
        vanna=vanna,
        charm=charm,
        levels=lv,
        levels_0dte=lv0,
        by_expiry=by_expiry,
        grid=grid,
        profile=prof,
        profile_0dte=prof0,
        legacy_calls=_legacy(chain, sidx, strikes, shares, chain.is_call),
        legacy_puts=_legacy(chain, sidx, strikes, shares, put),
    )
