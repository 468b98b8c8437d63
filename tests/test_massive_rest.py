"""Property tests for schemas/massive_rest.py: good items round-trip exactly; any malformed
input is a counted rejection with a reason (or RestDecodeError for a broken page), never an
unhandled exception."""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import massive_rest as mr
from schemas import ticker

TS = st.integers(min_value=mr.MIN_TS_NS, max_value=mr.MAX_TS_NS)
PRICE = st.floats(min_value=0, max_value=5000, allow_nan=False)
GREEK = st.floats(min_value=-50, max_value=50, allow_nan=False)


@st.composite
def contract_keys(draw: st.DrawFn) -> tuple[str, dt.date, str, float]:
    root = draw(st.sampled_from(["SPX", "SPXW", "NDX", "NDXP"]))
    expiry = draw(st.dates(min_value=dt.date(2024, 1, 1), max_value=dt.date(2030, 12, 31)))
    right = draw(st.sampled_from(["C", "P"]))
    strike = draw(st.integers(min_value=1, max_value=99_999_995)) / 1000
    return root, expiry, right, strike


@st.composite
def good_items(draw: st.DrawFn) -> dict[str, Any]:
    root, expiry, right, strike = draw(contract_keys())
    item: dict[str, Any] = {
        "details": {
            "contract_type": {"C": "call", "P": "put"}[right],
            "exercise_style": "european",
            "expiration_date": expiry.isoformat(),
            "shares_per_contract": 100,
            "strike_price": strike,
            "ticker": ticker.encode(root, expiry, right, strike),
        },
        "break_even_price": draw(PRICE),
        "open_interest": draw(st.integers(min_value=0, max_value=10**7)),
        "day": {"volume": draw(st.integers(min_value=0, max_value=10**7))},
        "underlying_asset": {"ticker": "I:SPX", "value": 6000.5, "last_updated": draw(TS)},
    }
    if draw(st.booleans()):
        bid = draw(PRICE)
        item["last_quote"] = {
            "bid": bid,
            "ask": bid + draw(PRICE),
            "bid_size": 1,
            "ask_size": 2,
            "midpoint": bid,
            "last_updated": draw(TS),
            "timeframe": "REAL-TIME",
        }
    if draw(st.booleans()):
        item["last_trade"] = {
            "price": draw(PRICE),
            "size": draw(st.integers(min_value=1, max_value=1000)),
            "sip_timestamp": draw(TS),
            "exchange": 302,
            "conditions": [209],
        }
    if draw(st.booleans()):
        item["greeks"] = {k: draw(GREEK) for k in ("delta", "gamma", "theta", "vega")}
        item["implied_volatility"] = draw(st.floats(min_value=0, max_value=20))
    return item


@given(st.lists(good_items(), max_size=8))
@settings(max_examples=150, deadline=None)
def test_good_items_convert_exactly(items: list[dict[str, Any]]) -> None:
    page = mr.parse_chain_page(json.dumps({"status": "OK", "results": items, "next_url": "x"}))
    assert page.rejections == []
    assert page.next_url == "x"
    assert len(page.contracts) == len(items)
    for raw, c in zip(items, page.contracts, strict=True):
        d = raw["details"]
        assert (c.cid, c.expiry, c.strike) == (
            d["ticker"],
            d["expiration_date"],
            d["strike_price"],
        )
        q, t, g = raw.get("last_quote"), raw.get("last_trade"), raw.get("greeks")
        assert c.bid == (q["bid"] if q else None) and c.ask == (q["ask"] if q else None)
        assert c.quote_ts_ns == (q["last_updated"] if q else None)
        assert c.last == (t["price"] if t else None)
        assert c.trade_ts_ns == (t["sip_timestamp"] if t else None)
        assert c.gamma == (g["gamma"] if g else None)
        assert c.oi == raw["open_interest"] and c.volume == raw["day"]["volume"]


