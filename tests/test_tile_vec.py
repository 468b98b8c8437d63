"""The builders' vectorised tile path (processors.heatmap.tile_vec) is byte-equal to the per-tile
reference ``heatmap.staged_value`` over whole grids, whatever the leg values: missing,
stale, trades only, credits, zero debits, huge prices, negative or far-future timestamps
(the last two take the reference path inside the batch)."""

from __future__ import annotations

import datetime as dt

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.heatmap import grid as hm
from processors.heatmap import tile_vec as tv
from schemas import ticker

NOW = 1_764_000_000_000_000_000
SEC = 1_000_000_000
EXPS = ["2026-12-01", "2026-12-02"]
STRIKES = [5980.0 + 5 * i for i in range(9)] + [6027.5]
CIDS = [
    ticker.encode("SPXW", dt.date.fromisoformat(e), r, k)
    for e in EXPS
    for r in "CP"
    for k in STRIKES
]

_px = st.one_of(
    st.none(),
    st.floats(-5, 300, allow_nan=False).map(lambda x: round(x, 2)),
    st.sampled_from([0.0, -0.0, 1e-7, 12345678.125, 1e250]),
)
_ts = st.one_of(
    st.none(),
    st.integers(0, 120 * SEC).map(lambda x: NOW + x),
    st.sampled_from([0, -5, 2**62, 2**70]),
)


@st.composite
def leg_quote(draw: st.DrawFn) -> hm.LegQuote | None:
    if draw(st.integers(0, 11)) == 0:
        return None
    bid, ask, last = draw(_px), draw(_px), draw(_px)
    mid = draw(st.one_of(st.none(), st.just((bid + ask) / 2 if bid and ask else None)))
    qts, tts = draw(_ts), draw(_ts)
    ts = draw(st.one_of(st.just(max(qts or 0, tts or 0)), _ts.map(lambda x: x or 0)))
    src = draw(st.sampled_from(["ws", "chain"]))
    rx = draw(_ts)  # when a chain snapshot last confirmed the quote
    return hm.LegQuote(bid, ask, mid, qts, last, tts, ts, src, rx)


_cents = st.integers(0, 6000).map(lambda k: k * 5 / 100)  # 0.00 .. 300.00 in 0.05 steps
_secs = st.integers(0, 90).map(lambda s: NOW - s * SEC)  # whole seconds: age == max_age is common


@st.composite
def typical_quote(draw: st.DrawFn) -> hm.LegQuote | None:
    """What a live chain holds: two-sided quotes (sometimes one-sided, crossed or bid 0),
    trades or none, timestamps of the last 90 s, every value inside the arrays' range."""
    if draw(st.integers(0, 19)) == 0:
        return None
    bid: float | None = draw(_cents)
    ask: float | None = round(bid + draw(st.integers(-2, 40)) * 0.05, 2)  # type: ignore[operator]
    side = draw(st.integers(0, 9))
    if side == 0:
        bid = ask = None  # no quote at all
    elif side == 1:
        ask = None
    mid = (bid + ask) / 2 if bid is not None and ask is not None else None
    qts = None if bid is None and ask is None else draw(_secs)
    rx = draw(st.one_of(st.none(), _secs)) if qts is not None else None
    last, tts = (None, None) if draw(st.booleans()) else (draw(_cents), draw(_secs))
    ts = max(qts or 0, tts or 0)
    src = draw(st.sampled_from(["ws", "chain"]))
    return hm.LegQuote(bid, ask, mid, qts, last, tts, ts, src, rx)


def reference(spec: hm.TileSpec, quotes: dict[str, hm.LegQuote | None], age: int) -> bytes:
    try:
        return hm.staged_value(spec, quotes, age)
    except OverflowError:  # a value beyond any price: the reference itself refuses it
        return b"overflow"


