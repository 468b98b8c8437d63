"""GEX math against hand-computed chains and an independent Black-Scholes gamma."""

from __future__ import annotations

import datetime as dt
import math
import random

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.gex import exposure as gex_math
from processors.gex.exposure import Params
from schemas.messages import GexRow
from streams.clock import NY

UTC = dt.UTC
# Monday 2026-03-16 11:00 New York (EDT, UTC-4) -> 15:00 UTC
NOW = dt.datetime(2026, 3, 16, 15, 0, tzinfo=UTC)
NOW_NS = int(NOW.timestamp()) * 10**9
SPOT = 6800.0
TODAY = "2026-03-16"
FRI = "2026-03-20"  # third Friday of March 2026: SPX (AM) and SPXW (PM) both expire


def row(
    root: str,
    expiry: str,
    right: str,
    strike: float,
    gamma: float | None,
    oi: float | None,
    iv: float | None = 0.2,
) -> GexRow:
    return GexRow(root, expiry, strike, right, gamma, oi, iv, NOW_NS)


def build(rows: list[GexRow], spot: float = SPOT, **kw: float) -> gex_math.GexResult:
    params = Params(**kw)
    return gex_math.compute(gex_math.prepare(rows, NOW_NS, params), spot, params)


# Hand-computed chain (shares = gamma * OI * 100):
#   SPXW FRI C 6800: 0.002 * 1000 * 100 = 200
#   SPX  FRI C 6800: 0.001 *  500 * 100 =  50   -> same strike and expiry: 250 (summed)
#   SPXW FRI P 6800: 0.002 *  300 * 100 =  60
#   SPXW FRI P 6750: 0.0015 * 2000 * 100 = 300
#   SPXW FRI C 6850: 0.0015 *  400 * 100 =  60
#   SPXW TODAY C 6800: 0.004 * 100 * 100 =  40   (0DTE)
#   SPXW TODAY P 6750: 0.001 * 100 * 100 =  10   (0DTE)
HAND = [
    row("SPXW", FRI, "C", 6800, 0.002, 1000),
    row("SPX", FRI, "C", 6800, 0.001, 500),
    row("SPXW", FRI, "P", 6800, 0.002, 300),
    row("SPXW", FRI, "P", 6750, 0.0015, 2000),
    row("SPXW", FRI, "C", 6850, 0.0015, 400),
    row("SPXW", TODAY, "C", 6800, 0.004, 100),
    row("SPXW", TODAY, "P", 6750, 0.001, 100),
]
DOLLAR = SPOT * SPOT * 0.01  # 462,400 USD per share of gamma for a 1 % move


def test_hand_chain_per_strike_and_sign_convention() -> None:
    items = build(HAND).items()
    assert set(items) == {"6750", "6800", "6850"}
    s = items["6800"]
    assert s["calls"] == pytest.approx(200 + 50 + 40)
    assert s["puts"] == pytest.approx(-60)
    assert s["net"] == pytest.approx(290 - 60)
    assert s["calls_0dte"] == pytest.approx(40)
    assert s["puts_0dte"] == 0
    assert s["n"] == 4
    assert items["6750"]["puts"] == pytest.approx(-310)
    assert items["6750"]["puts_0dte"] == pytest.approx(-10)
    assert items["6750"]["calls"] == 0
    assert items["6850"]["calls"] == pytest.approx(60)
    assert items["6800"]["net_usd"] == pytest.approx(230 * DOLLAR, abs=0.01)
    assert items["6750"]["puts_0dte_usd"] == pytest.approx(-10 * DOLLAR, abs=0.01)


