"""Massive option ticker codec."""

from __future__ import annotations

import contextlib
import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import ticker


@pytest.mark.parametrize(
    ("raw", "root", "expiry", "right", "strike", "symbol"),
    [
        ("O:SPXW260107C06850000", "SPXW", dt.date(2026, 1, 7), "C", 6850.0, "SPX"),
        ("O:SPX261218P05000000", "SPX", dt.date(2026, 12, 18), "P", 5000.0, "SPX"),
        ("O:NDXP260417C26500000", "NDXP", dt.date(2026, 4, 17), "C", 26500.0, "NDX"),
        ("O:EVRI240119C00002500", "EVRI", dt.date(2024, 1, 19), "C", 2.5, "EVRI"),
        ("O:AAPL230616C00150000", "AAPL", dt.date(2023, 6, 16), "C", 150.0, "AAPL"),
    ],
)
def test_parse_known_tickers(
    raw: str, root: str, expiry: dt.date, right: str, strike: float, symbol: str
) -> None:
    t = ticker.parse(raw)
    assert (t.root, t.expiry, t.right, t.strike, t.symbol) == (root, expiry, right, strike, symbol)
    assert t.encode() == raw


@pytest.mark.parametrize(
    "bad",
    [
        "SPXW260107C06850000",  # no O: prefix
        "O:SPXW260107X06850000",  # not C/P
        "O:SPXW261307C06850000",  # month 13
        "O:SPXW26010AC06850000",  # letters in date
        "O:C06850000",  # too short
        "O:spxw260107C06850000",  # lower-case root
        "O:SPXW260107C0685000",  # 7 strike digits
        "",
    ],
)
def test_parse_rejects_with_reason(bad: str) -> None:
    with pytest.raises(ticker.TickerError):
        ticker.parse(bad)


@given(
    root=st.sampled_from(["SPX", "SPXW", "NDX", "NDXP", "A", "ABCDEF"]),
    expiry=st.dates(dt.date(2000, 1, 1), dt.date(2099, 12, 31)),
    right=st.sampled_from(["C", "P"]),
    milli=st.integers(0, 99_999_999),
)
def test_round_trip(root: str, expiry: dt.date, right: str, milli: int) -> None:
    strike = milli / 1000
    raw = ticker.encode(root, expiry, right, strike)
    assert len(raw) == 2 + len(root) + 15
    t = ticker.parse(raw)
    assert (t.root, t.expiry, t.right, t.strike) == (root, expiry, right, strike)


@given(st.text(max_size=30))
def test_parse_never_raises_anything_but_ticker_error(s: str) -> None:
    with contextlib.suppress(ticker.TickerError):
        ticker.parse(s)


def test_encode_rejects_unrepresentable_strike() -> None:
    with pytest.raises(ticker.TickerError):
        ticker.encode("SPX", dt.date(2026, 1, 2), "C", 0.0001)
    with pytest.raises(ticker.TickerError):
        ticker.encode("SPX", dt.date(2026, 1, 2), "C", 100_000.0)
