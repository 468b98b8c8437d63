"""chain-poller against the simulator (real HTTP, real Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from processors.ingest import chain_poller as cp
from processors.ingest import rest_client
from schemas import keys
from schemas.messages import (
    ChainPointer,
    ControlMessage,
    SpotTick,
    decode_snapshot,
    entry,
    from_entry,
)
from simulator.server import SimConfig, SimServer
from streams.processor import Deps
from streams.settings import from_env
from tests.util import FakeHttp, eventually

KEY = "sim-key"


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    srv = SimServer(SimConfig(seed=1, api_key=KEY, symbols=("SPX", "NDX"), market_open=True))
    await srv.start(host="127.0.0.1", port=0)
    try:
        yield srv
    finally:
        await srv.stop()


def make(deps: Deps, srv: SimServer, **kw: Any) -> cp.ChainPoller:
    base: dict[str, Any] = dict(
        api_key=KEY,
        rest_url=srv.rest_url,
        limit=100,
        expirations=3,
        max_days=10,
        band_pct=0.04,
        min_interval_s=30.0,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        control_block_ms=50,
        full_interval_s=0.0,  # the whole-chain fetch has its own test
    )
    symbols = kw.pop("symbols", None)
    base.update(kw)
    return cp.ChainPoller(deps, cp.PollerSettings(**base), symbols)


def metric(deps: Deps, name: str, **labels: str) -> float:
    v = deps.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


async def pointers(redis: Redis) -> list[ChainPointer]:
    return [from_entry(f, ChainPointer) for _i, f in await redis.xrange(keys.CHAIN_STREAM)]


@contextlib.asynccontextmanager
async def running(p: cp.ChainPoller) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(p.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def expected_cids(
    srv: SimServer, p: cp.ChainPoller, symbol: str, spot: float
) -> tuple[set[str], int]:
    """The filtered chain computed independently from the simulator's own contract list,
    and the number of contracts matching the server-side filter (before the N-expiry trim)."""
    today = p.today()
    horizon = (today + dt.timedelta(days=p.settings.max_days)).isoformat()
    lo, hi = round(spot * (1 - p.settings.band_pct), 3), round(spot * (1 + p.settings.band_pct), 3)
    listed = [
        c
        for c in srv.market.by_symbol[symbol]
        if today.isoformat() <= c.exp_s <= horizon and lo <= c.strike <= hi
    ]
    first = sorted({c.exp_s for c in listed})[: p.settings.expirations]
    return {c.ticker for c in listed if c.exp_s in first}, len(listed)


async def test_pages_to_the_end_every_contract_once(deps: Deps, sim: SimServer) -> None:
    p = make(deps, sim, limit=37)
    async with p.rest.client() as client:
        results = await p.cycle(client, "startup")
    assert [r.symbol for r in results] == ["SPX", "NDX"]
    ptrs = await pointers(deps.redis)
    assert [x.symbol for x in ptrs] == ["SPX", "NDX"]
    for ptr, res in zip(ptrs, results, strict=True):
        blob = await deps.redis.get(ptr.snapshot_key)
        assert blob is not None
        ttl = await deps.redis.ttl(ptr.snapshot_key)
        assert 0 < ttl <= p.settings.snapshot_ttl_s
        snap = decode_snapshot(blob)
        cids = [c.cid for c in snap.contracts]
        assert len(cids) == len(set(cids)) == ptr.n_contracts  # exactly once
        assert ptr.spot is not None and snap.spot == ptr.spot
        want, n_server = expected_cids(sim, p, ptr.symbol, ptr.spot)
        assert set(cids) == want
        assert res.pages > 1  # paging really happened (limit 37), to the last page
        assert res.pages == -(-n_server // 37)
        assert metric(deps, "massive_chain_poller_pages_total", symbol=ptr.symbol) == res.pages
        assert metric(deps, "massive_chain_poller_contracts", symbol=ptr.symbol) == len(cids)
        assert ptr.reason == "startup"
    spots = [from_entry(f, SpotTick) for _i, f in await deps.redis.xrange(keys.SPOT_STREAM)]
    assert [(s.symbol, s.source) for s in spots] == [("SPX", "rest"), ("NDX", "rest")]
    # index snapshot times are ns (the simulator clock is now)
    assert all(abs(s.ts_ns - time.time_ns()) < 60e9 for s in spots)


async def test_whole_chain_for_gex_at_its_own_cadence(deps: Deps, sim: SimServer) -> None:
    p = make(deps, sim, limit=250, full_interval_s=0.3, full_snapshot_ttl_s=90)
    async with running(p):

        async def two_full_each() -> bool:
            ptrs = await pointers(deps.redis)
            full = [x.symbol for x in ptrs if x.scope == "full"]
            return full.count("SPX") >= 2 and full.count("NDX") >= 2

        await eventually(two_full_each, timeout_s=60)
    ptrs = await pointers(deps.redis)
    window = {x.symbol: x for x in ptrs if x.scope == "window"}
    assert set(window) == {"SPX", "NDX"}  # the heatmap's window goes on (min_interval 30 s)
    today = p.today().isoformat()
    for ptr in [x for x in ptrs if x.scope == "full"][:2]:
        snap = decode_snapshot(await deps.redis.get(ptr.snapshot_key) or b"")
        listed = [c for c in sim.market.by_symbol[ptr.symbol] if c.exp_s >= today]
        assert {c.cid for c in snap.contracts} == {c.ticker for c in listed}
        assert {c.expiry for c in snap.contracts} == {c.exp_s for c in listed}
        assert 0 < await deps.redis.ttl(ptr.snapshot_key) <= 90
        assert ":full:" in ptr.snapshot_key and ptr.n_contracts == len(snap.contracts)
        win = decode_snapshot(await deps.redis.get(window[ptr.symbol].snapshot_key) or b"")
        win_exps = {c.expiry for c in win.contracts}
        assert len(win_exps) <= 3 < len({c.expiry for c in snap.contracts})  # narrow window
    n_spx = len([c for c in sim.market.by_symbol["SPX"] if c.exp_s >= today])
    assert metric(deps, "massive_chain_poller_full_contracts", symbol="SPX") == n_spx
    # a failed whole-chain fetch is counted and the other symbols still go
    p2 = make(deps, sim, limit=250, max_retries=0)
    async with p2.rest.client() as client:
        sim.fail_next(1, status=500)  # SPX's first whole-chain page
        done = await p2.full_cycle(client, {}, "cadence")
    assert [r.symbol for r in done] == ["NDX"]
    assert metric(deps, "massive_chain_poller_fetches_total", symbol="SPX", outcome="full_error")


async def test_bearer_auth_mode(deps: Deps, sim: SimServer) -> None:
    p = make(deps, sim, auth_mode="bearer", limit=250)
    async with p.rest.client() as client:
        results = await p.cycle(client, "startup")
    assert len(results) == 2 and all(r.contracts for r in results)


async def test_429_then_success_honours_retry_after(deps: Deps, sim: SimServer) -> None:
    p = make(deps, sim, symbols=("SPX",), limit=250)
    sim.fail_next(2, status=429)
    t0 = time.monotonic()
    async with p.rest.client() as client:
        (res,) = await p.cycle(client, "startup")
    elapsed = time.monotonic() - t0
    assert res.contracts
    assert sim.stats.responses.get(429) == 2
    assert metric(deps, "massive_chain_poller_retries_total", kind="rate_limited") == 2
    assert metric(deps, "massive_chain_poller_requests_total", status="429") == 2
    # Retry-After (1 s in the simulator) was honoured both times, backoff alone is <= 0.05 s
    assert elapsed >= 2 * sim.config.retry_after_s


async def test_500_burst_then_success(deps: Deps, sim: SimServer) -> None:
    p = make(deps, sim, limit=250)
    sim.fail_next(4, status=500)
    async with p.rest.client() as client:
        results = await p.cycle(client, "startup")
    assert len(results) == 2
    assert metric(deps, "massive_chain_poller_retries_total", kind="http_5xx") == 4
    assert len(await pointers(deps.redis)) == 2


async def test_5xx_beyond_retries_is_counted_not_raised(deps: Deps, sim: SimServer) -> None:
    p = make(deps, sim, symbols=("SPX", "NDX"), limit=250, max_retries=2)
    # index snapshot gets 3 x 503 (fails, falls back to chain spot); then SPX chain 3 x 503
    sim.fail_next(6, status=503)
    async with p.rest.client() as client:
        results = await p.cycle(client, "startup")
    assert [r.symbol for r in results] == ["NDX"]
    assert metric(deps, "massive_chain_poller_errors_total", kind="http_5xx") == 2
    assert metric(deps, "massive_chain_poller_fetches_total", symbol="SPX", outcome="error") == 1
    # NDX spot came from the chain's underlying_asset.value
    (ptr,) = await pointers(deps.redis)
    assert ptr.symbol == "NDX" and ptr.spot is not None
    assert abs(ptr.spot / sim.market.indices["NDX"].value - 1) < 0.05


async def test_auth_failure_is_clear_and_does_not_spin(deps: Deps, sim: SimServer) -> None:
    p = make(deps, sim, api_key="wrong-key", auth_retry_s=60.0)
    async with running(p):
        await eventually(
            lambda: _async(metric(deps, "massive_chain_poller_auth_failed") == 1), timeout_s=5
        )
        assert isinstance(p.last_error, cp.AuthError)
        assert p.last_error.status == 401
        assert "MASSIVE_API_KEY" in str(p.last_error)
        assert metric(deps, "massive_chain_poller_errors_total", kind="auth") == 1
        assert metric(deps, "massive_chain_poller_next_interval_seconds") == 60.0
        assert sim.stats.requests == 1  # one request, then a long wait (no retry storm)
        assert not p.ready
    assert await deps.redis.xlen(keys.CHAIN_STREAM) == 0


async def test_403_is_an_auth_error(deps: Deps, sim: SimServer) -> None:
    p = make(deps, sim)
    sim.fail_next(1, status=403)
    async with p.rest.client() as client:
        with pytest.raises(cp.AuthError) as ei:
            await p.cycle(client, "startup")
    assert ei.value.status == 403


async def _async(v: Any) -> Any:
    return v


async def test_refresh_requests_wake_the_loop_and_coalesce(deps: Deps, sim: SimServer) -> None:
    p = make(deps, sim, limit=250, min_interval_s=60.0)
    async with running(p):
        await eventually(lambda: _async(p.cycles == 1 and p.ready), timeout_s=10)
        # wait for the control group to exist (created by the poller at start)
        await eventually(
            lambda: _async(metric(deps, "massive_chain_poller_next_interval_seconds") >= 60)
        )
        async with deps.redis.pipeline(transaction=True) as pipe:
            for _ in range(3):
                msg = ControlMessage(
                    kind="refresh_chain", ts_ns=time.time_ns(), reason="ws_dormant"
                )
                pipe.xadd(keys.CONTROL_STREAM, entry(msg))  # type: ignore[arg-type]
            await pipe.execute()
        await eventually(lambda: _async(p.cycles == 2), timeout_s=10)
        ptrs = await pointers(deps.redis)
        assert [x.reason for x in ptrs] == ["startup", "startup", "dormancy", "dormancy"]
        assert metric(deps, "massive_chain_poller_refresh_requests_total", reason="ws_dormant") == 3
        assert p.cycles == 2  # three requests, one fetch


async def test_cadence_follows_fetch_latency(deps: Deps, sim: SimServer) -> None:
    """Next start >= max(min_interval, k * last cycle) after the previous one completed."""
    k = 3.0
    # One expiration, 250 per page: the chain's size (so the cycle time) depends
    # on the calendar (0DTE, monthly SPX listings); four cycles take ~3 (k + 1) cycles.
    p = make(deps, sim, limit=250, min_interval_s=0.05, latency_factor=k, expirations=1)
    async with running(p):
        await eventually(lambda: _async(p.cycles >= 4), timeout_s=90)
    cycle_s = metric(deps, "massive_chain_poller_cycle_seconds")
    assert metric(deps, "massive_chain_poller_next_interval_seconds") == pytest.approx(
        max(0.05, k * cycle_s)
    )
    spx = [x for x in await pointers(deps.redis) if x.symbol == "SPX"]
    assert len(spx) >= 4
    for a, b in itertools.pairwise(spx):
        # SPX is fetched first in a cycle: between two SPX writes lie the SPX fetch of the
        # next cycle and the wait (>= k * previous cycle >= k * previous SPX fetch)
        assert (b.ts_ns - a.ts_ns) / 1e9 >= k * a.fetch_s + b.fetch_s - 0.01


def test_next_url_on_our_base_keeps_cursor_and_reappends_key(deps: Deps) -> None:
    s = cp.PollerSettings(api_key="k1", rest_url="http://sim.local:8080")
    p = cp.ChainPoller(deps, s)
    u = p.rest.next_page_url("http://sim.local:8080/v3/snapshot/options/I:SPX?cursor=YWJj")
    assert (u.scheme, u.host, u.port, u.path) == (
        "http",
        "sim.local",
        8080,
        "/v3/snapshot/options/I:SPX",
    )
    assert dict(u.params) == {"cursor": "YWJj", "apiKey": "k1"}
    pb = cp.ChainPoller(deps, dataclasses.replace(s, auth_mode="bearer"))
    ub = pb.rest.next_page_url("http://sim.local:8080/v3/snapshot/options/I:SPX?cursor=YWJj")
    assert dict(ub.params) == {"cursor": "YWJj"}
    # the default port, spelled or not, is the same origin; a base path is kept
    ph = cp.ChainPoller(deps, dataclasses.replace(s, rest_url="https://api.massive.com/"))
    uh = ph.rest.next_page_url("https://api.massive.com:443/v3/snapshot/options/I:SPX?cursor=x")
    assert (uh.host, uh.port, uh.path) == ("api.massive.com", None, "/v3/snapshot/options/I:SPX")
    pp = cp.ChainPoller(deps, dataclasses.replace(s, rest_url="http://proxy:81/massive"))
    assert pp.rest.url("v3/snapshot/indices").path == "/massive/v3/snapshot/indices"
    assert pp.rest.next_page_url("http://proxy:81/massive/v3/x?cursor=1").path == "/massive/v3/x"


@pytest.mark.parametrize(
    ("next_url", "kind"),
    [
        ("https://evil.example/v3/snapshot/options/I:SPX?cursor=1", "next_url_foreign"),
        ("http://sim.local:8081/v3/snapshot/options/I:SPX?cursor=1", "next_url_foreign"),
        ("https://sim.local:8080/v3/snapshot/options/I:SPX?cursor=1", "next_url_foreign"),
        ("//evil.example/v3/snapshot/options/I:SPX?cursor=1", "next_url_foreign"),
        ("/v3/snapshot/options/I:SPX?cursor=1", "next_url_foreign"),
        ("http://user@evil.example:80@sim.local:8080/v3?cursor=1", "next_url_bad_path"),
        ("http://sim.local:8080/http://evil.example/x?cursor=1", "next_url_bad_path"),
        ("http://sim.local:8080//evil.example/x?cursor=1", "next_url_bad_path"),
        ("http://sim.local:8080/v3/%2e%2e/%2e%2e/x?cursor=1", "next_url_bad_path"),
        ("http://sim.local:8080/other/v3?cursor=1", "next_url_bad_path"),
    ],
)
def test_next_url_off_our_base_is_refused(deps: Deps, next_url: str, kind: str) -> None:
    p = cp.ChainPoller(deps, cp.PollerSettings(api_key="k1", rest_url="http://sim.local:8080/v3"))
    with pytest.raises(cp.FetchError) as ei:
        p.rest.next_page_url(next_url)
    assert ei.value.kind == kind
    assert "k1" not in str(ei.value)


async def test_a_hostile_next_url_never_reaches_another_host(deps: Deps) -> None:
    """A provider whose next_url path is itself a URL (or names another host): the request
    with the key never leaves for the other host; the fetch fails with a counted reason."""
    key = "hostile-test-key-0123456789"
    async with FakeHttp() as evil:
        hostile = [
            f"/http://127.0.0.1:{evil.port}/x?cursor=1",  # appended to the provider's origin
            f"http://127.0.0.1:{evil.port}/v3/snapshot/options/I:SPX?cursor=1",
            f"//127.0.0.1:{evil.port}/v3/snapshot/options/I:SPX?cursor=1",
        ]
        served: list[str] = []

        def answer(target: str) -> tuple[int, object]:
            if target.startswith("/v3/snapshot/options/I:SPX?") and "cursor" not in target:
                nxt = hostile[len(served)]
                nxt = provider.url + nxt if nxt.startswith("/http") else nxt
                served.append(nxt)
                return 200, {"status": "OK", "request_id": "r", "results": [], "next_url": nxt}
            return 404, {"status": "NOT_FOUND", "request_id": "r", "message": "no"}

        async with FakeHttp(answer) as provider:
            p = cp.ChainPoller(
                deps,
                cp.PollerSettings(api_key=key, rest_url=provider.url, max_retries=0),
                ("SPX",),
            )
            async with p.rest.client() as client:
                for _ in hostile:
                    with pytest.raises(cp.FetchError):
                        await p.cycle(client, "startup")
            assert len(served) == len(hostile)
    assert evil.requests == []  # never reached, key or not
    assert all(key not in t for t in provider.requests if "cursor" in t)
    assert metric(deps, "massive_chain_poller_errors_total", kind="next_url_bad_path") == 1
    assert metric(deps, "massive_chain_poller_errors_total", kind="next_url_foreign") == 2
    assert metric(deps, "massive_chain_poller_fetches_total", symbol="SPX", outcome="error") == 3


def test_retry_after_parsing() -> None:
    def resp(v: str | None) -> httpx.Response:
        return httpx.Response(429, headers={} if v is None else {"Retry-After": v})

    assert rest_client.retry_after_s(resp("3")) == 3.0
    assert rest_client.retry_after_s(resp(None)) is None
    assert rest_client.retry_after_s(resp("soon")) is None
    now = dt.datetime(2026, 1, 7, 15, 0, 0, tzinfo=dt.UTC)
    assert rest_client.retry_after_s(resp("Wed, 07 Jan 2026 15:00:05 GMT"), now) == 5.0


def test_settings_from_env() -> None:
    env = {
        "MASSIVE_API_KEY": "from-generic",
        "MASSIVE_POLLER_AUTH_MODE": "bearer",
        "MASSIVE_POLLER_BAND_POINTS": "200",
    }
    s = from_env(cp.PollerSettings, env)
    assert (s.api_key, s.auth_mode, s.band_points) == ("from-generic", "bearer", 200.0)
    own = from_env(cp.PollerSettings, {**env, "MASSIVE_POLLER_API_KEY": "own"})
    assert own.api_key == "own"
    with pytest.raises(ValueError, match="auth_mode"):
        from_env(cp.PollerSettings, {"MASSIVE_POLLER_AUTH_MODE": "cookie"})


def test_build_via_processor_loader(deps: Deps, monkeypatch: pytest.MonkeyPatch) -> None:
    from processors.registry import load

    monkeypatch.setenv("MASSIVE_API_KEY", "env-key")
    monkeypatch.setenv("MASSIVE_POLLER_REST_URL", "http://127.0.0.1:1")
    p = load("chain-poller", deps)
    assert isinstance(p, cp.ChainPoller) and p.name == "chain-poller" and not p.ready
    assert (p.settings.api_key, p.settings.rest_url, p.symbols) == (
        "env-key",
        "http://127.0.0.1:1",
        ("SPX", "NDX"),
    )
    only = load("chain-poller:spx", deps)
    assert isinstance(only, cp.ChainPoller) and only.symbols == ("SPX",)


def test_rest_retries_use_the_one_backoff_policy_with_full_jitter(deps: Deps) -> None:
    from streams.retry import Backoff

    s = cp.PollerSettings(backoff_base_s=0.2, backoff_max_s=3.0)
    p = cp.ChainPoller(deps, s)
    assert p.rest.settings.backoff == Backoff(base_s=0.2, cap_s=3.0, jitter="full")
    delays = [
        p.rest.settings.backoff.delay_s(4) for _ in range(400)
    ]  # window min(3.0, 0.2 * 2**4) = 3.0
    assert all(0 <= d <= 3.0 for d in delays) and min(delays) < 0.75 and max(delays) > 2.25
    with pytest.raises(ValueError, match="backoff"):
        from_env(cp.PollerSettings, {"MASSIVE_POLLER_BACKOFF_BASE_S": "0"})


def test_failed_cycles_back_off_with_the_one_policy(deps: Deps) -> None:
    """A cycle in which every symbol failed waits its cadence delay doubled per failed cycle
    (up to 6 x backoff_max_s); an internal failure (Redis down) min_interval_s doubled up to
    backoff_max_s; both with equal jitter (at least half the window)."""
    from streams.retry import Backoff

    s = cp.PollerSettings(min_interval_s=5.0, latency_factor=2.0, backoff_max_s=10.0)
    p = cp.ChainPoller(deps, s)
    fetch = p._failed_cycle_backoff(took=4.0)  # cadence max(5, 2 * 4) = 8
    assert fetch == Backoff(base_s=8.0, cap_s=60.0, jitter="equal")
    first = [fetch.delay_s(1) for _ in range(200)]  # window 16
    assert all(8.0 <= d <= 16.0 for d in first) and max(first) - min(first) > 4.0
    assert all(30.0 <= fetch.delay_s(6) <= 60.0 for _ in range(50))  # capped
    assert p._failed_cycle_backoff(took=100.0).base_s == 60.0  # a slow cycle: the cap
    internal = [p._internal_backoff.delay_s(n) for n in (0, 1, 5) for _ in range(50)]
    assert all(2.5 <= d <= 10.0 for d in internal)
    assert p._internal_backoff == Backoff(base_s=5.0, cap_s=10.0, jitter="equal")


async def test_stock_and_etf_chains_take_their_spot_from_underlying_asset(deps: Deps) -> None:
    srv = SimServer(SimConfig(seed=2, api_key=KEY, symbols=("SPX", "SPY", "AAPL")))
    await srv.start(host="127.0.0.1", port=0)
    try:
        srv.set_spot("AAPL", 231.5)
        p = make(deps, srv, symbols=("SPX", "SPY", "AAPL"))
        async with p.rest.client() as client:
            first = await p.cycle(client, "startup")
            again = await p.cycle(client, "cadence")
    finally:
        await srv.stop()
    assert [r.symbol for r in first] == ["SPX", "SPY", "AAPL"]
    ptrs = [x for x in await pointers(deps.redis) if x.symbol == "AAPL"]
    snap = decode_snapshot(await deps.redis.get(ptrs[-1].snapshot_key) or b"")
    assert snap.spot == 231.5 and snap.contracts
    assert {c.cid[2:6] for c in snap.contracts} == {"AAPL"}
    assert all(c.shares == 100 for c in snap.contracts)
    # band around the stock's own price (the first fetch had none: it is trimmed after)
    assert all(231.5 * 0.96 - 1e-6 <= c.strike <= 231.5 * 1.04 + 1e-6 for c in snap.contracts)
    ticks = [from_entry(f, SpotTick) for _i, f in await deps.redis.xrange(keys.SPOT_STREAM)]
    aapl = [t for t in ticks if t.symbol == "AAPL"]
    assert [t.value for t in aapl] == [231.5, 231.5] and all(t.source == "rest" for t in aapl)
    age = metric(
        deps, "massive_chain_poller_spot_age_seconds", symbol="AAPL", source="underlying_asset"
    )
    assert 0 <= age < 60
    assert p._last_spot["AAPL"][0] == 231.5  # the next band's centre
    assert next(r.spot for r in again if r.symbol == "SPY") is not None
    assert metric(deps, "massive_chain_poller_errors_total", kind="api_error") == 0