def test_hand_chain_totals_and_walls() -> None:
    res = build(HAND)
    tot = res.totals()
    assert tot["all"]["calls"] == pytest.approx(350)  # 250 + 60 + 40
    assert tot["all"]["puts"] == pytest.approx(-370)  # 60 + 300 + 10
    assert tot["all"]["net"] == pytest.approx(-20)
    assert tot["all"]["net_usd"] == pytest.approx(-20 * DOLLAR, abs=0.01)
    assert tot["0dte"]["calls"] == pytest.approx(40)
    assert tot["0dte"]["puts"] == pytest.approx(-10)
    lv = res.levels
    assert lv.call_wall == 6800  # 290 > 60
    assert lv.put_wall == 6750  # |-310| > |-60|
    assert lv.abs_gamma_strike == 6800  # 290 + 60 = 350 > 310
    lv0 = res.levels_0dte
    assert (lv0.call_wall, lv0.put_wall, lv0.abs_gamma_strike) == (6800, 6750, 6800)


def test_spx_and_spxw_sum_at_same_strike_and_expiry_in_legacy_maps() -> None:
    res = build(HAND)
    assert res.legacy_calls == {
        FRI: {"6800": pytest.approx(250), "6850": pytest.approx(60)},
        TODAY: {"6800": pytest.approx(40)},
    }
    assert res.legacy_puts == {  # old convention: put magnitudes are positive
        FRI: {"6800": pytest.approx(60), "6750": pytest.approx(300)},
        TODAY: {"6750": pytest.approx(10)},
    }
    only_spxw = build([r for r in HAND if r.root == "SPXW"])
    assert only_spxw.legacy_calls[FRI]["6800"] == pytest.approx(200)


def test_fractional_strikes_are_not_truncated() -> None:
    res = build([row("SPXW", FRI, "C", 6852.5, 0.001, 10), row("SPXW", FRI, "C", 6852, 0.001, 1)])
    assert set(res.items()) == {"6852", "6852.5"}
    assert res.legacy_calls[FRI] == {"6852": pytest.approx(0.1), "6852.5": pytest.approx(1.0)}


def test_missing_greeks_are_repriced_missing_oi_excluded_bad_rows_rejected() -> None:
    rows = [
        *HAND,
        row("SPXW", FRI, "C", 6900, None, 100),  # no gamma: re-priced from its IV
        row("SPXW", FRI, "C", 6900, 0.001, None),  # no OI: excluded
        row("SPXW", FRI, "P", 6900, math.nan, 100),  # NaN gamma = missing: re-priced
        row("SPXW", FRI, "X", 6900, 0.001, 100),
        row("SPXW", "2026-13-01", "C", 6900, 0.001, 100),
        row("SPXW", FRI, "C", -5, 0.001, 100),
        row("SPXW", FRI, "C", 6900, -0.001, 100),
        row("SPXW", FRI, "C", 6900, 0.001, math.inf),
        row("SPXW", FRI, "C", 6950, 0.001, 100, iv=None),  # no IV: imputed, gamma kept
    ]
    chain = gex_math.prepare(rows, NOW_NS, snap_spot=SPOT)
    assert chain.n_input == len(rows)
    assert chain.n_missing_greeks == 2
    assert chain.rejected == {"bad_right": 1, "bad_expiry": 1, "bad_strike": 1, "bad_greek": 2}
    assert chain.excluded == {"no_oi": 1}
    assert chain.n_missing_iv == 1
    assert chain.n == len(HAND) + 3
    assert not chain.g_fit.any()  # hand gammas are no Black-Scholes smile: clock basis
    cov = chain.coverage()
    assert cov["imputed_iv"] == 1 and cov["repriced_gamma"] == 2
    assert cov["excluded"] == {"no_oi": 1} and cov["expirations"] == 2
    res = gex_math.compute(chain, SPOT)
    items = res.items()
    assert set(items) == {"6750", "6800", "6850", "6900", "6950"}
    assert items["6950"]["calls"] == pytest.approx(10)
    g = ref_gamma(SPOT, 6900, ref_t(FRI, "SPXW"), 0.2, 0.0, 0.0) * 100 * 100
    assert items["6900"]["calls"] == pytest.approx(g, abs=1e-6)
    assert items["6900"]["puts"] == pytest.approx(-g, abs=1e-6)
    assert res.totals()["all"]["net"] == pytest.approx(-20 + 10)


