"""Simulated Massive API over real loopback HTTP and WebSocket connections."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import itertools
import json
import math
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
import websockets
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.massive import Quote, Trade, decode_frame
from schemas.ticker import parse as parse_ticker
from simulator.market import (
    Market,
    bid_ask,
    black_scholes,
    is_trading_day,
    next_trading_day,
    ns_at,
    prev_trading_day,
    third_friday,
)
from simulator.server import SimConfig, SimServer
from tests.util import eventually

KEY = "sim-key"


@pytest.fixture
async def srv() -> AsyncIterator[SimServer]:
    s = SimServer(SimConfig(events_per_s=400.0))
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10.0) as c:
        yield c


async def get(
    client: httpx.AsyncClient, srv: SimServer, path: str, **params: Any
) -> httpx.Response:
    return await client.get(srv.rest_url + path, params={"apiKey": KEY, **params})


async def page_all(
    client: httpx.AsyncClient, srv: SimServer, path: str, params: dict[str, Any]
) -> tuple[list[dict[str, Any]], int]:
    """Follow next_url to the end (re-appending apiKey, as a query-auth client must)."""
    r = await client.get(srv.rest_url + path, params={"apiKey": KEY, **params})
    out: list[dict[str, Any]] = []
    pages = 0
    while True:
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "OK" and body["request_id"]
        out.extend(body["results"])
        pages += 1
        nxt = body.get("next_url")
        if not nxt:
            return out, pages
        assert "apiKey" not in nxt
        # (httpx drops a URL's own query when params= is given, so append by hand)
        r = await client.get(f"{nxt}&apiKey={KEY}")


def chain_tickers(srv: SimServer, symbol: str) -> list[str]:
    return [c.ticker for c in srv.market.by_symbol[symbol]]


# --- market model ------------------------------------------------------------------------
def test_spx_chain_is_about_20000_contracts_and_ndx_smaller() -> None:
    m = Market(seed=1, now_ns=1_795_838_282_000_000_000)  # Sat 2026-11-28 -> session Mon
    spx, ndx = len(m.by_symbol["SPX"]), len(m.by_symbol["NDX"])
    assert 18_000 <= spx <= 24_000, spx
    assert 3_000 <= ndx < spx / 2, ndx
    assert m.session == dt.date(2026, 11, 30)
    roots = {c.root for c in m.contracts.values()}
    assert roots == {"SPX", "SPXW", "NDX", "NDXP"}
    for c in m.contracts.values():
        assert is_trading_day(c.expiry)
        assert parse_ticker(c.ticker).strike == c.strike
        if c.root in ("SPX", "NDX"):  # AM monthlies: third Fridays (or the day before)
            tf = third_friday(c.expiry.year, c.expiry.month)
            assert 0 <= (tf - c.expiry).days <= 1
    assert any(c.root == "SPXW" and c.expiry == m.session for c in m.contracts.values())  # 0DTE
    assert any(c.root == "NDXP" and c.expiry == m.session for c in m.contracts.values())
    grid: dict[tuple[str, dt.date], list[float]] = {}
    for c in m.by_symbol["SPX"]:
        if c.call:
            grid.setdefault((c.root, c.expiry), []).append(c.strike)
    steps = {min(b - a for a, b in itertools.pairwise(ks)) for ks in grid.values()}
    assert steps == {5.0}  # 5-point strikes near the money on every SPX expiry
    assert len({c.expiry for c in m.contracts.values() if c.symbol == "SPX"}) >= 30


def test_same_seed_same_events_different_seed_different() -> None:
    t0 = 1_795_838_282_000_000_000

    def run(seed: int) -> list[dict[str, Any]]:
        m = Market(seed=seed, now_ns=t0, events_per_s=500.0)
        out: list[dict[str, Any]] = []
        for i in range(1, 21):
            out.extend(e.payload for e in m.generate(t0 + i * 50_000_000))
        return out

    a, b, c = run(7), run(7), run(8)
    assert len(a) > 100
    assert a == b
    assert a != c
    kinds = {e["ev"] for e in a}
    assert kinds == {"T", "Q"}
    ts = [e["t"] for e in a]
    assert ts == sorted(ts) and t0 // 1_000_000 <= ts[0] and ts[-1] <= t0 // 1_000_000 + 1000


def test_events_are_biased_to_near_atm_short_dated() -> None:
    t0 = 1_795_838_282_000_000_000
    m = Market(seed=3, now_ns=t0, events_per_s=2000.0)
    evs = [e for i in range(1, 11) for e in m.generate(t0 + i * 100_000_000)]
    near = 0
    for e in evs:
        c = m.contracts[e.key]
        if abs(c.strike / m.indices[c.symbol].value - 1) < 0.03:
            near += 1
    share_chain = sum(
        1 for c in m.contracts.values() if abs(c.strike / m.indices[c.symbol].value - 1) < 0.01
    ) / len(m.contracts)
    assert near / len(evs) > 3 * share_chain
    first = sorted({m.contracts[e.key].expiry for e in evs})[0]
    assert first == m.session  # 0DTE trades


def test_open_interest_profile() -> None:
    m = Market(seed=5, now_ns=1_795_838_282_000_000_000)
    spot = m.indices["SPX"].value
    monthly = sorted({c.expiry for c in m.by_symbol["SPX"] if c.root == "SPX"})[1]

    def oi(pred: Any) -> float:
        xs = [m.refresh(c).oi for c in m.by_symbol["SPX"] if pred(c)]
        assert len(xs) >= 4
        return sum(xs) / len(xs)

    def on(root: str) -> Any:
        return lambda c: c.root == root and c.expiry == monthly

    def dist(c: Any) -> float:
        return abs(c.strike / spot - 1)

    pm, am = on("SPXW"), on("SPX")
    assert oi(lambda c: pm(c) and dist(c) < 0.02) > 2 * oi(lambda c: pm(c) and dist(c) > 0.15)
    near_round = oi(lambda c: pm(c) and dist(c) < 0.05 and c.strike % 100 == 0)
    near_odd = oi(lambda c: pm(c) and dist(c) < 0.05 and c.strike % 25 != 0)
    assert near_round > 1.5 * near_odd
    puts_below = oi(lambda c: pm(c) and not c.call and 0.01 < 1 - c.strike / spot < 0.06)
    calls_above = oi(lambda c: pm(c) and c.call and 0.01 < c.strike / spot - 1 < 0.06)
    assert puts_below > 1.5 * calls_above
    assert oi(lambda c: am(c) and dist(c) < 0.05) > 1.5 * oi(lambda c: pm(c) and dist(c) < 0.05)
    # the same seed gives the same open interest whatever the order contracts are touched in
    m2 = Market(seed=5, now_ns=1_795_838_282_000_000_000)
    sample = m.by_symbol["SPX"][::97]
    assert [m2.refresh(c2).oi for c2 in reversed([m2.contracts[c.ticker] for c in sample])] == [
        m.refresh(c).oi for c in reversed(sample)
    ]


@settings(max_examples=200, deadline=None)
@given(
    s=st.floats(1000, 30000),
    k_rel=st.floats(0.5, 1.5),
    t=st.floats(1 / 365 / 24, 2.0),
    vol=st.floats(0.05, 1.0),
)
def test_black_scholes_parity_and_greeks(s: float, k_rel: float, t: float, vol: float) -> None:
    k, r, q = s * k_rel, 0.04, 0.013
    c = black_scholes(s, k, t, vol, r, q, True)
    p = black_scholes(s, k, t, vol, r, q, False)
    parity = s * math.exp(-q * t) - k * math.exp(-r * t)
    assert c.price - p.price == pytest.approx(parity, abs=1e-6 * s)
    assert 0 <= c.delta <= 1 and -1 <= p.delta <= 0
    assert c.gamma == pytest.approx(p.gamma) and c.gamma >= 0
    # step well inside one standard deviation of the log-price (an hour to expiry at 12.5 %
    # vol is 0.13 %: a fixed 1e-4 * s step then misses the delta by 2e-4, found by hypothesis)
    h = s * min(1e-4, 0.01 * vol * math.sqrt(t))
    up = black_scholes(s + h, k, t, vol, r, q, True).price
    dn = black_scholes(s - h, k, t, vol, r, q, True).price
    assert (up - dn) / (2 * h) == pytest.approx(c.delta, abs=1e-4)
    vup = black_scholes(s, k, t, vol + 1e-4, r, q, True).price
    vdn = black_scholes(s, k, t, vol - 1e-4, r, q, True).price
    assert (vup - vdn) / 2e-4 * 0.01 == pytest.approx(c.vega, rel=1e-3, abs=1e-6 * s)


@given(price=st.floats(0.0, 5000.0))
def test_quotes_on_tick_grid(price: float) -> None:
    bid, ask = bid_ask(price)
    assert 0 <= bid < ask
    for v in (bid, ask):
        tick = 0.05 if v < 3.0 else 0.10
        assert abs(v / tick - round(v / tick)) < 1e-6, (v, tick)
    assert bid <= price + 1e-9 and ask >= price - 1e-9


# --- REST: chain, paging, filters ------------------------------------------------------------
async def test_full_spx_chain_pages_cover_every_contract_once(
    srv: SimServer, client: httpx.AsyncClient
) -> None:
    items, pages = await page_all(client, srv, "/v3/snapshot/options/I:SPX", {"limit": 250})
    tickers = [i["details"]["ticker"] for i in items]
    assert len(tickers) == len(set(tickers))
    assert sorted(tickers) == sorted(chain_tickers(srv, "SPX"))
    assert tickers == sorted(tickers)  # default sort=ticker asc
    assert pages == math.ceil(len(tickers) / 250)
    assert len(tickers) > 18_000


async def test_cursor_is_base64url_query_state_and_paging_stable_across_listing(
    srv: SimServer, client: httpx.AsyncClient
) -> None:
    last = sorted({c.exp_s for c in srv.market.by_symbol["SPX"]})[8]
    params = {
        "limit": 250,
        "sort": "strike_price",
        "order": "desc",
        "contract_type": "put",
        "expiration_date.lte": last,
    }
    r = await get(client, srv, "/v3/snapshot/options/I:SPX", **params)
    body = r.json()
    nxt = body["next_url"]
    assert nxt.startswith(srv.rest_url + "/v3/snapshot/options/I:SPX?cursor=")
    cursor = parse_qs(urlparse(nxt).query)["cursor"][0]
    assert "=" not in cursor
    state = parse_qs(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
    assert state["sort"] == ["strike_price"] and state["order"] == ["desc"]
    assert state["limit"] == ["250"] and state["contract_type"] == ["put"]
    assert state["expiration_date.lte"] == [last]
    seen = [i["details"]["ticker"] for i in body["results"]]
    # the topology changes mid-paging: every pre-existing contract is still served once
    new = srv.list_new_strike("SPX")
    while nxt:
        r = await client.get(nxt, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
        body = r.json()
        seen.extend(i["details"]["ticker"] for i in body["results"])
        nxt = body.get("next_url")
    assert len(seen) == len(set(seen))
    puts = {c.ticker for c in srv.market.by_symbol["SPX"] if not c.call and c.exp_s <= last}
    assert puts - set(new) <= set(seen) <= puts
    strikes = [parse_ticker(t).strike for t in seen]
    assert strikes == sorted(strikes, reverse=True)


async def test_filters_match_brute_force(srv: SimServer, client: httpx.AsyncClient) -> None:
    m = srv.market
    exp = sorted({c.exp_s for c in m.by_symbol["SPX"]})
    spot = m.indices["SPX"].value
    lo, hi = round(spot * 0.98 / 5) * 5, round(spot * 1.02 / 5) * 5
    cases: list[tuple[dict[str, Any], Any]] = [
        (
            {"strike_price.gte": lo, "strike_price.lte": hi, "expiration_date": exp[0]},
            lambda c: lo <= c.strike <= hi and c.exp_s == exp[0],
        ),
        (
            {"strike_price.gt": lo, "strike_price.lt": hi, "contract_type": "call"},
            lambda c: lo < c.strike < hi and c.call,
        ),
        (
            {"expiration_date.gte": exp[2], "expiration_date.lt": exp[5], "strike_price": lo},
            lambda c: exp[2] <= c.exp_s < exp[5] and c.strike == lo,
        ),
        ({"expiration_date.gt": exp[-2], "sort": "expiration_date"}, lambda c: c.exp_s > exp[-2]),
    ]
    for params, pred in cases:
        items, _ = await page_all(
            client, srv, "/v3/snapshot/options/I:SPX", {"limit": 250, **params}
        )
        want = sorted(c.ticker for c in m.by_symbol["SPX"] if pred(c))
        assert want, params
        assert sorted(i["details"]["ticker"] for i in items) == want, params
        if params.get("sort") == "expiration_date":
            keys = [(i["details"]["expiration_date"], i["details"]["ticker"]) for i in items]
            assert keys == sorted(keys)


async def test_limits_default_max_and_bad_params(srv: SimServer, client: httpx.AsyncClient) -> None:
    r = await get(client, srv, "/v3/snapshot/options/I:NDX")
    assert r.status_code == 200 and len(r.json()["results"]) == 10 and "next_url" in r.json()
    r = await get(client, srv, "/v3/snapshot/options/I:NDX", limit=251)
    assert r.status_code == 400
    body = r.json()
    assert body["status"] == "ERROR" and body["request_id"] and "limit" in body["error"]
    for bad in ({"contract_type": "both"}, {"strike_price.gte": "abc"}, {"sort": "volume"}):
        r = await get(client, srv, "/v3/snapshot/options/I:SPX", **bad)
        assert r.status_code == 400 and r.json()["status"] == "ERROR", bad
    r = await get(client, srv, "/v3/snapshot/options/I:SPX", cursor="bm90LWEtY3Vyc29y")
    assert r.status_code == 400
    r = await get(client, srv, "/v3/snapshot/options/I:NOPE")
    assert r.status_code == 200 and r.json()["results"] == []


async def test_clamp_option(client: httpx.AsyncClient) -> None:
    s = SimServer(SimConfig(limit_over_max="clamp", symbols=("NDX",)))
    await s.start()
    try:
        r = await get(client, s, "/v3/snapshot/options/I:NDX", limit=1000)
        assert r.status_code == 200 and len(r.json()["results"]) == 250
    finally:
        await s.stop()


async def test_item_shape_units_and_omissions(srv: SimServer, client: httpx.AsyncClient) -> None:
    items, _ = await page_all(
        client,
        srv,
        "/v3/snapshot/options/I:SPX",
        {"limit": 250, "expiration_date.lte": min(c.exp_s for c in srv.market.by_symbol["SPX"])},
    )
    ndx_monthly = srv.market.by_symbol["NDX"][0].exp_s  # first by ticker: an NDX monthly
    ndx_params = {"limit": 250, "expiration_date": ndx_monthly}
    items += (await page_all(client, srv, "/v3/snapshot/options/I:NDX", ndx_params))[0]
    assert items
    now_ns = srv.clock()
    with_greeks = with_trade = 0
    for it in items:
        d = it["details"]
        assert d["exercise_style"] == "european" and d["shares_per_contract"] == 100
        assert d["contract_type"] in ("call", "put")
        t = parse_ticker(d["ticker"])
        assert t.strike == d["strike_price"] and t.expiry.isoformat() == d["expiration_date"]
        q = it["last_quote"]
        assert 0 <= q["bid"] < q["ask"] and q["midpoint"] == pytest.approx(
            (q["bid"] + q["ask"]) / 2
        )
        assert 10**18 < q["last_updated"] <= now_ns  # nanoseconds
        u = it["underlying_asset"]
        assert u["ticker"] == f"I:{t.symbol}" and u["value"] > 0 and u["last_updated"] > 10**18
        assert isinstance(it["open_interest"], int) and it["open_interest"] >= 0
        assert "break_even_price" in it
        # like the provider: the distance from the index to break-even
        assert u["change_to_break_even"] == pytest.approx(
            it["break_even_price"] - u["value"], abs=1e-4
        )
        # the whole session bar, also for a contract not traded today (previous close)
        day = it["day"]
        assert set(day) == {
            "open", "high", "low", "close", "volume", "vwap", "change", "change_percent",
            "previous_close", "last_updated",
        }  # fmt: skip
        assert day["low"] <= min(day["open"], day["close"]) <= day["high"]
        assert day["change"] == pytest.approx(day["close"] - day["previous_close"], abs=1e-4)
        assert day["change_percent"] == pytest.approx(
            100 * day["change"] / day["previous_close"], abs=1e-3
        )
        if day["volume"] == 0:
            assert "last_trade" not in it or it["last_trade"]["sip_timestamp"] < day["last_updated"]
        if "greeks" in it:
            with_greeks += 1
            g = it["greeks"]
            assert set(g) == {"delta", "gamma", "theta", "vega"}
            assert 0.0 < it["implied_volatility"] < 3.0
            assert (g["delta"] > 0) == (d["contract_type"] == "call")
        if "last_trade" in it:
            with_trade += 1
            lt = it["last_trade"]
            assert 10**18 < lt["sip_timestamp"] <= now_ns and lt["size"] >= 1 and lt["price"] > 0
            assert it["day"]["volume"] >= lt["size"]
    assert 0 < with_greeks < len(items)  # some deep OTM/ITM contracts carry no greeks
    assert 0 < with_trade < len(items)  # contracts that never traded carry no last_trade


async def test_single_contract_and_new_listing(srv: SimServer, client: httpx.AsyncClient) -> None:
    c = srv.market.by_symbol["SPX"][100]
    r = await get(client, srv, f"/v3/snapshot/options/I:SPX/{c.ticker}")
    assert r.status_code == 200
    res = r.json()["results"]
    assert isinstance(res, dict) and res["details"]["ticker"] == c.ticker
    r = await get(client, srv, f"/v3/snapshot/options/I:NDX/{c.ticker}")
    assert r.status_code == 404 and r.json()["status"] == "NOT_FOUND"
    new = srv.list_new_strike("SPX")
    assert len(new) == 2
    for t in new:
        r = await get(client, srv, f"/v3/snapshot/options/I:SPX/{t}")
        assert r.status_code == 200 and r.json()["results"]["details"]["ticker"] == t
    k = parse_ticker(new[0]).strike
    items, _ = await page_all(
        client, srv, "/v3/snapshot/options/I:SPX", {"strike_price": k, "limit": 250}
    )
    assert set(new) <= {i["details"]["ticker"] for i in items}
    before = len(srv.market.by_symbol["NDX"])
    new_exp = srv.list_new_expiry("NDX")
    assert len(new_exp) > 20 and len(srv.market.by_symbol["NDX"]) == before + len(new_exp)
    assert len({parse_ticker(t).expiry for t in new_exp}) == 1
    # the new contracts can trade: they are in the event sampler
    m = srv.market
    picks = {m._pick().ticker for _ in range(20000)}
    assert picks & set(new_exp)


async def test_set_spot_holds_the_index_and_listings_take_a_strike_or_expiry(
    srv: SimServer, client: httpx.AsyncClient
) -> None:
    srv.set_spot("SPX", 6123.45)
    for _ in range(3):
        srv.market.advance(srv.market.now_ns + 60 * 10**9)
    r = await get(client, srv, "/v3/snapshot/indices", **{"ticker.any_of": "I:SPX"})
    assert r.json()["results"][0]["value"] == 6123.45
    srv.set_spot("SPX", None)  # walks again
    srv.market.advance(srv.market.now_ns + 3600 * 10**9)
    assert srv.market.indices["SPX"].value != 6123.45
    new = srv.list_new_strike("SPX", 6001.5)
    assert {parse_ticker(t).strike for t in new} == {6001.5}
    with pytest.raises(ValueError, match="already listed"):
        srv.list_new_strike("SPX", 6001.5)
    last = max(c.expiry for c in srv.market.by_symbol["NDX"])
    d = last + dt.timedelta(days=3)
    assert {parse_ticker(t).expiry for t in srv.list_new_expiry("NDX", d)} == {d}
    with pytest.raises(ValueError, match="already listed"):
        srv.list_new_expiry("NDX", d)


async def test_indices_snapshot_and_market_status(
    srv: SimServer, client: httpx.AsyncClient
) -> None:
    r = await get(client, srv, "/v3/snapshot/indices", **{"ticker.any_of": "I:SPX,I:NDX,I:FOO"})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "OK"
    spx, ndx, foo = body["results"]
    assert spx["ticker"] == "I:SPX" and ndx["ticker"] == "I:NDX"
    assert spx["value"] == srv.market.indices["SPX"].value
    assert spx["type"] == "indices" and spx["market_status"] == "open"
    assert spx["timeframe"] == "REAL-TIME" and spx["last_updated"] > 10**18
    assert set(spx["session"]) >= {"change", "change_percent", "close", "previous_close"}
    assert foo == {"ticker": "I:FOO", "error": "NOT_FOUND", "message": "Ticker not found."}
    r = await get(client, srv, "/v1/marketstatus/now")
    assert r.json()["market"] == "open"
    srv.set_market_open(False)
    r = await get(client, srv, "/v1/marketstatus/now")
    assert r.json()["market"] == "closed"
    r = await get(client, srv, "/v3/snapshot/indices", **{"ticker.any_of": "I:SPX"})
    assert r.json()["results"][0]["market_status"] == "closed"


# --- REST: auth and failures ---------------------------------------------------------------------
async def test_auth_query_bearer_and_401(srv: SimServer, client: httpx.AsyncClient) -> None:
    url = srv.rest_url + "/v3/snapshot/indices"
    assert (await client.get(url, params={"apiKey": KEY})).status_code == 200
    r = await client.get(url, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    r = await client.get(url)
    assert r.status_code == 401
    assert r.json()["status"] == "ERROR" and r.json()["request_id"] and r.json()["error"]
    r = await client.get(url, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"] == "Unknown API Key"
    r = await client.get(url, params={"apiKey": "nope"})
    assert r.status_code == 401 and set(r.json()) == {"status", "request_id", "error"}


async def test_fail_next_then_success(srv: SimServer, client: httpx.AsyncClient) -> None:
    srv.fail_next(2, status=429)
    srv.fail_next(1, status=503)
    statuses = []
    for _ in range(4):
        r = await get(client, srv, "/v3/snapshot/options/I:SPX", limit=5)
        statuses.append(r.status_code)
        if r.status_code == 429:
            assert r.headers["Retry-After"].isdigit()
            b = r.json()
            assert b["status"] == "ERROR" and "exceeded" in b["error"] and b["request_id"]
    assert statuses == [429, 429, 503, 200]
    assert srv.stats.responses[429] == 2 and srv.stats.requests >= 4


# --- official client --------------------------------------------------------------------------
async def test_official_massive_client_pages_chain_and_parses_indices(srv: SimServer) -> None:
    from massive import RESTClient

    rest = RESTClient(api_key=KEY, base=srv.rest_url, retries=3)
    exps = sorted({c.exp_s for c in srv.market.by_symbol["SPX"]})
    params = {"expiration_date.lte": exps[2], "limit": 250}

    def run() -> tuple[list[Any], list[Any]]:
        snaps = list(rest.list_snapshot_options_chain("I:SPX", params=params))
        idx = rest.get_snapshot_indices(["I:SPX", "I:NDX"])
        return snaps, list(idx)

    srv.fail_next(1, status=429)  # the client's own retry absorbs it
    snaps, idx = await asyncio.to_thread(run)
    want = {c.ticker for c in srv.market.by_symbol["SPX"] if c.exp_s <= exps[2]}
    assert len(want) > 500  # several pages at limit=250
    got = [s.details.ticker for s in snaps]
    assert len(got) == len(set(got)) and set(got) == want
    s0 = next(s for s in snaps if s.greeks is not None and s.last_trade is not None)
    assert s0.details.exercise_style == "european" and s0.underlying_asset.ticker == "I:SPX"
    assert s0.last_quote.last_updated > 10**18 and s0.last_trade.sip_timestamp > 10**18
    assert s0.open_interest is not None and s0.implied_volatility is not None
    assert s0.details.expiration_date <= exps[2]
    assert [i.ticker for i in idx] == ["I:SPX", "I:NDX"]
    assert idx[0].value == pytest.approx(srv.market.indices["SPX"].value, rel=0.01)
    assert idx[0].session is not None and idx[0].market_status == "open"


# --- WebSocket -------------------------------------------------------------------------------
async def recv(ws: Any, wait_s: float = 5.0) -> list[dict[str, Any]]:
    data = await asyncio.wait_for(ws.recv(), wait_s)
    frame: list[dict[str, Any]] = json.loads(data)
    assert isinstance(frame, list)
    return frame


async def login(srv: SimServer, market: str = "options") -> Any:
    ws = await websockets.connect(f"{srv.ws_url}/{market}")
    assert await recv(ws) == [
        {"ev": "status", "status": "connected", "message": "Connected Successfully"}
    ]
    await ws.send(json.dumps({"action": "auth", "params": KEY}))
    assert await recv(ws) == [
        {"ev": "status", "status": "auth_success", "message": "authenticated"}
    ]
    return ws


async def subscribe(ws: Any, params: list[str], action: str = "subscribe") -> list[dict[str, Any]]:
    await ws.send(json.dumps({"action": action, "params": ",".join(params)}))
    return [(await recv(ws))[0] for _ in params]


async def data_frame(ws: Any, wait_s: float = 5.0) -> list[dict[str, Any]]:
    """The next frame carrying market events (status frames are skipped)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + wait_s
    while True:
        frame = await recv(ws, max(0.01, end - loop.time()))
        if any(e.get("ev") != "status" for e in frame):
            return frame


