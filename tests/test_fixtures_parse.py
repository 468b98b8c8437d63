"""Every provider fixture that shows a chain snapshot, a single-contract snapshot, an index
snapshot or a WS frame parses into our schemas (shared/fixtures/massive, beside the repo).

Expected values are read from the fixture JSON itself (independently, with the stdlib json
module) and compared with what our msgspec schemas produce; the ns/ms handling is checked by
converting concrete timestamps to calendar dates.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from schemas import massive_rest as mr
from schemas.massive import (
    FairMarketValue,
    IndexValue,
    Quote,
    Status,
    Trade,
    decode_frame,
    ms_to_ns,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIX = SHARED / "fixtures" / "massive"
MOCKS = FIX / "client-python" / "test_rest" / "mocks"
SPEC = FIX / "client-python" / ".massive"

pytestmark = pytest.mark.skipif(not FIX.is_dir(), reason=f"fixtures not found at {FIX}")

CHAIN_FILES = ["client-python/test_rest/mocks/v3/snapshot/options/AAPL.json"]
CONTRACT_FILES = [
    "client-python/test_rest/mocks/v3/snapshot/options/AAPL/O;AAPL230616C00150000.json"
]
INDEX_FILES = [
    "client-python/test_rest/mocks/v3/snapshot/indices&ticker.any_of=SPX%2CAPx%2CAPy.json",
    "client-python/test_rest/mocks/v3/snapshot.json",  # universal snapshot (marketswarm spot)
]
COVERED = {
    *CHAIN_FILES,
    *CONTRACT_FILES,
    *INDEX_FILES,
    "kb_spx_index_option_chain_example.json",
    "ws_sample_messages.json",
    "spec_extract_chain_spec.json",
    "spec_extract_contract_spec.json",
    "spec_extract_indices_spec.json",
    "spec_extract_ws_options_indices.json",
    "client-python/.massive/rest.json",
    "client-python/.massive/websocket.json",
}
# Fixtures that are none of the four kinds (reference data, market status, summaries).
NOT_SNAPSHOTS = {
    "client-python/SOURCE_COMMIT.txt",
    "client-python/test_rest/mocks/v1/marketstatus/now.json",
    "client-python/test_rest/mocks/v1/summaries&ticker.any_of=NCLH%2CO%3ANCLH221014C00005000"
    "%2CC%3AEURUSD%2CX%3ABTCUSD%2CAPx.json",
    "client-python/test_rest/mocks/v3/reference/options/contracts.json",
    "client-python/test_rest/mocks/v3/reference/options/contracts&cursor="
    "YXA9JTdCJTIySUQlMjIlM0ElMjIy.json",
    "client-python/test_rest/mocks/v3/reference/options/contracts/OEVRI240119C00002500.json",
}


def load(rel: str) -> Any:
    return json.loads((FIX / rel).read_text())


def utc_date(ns: int) -> dt.date:
    return dt.datetime.fromtimestamp(ns / 1e9, tz=dt.UTC).date()


def test_every_fixture_is_classified() -> None:
    """A new fixture file forces a decision: parse it here or say why not."""
    found = {str(p.relative_to(FIX)) for p in FIX.rglob("*") if p.is_file()}
    assert found == COVERED | NOT_SNAPSHOTS


# --- option items ------------------------------------------------------------------------
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


@pytest.mark.parametrize("rel", CHAIN_FILES)
def test_chain_mock_parses(rel: str) -> None:
    raw = load(rel)
    page = mr.parse_chain_page((FIX / rel).read_bytes())
    assert page.rejections == []
    assert page.status == "OK" and page.error is None and page.next_url is None
    assert len(page.contracts) == len(raw["results"]) == 1
    for item, c in zip(raw["results"], page.contracts, strict=True):
        check_item(item, c)
    c = page.contracts[0]
    # REST times are ns: the quote is from 2022-04-29, the trade from 2023-03-13.
    assert c.quote_ts_ns == 1651254260800059648
    assert utc_date(c.quote_ts_ns) == dt.date(2022, 4, 29)
    assert c.trade_ts_ns is not None and utc_date(c.trade_ts_ns) == dt.date(2023, 3, 13)
    # stock underlying: price, ns time
    assert page.underlying_value == raw["results"][0]["underlying_asset"]["price"]
    assert page.underlying_ts_ns is not None
    assert utc_date(page.underlying_ts_ns) == dt.date(2022, 4, 29)


@pytest.mark.parametrize("rel", CONTRACT_FILES)
def test_single_contract_mock_parses(rel: str) -> None:
    raw = load(rel)
    page = mr.parse_contract_snapshot((FIX / rel).read_bytes())
    assert page.rejections == [] and len(page.contracts) == 1
    check_item(raw["results"], page.contracts[0])
    # the same item through the chain path gives the same contract
    chain = mr.parse_chain_page(json.dumps({"status": "OK", "results": [raw["results"]]}))
    assert chain.contracts == page.contracts


def test_kb_spx_index_option_example() -> None:
    rel = "kb_spx_index_option_chain_example.json"
    raw = load(rel)
    body = (FIX / rel).read_bytes()
    page = mr.parse_chain_page(body, symbol="SPX")
    assert page.rejections == []
    assert len(page.contracts) == 1
    check_item(raw["results"][0], page.contracts[0])
    c = page.contracts[0]
    assert (c.cid, c.expiry, c.strike, c.right) == (
        "O:SPXW230712C04500000",
        "2023-07-12",
        4500.0,
        "C",
    )
    # quote and trade at 2023-07-12 (the expiry day, 0DTE), ns
    assert c.quote_ts_ns is not None and utc_date(c.quote_ts_ns) == dt.date(2023, 7, 12)
    assert c.trade_ts_ns is not None and utc_date(c.trade_ts_ns) == dt.date(2023, 7, 12)
    # index underlying carries value (not price)
    assert page.underlying_value == raw["results"][0]["underlying_asset"]["value"]
    # SPXW belongs to SPX, not NDX
    wrong = mr.parse_chain_page(body, symbol="NDX")
    assert wrong.contracts == []
    assert [r.reason for r in wrong.rejections] == [mr.R_WRONG_UNDERLYING]


def test_index_mock_without_prefix_and_ticker_errors() -> None:
    rel = INDEX_FILES[0]
    raw = load(rel)
    page = mr.parse_index_snapshot((FIX / rel).read_bytes())
    spx = raw["results"][0]
    assert spx["ticker"] == "SPX"  # the old mock has no I: prefix
    assert page.spots == [mr.IndexSpot("SPX", spx["value"], None, spx["market_status"])]
    assert [r.reason for r in page.rejections] == [mr.R_TICKER_ERROR, mr.R_TICKER_ERROR]
    assert "NOT_FOUND" in page.rejections[0].detail
    assert "NOT_ENTITLED" in page.rejections[1].detail


def test_universal_snapshot_has_no_index_level() -> None:
    rel = INDEX_FILES[1]
    page = mr.parse_index_snapshot((FIX / rel).read_bytes())
    assert page.spots == []
    # option entry (O: ticker), stock entry (no value), per-ticker error
    assert [r.reason for r in page.rejections] == [
        mr.R_BAD_INDEX_TICKER,
        mr.R_NO_VALUE,
        mr.R_TICKER_ERROR,
    ]


# --- spec examples -----------------------------------------------------------------------
def spec_example(op: dict[str, Any]) -> Any:
    return op["get"]["responses"]["200"]["content"]["application/json"]["example"]


def chain_spec_checks(ex: dict[str, Any]) -> None:
    page = mr.parse_chain_page(json.dumps(ex))
    # The spec example's ticker "O:AAPL211022C000150000" has a 9-digit strike and a date
    # that disagrees with expiration_date 2022-01-21: it is rejected, with that reason.
    assert page.contracts == []
    assert [r.reason for r in page.rejections] == [mr.R_BAD_TICKER]
    # the rest of the item is of the documented shape
    item = mr.decode_item(json.dumps(ex["results"][0]).encode())
    assert item.last_quote is not None
    assert item.last_quote.last_updated == ex["results"][0]["last_quote"]["last_updated"]
    assert item.underlying_asset is not None and item.underlying_asset.timeframe == "DELAYED"
    # with a well-formed ticker (same date as expiration_date) the item converts
    fixed = json.loads(json.dumps(ex["results"][0]))
    fixed["details"]["ticker"] = "O:AAPL220121C00150000"
    (c,) = mr.parse_chain_page(json.dumps({"results": [fixed]})).contracts
    check_item(fixed, c)
    assert c.quote_ts_ns is not None and utc_date(c.quote_ts_ns) == dt.date(2020, 11, 12)


def contract_spec_checks(ex: dict[str, Any]) -> None:
    page = mr.parse_contract_snapshot(json.dumps(ex))
    assert page.rejections == []
    (c,) = page.contracts
    check_item(ex["results"], c)
    assert c.quote_ts_ns is not None and utc_date(c.quote_ts_ns) == dt.date(2021, 11, 10)
    item = mr.decode_item(json.dumps(ex["results"]).encode())
    assert item.last_quote is not None
    assert (item.last_quote.bid_exchange, item.last_quote.ask_exchange) == (301, 301)


def indices_spec_checks(ex: dict[str, Any]) -> None:
    page = mr.parse_index_snapshot(json.dumps(ex))
    (spot,) = page.spots
    first = ex["results"][0]
    assert spot.symbol == "DJI" and spot.value == first["value"]
    assert spot.ts_ns == first["last_updated"]
    assert spot.ts_ns is not None and utc_date(spot.ts_ns) == dt.date(2023, 3, 23)
    assert [r.reason for r in page.rejections] == [mr.R_TICKER_ERROR, mr.R_TICKER_ERROR]


def test_spec_extract_examples() -> None:
    chain_spec_checks(spec_example(load("spec_extract_chain_spec.json")))
    contract_spec_checks(spec_example(load("spec_extract_contract_spec.json")))
    indices_spec_checks(spec_example(load("spec_extract_indices_spec.json")))


def test_full_rest_spec_examples() -> None:
    paths = json.loads((SPEC / "rest.json").read_text())["paths"]
    chain_spec_checks(spec_example(paths["/v3/snapshot/options/{underlyingAsset}"]))
    contract_spec_checks(
        spec_example(paths["/v3/snapshot/options/{underlyingAsset}/{optionContract}"])
    )
    indices_spec_checks(spec_example(paths["/v3/snapshot/indices"]))
    universal = mr.parse_index_snapshot(json.dumps(spec_example(paths["/v3/snapshot"])))
    assert universal.spots == [] and len(universal.rejections) == 3


# --- WebSocket frames --------------------------------------------------------------------
EXPECTED_WS_TYPE = {
    "T": Trade,
    "Q": Quote,
    "V": IndexValue,
    "status": Status,
    "FMV": FairMarketValue,
}


def check_ws_frame(frame: list[dict[str, Any]]) -> None:
    out = decode_frame(json.dumps(frame).encode())
    assert out.errors == []
    assert len(out.events) == len(frame)
    for raw, ev in zip(frame, out.events, strict=True):
        typ = EXPECTED_WS_TYPE.get(raw["ev"])
        if typ is not None:
            assert isinstance(ev, typ)
        if isinstance(ev, Trade):
            assert (ev.sym, ev.p, ev.s, ev.t) == (raw["sym"], raw["p"], raw["s"], raw["t"])
        elif isinstance(ev, Quote):
            assert (ev.bp, ev.ap, ev.bs, ev.as_, ev.t) == (
                raw["bp"],
                raw["ap"],
                raw["bs"],
                raw["as"],
                raw["t"],
            )
        elif isinstance(ev, IndexValue):
            assert (ev.ticker, ev.val, ev.t) == (raw["T"], raw["val"], raw["t"])


def test_ws_sample_messages() -> None:
    samples = load("ws_sample_messages.json")
    server = {k: v for k, v in samples.items() if isinstance(v, list)}
    client = {k: v for k, v in samples.items() if k.startswith("client_")}
    assert set(server) | set(client) | {"_note"} == set(samples)
    for frame in server.values():
        check_ws_frame(frame)
    for msg in client.values():
        assert msg["action"] in ("auth", "subscribe", "unsubscribe")
    # WS T/Q/V times are ms: the sample trade is from 2021-08-24, the V from 2023-03-07
    (t,) = decode_frame(json.dumps(samples["options_T"])).events
    assert isinstance(t, Trade) and utc_date(ms_to_ns(t.t)) == dt.date(2021, 8, 24)
    (v,) = decode_frame(json.dumps(samples["indices_V"])).events
    assert isinstance(v, IndexValue) and utc_date(ms_to_ns(v.t)) == dt.date(2023, 3, 7)
    # ... while FMV t is already ns (2014-06-02)
    (f,) = decode_frame(json.dumps(samples["options_FMV_business"])).events
    assert isinstance(f, FairMarketValue) and utc_date(f.t) == dt.date(2014, 6, 2)


def ws_examples(paths: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for path, op in paths.items():
        if path.startswith(("/options/", "/indices/", "/business/options/")):
            out.append(spec_example(op))
    return out


def test_ws_spec_extract_examples() -> None:
    spec = load("spec_extract_ws_options_indices.json")
    events = ws_examples(spec)
    assert len(events) == 8
    for ev in events:
        check_ws_frame([ev])  # the server wraps events in an array
    for name in ("ConnectEvent", "DisconnectEvent", "AuthEvent", "SubscribeEvent"):
        status = json.loads(spec[name]["allOf"][1]["example"])
        check_ws_frame([status])


def test_full_ws_spec_examples() -> None:
    spec = json.loads((SPEC / "websocket.json").read_text())
    events = ws_examples(spec["paths"])
    assert len(events) == 8
    extract = ws_examples(load("spec_extract_ws_options_indices.json"))
    assert events == extract
    for ev in events:
        check_ws_frame([ev])