OPTIONAL_PATHS = [
    ("greeks",),
    ("implied_volatility",),
    ("last_trade",),
    ("last_quote",),
    ("fmv",),
    ("day",),
    ("open_interest",),
    ("break_even_price",),
    ("underlying_asset",),
    ("details", "expiration_date"),
    ("details", "strike_price"),
    ("details", "contract_type"),
    ("last_quote", "last_updated"),
    ("last_trade", "sip_timestamp"),
]


@given(good_items(), st.sets(st.sampled_from(OPTIONAL_PATHS)))
@settings(max_examples=150, deadline=None)
def test_missing_optional_fields_are_none(item: dict[str, Any], drop: set[tuple[str, ...]]) -> None:
    for path in sorted(drop, key=len, reverse=True):
        obj = item
        for k in path[:-1]:
            obj = obj.get(k) or {}
        obj.pop(path[-1], None)
    (c,) = mr.parse_chain_page(json.dumps({"results": [item]})).contracts
    assert c.cid == item["details"]["ticker"]
    if ("greeks",) in drop or "greeks" not in item:
        assert (c.delta, c.gamma, c.theta, c.vega) == (None, None, None, None)
    if ("last_quote",) in drop or "last_quote" not in item:
        assert (c.bid, c.ask, c.quote_ts_ns) == (None, None, None)


JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(good_items(), st.data())
@settings(max_examples=300, deadline=None)
def test_wrong_types_are_rejections(item: dict[str, Any], data: st.DataObject) -> None:
    """Replace one field (anywhere) by an arbitrary JSON value: the item either still
    converts or is rejected with a known reason; other items of the page are unaffected."""
    paths: list[tuple[str, ...]] = []
    for k, v in item.items():
        paths.append((k,))
        if isinstance(v, dict):
            paths.extend((k, kk) for kk in v)
    path = data.draw(st.sampled_from(paths))
    obj = item
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = data.draw(JSONISH)
    good = data.draw(good_items())
    page = mr.parse_chain_page(json.dumps({"results": [good, item, good]}))
    assert len(page.contracts) + len(page.rejections) == 3
    assert page.contracts[0].cid == good["details"]["ticker"] == page.contracts[-1].cid
    for r in page.rejections:
        assert r.reason in mr.REASONS and r.detail


@given(st.lists(JSONISH, max_size=5))
@settings(max_examples=200, deadline=None)
def test_results_of_arbitrary_values(results: list[Any]) -> None:
    page = mr.parse_chain_page(json.dumps({"results": results}))
    assert len(page.contracts) + len(page.rejections) == len(results)
    idx = mr.parse_index_snapshot(json.dumps({"results": results}))
    assert len(idx.spots) + len(idx.rejections) == len(results)


@given(JSONISH)
@settings(deadline=None)
def test_arbitrary_bodies_never_raise_unexpected(body: Any) -> None:
    for fn in (mr.parse_chain_page, mr.parse_contract_snapshot, mr.parse_index_snapshot):
        try:
            fn(json.dumps(body))
        except mr.RestDecodeError as exc:
            assert str(exc)  # a clear page-level reason; nothing else may escape


@given(st.lists(good_items(), min_size=1, max_size=3), st.data())
@settings(max_examples=150, deadline=None)
def test_truncated_json_is_a_clear_page_error(
    items: list[dict[str, Any]], data: st.DataObject
) -> None:
    body = json.dumps({"status": "OK", "results": items}).encode()
    cut = data.draw(st.integers(min_value=0, max_value=len(body) - 1))
    with pytest.raises(mr.RestDecodeError, match=r"malformed|truncated|Input data"):
        mr.parse_chain_page(body[:cut])


