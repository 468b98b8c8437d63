"""Issue 19 acceptance on a live simulator run with default settings (small scale;
bench/tile_quality.py runs it longer and prints the figures): see tests/tile_quality.py."""

from __future__ import annotations

import pytest

from tests.tile_quality import run, summary

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
async def test_live_run_tiles_are_tradable_ranked_and_bounds_executable() -> None:
    report = await run(15.0)
    print("\n".join(summary(report)))
    assert report.ws_applied > 0  # the WS path ran, not only chain snapshots
    for strategy in ("vertical", "butterfly"):
        s = report.by_strategy[strategy]
        assert s.tiles > 1000, strategy
        assert s.with_fields == s.tiles, strategy  # every tile: debit_natural and tradable
        assert 0 < s.tradable < s.tiles, strategy
        assert s.convex_99 > 0 and s.convex_99_untradable == 0, strategy
        assert s.bound <= 0.005 * s.tiles, strategy  # executable arbitrage flags
        assert s.negative_zero == 0 and s.long_decimals == 0, strategy
    single = report.by_strategy["single"]
    assert single.with_fields == single.tiles and single.negative_zero == 0
    # default settings: GEX over the whole chain, every expiration of the simulated SPX named
    g = report.gex["SPX"]
    assert g.scope == "full" and g.model == g.listed and g.legacy_calls == g.listed
    assert len(g.listed) > 20 and g.zero_gamma is not None
