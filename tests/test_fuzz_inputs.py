"""Bad input never stops a processor: hypothesis-generated WS frames and REST pages (wrong
types, missing fields, huge numbers, NaN, unknown tickers, truncated JSON) go through the
REAL processing paths against a real Redis:

* WS: raw entries XADDed to ``massive:ws:stream`` and consumed by a running
  :class:`processors.epochs.hydrator.Hydrator` (its consumer-group loop, not ``handle`` directly);
* REST: a running :class:`processors.ingest.chain_poller.ChainPoller` loop whose HTTP client is
  served by an ``httpx.MockTransport`` (the poller's own request, retry, paging, decoding and
  Redis write code runs unchanged).

Each example asserts the rejection counters moved by exactly the expected amount per reason,
that the processor still processes a GOOD input placed after the bad ones, and that it is
still running (nothing dead-lettered, nothing left pending).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from processors.epochs.hydrator import Hydrator
from processors.ingest import chain_poller as cp
from schemas import keys, ticker
from schemas.messages import WS_PAYLOAD_FIELD, WS_RECV_FIELD, ChainPointer, decode_snapshot
from schemas.messages import from_entry as msg_from_entry
from streams import admin
from streams.processor import Deps
from streams.settings import RuntimeSettings
from tests.factories import contract, seed_epoch
from tests.util import RedisServer

MS = 1_000_000
T0 = 1_764_000_000_000  # ms
EXP = "2026-12-18"
EID = "fuzz-e1"
KNOWN = [
    contract("SPXW", EXP, "C", 6000, bid=1.0, ask=1.2, quote_ts_ns=T0 * MS),
    contract("SPXW", EXP, "P", 6000, bid=2.0, ask=2.5, quote_ts_ns=T0 * MS),
]
GOOD_CID = KNOWN[0].cid

FUZZ = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def quote(cid: str, t: int, bp: float = 1.0, ap: float = 1.1) -> dict[str, Any]:
    return {"ev": "Q", "sym": cid, "bx": 1, "ax": 1, "bp": bp, "ap": ap, "bs": 1, "as": 1,
            "t": t, "q": 1}  # fmt: skip


def trade(cid: str, t: int, p: float = 1.0, s: int = 1) -> dict[str, Any]:
    return {"ev": "T", "sym": cid, "x": 1, "p": p, "s": s, "c": [209], "t": t, "q": 1}


# --- WS entries: (fields, expected {reason: count}) -----------------------------------------
# reasons: bad_entry / bad_frame / bad_event (hydrator rejected_total) and "miss"
# (geometry_miss_total). A bad event shares its frame with a good event of another contract,
# which must still apply.
Fields = dict[bytes, bytes]
Case = tuple[Fields, dict[str, int]]


def _entry(payload: bytes, recv: bytes | None = b"1") -> Fields:
    f = {WS_PAYLOAD_FIELD: payload}
    if recv is not None:
        f[WS_RECV_FIELD] = recv
    return f


_i64 = st.integers(-(2**63), 2**63 - 1)  # what a JSON encoder can write
_wrong = st.one_of(
    st.text(max_size=5), st.lists(_i64, max_size=2), st.none(), st.booleans(),
    st.dictionaries(st.text(max_size=3), _i64, max_size=2),
)  # fmt: skip
# wrong types for a string field (a string of any content is the right type)
_wrong_nonstr = st.one_of(
    _i64, st.lists(_i64, max_size=2), st.none(), st.booleans(),
    st.dictionaries(st.text(max_size=3), _i64, max_size=2),
)  # fmt: skip
_huge_float = st.one_of(st.floats(min_value=1.01e9, max_value=1e300), st.just(-1.0))
_huge_int = st.integers(min_value=10**14 + 1, max_value=2**62)


@st.composite
def ws_case(draw: st.DrawFn, n: int) -> Case:
    """One bad WS entry (n makes unknown tickers unique within an example)."""
    t = T0 + 10 + n
    kind = draw(
        st.sampled_from(
            ["truncated", "not_array", "nan", "wrong_type", "missing", "huge", "unknown_ev",
             "unknown_ticker", "garbage_ticker", "no_recv", "bad_recv"]
        )
    )  # fmt: skip
    other = trade(KNOWN[1].cid, t)  # a good event sharing the frame (event-level cases)
    if kind == "truncated":
        raw = orjson.dumps([quote(GOOD_CID, t), other])
        cut = draw(st.integers(1, len(raw) - 1))
        return _entry(raw[:cut]), {"bad_frame": 1}
    if kind == "not_array":
        v = draw(st.one_of(st.dictionaries(st.text(max_size=3), _i64, max_size=3),
                           _i64, st.text(max_size=8)))  # fmt: skip
        return _entry(orjson.dumps(v)), {"bad_frame": 1}
    if kind == "nan":
        lit = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"nan"]))
        raw = orjson.dumps([quote(GOOD_CID, t, bp=0.5)]).replace(b'"bp":0.5', b'"bp":' + lit)
        return _entry(raw), {"bad_frame": 1}
    if kind == "wrong_type":
        ev = quote(GOOD_CID, t) if draw(st.booleans()) else trade(GOOD_CID, t)
        field = draw(
            st.sampled_from(sorted(k for k in ev if k in ("sym", "bp", "ap", "p", "s", "t")))
        )
        ev[field] = draw(_wrong_nonstr if field == "sym" else _wrong)
        return _entry(orjson.dumps([ev, other])), {"bad_event": 1}
    if kind == "missing":
        ev = quote(GOOD_CID, t) if draw(st.booleans()) else trade(GOOD_CID, t)
        required = ["ev", "sym", "t", *(["bp", "ap"] if ev["ev"] == "Q" else ["p", "s"])]
        del ev[draw(st.sampled_from(required))]
        return _entry(orjson.dumps([ev, other])), {"bad_event": 1}
    if kind == "huge":
        which = draw(st.sampled_from(["bp", "t", "s", "p", "s64"]))
        ev = quote(GOOD_CID, t) if which in ("bp", "t") else trade(GOOD_CID, t)
        if which == "s64":  # beyond int64: spliced in as text (orjson refuses to encode it)
            raw = orjson.dumps([ev | {"s": 0}, other]).replace(
                b'"s":0', b'"s":' + str(2**70).encode(), 1
            )
            return _entry(raw), {"bad_event": 1}
        ev[which] = draw(_huge_int) if which in ("t", "s") else draw(_huge_float)
        return _entry(orjson.dumps([ev, other])), {"bad_event": 1}
    if kind == "unknown_ev":
        ev = quote(GOOD_CID, t) | {"ev": draw(st.sampled_from(["XQ", "", "q", "TT"]))}
        return _entry(orjson.dumps([ev, other])), {"bad_event": 1}
    if kind == "unknown_ticker":  # a valid ticker outside the epoch: geometry miss
        cid = ticker.encode("SPXW", dt.date(2026, 12, 18), "C", 9000 + 5 * n)
        return _entry(orjson.dumps([quote(cid, t), other])), {"miss": 1}
    if kind == "garbage_ticker":
        sym = draw(st.text(min_size=1, max_size=12)) + f"#{n}"
        return _entry(orjson.dumps([trade(sym, t), other])), {"miss": 1}
    if kind == "no_recv":
        return _entry(orjson.dumps([quote(GOOD_CID, t)]), recv=None), {"bad_entry": 1}
    bad = draw(st.sampled_from([b"", b"abc", b"1.5", b"-", b"\xff"]))
    return _entry(orjson.dumps([quote(GOOD_CID, t)]), recv=bad), {"bad_entry": 1}


def _val(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


async def _wait(check: Callable[[], Any], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met")
        await asyncio.sleep(0.01)


@FUZZ
@given(data=st.data(), n_bad=st.integers(1, 8))
def test_ws_bad_frames_are_counted_and_never_stop_the_hydrator(
    redis_server: RedisServer, data: st.DataObject, n_bad: int
) -> None:
    cases = [data.draw(ws_case(i), label=f"bad{i}") for i in range(n_bad)]
    expected: Counter[str] = Counter()
    for _, exp in cases:
        expected.update(exp)
    good_t = T0 + 100_000

    async def scenario() -> None:
        redis = Redis.from_url(redis_server.url)
        reg = CollectorRegistry()
        stop = asyncio.Event()
        try:
            await redis.flushall()
            await seed_epoch(redis, EID, "SPX", KNOWN, spot=6000.0)
            rs = RuntimeSettings(redis_url=redis_server.url, consumer="fuzz", block_ms=20)
            hyd = Hydrator(Deps(redis, rs, reg))
            task = asyncio.create_task(hyd.run(stop))
            await _wait(lambda: _ready(hyd))
            pipe = redis.pipeline(transaction=False)
            for fields, _ in cases:
                pipe.xadd(keys.WS_STREAM, fields)  # type: ignore[arg-type]
            good = [quote(GOOD_CID, good_t, bp=7.0, ap=7.5)]
            pipe.xadd(keys.WS_STREAM, _entry(orjson.dumps(good), b"2"))  # type: ignore[arg-type]
            await pipe.execute()

            async def good_applied() -> bool:
                v = await redis.hget(keys.epoch_contract("SPX", EID, GOOD_CID), "quote_ts")
                return v is not None and int(v) == good_t * MS

            await _wait(good_applied)
            await _wait(lambda: _drained(redis))
            assert not task.done(), task
            for reason in ("bad_entry", "bad_frame", "bad_event"):
                got = _val(reg, "massive_hydrator_rejected_total", reason=reason)
                assert got == expected[reason], (reason, got, expected, cases)
            misses = sum(
                _val(reg, "massive_hydrator_geometry_miss_total", symbol=s)
                for s in ("SPX", "NDX", "other")
            )
            assert misses == expected["miss"], (misses, cases)
            h = await redis.hgetall(keys.epoch_contract("SPX", EID, GOOD_CID))
            assert h[b"bid"] == b"7.0" and h[b"ask"] == b"7.5"
            # nothing invented: only the two epoch contracts exist
            n_hashes = len(
                [
                    k
                    async for k in redis.scan_iter(
                        match=keys.epoch_contract_prefix("SPX", EID) + "*"
                    )
                ]
            )
            assert n_hashes == len(KNOWN)
            assert await redis.xlen(keys.dead_letter_stream(keys.WS_STREAM)) == 0
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)
            await redis.aclose()

    asyncio.run(scenario())


async def _ready(p: Any) -> bool:
    return bool(p.ready)


async def _drained(redis: Redis, stream: str = keys.WS_STREAM) -> bool:
    rows = await admin.lag(redis, [stream])
    return bool(rows) and all(g.lag == 0 and g.pending == 0 for g in rows)


# --- REST pages -----------------------------------------------------------------------------
SPOT = 6000.0
NOW_NS = time.time_ns()
TODAY = dt.date.today()


def _expiry() -> dt.date:
    d = TODAY + dt.timedelta(days=3)
    while d.weekday() >= 5:
        d += dt.timedelta(days=1)
    return d


EXPIRY = _expiry()


def rest_item(strike: float, right: str = "C", root: str = "SPXW") -> dict[str, Any]:
    """One chain snapshot result item in the provider's shape (see tests/fixtures/massive)."""
    cid = ticker.encode(root, EXPIRY, right, strike)
    return {
        "details": {"contract_type": "call" if right == "C" else "put",
                    "exercise_style": "european", "expiration_date": EXPIRY.isoformat(),
                    "shares_per_contract": 100, "strike_price": strike, "ticker": cid},
        "greeks": {"delta": 0.5, "gamma": 0.01, "theta": -1.0, "vega": 0.4},
        "implied_volatility": 0.15,
        "last_quote": {"ask": 10.5, "bid": 10.0, "last_updated": NOW_NS, "midpoint": 10.25},
        "last_trade": {"sip_timestamp": NOW_NS, "price": 10.2, "size": 1, "exchange": 302},
        "open_interest": 1000,
        "underlying_asset": {"last_updated": NOW_NS, "value": SPOT, "ticker": "I:SPX"},
    }  # fmt: skip


