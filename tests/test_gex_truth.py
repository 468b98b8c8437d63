"""Our zero gamma (all expiries and 0DTE) against the simulated market's truth: its smile for
every contract, its clock and its rates (issue 19 acceptance: error <= 5 SPX points at
several times of day). See tests/gex_truth.py for how both sides are computed."""

from __future__ import annotations

import pytest

from tests.gex_truth import TIMES, at, simulate, truth_zero_gamma

TOLERANCE_POINTS = 5.0


@pytest.mark.parametrize("label", list(TIMES))
def test_zero_gamma_matches_the_simulated_market(label: str) -> None:
    hh, mm = TIMES[label]
    case = simulate(at(hh, mm), walk_s=1800)
    lv, lv0 = case.result.levels, case.result.levels_0dte
    z, z0 = truth_zero_gamma(case.truth), truth_zero_gamma(case.truth, zero_dte_only=True)
    assert z is not None and z0 is not None
    assert lv.zero_gamma is not None and lv0.zero_gamma is not None
    assert abs(lv.zero_gamma - z) <= TOLERANCE_POINTS, (label, lv.zero_gamma, z)
    assert abs(lv0.zero_gamma - z0) <= TOLERANCE_POINTS, (label, lv0.zero_gamma, z0)
    # the whole chain is in: every expiration of the simulated chain, nothing dropped
    listed = {c.expiry for c in case.truth.contracts if not c.settled}
    assert set(case.chain.expiries) == listed
    assert set(case.result.legacy_calls) == set(case.result.legacy_puts) == listed
    assert case.chain.n == sum(not c.settled for c in case.truth.contracts)
    assert case.chain.coverage()["imputed_iv"] > 0  # the provider omits some greeks
    # every settlement group's basis came out of the provider's gamma, and it is the truth's
    assert case.chain.g_fit.all()
    for c in case.truth.contracts[:: max(1, len(case.truth.contracts) // 50)]:
        if c.settled:
            continue
        g = case.chain.g_settle_ns.tolist().index(c.settle_ns)
        assert case.chain.g_t[g] == pytest.approx(c.t_years, rel=2e-3)
        assert case.chain.g_b[g] == pytest.approx(case.truth.r - case.truth.q, abs=2e-3)


def test_pre_market_basis_is_trading_time_from_the_open() -> None:
    """Before the open the simulator measures T from 09:30 (its convention); the wall clock
    would add the time until the open. The fitted basis follows the provider."""
    case = simulate(at(8, 0))
    today = case.chain.expiries.index("2026-03-17")
    g = int(case.chain.g_expiry.tolist().index(today))
    assert case.chain.g_fit[g]
    assert case.chain.g_t[g] * 365 * 24 == pytest.approx(6.5, rel=1e-3)  # 09:30 -> 16:00
