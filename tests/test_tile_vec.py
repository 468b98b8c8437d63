"""The builders' vectorised tile path (processors.tile_vec) is byte-equal to the per-tile
reference ``heatmap.staged_value`` over whole grids, whatever the leg values: missing,
stale, trades only, credits, zero debits, huge prices, negative or far-future timestamps
(the last two take the reference path inside the batch)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors import heatmap as hm
from processors import tile_vec as tv
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


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    strategy=st.sampled_from(hm.STRATEGIES),
    quotes=st.lists(leg_quote(), min_size=len(CIDS), max_size=len(CIDS)),
    dirty=st.lists(st.sampled_from(CIDS), min_size=1, max_size=8),
    max_age_s=st.sampled_from([1, 10, 60]),
)
def test_vectorised_batch_equals_the_reference_tile_by_tile(
    strategy: str,
    quotes: list[hm.LegQuote | None],
    dirty: list[str],
    max_age_s: int,
) -> None:
    grid = hm.build_grid("SPX", strategy, CIDS, (5.0, 10.0, 22.5), today=None, n_expiries=2)
    table = tv.TileTable(grid)
    qs = dict(zip(CIDS, quotes, strict=True))
    age = max_age_s * SEC
    for rows in (table.affected(dirty), table.all_rows()):
        legs = table.leg_contracts(rows)
        assert set(legs) == set(grid.leg_cids(grid.specs[t] for t in table.tile_ids(rows)))
        read = {c: qs[c] for c in legs}
        table.load(read)
        try:
            got = table.staged_values(rows, read, age)
        except OverflowError:
            got = None
        want = [reference(grid.specs[t], read, age) for t in table.tile_ids(rows)]
        if got is None:
            assert b"overflow" in want
        else:
            assert got == want
    assert set(table.tile_ids(table.affected(dirty))) == set(grid.affected(dirty))


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