GOOD_ITEMS = [rest_item(6000.0, "C"), rest_item(6000.0, "P")]
GOOD_CIDS = sorted(i["details"]["ticker"] for i in GOOD_ITEMS)


WRONG_TYPE_PATHS = [
    ("last_quote", "bid"),
    ("last_trade", "price"),
    ("details", "ticker"),
    ("greeks", "gamma"),
    ("open_interest",),
    ("last_quote", "last_updated"),
]


def _set_path(item: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    tgt = item
    for k in path[:-1]:
        tgt = tgt[k]
    tgt[path[-1]] = value


@st.composite
def rest_case(draw: st.DrawFn, n: int) -> tuple[Any, set[str]]:
    """A bad chain item (JSON-able, or raw bytes) and the reasons it may be rejected with."""
    it = rest_item(5000.0 + 5 * n)
    kind = draw(
        st.sampled_from(
            ["wrong_type", "no_ticker", "bad_ticker", "wrong_underlying", "mismatch", "huge",
             "negative", "bad_ts", "bad_contract_type", "not_object", "nan"]
        )
    )  # fmt: skip
    if kind == "wrong_type":
        path = draw(st.sampled_from(WRONG_TYPE_PATHS))
        # optional fields may be null; a number is the right type for numeric fields
        wrong = _wrong_nonstr if path == ("details", "ticker") else _wrong
        _set_path(it, path, draw(wrong.filter(lambda v: v is not None)))
        return it, {"decode"}
    if kind == "no_ticker":
        del it["details"]["ticker"]
        return it, {"no_ticker"}
    if kind == "bad_ticker":
        it["details"]["ticker"] = draw(
            st.sampled_from(["O:SPXW", "SPX", "O:ZZZZ26C1", "O:SPXW261301C06000000"])
        )
        return it, {"bad_ticker"}
    if kind == "wrong_underlying":  # a real ticker of another index: unknown for this chain
        it["details"]["ticker"] = ticker.encode("NDXP", EXPIRY, "C", 21000.0 + 5 * n)
        it["details"]["strike_price"] = 21000.0 + 5 * n
        return it, {"wrong_underlying"}
    if kind == "mismatch":
        it["details"]["strike_price"] = 1.0
        return it, {"details_mismatch"}
    if kind == "huge":
        path = draw(
            st.sampled_from([("last_quote", "bid"), ("greeks", "gamma"), ("open_interest",)])
        )
        _set_path(it, path, draw(st.floats(min_value=1.01e9, max_value=1e300)))
        return it, {"non_finite"}
    if kind == "negative":
        it["last_quote"]["ask"] = -draw(st.floats(min_value=0.01, max_value=1e6))
        return it, {"negative_value"}
    if kind == "bad_ts":
        it["last_trade"]["sip_timestamp"] = NOW_NS // draw(st.sampled_from([1000, 1_000_000]))
        return it, {"bad_timestamp"}
    if kind == "bad_contract_type":
        it["details"]["contract_type"] = draw(st.sampled_from(["CALL", "c", "straddle", ""]))
        return it, {"bad_contract_type"}
    if kind == "not_object":
        return draw(st.one_of(_i64, st.text(max_size=5), st.lists(_i64, max_size=2))), {"decode"}
    # a huge exponent (1e999) decodes as an out-of-range number: rejected, never stored
    raw = orjson.dumps(it).replace(b'"implied_volatility":0.15', b'"implied_volatility":1e999')
    return orjson.Fragment(raw), {"non_finite", "decode"}


def page(results: list[Any], next_url: str | None = None) -> bytes:
    body: dict[str, Any] = {"status": "OK", "request_id": "fuzz", "results": results}
    if next_url:
        body["next_url"] = next_url
    return orjson.dumps(body)


def spot_page() -> bytes:
    item = {"ticker": "I:SPX", "value": SPOT, "last_updated": NOW_NS, "market_status": "open"}
    return orjson.dumps({"status": "OK", "request_id": "i", "results": [item]})


@contextlib.asynccontextmanager
async def running_poller(
    redis: Redis,
    handler: Callable[[httpx.Request], httpx.Response],
    reg: CollectorRegistry,
    url: str,
) -> AsyncIterator[tuple[cp.ChainPoller, asyncio.Task[None]]]:
    s = cp.PollerSettings(
        api_key="k", rest_url="http://rest.fuzz", min_interval_s=0.05,
        latency_factor=1.0, max_retries=3, backoff_base_s=0.001, backoff_max_s=0.005,
        control_block_ms=20, expirations=5, max_days=14, band_pct=0.5,
        full_interval_s=0.0,  # this fuzzes the window's pages
    )  # fmt: skip
    rs = RuntimeSettings(redis_url=url, consumer="f", symbols=("SPX",))
    poller = cp.ChainPoller(Deps(redis, rs, reg), s)
    transport = httpx.MockTransport(handler)
    poller.rest.client = lambda: httpx.AsyncClient(transport=transport)  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(poller.run(stop))
    try:
        yield poller, task
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)