def test_decode_rows_counts_undecodable_values() -> None:
    good = [msgspec.json.encode(r) for r in HAND]
    rows, rejected = gex_math.decode_rows([*good, b"{not json", b'["SPXW"]'])
    assert rows == [msgspec.structs.astuple(r) for r in HAND]
    assert rejected == {"undecodable": 2}
    rows, rejected = gex_math.decode_rows(good)
    assert (rows, rejected) == ([msgspec.structs.astuple(r) for r in HAND], {})


def test_settlement_times_and_time_floor() -> None:
    # 2026-03-20 is in EDT (UTC-4): PM 16:00 -> 20:00 UTC; AM monthly 09:30 -> 13:30 UTC
    assert gex_math.expiry_ns(FRI, "SPXW") == int(
        dt.datetime(2026, 3, 20, 20, 0, tzinfo=UTC).timestamp() * 1e9
    )
    assert gex_math.expiry_ns(FRI, "SPX") == int(
        dt.datetime(2026, 3, 20, 13, 30, tzinfo=UTC).timestamp() * 1e9
    )
    # 2026-01-16 is in EST (UTC-5)
    assert gex_math.expiry_ns("2026-01-16", "NDXP") == int(
        dt.datetime(2026, 1, 16, 21, 0, tzinfo=UTC).timestamp() * 1e9
    )
    settle = gex_math.expiry_ns(TODAY, "SPXW")
    assert gex_math.year_fraction(settle, NOW_NS, 300) == pytest.approx(5 * 3600 / (365 * 86400))
    assert gex_math.year_fraction(settle, settle + 10**12, 300) == 300 / (365 * 86400)
    # 22:00 New York on Monday is already Tuesday in UTC; 0DTE follows New York
    late = int(dt.datetime(2026, 3, 17, 2, 0, tzinfo=UTC).timestamp() * 1e9)
    assert gex_math.ny_date(late) == TODAY


def test_retime_matches_a_fresh_prepare() -> None:
    rows = [*HAND, row("SPX", FRI, "P", 6800, 0.001, 7)]
    chain = gex_math.prepare(rows, NOW_NS, snap_spot=SPOT)
    # Tuesday 01:00 New York: TODAY's contracts settled (dropped with their expiry), 0DTE is
    # now 2026-03-17 (none listed)
    later = int(dt.datetime(2026, 3, 17, 5, 0, tzinfo=UTC).timestamp()) * 10**9
    a = gex_math.retime(chain, later)
    b = gex_math.prepare(rows, later, snap_spot=SPOT, snap_ns=NOW_NS)
    assert a.today == b.today == "2026-03-17"
    assert a.expiries == b.expiries == [FRI]
    assert a.excluded == b.excluded == {"expired": 2}
    for name in ("t_years", "zero_dte", "strike", "oi", "exp_idx", "grp", "g_settle_ns", "gamma"):
        assert getattr(a, name).tolist() == getattr(b, name).tolist(), name
    assert not a.zero_dte.any()
    spxw = a.g_settle_ns.tolist().index(gex_math.expiry_ns(FRI, "SPXW"))
    assert a.g_t[spxw] == pytest.approx((3 * 86400 + 15 * 3600) / (365 * 86400))
    assert gex_math.compute(a, SPOT).items() == gex_math.compute(b, SPOT).items()


# --- independent Black-Scholes reference ---------------------------------------------------
def ref_gamma(s: float, k: float, t: float, vol: float, r: float, q: float) -> float:
    """Gamma written via d2 and the strike: K e^{-rT} n(d2) / (S^2 vol sqrt T)."""
    vst = vol * math.sqrt(t)
    d2 = (math.log(s / k) + (r - q - vol * vol / 2) * t) / vst
    density = math.exp(-d2 * d2 / 2) / math.sqrt(2 * math.pi)
    return k * math.exp(-r * t) * density / (s * s * vst)