async def collect(ws: Any, seconds: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0:
        try:
            out.extend(await recv(ws, left))
        except TimeoutError:
            break
    return out


async def test_ws_handshake_acks_and_only_subscribed_events(srv: SimServer) -> None:
    m = srv.market
    spot = m.indices["SPX"].value
    near = sorted(
        (c for c in m.by_symbol["SPX"] if c.expiry == m.session),
        key=lambda c: abs(c.strike - spot),
    )[:40]
    tickers = [c.ticker for c in near]
    ws = await login(srv)
    try:
        params = [f"Q.{t}" for t in tickers] + [f"T.{t}" for t in tickers[:10]]
        acks = await subscribe(ws, params)
        assert acks == [
            {"ev": "status", "status": "success", "message": f"subscribed to: {p}"} for p in params
        ]
        events = await data_frame(ws) + await collect(ws, 1.0)
        for e in events:
            assert e["ev"] in ("Q", "T")
            assert e["sym"] in tickers if e["ev"] == "Q" else e["sym"] in tickers[:10]
            assert 10**12 < e["t"] < 10**14  # milliseconds
        frame_events = [decode_frame(json.dumps([e])) for e in events]
        assert all(not f.errors for f in frame_events)
        assert any(isinstance(f.events[0], Quote) for f in frame_events)
        # unsubscribe everything: events stop
        await subscribe(ws, params, action="unsubscribe")
        await collect(ws, 0.2)  # frames already queued
        assert await collect(ws, 0.5) == []
    finally:
        await ws.close()


async def test_ws_trades_wildcard_batches_frames(srv: SimServer) -> None:
    ws = await login(srv)
    try:
        assert (await subscribe(ws, ["T.*"]))[0]["status"] == "success"
        frames: list[list[dict[str, Any]]] = [await data_frame(ws)]
        loop = asyncio.get_running_loop()
        end = loop.time() + 2.0
        while loop.time() < end:
            frames.append(await recv(ws))
        assert any(len(f) > 1 for f in frames)  # several events per frame
        trades = [decode_frame(json.dumps(f)) for f in frames]
        assert all(not d.errors for d in trades)
        evs = [e for d in trades for e in d.events]
        assert evs and all(isinstance(e, Trade) for e in evs)
        assert all(e.sym in srv.market.contracts for e in evs if isinstance(e, Trade))
        assert srv.stats.events_sent.get("T", 0) >= len(evs)
        assert srv.stats.connections == 1
    finally:
        await ws.close()


async def test_ws_auth_rules_and_subscription_errors() -> None:
    s = SimServer(SimConfig(max_quote_subscriptions=3, max_connections=1, symbols=("NDX",)))
    await s.start()
    try:
        ws = await websockets.connect(f"{s.ws_url}/options")
        await recv(ws)
        await ws.send(json.dumps({"action": "subscribe", "params": "T.*"}))
        assert (await recv(ws))[0]["status"] == "auth_required"
        await ws.send(json.dumps({"action": "auth", "params": "wrong"}))
        assert (await recv(ws))[0]["status"] == "auth_failed"
        with pytest.raises(websockets.ConnectionClosed):
            await recv(ws)

        ws = await login(s)
        t = [c.ticker for c in s.market.by_symbol["NDX"][:5]]
        acks = await subscribe(ws, ["Q.*", *(f"Q.{x}" for x in t), "V.I:NDX", "bogus"])
        assert [a["status"] for a in acks] == [
            "error",
            "success",
            "success",
            "success",
            "error",  # 4th quote contract over the per-connection maximum (3 here)
            "error",
            "error",  # V is an indices event
            "error",
        ]
        # a second concurrent connection for the same key and market is refused
        ws2 = await websockets.connect(f"{s.ws_url}/options")
        await recv(ws2)
        await ws2.send(json.dumps({"action": "auth", "params": KEY}))
        assert (await recv(ws2))[0]["status"] == "auth_success"
        assert (await recv(ws2))[0]["status"] == "max_connections"
        with pytest.raises(websockets.ConnectionClosed):
            await recv(ws2)
        # other market is independent
        wsi = await login(s, "indices")
        assert (await subscribe(wsi, ["V.I:NDX"]))[0]["status"] == "success"
        v = await recv(wsi, 3.0)
        assert v[0]["ev"] == "V" and v[0]["T"] == "I:NDX" and 10**12 < v[0]["t"] < 10**14
        await wsi.close()
        await ws.close()
    finally:
        await s.stop()


async def test_drop_ws_silence_and_market_closed(srv: SimServer) -> None:
    ws = await login(srv)
    wsi = await login(srv, "indices")
    try:
        await subscribe(ws, ["T.*"])
        await subscribe(wsi, ["V.*"])
        assert await data_frame(ws)
        srv.set_silent(True)
        await collect(ws, 0.2)
        assert await collect(ws, 0.6) == []
        srv.set_silent(False)
        assert await data_frame(ws)

        srv.set_market_open(False)
        await collect(ws, 0.2)
        spot = srv.market.indices["SPX"].value
        assert await collect(ws, 0.6) == []
        assert srv.market.indices["SPX"].value == spot
        srv.set_market_open(True)
        assert await data_frame(ws)
        assert (await data_frame(wsi))[0]["ev"] == "V"

        before = srv.stats.connections_total
        srv.drop_ws()
        for w in (ws, wsi):
            with pytest.raises(websockets.ConnectionClosedError) as ei:
                while True:
                    await recv(w)
            assert ei.value.rcvd is None  # no close frame: an abrupt drop

        async def gone() -> bool:
            return srv.stats.connections == 0

        await eventually(gone)
        ws = await login(srv)  # reconnect works
        assert srv.stats.connections_total == before + 1
    finally:
        await ws.close()
        await wsi.close()


async def test_inject_malformed_frames(srv: SimServer) -> None:
    ws = await login(srv)
    try:
        await subscribe(ws, ["T.*"])
        assert await data_frame(ws)
        srv.inject_malformed(5)
        raws: list[str] = []
        while len(raws) < 40:
            raws.append(await asyncio.wait_for(ws.recv(), 5.0))
        bad = 0
        reasons = set()
        for raw in raws:
            d = decode_frame(raw)
            unknown = [
                e for e in d.events if isinstance(e, Trade) and e.sym not in srv.market.contracts
            ]
            if d.errors or unknown:
                bad += 1
                reasons.add("unknown" if unknown else d.errors[0].split(":")[0])
        assert bad == 5, raws[:6]
        assert "unknown" in reasons and len(reasons) >= 2
        assert srv.stats.malformed_sent == 5
    finally:
        await ws.close()


async def test_injected_clock_drives_timestamps() -> None:
    t = [1_795_838_282_000_000_000]

    def clock() -> int:
        t[0] += 10_000_000  # 10 ms per call
        return t[0]

    s = SimServer(SimConfig(symbols=("NDX",), spots=(("NDX", 18000.0),)), clock=clock)
    assert s.market.indices["NDX"].value == 18000.0
    strikes = [c.strike for c in s.market.by_symbol["NDX"]]
    assert 18000 * 0.75 < min(strikes) < 18000 < max(strikes) < 18000 * 1.25  # around spot
    await s.start()
    try:
        async with httpx.AsyncClient() as c:
            r = await get(c, s, "/v3/snapshot/indices", **{"ticker.any_of": "I:NDX"})
            ts = r.json()["results"][0]["last_updated"]
            assert 1_795_838_282_000_000_000 <= ts <= t[0]
    finally:
        await s.stop()


# --- CLI and scenarios -------------------------------------------------------------------------
def test_cli_main_serves_and_exits(capsys: pytest.CaptureFixture[str]) -> None:
    from simulator.cli import main

    rc = main(["--port", "0", "--duration-s", "0.3", "--symbols", "NDX", "--log-level", "WARNING"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "REST http://127.0.0.1:" in out and "/options" in out and "NDX" in out


def test_cli_key_defaults_to_massive_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """k8s hands the simulator its key as MASSIVE_API_KEY (from the Secret), not in args."""
    from simulator.cli import build_parser

    monkeypatch.delenv("MASSIVE_API_KEY", raising=False)
    assert build_parser().parse_args([]).api_key == "sim-key"
    monkeypatch.setenv("MASSIVE_API_KEY", "from-secret")
    assert build_parser().parse_args([]).api_key == "from-secret"
    assert build_parser().parse_args(["--api-key", "explicit"]).api_key == "explicit"


async def test_scenarios_drive_the_server(client: httpx.AsyncClient) -> None:
    from simulator.cli import build_parser, run_scenario

    s = SimServer(SimConfig(symbols=("NDX",)))
    await s.start()
    try:
        n0 = len(s.market.by_symbol["NDX"])
        args = build_parser().parse_args(["--scenario", "new-listing", "--listing-after-s", "0.05"])
        stop = asyncio.Event()
        task = asyncio.create_task(run_scenario(s, args, stop))

        async def listed() -> bool:
            return len(s.market.by_symbol["NDX"]) > n0 + 2  # a strike, then an expiry

        await eventually(listed)
        stop.set()
        await task

        args = build_parser().parse_args(["--scenario", "burst429", "--burst-every-s", "0.05"])
        stop = asyncio.Event()
        task = asyncio.create_task(run_scenario(s, args, stop))

        async def limited() -> bool:
            r = await get(client, s, "/v1/marketstatus/now")
            return r.status_code == 429

        await eventually(limited)
        stop.set()
        await task

        args = build_parser().parse_args(
            ["--scenario", "silence", "--period-s", "0.2", "--silence-s", "0.1"]
        )
        stop = asyncio.Event()
        task = asyncio.create_task(run_scenario(s, args, stop))

        async def silent() -> bool:
            return s._silent

        await eventually(silent)
        stop.set()
        await task
        assert not s._silent  # silence is lifted when the scenario stops
    finally:
        await s.stop()


async def test_unknown_path_is_provider_json_404(srv: SimServer, client: httpx.AsyncClient) -> None:
    r = await get(client, srv, "/v2/nothing/here")
    assert r.status_code == 404
    b = r.json()
    assert b["status"] == "NOT_FOUND" and b["request_id"]


async def test_official_massive_websocket_client_receives_parsed_events(srv: SimServer) -> None:
    from massive import WebSocketClient
    from massive.websocket.models import EquityQuote, EquityTrade, IndexValue

    c = next(c for c in srv.market.by_symbol["SPX"] if c.expiry == srv.market.session)
    got: list[Any] = []

    async def handle(msgs: list[Any]) -> None:
        got.extend(msgs)

    opt = WebSocketClient(
        api_key=KEY,
        feed=f"{srv.host}:{srv.port}",
        market="options",
        secure=False,
        subscriptions=["T.*", f"Q.{c.ticker}"],
    )
    idx = WebSocketClient(
        api_key=KEY,
        feed=f"{srv.host}:{srv.port}",
        market="indices",
        secure=False,
        subscriptions=["V.I:SPX"],
    )
    tasks = [asyncio.create_task(opt.connect(handle)), asyncio.create_task(idx.connect(handle))]
    try:

        async def seen() -> bool:
            kinds = {type(m) for m in got}
            return EquityTrade in kinds and IndexValue in kinds

        await eventually(seen, timeout_s=10)
        trade = next(m for m in got if isinstance(m, EquityTrade))
        assert trade.symbol in srv.market.contracts and trade.price is not None
        assert trade.timestamp is not None and 10**12 < trade.timestamp < 10**14
        value = next(m for m in got if isinstance(m, IndexValue))
        assert value.ticker == "I:SPX" and value.value is not None
        quotes = [m for m in got if isinstance(m, EquityQuote)]
        assert all(q.symbol == c.ticker for q in quotes)
    finally:
        await opt.close()
        await idx.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_busy_port_raises_oserror(srv: SimServer) -> None:
    other = SimServer(SimConfig(symbols=("NDX",)))
    with pytest.raises(OSError):
        await other.start(port=srv.port)
    await other.stop()  # harmless after a failed start


async def test_ws_many_large_subscribe_messages_back_to_back_are_not_slow_consumer(
    srv: SimServer,
) -> None:
    # 22k-contract chains subscribe in ~45 messages of 500 params sent without waiting; the
    # server's per-param acks must not trip its own slow-consumer limit.
    tickers = sorted(srv.market.contracts)[:12_000]
    ws = await login(srv)
    try:
        chunks = [tickers[i : i + 500] for i in range(0, len(tickers), 500)]
        for chunk in chunks:
            await ws.send(json.dumps({"action": "subscribe", "params": ",".join(
                f"T.{t}" for t in chunk)}))  # fmt: skip
        acks = 0
        while acks < len(tickers):
            for e in await recv(ws, 10.0):
                if e.get("ev") == "status":
                    assert e["status"] == "success", e
                    acks += 1
        assert srv.stats.connections == 1
    finally:
        await ws.close()


# --- stocks and ETFs --------------------------------------------------------------------------
def test_equity_chains_expiries_and_strike_spacing() -> None:
    m = Market(seed=3, symbols=("SPY", "AAPL", "XYZ"), now_ns=1_795_838_282_000_000_000)
    for sym, step in (("SPY", 1.0), ("AAPL", 5.0)):
        cs = m.by_symbol[sym]
        assert {c.root for c in cs} == {sym}
        assert all(c.settle_ns == ns_at(c.expiry, 16, 0) for c in cs)  # PM, one root
        exps = sorted({c.expiry for c in cs})
        fridays = [e for e in exps if e.weekday() == 4]
        assert len(fridays) >= 8  # weeklies
        assert any(e == prev_trading_day(third_friday(e.year, e.month)) for e in exps)
        near = sorted({c.strike for c in cs if c.expiry == exps[0]})
        spot = m.indices[sym].value
        gaps = [b - a for a, b in itertools.pairwise(near) if abs(a - spot) < 0.05 * spot]
        assert min(gaps) == step  # strike spacing by price level
    spy_days = sorted({c.expiry for c in m.by_symbol["SPY"]})
    assert spy_days[1] == next_trading_day(spy_days[0] + dt.timedelta(days=1))  # ETF dailies
    assert len(m.by_symbol["XYZ"]) > 200  # any ticker is a generic stock
    # American: never below intrinsic value
    for c in m.by_symbol["AAPL"]:
        m.refresh(c)
        assert c.model is not None
        intrinsic = (
            max(m.indices["AAPL"].value - c.strike, 0)
            if c.call
            else max(c.strike - m.indices["AAPL"].value, 0)
        )
        assert c.model.price >= intrinsic - 1e-9
    with pytest.raises(ValueError, match="no spec"):
        Market(seed=1, symbols=("BRK.B",), now_ns=1_795_838_282_000_000_000)


async def test_equity_rest_shapes_and_official_client(client: httpx.AsyncClient) -> None:
    from massive import RESTClient

    s = SimServer(SimConfig(symbols=("SPY", "AAPL"), spots=(("AAPL", 231.5),)))
    await s.start()
    s.set_spot("AAPL", 231.5)  # held still
    try:
        r = await get(client, s, "/v3/snapshot/options/AAPL", limit=5)
        item = r.json()["results"][0]
        assert item["details"]["exercise_style"] == "american"
        assert item["details"]["shares_per_contract"] == 100
        ua = item["underlying_asset"]
        assert ua["ticker"] == "AAPL" and ua["price"] == 231.5 and "value" not in ua
        # a stock has no I: chain and is no index
        assert (await get(client, s, "/v3/snapshot/options/I:AAPL")).json()["results"] == []
        idx = (await get(client, s, "/v3/snapshot/indices", **{"ticker.any_of": "I:AAPL"})).json()
        assert idx["results"][0]["error"] == "NOT_FOUND"
        stock = (await get(client, s, "/v2/snapshot/locale/us/markets/stocks/tickers/AAPL")).json()
        assert stock["ticker"]["lastTrade"]["p"] == 231.5 and stock["ticker"]["updated"] > 10**18

        rest = RESTClient(api_key=KEY, base=s.rest_url, retries=3)
        exps = sorted({c.exp_s for c in s.market.by_symbol["SPY"]})

        def run() -> tuple[list[Any], Any]:
            params = {"expiration_date.lte": exps[1], "limit": 250}
            snaps = list(rest.list_snapshot_options_chain("SPY", params=params))
            return snaps, rest.get_snapshot_ticker("stocks", "AAPL")

        snaps, snap = await asyncio.to_thread(run)
        want = {c.ticker for c in s.market.by_symbol["SPY"] if c.exp_s <= exps[1]}
        assert {x.details.ticker for x in snaps} == want and len(want) > 250
        s0 = next(x for x in snaps if x.greeks is not None)
        assert s0.details.exercise_style == "american" and s0.details.shares_per_contract == 100
        assert s0.underlying_asset.ticker == "SPY"
        assert s0.underlying_asset.price == pytest.approx(s.market.indices["SPY"].value, rel=0.01)
        assert snap.ticker == "AAPL" and snap.last_trade.price == 231.5
        assert snap.last_quote.bid_price == 231.49 and snap.last_quote.ask_price == 231.51
    finally:
        await s.stop()


async def test_stocks_ws_trades_and_quotes_parsed_by_official_client() -> None:
    import logging

    from massive.websocket.models import EquityQuote, EquityTrade, parse
    from massive.websocket.models import Market as WsMarket

    s = SimServer(SimConfig(symbols=("SPX", "SPY"), index_interval_s=0.1))
    await s.start()
    try:
        ws = await login(s, "stocks")
        acks = await subscribe(ws, ["T.SPY", "Q.SPY", "V.I:SPX"])
        assert [a["status"] for a in acks] == ["success", "success", "error"]
        events = [e for e in await collect(ws, 0.6) if e["ev"] != "status"]
        assert {e["ev"] for e in events} == {"T", "Q"} and {e["sym"] for e in events} == {"SPY"}
        parsed = parse(events, logging.getLogger("massive-test"), WsMarket.Stocks)
        trades = [p for p in parsed if isinstance(p, EquityTrade)]
        quotes = [p for p in parsed if isinstance(p, EquityQuote)]
        assert trades and quotes
        assert trades[0].symbol == "SPY" and trades[0].price == pytest.approx(600, rel=0.05)
        assert quotes[0].bid_price < quotes[0].ask_price and quotes[0].timestamp > 10**12
        # the options feed never carries stock events, nor the stocks feed option events
        wso = await login(s, "options")
        await subscribe(wso, ["T.*"])
        assert all(e["sym"].startswith("O:") for e in await collect(wso, 0.4) if "sym" in e)
        for w in (ws, wso):
            await w.close()
    finally:
        await s.stop()