async def snapshots(redis: Redis) -> list[list[str]]:
    out = []
    entries: Any = await redis.xrange(keys.CHAIN_STREAM)
    for _, f in entries:
        ptr = msg_from_entry(f, ChainPointer)
        blob = await redis.get(ptr.snapshot_key)
        assert isinstance(blob, bytes)
        out.append(sorted(c.cid for c in decode_snapshot(blob).contracts))
    return out


@FUZZ
@given(data=st.data(), n_bad=st.integers(1, 6), truncations=st.integers(0, 3))
def test_rest_bad_pages_are_counted_and_never_stop_the_chain_poller(
    redis_server: RedisServer, data: st.DataObject, n_bad: int, truncations: int
) -> None:
    """Page 1 of the first cycle carries bad items among good ones (split across two pages
    linked by next_url); the first ``truncations`` answers to that page are truncated JSON
    (retried). Every bad item is rejected with a reason from its expected set; the snapshot
    holds exactly the good contracts; the loop keeps going (a second snapshot arrives)."""
    cases = [data.draw(rest_case(i), label=f"bad{i}") for i in range(n_bad)]
    bad_items = [c[0] for c in cases]
    split = data.draw(st.integers(0, len(bad_items)), label="split")
    page1 = page(
        [GOOD_ITEMS[0], *bad_items[:split]],
        next_url="http://rest.fuzz/v3/snapshot/options/I:SPX?cursor=p2",
    )
    page2 = page([*bad_items[split:], GOOD_ITEMS[1]])
    cut = data.draw(st.integers(1, len(page1) - 1), label="cut")
    served = Counter[str]()

    def handler(req: httpx.Request) -> httpx.Response:
        path = req.url.path
        if path == "/v3/snapshot/indices":
            return httpx.Response(200, content=spot_page())
        if req.url.params.get("cursor") == "p2":
            return httpx.Response(200, content=page2)
        served["p1"] += 1
        if served["p1"] <= truncations:
            return httpx.Response(200, content=page1[:cut])
        return httpx.Response(200, content=page1)

    async def scenario() -> None:
        redis = Redis.from_url(redis_server.url)
        reg = CollectorRegistry()
        try:
            await redis.flushall()
            async with running_poller(redis, handler, reg, redis_server.url) as (_, task):

                async def two_snapshots() -> bool:
                    return await redis.xlen(keys.CHAIN_STREAM) >= 2

                await _wait(two_snapshots)
                assert not task.done()
                snaps = await snapshots(redis)
            assert all(s == GOOD_CIDS for s in snaps), snaps
            # rejected items: counted once per cycle they were served in
            per_cycle = n_bad
            total = sum(
                _val(reg, "massive_chain_poller_rejected_items_total", reason=r)
                for r in ("decode", "no_ticker", "bad_ticker", "details_mismatch",
                          "bad_contract_type", "wrong_underlying", "non_finite",
                          "negative_value", "bad_timestamp")
            )  # fmt: skip
            cycles = int(
                _val(reg, "massive_chain_poller_fetches_total", symbol="SPX", outcome="ok")
            )
            assert cycles >= 2 and total == per_cycle * cycles, (total, cycles, cases)
            allowed: Counter[str] = Counter()
            for _, reasons in cases:
                for r in reasons:
                    allowed[r] += cycles
            for r in allowed:
                assert (
                    _val(reg, "massive_chain_poller_rejected_items_total", reason=r) <= allowed[r]
                )
            assert _val(reg, "massive_chain_poller_errors_total", kind="decode") == truncations
        finally:
            await redis.aclose()

    asyncio.run(scenario())