def ref_call(s: float, k: float, t: float, vol: float, r: float, q: float) -> float:
    vst = vol * math.sqrt(t)
    d1 = (math.log(s / k) + (r - q + vol * vol / 2) * t) / vst

    def cdf(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    return s * math.exp(-q * t) * cdf(d1) - k * math.exp(-r * t) * cdf(d1 - vst)


def test_reference_gamma_matches_second_difference_of_price() -> None:
    for s, k, t, vol in ((6800, 6850, 0.02, 0.18), (6800, 6500, 0.3, 0.25), (100, 95, 1.0, 0.4)):
        h = s * 1e-4
        fd = (ref_call(s + h, k, t, vol, 0.04, 0.013) - 2 * ref_call(s, k, t, vol, 0.04, 0.013)
              + ref_call(s - h, k, t, vol, 0.04, 0.013)) / (h * h)  # fmt: skip
        assert ref_gamma(s, k, t, vol, 0.04, 0.013) == pytest.approx(fd, rel=1e-5)


def ref_t(expiry: str, root: str) -> float:
    hh, mm = (9, 30) if root == "SPX" else (16, 0)
    d = dt.date.fromisoformat(expiry)
    settle = dt.datetime(d.year, d.month, d.day, hh, mm, tzinfo=NY)
    return max((settle - NOW).total_seconds(), 300.0) / (365 * 86400)


def ref_net(rows: list[GexRow], s: float, r: float = 0.0, q: float = 0.0) -> tuple[float, float]:
    """(net, gross) dollar GEX per 1 % at hypothetical spot ``s``."""
    net = gross = 0.0
    for x in rows:
        assert x.oi is not None and x.iv is not None
        g = ref_gamma(s, x.strike, ref_t(x.expiry, x.root), x.iv, r, q)
        v = g * x.oi * 100 * s * s * 0.01
        net += v if x.right == "C" else -v
        gross += v
    return net, gross


def skewed_chain(seed: int, expiries: list[str], center: float = SPOT) -> list[GexRow]:
    """Calls concentrated above spot, puts below (a typical dealer book with a flip)."""
    rng = random.Random(seed)
    out = []
    for e in expiries:
        for root in ("SPXW", "SPX") if e == FRI else ("SPXW",):
            for k in range(int(center) - 400, int(center) + 401, 25):
                m = math.log(k / center)
                iv = 0.15 - 0.4 * m
                call_oi = rng.randint(50, 500) * (3 if k > center else 1)
                put_oi = rng.randint(50, 500) * (3 if k < center else 1)
                out.append(row(root, e, "C", k, 0.001, call_oi, iv))
                out.append(row(root, e, "P", k, 0.001, put_oi, iv))
    return out


def assert_is_zero_crossing(
    rows: list[GexRow], level: float, r: float = 0.0, q: float = 0.0
) -> None:
    net, gross = ref_net(rows, level, r, q)
    assert abs(net) <= 1e-3 * gross, (net, gross)
    below, _ = ref_net(rows, level - 0.5, r, q)
    above, _ = ref_net(rows, level + 0.5, r, q)
    assert below * above < 0, (below, above)


def ref_crossings(rows: list[GexRow], lo: float, hi: float, step: float) -> list[float]:
    pts = [lo + i * step for i in range(int((hi - lo) / step) + 1)]
    vals = [ref_net(rows, p)[0] for p in pts]
    return [pts[i] for i in range(len(pts) - 1) if vals[i] * vals[i + 1] < 0]


def test_zero_gamma_against_independent_black_scholes() -> None:
    rows = skewed_chain(1, [TODAY, "2026-03-17", FRI])
    res = build(rows)
    z = res.levels.zero_gamma
    assert z is not None and res.levels.zero_gamma_reason is None
    assert_is_zero_crossing(rows, z)
    # it is the crossing nearest to spot found by an independent 2-point sweep
    xs = ref_crossings(rows, SPOT * 0.85, SPOT * 1.15, 2.0)
    assert xs, "reference found no crossing"
    nearest = min(xs, key=lambda x: abs(x - SPOT))
    assert abs(nearest - z) <= 2.0
    assert res.levels.zero_gamma_crossings >= 1


def banded_chain() -> list[GexRow]:
    """Alternating bands of put and call open interest 150 points apart: net GEX changes
    sign three times within the search range (near 6675, 6825 and 6970)."""
    bands = ((6600, "P"), (6750, "C"), (6900, "P"), (7050, "C"))
    return [
        row("SPXW", FRI, right, k + dk, None, 3000, 0.12)
        for k, right in bands
        for dk in (-10, -5, 0, 5, 10)
    ]


@pytest.mark.parametrize("spot", [6700.0, 6810.0, 6960.0])
def test_zero_gamma_is_the_crossing_nearest_to_spot_among_several(spot: float) -> None:
    rows = banded_chain()
    res = build(rows, spot=spot)
    z = res.levels.zero_gamma
    assert z is not None and res.levels.zero_gamma_crossings == 3
    assert_is_zero_crossing(rows, z)
    xs = ref_crossings(rows, spot * 0.85, spot * 1.15, 2.0)
    assert len(xs) == 3, xs
    nearest = min(xs, key=lambda x: abs(x - spot))
    assert abs(nearest - z) <= 2.0, (z, xs)


def test_zero_gamma_with_rates_and_dividends() -> None:
    rows = skewed_chain(2, ["2026-03-17", FRI, "2026-04-17"])
    res = build(rows, rate=0.04, div_yield=0.013)
    z = res.levels.zero_gamma
    assert z is not None
    assert_is_zero_crossing(rows, z, 0.04, 0.013)


def test_zero_gamma_0dte_view_uses_only_0dte_contracts() -> None:
    today_rows = skewed_chain(3, [TODAY], center=6760)
    later_rows = skewed_chain(4, [FRI], center=6880)
    res = build(today_rows + later_rows)
    z0 = res.levels_0dte.zero_gamma
    assert z0 is not None
    assert_is_zero_crossing(today_rows, z0)
    z = res.levels.zero_gamma
    assert z is not None
    assert_is_zero_crossing(today_rows + later_rows, z)
    assert abs(z - z0) > 1.0


def test_no_crossing_reports_null_with_reason() -> None:
    calls_only = [r for r in skewed_chain(5, [FRI]) if r.right == "C"]
    res = build(calls_only)
    assert res.levels.zero_gamma is None
    assert res.levels.zero_gamma_reason is not None
    assert "positive" in res.levels.zero_gamma_reason
    assert res.levels.zero_gamma_crossings == 0
    assert res.levels_0dte.zero_gamma is None
    assert "no contracts expiring today" in (res.levels_0dte.zero_gamma_reason or "")
    no_iv = [row("SPXW", FRI, "C", 6800, 0.001, 10, iv=None)]
    lv = build(no_iv).levels
    assert lv.zero_gamma is None and "IV" in (lv.zero_gamma_reason or "")
    assert lv.call_wall == 6800


def test_spot_must_be_positive() -> None:
    chain = gex_math.prepare(HAND, NOW_NS)
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError):
            gex_math.compute(chain, bad)


