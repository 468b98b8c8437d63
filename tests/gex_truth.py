"""The simulated market's true GEX levels next to ours (used by tests/test_gex_truth.py and
``python -m tests.gex_truth`` for a printout).

Ours: the simulator's REST chain items (what the provider publishes: greeks and IV only with
a bid and |delta| < 0.999, rounded) -> the REST parser -> a ChainSnapshot blob -> the GEX
math with default settings. Truth: every contract of the simulated market priced with its
own smile, clock and rates (``Market.truth``), zero gamma found by an independent sweep (a
fine grid and bisection written here, scalar Black-Scholes from the simulator).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

import msgspec
import numpy as np

from processors.gex import exposure as gex_math
from schemas import massive_rest as mr
from schemas.messages import decode_gex_source, encode_gex_source
from simulator.market import Truth
from simulator.server import SimConfig, SimServer
from streams.clock import NY

DAY = dt.date(2026, 3, 17)  # a Tuesday: 0DTE SPXW, no AM monthly settling that day
TIMES = {"pre-market": (8, 0), "midday": (12, 30), "30 min before close": (15, 30)}


def at(hh: int, mm: int, day: dt.date = DAY) -> int:
    return int(dt.datetime(day.year, day.month, day.day, hh, mm, tzinfo=NY).timestamp()) * 10**9


@dataclass(frozen=True)
class Case:
    now_ns: int
    spot: float
    chain: gex_math.Chain
    result: gex_math.GexResult
    truth: Truth


def simulate(now_ns: int, seed: int = 1, symbol: str = "SPX", walk_s: float = 0.0) -> Case:
    """Our GEX for the simulator's whole chain at ``now_ns`` (after ``walk_s`` seconds of the
    market's random walk, so spot is not the chain's centre)."""
    start = now_ns - int(walk_s * 1e9)
    sim = SimServer(SimConfig(seed=seed, symbols=(symbol,)), clock=lambda: start)
    market = sim.market
    if walk_s:
        market.advance(now_ns)
    st = market.indices[symbol]
    items = [sim._item(c, st) for c in market.by_symbol[symbol]]
    page = mr.parse_chain_page(msgspec.json.encode({"status": "OK", "results": items}), symbol)
    assert not page.rejections, page.rejections[:3]
    # the path of a full-chain snapshot: normalizer -> GEX source blob -> GEX builder
    blob = encode_gex_source(
        gex_math.source_from_contracts(symbol, now_ns, st.value, page.contracts)
    )
    src = decode_gex_source(blob)
    params = gex_math.Params()
    cols = gex_math.source_columns(src)
    chain = gex_math.prepare(cols, now_ns, params, snap_spot=src.spot, snap_ns=src.ts_ns)
    res = gex_math.compute(chain, st.value, params)
    return Case(now_ns, st.value, chain, res, market.truth(symbol))


def _truth_curve(t: Truth, s: np.ndarray, zero_dte_only: bool) -> np.ndarray:
    """Net dollar GEX per 1 % (calls +, puts -) at each hypothetical spot in ``s``."""
    today = dt.datetime.fromtimestamp(t.now_ns / 1e9, NY).date().isoformat()
    cs = [c for c in t.contracts if not c.settled and (not zero_dte_only or c.expiry == today)]
    k = np.array([c.strike for c in cs])
    iv = np.array([c.iv for c in cs])
    tau = np.array([c.t_years for c in cs])
    pos_oi = np.array([c.oi if c.call else -c.oi for c in cs], dtype=np.float64)
    out = np.empty(s.shape[0])
    for i, x in enumerate(s.tolist()):
        v = iv * np.sqrt(tau)
        d1 = (np.log(x / k) + (t.r - t.q + 0.5 * iv * iv) * tau) / v
        gamma = np.exp(-t.q * tau) * np.exp(-0.5 * d1 * d1) / (x * v * math.sqrt(2 * math.pi))
        out[i] = float((pos_oi * gamma).sum()) * 100 * x * x * 0.01
    return out


def truth_zero_gamma(t: Truth, zero_dte_only: bool = False) -> float | None:
    """Crossing nearest to spot on a 1-point grid over spot +-15 %, bisected to 0.001."""
    grid = np.arange(math.floor(t.spot * 0.85), math.ceil(t.spot * 1.15) + 1, 1.0)
    g = _truth_curve(t, grid, zero_dte_only)
    idx = np.flatnonzero(np.sign(g[:-1]) * np.sign(g[1:]) <= 0)
    if idx.shape[0] == 0:
        return None
    i = int(min(idx.tolist(), key=lambda j: abs(grid[j] - t.spot)))
    lo, hi = float(grid[i]), float(grid[i + 1])
    f_lo = float(g[i])
    while hi - lo > 1e-3:
        mid = 0.5 * (lo + hi)
        f_mid = float(_truth_curve(t, np.array([mid]), zero_dte_only)[0])
        if (f_mid < 0) == (f_lo < 0):
            lo, f_lo = mid, f_mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def main() -> None:
    for label, (hh, mm) in TIMES.items():
        case = simulate(at(hh, mm), walk_s=600)
        lv, lv0 = case.result.levels, case.result.levels_0dte
        z, z0 = truth_zero_gamma(case.truth), truth_zero_gamma(case.truth, True)
        cov = case.chain.coverage()
        fit = int(case.chain.g_fit.sum())
        print(
            f"{label:>20}: spot {case.spot:.2f}  zero gamma ours {lv.zero_gamma} truth "
            f"{z and round(z, 2)}  0DTE ours {lv0.zero_gamma} truth {z0 and round(z0, 2)}  "
            f"groups fitted {fit}/{case.chain.g_fit.shape[0]}  coverage {cov}"
        )


if __name__ == "__main__":
    main()