async def test_rest_page_undecodable_every_time_is_a_counted_cycle_failure(
    redis: Redis, redis_server: RedisServer
) -> None:
    """A chain endpoint that only ever answers garbage (HTML, truncated JSON): every retry
    is counted, the cycle fails with a decode error, the loop backs off and tries again,
    and the first good answer produces a snapshot."""
    bodies = [b"<html>502 Bad Gateway</html>", b'{"status":"OK","results":[{"det', b"", b"null"]
    n = Counter[str]()
    healthy = asyncio.Event()

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/v3/snapshot/indices":
            return httpx.Response(200, content=spot_page())
        n["chain"] += 1
        if not healthy.is_set():
            return httpx.Response(200, content=bodies[n["chain"] % len(bodies)])
        return httpx.Response(200, content=page(GOOD_ITEMS))

    reg = CollectorRegistry()
    async with running_poller(redis, handler, reg, redis_server.url) as (poller, task):

        async def failed_twice() -> bool:
            return (
                _val(reg, "massive_chain_poller_fetches_total", symbol="SPX", outcome="error") >= 2
            )

        await _wait(failed_twice)
        assert await redis.xlen(keys.CHAIN_STREAM) == 0
        assert _val(reg, "massive_chain_poller_errors_total", kind="decode") >= 2 * 4
        assert not task.done()
        healthy.set()

        async def snapshot() -> bool:
            return await redis.xlen(keys.CHAIN_STREAM) >= 1

        await _wait(snapshot, timeout_s=30)
        assert (await snapshots(redis))[0] == GOOD_CIDS
        assert poller.last_error is not None and poller.last_error.kind == "decode"