def test_params_validation() -> None:
    with pytest.raises(ValueError):
        Params(grid_step_pct=0)
    with pytest.raises(ValueError):
        Params(grid_range_pct=1, grid_step_pct=2)
    with pytest.raises(ValueError):
        Params(min_t_s=0)


# --- invariants over random chains ---------------------------------------------------------
row_st = st.builds(
    row,
    st.sampled_from(["SPX", "SPXW"]),
    st.sampled_from([TODAY, "2026-03-17", FRI]),
    st.sampled_from(["C", "P"]),
    st.sampled_from([6700.0, 6750.0, 6800.0, 6802.5, 6850.0]),
    st.one_of(st.none(), st.floats(0, 0.01)),
    st.one_of(st.none(), st.floats(0, 1e5)),
    st.one_of(st.none(), st.floats(0.05, 1.5)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(row_st, max_size=40), st.randoms(use_true_random=False))
def test_invariants_sums_signs_and_order_independence(
    rows: list[GexRow], rnd: random.Random
) -> None:
    chain = gex_math.prepare(rows, NOW_NS, snap_spot=SPOT)
    res = gex_math.compute(chain, SPOT)
    items = res.items()
    assert sum(int(i["n"]) for i in items.values()) == chain.n
    with_oi = [
        r
        for r in rows
        if r.oi is not None
        and not math.isnan(r.oi)
        and gex_math.expiry_ns(r.expiry, r.root) > NOW_NS
    ]
    assert chain.n + chain.excluded.get("no_iv", 0) == len(with_oi)
    # provider gamma is used as given; a missing one is re-priced (finite, >= 0)
    n_given = sum(r.gamma is not None for r in with_oi)
    assert np.isfinite(chain.gamma).all() and (chain.gamma >= 0).all()
    assert int(chain.has_gamma.sum()) == n_given
    for it in items.values():
        assert it["calls"] >= 0 >= it["puts"]
        assert it["net"] == pytest.approx(it["calls"] + it["puts"], abs=1e-5)
        k = gex_math.strike_key(it["strike"])
        legacy_c = sum(m.get(k, 0.0) for m in res.legacy_calls.values())
        legacy_p = sum(m.get(k, 0.0) for m in res.legacy_puts.values())
        assert legacy_c == pytest.approx(it["calls"], rel=1e-9, abs=1e-5)
        assert legacy_p == pytest.approx(-it["puts"], rel=1e-9, abs=1e-5)
        at_k = chain.strike == it["strike"]
        expect_c = float((chain.gamma * chain.oi * 100)[at_k & chain.is_call].sum())
        assert it["calls"] == pytest.approx(expect_c, rel=1e-9, abs=1e-5)
        for f, v in it.items():
            assert not (isinstance(v, float) and v == 0 and math.copysign(1, v) < 0), f
    tot = res.totals()["all"]
    assert tot["calls"] == pytest.approx(sum(i["calls"] for i in items.values()), abs=1e-4)
    shuffled = list(rows)
    rnd.shuffle(shuffled)
    res2 = gex_math.compute(gex_math.prepare(shuffled, NOW_NS, snap_spot=SPOT), SPOT)
    assert res2.items().keys() == items.keys()
    for k, it in res2.items().items():
        for f, v in it.items():
            assert v == pytest.approx(items[k][f], rel=1e-9, abs=1e-5)
    if res.levels.call_wall is None:
        assert all(i["calls"] == 0 for i in items.values())
    else:
        wall = items[gex_math.strike_key(res.levels.call_wall)]["calls"]
        assert wall == max(i["calls"] for i in items.values())
    if res.levels.put_wall is not None:
        wall = items[gex_math.strike_key(res.levels.put_wall)]["puts"]
        assert wall == min(i["puts"] for i in items.values())


# --- whole-chain additions (issue 19) ---------------------------------------------------------
def bs_call(s: float, k: float, t: float, vol: float, b: float, q: float) -> float:
    """European call with carry b (forward s e^{bt}) and yield q (discount r = b + q)."""
    vst = vol * math.sqrt(t)
    d1 = (math.log(s / k) + (b + vol * vol / 2) * t) / vst

    def cdf(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    return s * math.exp(-q * t) * cdf(d1) - k * math.exp(-(b + q) * t) * cdf(d1 - vst)


def smile_chain(spot: float, t_rows: float, b: float, q: float, expiry: str) -> list[GexRow]:
    """Provider rows whose gamma and IV are consistent Black-Scholes at (spot, t_rows, b, q):
    a quadratic smile in log-moneyness, calls and puts, OI everywhere."""
    out = []
    for k in range(int(spot) - 300, int(spot) + 301, 10):
        m = math.log(k / (spot * math.exp(b * t_rows)))
        iv = 0.16 - 0.5 * m + 2.0 * m * m
        h = spot * 1e-4
        g = (
            bs_call(spot + h, k, t_rows, iv, b, q)
            - 2 * bs_call(spot, k, t_rows, iv, b, q)
            + bs_call(spot - h, k, t_rows, iv, b, q)
        ) / (h * h)
        for right in ("C", "P"):
            out.append(row("SPXW", expiry, right, float(k), round(g, 8), 100.0, round(iv, 6)))
    return out


def test_time_basis_is_backed_out_of_the_providers_gamma() -> None:
    # the provider priced FRI with T = 2.5 days (another clock) and carry 0.03, yield 0.01
    t_rows = 2.5 / 365
    rows = smile_chain(SPOT, t_rows, 0.03, 0.01, FRI)
    chain = gex_math.prepare(rows, NOW_NS, snap_spot=SPOT)
    assert chain.g_fit.tolist() == [True]
    assert chain.g_tau[0] == pytest.approx(t_rows, rel=1e-3)
    assert chain.g_b[0] == pytest.approx(0.03, abs=2e-3)
    assert chain.g_fit_err[0] < 1e-3
    clock = gex_math.prepare(rows, NOW_NS, Params(t_basis="clock"), snap_spot=SPOT)
    assert not clock.g_fit.any() and clock.g_tau[0] == pytest.approx(ref_t(FRI, "SPXW"))
    # no snapshot spot, or gammas that no Black-Scholes smile explains: the wall clock
    assert not gex_math.prepare(rows, NOW_NS).g_fit.any()
    noisy = [msgspec.structs.replace(r, gamma=0.001) for r in rows]
    assert not gex_math.prepare(noisy, NOW_NS, snap_spot=SPOT).g_fit.any()


def test_missing_ivs_follow_the_smile_inside_and_are_floored_beyond_the_wings() -> None:
    rows = smile_chain(SPOT, ref_t(FRI, "SPXW"), 0.0, 0.0, FRI)
    truth = {(r.strike, r.right): r.iv for r in rows}
    # drop the IV (and gamma, as the provider does) inside the smile and on both wings
    gone = {6600.0, 6610.0, 6800.0, 6990.0, 7000.0, 7090.0, 7100.0, 6500.0, 6510.0}
    cut = [msgspec.structs.replace(r, iv=None, gamma=None) if r.strike in gone else r for r in rows]
    chain = gex_math.prepare(cut, NOW_NS, snap_spot=SPOT)
    assert chain.n_imputed_iv == 2 * len(gone)
    for k, right in ((6800.0, "C"), (6800.0, "P"), (6990.0, "C"), (7000.0, "P")):
        i = int(np.flatnonzero((chain.strike == k) & (chain.is_call == (right == "C")))[0])
        assert chain.imputed[i]
        assert chain.iv[i] == pytest.approx(truth[(k, right)], abs=2e-3)  # linear inside
    # beyond the wings: extrapolated with the wing's slope, the left one rising as the smile
    # does, never below the lowest listed IV of the expiry
    listed = [r.iv for r in cut if r.iv is not None]
    for k in (6500.0, 6510.0, 7090.0, 7100.0):
        i = int(np.flatnonzero(chain.strike == k)[0])
        assert chain.iv[i] >= min(listed) - 1e-12
    lo = int(np.flatnonzero(chain.strike == 6500.0)[0])
    assert chain.iv[lo] > truth[(6520.0, "C")]  # rises to the left, like the smile
    # a missing gamma is re-priced from the imputed IV: close to the provider's own
    i = int(np.flatnonzero((chain.strike == 6800.0) & chain.is_call)[0])
    g_true = next(r.gamma for r in rows if r.strike == 6800.0 and r.right == "C")
    assert chain.gamma[i] == pytest.approx(g_true, rel=0.02)


def fd_delta(k: float, call: bool, s: float, vol: float, tau: float, h: float) -> float:
    """Central difference of the option price in spot (r = q = 0; puts by parity)."""

    def price(x: float) -> float:
        c = bs_call(x, k, tau, vol, 0.0, 0.0)
        return c if call else c - x + k

    return (price(s + h) - price(s - h)) / (2 * h)


def test_delta_vanna_charm_against_finite_differences() -> None:
    t = ref_t(FRI, "SPXW")
    rows = smile_chain(SPOT, t, 0.0, 0.0, FRI)
    chain = gex_math.prepare(rows, NOW_NS, Params(t_basis="clock", value_step_s=0), snap_spot=SPOT)
    h, dv, dt_ = SPOT * 1e-4, 1e-4, 60 / (365 * 86400)
    for i in (5, 30, 31, 50):
        k, iv, call = float(chain.strike[i]), float(chain.iv[i]), bool(chain.is_call[i])
        delta = fd_delta(k, call, SPOT, iv, t, h)
        assert chain.delta[i] == pytest.approx(delta, abs=1e-5)
        vanna = fd_delta(k, call, SPOT, iv + dv, t, h) - fd_delta(k, call, SPOT, iv - dv, t, h)
        assert chain.vanna[i] == pytest.approx(vanna / (2 * dv), rel=1e-3)
        charm = fd_delta(k, call, SPOT, iv, t + dt_, h) - fd_delta(k, call, SPOT, iv, t - dt_, h)
        assert chain.charm[i] == pytest.approx(-charm / (2 * dt_), rel=2e-3, abs=1e-3)
    res = gex_math.compute(chain, SPOT)
    items = res.items()
    # the same position sign as gamma: calls +, puts -
    want = sum((1 if chain.is_call[j] else -1) * chain.delta[j] * 100 * 100
               for j in range(chain.n) if chain.strike[j] == 6800)  # fmt: skip
    assert items["6800"]["delta"] == pytest.approx(want, rel=1e-4)
    assert items["6800"]["delta_usd"] == pytest.approx(want * SPOT, rel=1e-4)


def test_per_expiry_zero_gamma_profile_and_key_strikes() -> None:
    today_rows = skewed_chain(3, [TODAY], center=6760)
    later_rows = skewed_chain(4, [FRI], center=6880)
    res = build(today_rows + later_rows)
    table = res.expiry_table()
    assert list(table) == [TODAY, FRI]
    assert table[FRI]["settlement"] == "AM+PM" and table[TODAY]["settlement"] == "PM"
    z0 = table[TODAY]["zero_gamma"]
    assert z0 == res.levels_0dte.zero_gamma
    assert_is_zero_crossing(today_rows, z0)
    assert_is_zero_crossing(later_rows, table[FRI]["zero_gamma"])
    assert table[FRI]["net_usd"] + table[TODAY]["net_usd"] == pytest.approx(
        res.totals()["all"]["net_usd"], abs=0.05
    )
    # the profile is the net dollar GEX at every grid spot (checked against the reference)
    prof = res.profile_dict()
    assert len(prof["spot"]) == len(prof["all"]) == 2 * round(15 / 0.25) + 1
    for i in (0, 40, 60, 80, 120):
        net, _ = ref_net(today_rows + later_rows, prof["spot"][i])
        assert prof["all"][i] == pytest.approx(net, rel=1e-3, abs=1.0)
    # key strikes: the largest calls + |puts|, descending
    items = res.items()
    tot = {float(k): v["calls"] - v["puts"] for k, v in items.items()}
    assert res.levels.key_strikes == sorted(tot, key=lambda k: (-tot[k], k))[:5]
    assert res.levels.key_strikes[0] == res.levels.abs_gamma_strike


def test_published_numbers_never_carry_negative_zero() -> None:
    rows = [row("SPXW", FRI, "C", 6800, 0.0, 100), row("SPXW", FRI, "P", 6800, 0.0, 100)]
    res = build(rows)
    blob = msgspec.json.encode(
        [res.items(), res.totals(), res.expiry_table(), res.profile_dict(), res.legacy_puts]
    )
    assert b"-0.0" not in blob and b"-0," not in blob