@pytest.fixture(autouse=True)
def numpy_path_for_every_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small batches take the per-tile path in production (SMALL_BATCH); here every batch
    goes through the numpy path, which is what is under test."""
    monkeypatch.setattr(tv, "SMALL_BATCH", 0)


@st.composite
def chain_quotes(draw: st.DrawFn) -> tuple[bool, list[hm.LegQuote | None]]:
    """(typical, one quote per contract): four batches in five are typical chains (the
    vectorised path must take them); the rest mix in any value (exotic ones send the batch
    through the reference path)."""
    typical = draw(st.integers(0, 4)) > 0
    leg = typical_quote() if typical else st.one_of(typical_quote(), leg_quote())
    return typical, draw(st.lists(leg, min_size=len(CIDS), max_size=len(CIDS)))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    strategy=st.sampled_from(hm.STRATEGIES),
    drawn=chain_quotes(),
    dirty=st.lists(st.sampled_from(CIDS), min_size=1, max_size=8),
    max_age_s=st.sampled_from([1, 10, 60]),
)
def test_vectorised_batch_equals_the_reference_tile_by_tile(
    strategy: str,
    drawn: tuple[bool, list[hm.LegQuote | None]],
    dirty: list[str],
    max_age_s: int,
) -> None:
    typical, quotes = drawn
    grid = hm.build_grid("SPX", strategy, CIDS, (5.0, 10.0, 22.5), today=None, n_expiries=2)
    table = tv.TileTable(grid)
    passes = tv.TileTable(grid, compute_rows=7)  # a batch of more tiles goes in passes
    qs = dict(zip(CIDS, quotes, strict=True))
    age = max_age_s * SEC
    for rows in (table.affected(dirty), table.all_rows()):
        legs = table.leg_contracts(rows)
        assert set(legs) == set(grid.leg_cids(grid.specs[t] for t in table.tile_ids(rows)))
        read = {c: qs[c] for c in legs}
        table.load(read)
        passes.load(read)
        try:
            got, key = table.staged_values_keyed(rows, read, age)
            got_p, key_p = passes.staged_values_keyed(rows, read, age)
        except OverflowError:
            got, key, got_p, key_p = None, None, None, None
        want = [reference(grid.specs[t], read, age) for t in table.tile_ids(rows)]
        if typical:
            assert key is not None, "a typical batch fell back to the per-tile path"
            assert key_p is not None, "a typical batch in passes fell back"
        if got is None:
            assert b"overflow" in want
        else:
            assert got == got_p == want
        if key is not None and key_p is not None:
            assert key_p.shape == key.shape and (key_p == key).all()
    assert set(table.tile_ids(table.affected(dirty))) == set(grid.affected(dirty))


@pytest.mark.parametrize("strategy", hm.STRATEGIES)
@pytest.mark.parametrize("via_rx", [False, True], ids=["quote_ts", "quote_rx"])
def test_a_quote_exactly_max_age_old_is_fresh_and_one_ns_older_is_stale(
    strategy: str, via_rx: bool
) -> None:
    """The freshness edge apart from the property test: every leg received exactly
    ``max_age`` before the tile's as-of time prices at its mid, unflagged; one nanosecond
    more and it is a stale mid. Vectorised and reference agree on both sides."""
    max_age = 10 * SEC
    grid = hm.build_grid("SPX", strategy, CIDS, (5.0, 10.0, 22.5), today=None, n_expiries=2)
    table = tv.TileTable(grid)
    rows = table.all_rows()
    for extra_ns, src, stale in ((0, b'"mid"', b"false"), (1, b'"mid_stale"', b"true")):
        received = NOW - max_age - extra_ns
        qts = NOW - 100 * SEC if via_rx else received
        rx = received if via_rx else None
        qs: dict[str, hm.LegQuote | None] = {
            c: hm.LegQuote(1.0 + i, 1.2 + i, 1.1 + i, qts, None, None, NOW, "chain", rx)
            for i, c in enumerate(CIDS)
        }
        table.load(qs)
        got, key = table.staged_values_keyed(rows, qs, max_age)
        assert key is not None  # the vectorised path ran
        assert got == [reference(grid.specs[t], qs, max_age) for t in table.tile_ids(rows)]
        for v in got:
            legs = msgspec.json.decode(v.partition(b":")[2])["legs"]
            assert {leg[2] for leg in legs} == {src.strip(b'"').decode()}
            assert b'"stale":' + stale in v


def test_table_rows_follow_the_grid() -> None:
    grid = hm.build_grid("SPX", "butterfly", CIDS, (5.0, 10.0), today=None, n_expiries=2)
    table = tv.TileTable(grid)
    assert table.tile_ids(table.all_rows()) == list(grid.specs)
    assert len(table.affected(["O:NOPE"])) == 0
    rows = table.affected([CIDS[3]])
    assert np.all(np.diff(rows) > 0)  # sorted, unique
    assert set(table.tile_ids(rows)) == set(grid.affected([CIDS[3]]))


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    strategy=st.sampled_from(hm.STRATEGIES),
    first=st.lists(leg_quote(), min_size=len(CIDS), max_size=len(CIDS)),
    second=st.lists(leg_quote(), min_size=len(CIDS), max_size=len(CIDS)),
    keep=st.lists(st.booleans(), min_size=len(CIDS), max_size=len(CIDS)),
)
def test_view_keys_are_equal_exactly_when_published_views_are(
    strategy: str,
    first: list[hm.LegQuote | None],
    second: list[hm.LegQuote | None],
    keep: list[bool],
) -> None:
    """The builder announces a tile only when its view key changed: keys must be equal
    exactly when the published views (staging value minus the seq) are byte-equal."""
    grid = hm.build_grid("SPX", strategy, CIDS, (5.0, 10.0, 22.5), today=None, n_expiries=2)
    table = tv.TileTable(grid)
    rows = table.all_rows()
    a = dict(zip(CIDS, first, strict=True))
    b = {c: (a[c] if k else q) for c, k, q in zip(CIDS, keep, second, strict=True)}
    views, keys_ = [], []
    for qs in (a, b):
        table.load(qs)
        vals, key = table.staged_values_keyed(rows, qs, 10 * SEC)
        if key is None:
            return  # the batch took the reference path (exotic values): nothing keyed
        views.append([v.partition(b":")[2] for v in vals])
        keys_.append(key)
    same_key = (keys_[0] == keys_[1]).all(axis=1).tolist()
    same_view = [x == y for x, y in zip(views[0], views[1], strict=True)]
    assert same_key == same_view
    table.announced(rows, keys_[0])
    assert table.view_changed(rows, keys_[1]).tolist() == [not s for s in same_view]
    table.forget_announced()
    assert table.view_changed(rows, keys_[1]).all()
