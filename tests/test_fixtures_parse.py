"""The provider fixtures (tests/fixtures/massive) are of the documented shapes, and every
chain page, contract snapshot, index snapshot and WS frame among them parses into our schemas.

The fixtures are written by this project in the shapes the provider documents (REST chain
snapshot pages with ``next_url``, a single-contract snapshot, the indices snapshot, WS frames
of every event type and status). ``DOCUMENTED`` below restates the documented fields: each
fixture is checked against it first, so a fixture cannot drift into a shape the provider does
not send. Expected values are read from the fixture JSON itself (independently, with the
stdlib json module) and compared with what the msgspec schemas produce; ns/ms handling is
checked by converting concrete timestamps to calendar dates.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from processors.ingest.ws_ingest import KNOWN_STATUSES
from schemas import massive_rest as mr
from schemas.massive import (
    Aggregate,
    FairMarketValue,
    IndexValue,
    MinuteAggregate,
    Quote,
    Status,
    Trade,
    decode_frame,
    ms_to_ns,
)

FIX = Path(__file__).resolve().parent / "fixtures" / "massive"
CHAIN_PAGES = ["rest/chain_spx_page1.json", "rest/chain_spx_page2.json"]
FILES = {
    *CHAIN_PAGES,
    "rest/chain_spy_delayed.json",
    "rest/contract_spxw.json",
    "rest/indices_snapshot.json",
    "ws/options.json",
    "ws/indices.json",
    "README.md",
}

# What the provider documents (OpenAPI/AsyncAPI specs), as facts: field -> JSON type.
NUM = (int, float)
DAY_FIELDS = (
    "open",
    "high",
    "low",
    "close",
    "previous_close",
    "volume",
    "vwap",
    "change",
    "change_percent",
)
DOCUMENTED: dict[str, dict[str, Any]] = {
    "envelope": {"required": {"status": str, "request_id": str}},
    "item": {
        "required": {
            "day": dict,
            "last_quote": dict,
            "underlying_asset": dict,
            "details": dict,
            "break_even_price": NUM,
            "open_interest": NUM,
        },
        "optional": {"greeks": dict, "implied_volatility": NUM, "last_trade": dict, "fmv": NUM},
    },
    "details": {
        "required": {
            "contract_type": str,
            "exercise_style": str,
            "expiration_date": str,
            "shares_per_contract": NUM,
            "strike_price": NUM,
            "ticker": str,
        },
        "optional": {},
    },
    "greeks": {"required": {k: NUM for k in ("delta", "gamma", "theta", "vega")}, "optional": {}},
    "last_quote": {
        "required": {k: NUM for k in ("ask", "bid", "ask_size", "bid_size", "midpoint")},
        "optional": {
            "ask_exchange": int,
            "bid_exchange": int,
            "last_updated": int,
            "timeframe": str,
        },
    },
    "last_trade": {
        "required": {"price": NUM, "size": int, "exchange": int, "sip_timestamp": int},
        "optional": {"conditions": list, "timeframe": str},
    },
    "day": {  # may be partial or empty for an untraded contract
        "required": {},
        "optional": {**dict.fromkeys(DAY_FIELDS, NUM), "last_updated": int},
    },
    "underlying_asset": {
        "required": {"ticker": str},
        "optional": {
            "change_to_break_even": NUM,
            "price": NUM,
            "value": NUM,
            "last_updated": int,
            "timeframe": str,
        },
    },
    "index": {
        "required": {"ticker": str},
        "optional": {
            "name": str,
            "type": str,
            "value": NUM,
            "market_status": str,
            "timeframe": str,
            "last_updated": int,
            "session": dict,
            "error": str,
            "message": str,
        },
    },
}
ENUMS = {
    "contract_type": {"put", "call", "other"},
    "exercise_style": {"american", "european", "bermudan"},
    "timeframe": {"DELAYED", "REAL-TIME"},
    "index_error": {"NOT_FOUND", "NOT_ENTITLED"},
}
# WS: every field of each event is present in the spec's examples.
WS_FIELDS = {
    "options": {
        "T": {"ev", "sym", "x", "p", "s", "c", "t", "q"},
        "Q": {"ev", "sym", "bx", "ax", "bp", "ap", "bs", "as", "t", "q"},
        "A": {"ev", "sym", "v", "av", "op", "vw", "o", "c", "h", "l", "a", "z", "s", "e"},
        "AM": {"ev", "sym", "v", "av", "op", "vw", "o", "c", "h", "l", "a", "z", "s", "e"},
        "FMV": {"ev", "fmv", "sym", "t"},
        "status": {"ev", "status", "message"},
    },
    "indices": {
        "V": {"ev", "val", "T", "t"},
        "A": {"ev", "sym", "op", "o", "c", "h", "l", "s", "e"},
        "AM": {"ev", "sym", "op", "o", "c", "h", "l", "s", "e"},
        "status": {"ev", "status", "message"},
    },
}
WS_STATUSES = {
    "connected",
    "auth_success",
    "auth_timeout",
    "auth_failed",
    "success",
    "auth_required",
    "error",
    "max_connections",
    "force_disconnect",
    "slow_consumer",
}
WS_TYPE = {
    "T": Trade,
    "Q": Quote,
    "V": IndexValue,
    "A": Aggregate,
    "AM": MinuteAggregate,
    "FMV": FairMarketValue,
    "status": Status,
}


def load(rel: str) -> Any:
    return json.loads((FIX / rel).read_text())


def utc_date(ns: int) -> dt.date:
    return dt.datetime.fromtimestamp(ns / 1e9, tz=dt.UTC).date()


def conforms(obj: dict[str, Any], kind: str) -> None:
    """``obj`` has the documented required fields, and only documented fields, of the
    documented JSON types."""
    spec = DOCUMENTED[kind]
    fields = {**spec["required"], **spec.get("optional", {})}
    assert set(spec["required"]) <= set(obj), (kind, set(spec["required"]) - set(obj))
    assert set(obj) <= set(fields), (kind, set(obj) - set(fields))
    for k, v in obj.items():
        assert isinstance(v, fields[k]) and not isinstance(v, bool), (kind, k, v)


def conforms_item(item: dict[str, Any]) -> None:
    conforms(item, "item")
    for part in ("details", "last_quote", "day", "underlying_asset", "greeks", "last_trade"):
        if part in item:
            conforms(item[part], part)
    d = item["details"]
    assert d["contract_type"] in ENUMS["contract_type"]
    assert d["exercise_style"] in ENUMS["exercise_style"]
    dt.date.fromisoformat(d["expiration_date"])
    for part in ("last_quote", "last_trade", "underlying_asset"):
        if "timeframe" in item.get(part, {}):
            assert item[part]["timeframe"] in ENUMS["timeframe"]
    if d["ticker"].startswith(("O:SPX", "O:NDX")):  # index options: value, european
        assert "value" in item["underlying_asset"] and d["exercise_style"] == "european"


# --- the fixtures themselves -------------------------------------------------------------
def test_every_fixture_is_covered() -> None:
    """A new fixture file forces a decision: check it here."""
    found = {str(p.relative_to(FIX)) for p in FIX.rglob("*") if p.is_file()}
    assert found == FILES


@pytest.mark.parametrize(
    "rel", [*CHAIN_PAGES, "rest/chain_spy_delayed.json", "rest/contract_spxw.json"]
)
def test_rest_option_fixtures_have_the_documented_shape(rel: str) -> None:
    raw = load(rel)
    conforms({k: v for k, v in raw.items() if k in ("status", "request_id")}, "envelope")
    assert set(raw) <= {"status", "request_id", "results", "next_url"}
    items = raw["results"] if isinstance(raw["results"], list) else [raw["results"]]
    for item in items:
        conforms_item(item)


def test_index_fixture_has_the_documented_shape() -> None:
    raw = load("rest/indices_snapshot.json")
    for item in raw["results"]:
        conforms(item, "index")
        assert ("error" in item) != ("value" in item)
        if "error" in item:
            assert item["error"] in ENUMS["index_error"]
        else:
            assert item["ticker"].startswith("I:") and item["ticker"][2:].isalnum()


@pytest.mark.parametrize("feed", ["options", "indices"])
def test_ws_fixtures_have_the_documented_shape(feed: str) -> None:
    raw = load(f"ws/{feed}.json")
    seen = set()
    for frame in raw["server"].values():
        assert isinstance(frame, list) and frame  # every server frame is a JSON array
        for ev in frame:
            assert set(ev) == WS_FIELDS[feed][ev["ev"]], ev
            seen.add(ev["ev"])
            if ev["ev"] == "status":
                assert ev["status"] in WS_STATUSES
    assert seen == set(WS_FIELDS[feed])  # every event type of the feed
    for msg in raw["client"].values():  # client frames: single objects
        assert set(msg) == {"action", "params"}
        assert msg["action"] in ("auth", "subscribe", "unsubscribe")
    if feed == "options":
        statuses = {f[0]["status"] for f in raw["server"].values() if f[0]["ev"] == "status"}
        assert statuses == WS_STATUSES  # every documented status value


# --- REST option items -------------------------------------------------------------------
def check_item(raw: dict[str, Any], c: Any) -> None:
    """``c`` (a ChainContract) carries exactly the values of the raw item."""
    d = raw["details"]
    assert c.cid == d["ticker"]
    assert c.expiry == d["expiration_date"]
    assert c.strike == d["strike_price"]
    assert c.right == {"call": "C", "put": "P"}[d["contract_type"]]
    q = raw.get("last_quote")
    assert (c.bid, c.ask, c.quote_ts_ns) == (
        (q["bid"], q["ask"], q["last_updated"]) if q else (None, None, None)
    )
    t = raw.get("last_trade")
    assert (c.last, c.last_size, c.trade_ts_ns) == (
        (t["price"], t["size"], t["sip_timestamp"]) if t else (None, None, None)
    )
    g = raw.get("greeks") or {}
    assert (c.delta, c.gamma, c.theta, c.vega) == tuple(
        g.get(k) for k in ("delta", "gamma", "theta", "vega")
    )
    assert c.iv == raw.get("implied_volatility")
    assert c.oi == raw.get("open_interest")
    assert c.volume == (raw.get("day") or {}).get("volume")


def test_first_chain_page_parses_with_its_cursor() -> None:
    rel = CHAIN_PAGES[0]
    raw = load(rel)
    page = mr.parse_chain_page((FIX / rel).read_bytes(), symbol="SPX")
    assert page.rejections == [] and page.error is None
    assert page.status == "OK" and page.request_id == raw["request_id"]
    assert len(page.contracts) == len(raw["results"]) == 3
    for item, c in zip(raw["results"], page.contracts, strict=True):
        check_item(item, c)
    # next_url: absolute, the query state in an unpadded base64url cursor, no API key
    url = urlparse(page.next_url or "")
    assert (url.scheme, url.path) == ("https", "/v3/snapshot/options/I:SPX")
    (cursor,) = parse_qs(url.query)["cursor"]
    state = parse_qs(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
    assert state["limit"] == ["3"] and state["sort"] == ["ticker"]
    assert "apiKey" not in url.query
    # REST times are ns, exact int64: the 0DTE call's quote is 2026-01-07 14:45:00.123456789
    call = page.contracts[1]
    assert call.cid == "O:SPXW260107C06850000"
    assert call.quote_ts_ns == 1767797100123456789
    assert utc_date(call.quote_ts_ns) == dt.date(2026, 1, 7) == dt.date.fromisoformat(call.expiry)
    # the untraded put: no trade, no greeks, no IV, an empty day bar
    put = page.contracts[2]
    assert (put.last, put.delta, put.iv, put.volume) == (None, None, None, None)
    # index underlying: value (not price), ns time
    assert page.underlying_value == raw["results"][0]["underlying_asset"]["value"] == 6843.21
    assert page.underlying_ts_ns is not None
    assert utc_date(page.underlying_ts_ns) == dt.date(2026, 1, 7)


def test_last_chain_page_rejects_bad_items_with_their_reason() -> None:
    rel = CHAIN_PAGES[1]
    raw = load(rel)
    page = mr.parse_chain_page((FIX / rel).read_bytes(), symbol="SPX")
    assert page.next_url is None  # the last page
    (c,) = page.contracts
    check_item(raw["results"][0], c)
    assert [r.reason for r in page.rejections] == [mr.R_BAD_TICKER, mr.R_MISMATCH]


def test_roots_belong_to_their_index() -> None:
    body = (FIX / CHAIN_PAGES[0]).read_bytes()
    roots = {c.cid[2:6] for c in mr.parse_chain_page(body, symbol="SPX").contracts}
    assert roots == {"SPX2", "SPXW"}  # SPX monthlies and SPXW dailies: both under I:SPX
    wrong = mr.parse_chain_page(body, symbol="NDX")
    assert wrong.contracts == []
    assert {r.reason for r in wrong.rejections} == {mr.R_WRONG_UNDERLYING}


def test_single_contract_snapshot_parses_like_the_chain_item() -> None:
    rel = "rest/contract_spxw.json"
    raw = load(rel)
    page = mr.parse_contract_snapshot((FIX / rel).read_bytes(), symbol="SPX")
    assert page.rejections == [] and len(page.contracts) == 1
    check_item(raw["results"], page.contracts[0])
    chain = mr.parse_chain_page(json.dumps({"status": "OK", "results": [raw["results"]]}))
    assert chain.contracts == page.contracts


def test_equity_underlying_carries_price_on_a_delayed_plan() -> None:
    rel = "rest/chain_spy_delayed.json"
    raw = load(rel)
    page = mr.parse_chain_page((FIX / rel).read_bytes())
    assert page.status == "DELAYED" and page.error is None and page.rejections == []
    (c,) = page.contracts
    check_item(raw["results"][0], c)
    assert page.underlying_value == raw["results"][0]["underlying_asset"]["price"]


def test_index_snapshot_parses_levels_and_per_ticker_errors() -> None:
    rel = "rest/indices_snapshot.json"
    raw = load(rel)
    page = mr.parse_index_snapshot((FIX / rel).read_bytes())
    spx, ndx = raw["results"][:2]
    assert page.spots == [
        mr.IndexSpot("SPX", spx["value"], spx["last_updated"], "open"),
        mr.IndexSpot("NDX", ndx["value"], ndx["last_updated"], "open"),
    ]
    assert utc_date(page.spots[0].ts_ns or 0) == dt.date(2026, 1, 7)
    assert [r.reason for r in page.rejections] == [mr.R_TICKER_ERROR, mr.R_TICKER_ERROR]
    assert "NOT_FOUND" in page.rejections[0].detail
    assert "NOT_ENTITLED" in page.rejections[1].detail


# --- WebSocket frames --------------------------------------------------------------------
def check_ws_frame(frame: list[dict[str, Any]]) -> None:
    out = decode_frame(json.dumps(frame).encode())
    assert out.errors == []
    assert len(out.events) == len(frame)
    for raw, ev in zip(frame, out.events, strict=True):
        assert isinstance(ev, WS_TYPE[raw["ev"]])
        if isinstance(ev, Trade):
            assert (ev.sym, ev.p, ev.s, ev.t, ev.x, ev.q, ev.c) == (
                raw["sym"],
                raw["p"],
                raw["s"],
                raw["t"],
                raw["x"],
                raw["q"],
                raw["c"],
            )
        elif isinstance(ev, Quote):
            assert (ev.sym, ev.bp, ev.ap, ev.bs, ev.as_, ev.bx, ev.ax, ev.t) == (
                raw["sym"],
                raw["bp"],
                raw["ap"],
                raw["bs"],
                raw["as"],
                raw["bx"],
                raw["ax"],
                raw["t"],
            )
        elif isinstance(ev, IndexValue):
            assert (ev.ticker, ev.val, ev.t) == (raw["T"], raw["val"], raw["t"])
        elif isinstance(ev, Status):
            assert (ev.status, ev.message) == (raw["status"], raw["message"])


@pytest.mark.parametrize("feed", ["options", "indices"])
def test_every_ws_frame_decodes(feed: str) -> None:
    for frame in load(f"ws/{feed}.json")["server"].values():
        check_ws_frame(frame)


def test_ws_times_are_ms_except_fmv() -> None:
    options = load("ws/options.json")["server"]
    (t,) = decode_frame(json.dumps(options["T"])).events
    assert isinstance(t, Trade) and utc_date(ms_to_ns(t.t)) == dt.date(2026, 1, 7)
    (q,) = decode_frame(json.dumps(options["Q"])).events
    assert isinstance(q, Quote) and utc_date(ms_to_ns(q.t)) == dt.date(2026, 1, 7)
    (v, _) = decode_frame(json.dumps(load("ws/indices.json")["server"]["V"])).events
    assert isinstance(v, IndexValue) and utc_date(ms_to_ns(v.t)) == dt.date(2026, 1, 7)
    (f,) = decode_frame(json.dumps(options["FMV"])).events  # FMV t is already ns
    assert isinstance(f, FairMarketValue) and utc_date(f.t) == dt.date(2026, 1, 7)


def test_ws_ingest_knows_every_documented_status() -> None:
    assert WS_STATUSES <= KNOWN_STATUSES