@given(good_items(), st.sampled_from(["1e400", "-1e400", "1e300", "-5"]))
@settings(max_examples=100, deadline=None)
def test_huge_or_negative_prices_rejected(item: dict[str, Any], lit: str) -> None:
    item["last_trade"] = {"price": 1.0, "size": 1, "sip_timestamp": 1_700_000_000_000_000_000}
    raw = json.dumps({"results": [item]}).replace('"price": 1.0', f'"price": {lit}')
    page = mr.parse_chain_page(raw)
    assert page.contracts == []
    (rej,) = page.rejections
    expected = {"1e400": mr.R_DECODE, "-1e400": mr.R_DECODE, "1e300": mr.R_NON_FINITE}
    assert rej.reason == expected.get(lit, mr.R_NEGATIVE)


@given(good_items(), st.sampled_from([math.nan, math.inf, -math.inf, 1e12]))
@settings(deadline=None)
def test_non_finite_values_in_structs_rejected(item: dict[str, Any], bad: float) -> None:
    decoded = mr.decode_item(json.dumps(item).encode())
    broken = msgspec.structs.replace(decoded, implied_volatility=bad)
    with pytest.raises(mr.ItemRejected) as ei:
        mr.to_contract(broken)
    assert ei.value.reason == mr.R_NON_FINITE


@given(good_items(), st.integers(min_value=0, max_value=mr.MIN_TS_NS // 1000))
@settings(deadline=None)
def test_ms_or_seconds_timestamps_rejected(item: dict[str, Any], ts: int) -> None:
    """A timestamp in ms (or s) where ns is documented is a unit error, not data."""
    item["last_trade"] = {"price": 1.0, "size": 1, "sip_timestamp": ts}
    (rej,) = mr.parse_chain_page(json.dumps({"results": [item]})).rejections
    assert rej.reason == mr.R_BAD_TS


def test_details_must_agree_with_ticker() -> None:
    exp = dt.date(2026, 1, 7)
    base = {
        "details": {
            "ticker": ticker.encode("SPXW", exp, "C", 6850),
            "expiration_date": "2026-01-07",
            "strike_price": 6850,
            "contract_type": "call",
        }
    }
    assert len(mr.parse_chain_page(json.dumps({"results": [base]})).contracts) == 1
    for field, value, reason in [
        ("expiration_date", "2026-01-08", mr.R_MISMATCH),
        ("strike_price", 6855, mr.R_MISMATCH),
        ("contract_type", "put", mr.R_MISMATCH),
        ("contract_type", "other", mr.R_BAD_TYPE),
        ("ticker", "O:SPXW260107X06850000", mr.R_BAD_TICKER),
        ("ticker", None, mr.R_NO_TICKER),
        ("ticker", 123, mr.R_DECODE),
    ]:
        item = json.loads(json.dumps(base))
        item["details"][field] = value
        (rej,) = mr.parse_chain_page(json.dumps({"results": [item]})).rejections
        assert rej.reason == reason, (field, value)


def test_envelope_errors_are_reported() -> None:
    page = mr.parse_chain_page(b'{"status":"ERROR","request_id":"x","error":"Unknown API Key"}')
    assert page.error == "Unknown API Key" and page.contracts == []
    page = mr.parse_chain_page(b'{"status":"NOT_AUTHORIZED","message":"not entitled"}')
    assert page.error == "not entitled"
    for body in (b"", b"<html>502</html>", b"[]", b'"OK"', b'{"results": {}}'):
        with pytest.raises(mr.RestDecodeError):
            mr.parse_chain_page(body)


@given(
    st.sampled_from(["I:SPX", "SPX", "I:NDX", "NDX"]),
    st.floats(min_value=1, max_value=1e5),
    st.one_of(st.none(), TS),
)
@settings(deadline=None)
def test_index_items(tkr: str, value: float, ts: int | None) -> None:
    item: dict[str, Any] = {"ticker": tkr, "value": value}
    if ts is not None:
        item["last_updated"] = ts
    (spot,) = mr.parse_index_snapshot(json.dumps({"results": [item]})).spots
    assert spot == mr.IndexSpot(tkr.removeprefix("I:"), value, ts, None)
