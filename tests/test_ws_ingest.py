"""ws-ingest against the simulator's WebSockets (real sockets, real Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import websockets
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from processors.ingest import ws_ingest as wi
from schemas import keys
from schemas.massive import IndexValue, Quote, Trade, decode_frame
from schemas.messages import WS_PAYLOAD_FIELD, WS_RECV_FIELD, ControlMessage, from_entry
from simulator.server import SimConfig, SimServer
from streams.processor import Deps
from streams.settings import from_env
from tests.util import eventually

KEY = "sim-key"
NY = wi.NY


async def _v(v: Any) -> Any:
    return v


@contextlib.asynccontextmanager
async def simulator(**kw: Any) -> AsyncIterator[SimServer]:
    cfg: dict[str, Any] = dict(
        seed=1, api_key=KEY, symbols=("SPX", "NDX"), events_per_s=400.0, market_open=True
    )
    cfg.update(kw)
    srv = SimServer(SimConfig(**cfg))
    await srv.start(host="127.0.0.1", port=0)
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with simulator() as srv:
        yield srv


def front_contracts(srv: SimServer, symbol: str, n_exp: int = 3, band: float = 0.03) -> list[Any]:
    """A filtered chain like the poller's: first n expiries from today, strikes near spot."""
    spot = srv.market.indices[symbol].value
    today = dt.datetime.now(NY).date().isoformat()
    listed = [c for c in srv.market.by_symbol[symbol] if c.exp_s >= today]
    exps = sorted({c.exp_s for c in listed})[:n_exp]
    return [c for c in listed if c.exp_s in exps and abs(c.strike / spot - 1) <= band]


async def seed_epoch(redis: Redis, srv: SimServer, symbol: str, eid: str, cids: list[str]) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.sadd(keys.epoch_contracts(symbol, eid), *cids)
        pipe.hset(keys.SPOT_LATEST, symbol, repr(srv.market.indices[symbol].value))
        pipe.set(keys.epoch_active(symbol), eid)
        await pipe.execute()


async def seed_both(redis: Redis, srv: SimServer) -> dict[str, list[str]]:
    out = {}
    for sym in ("SPX", "NDX"):
        out[sym] = [c.ticker for c in front_contracts(srv, sym)]
        await seed_epoch(redis, srv, sym, f"{sym}-e1", out[sym])
    return out


def make(deps: Deps, srv: SimServer, **kw: Any) -> wi.WsIngest:
    base: dict[str, Any] = dict(
        api_key=KEY,
        url=srv.ws_url,
        market_hours="always",
        epoch_poll_s=0.1,
        reconnect_base_s=0.05,
        reconnect_max_s=0.2,
        silence_s=5.0,
    )
    symbols = kw.pop("symbols", None)
    base.update(kw)
    return wi.WsIngest(deps, wi.WsSettings(**base), symbols)


@contextlib.asynccontextmanager
async def running(w: wi.WsIngest) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    try:
        yield task
    finally:
        stop.set()
        with contextlib.suppress(wi.WsAuthError):
            await asyncio.wait_for(task, 15)


def metric(deps: Deps, name: str, **labels: str) -> float:
    v = deps.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


async def stream(redis: Redis) -> list[tuple[int, bytes]]:
    return [
        (int(f[WS_RECV_FIELD]), f[WS_PAYLOAD_FIELD]) for _i, f in await redis.xrange(keys.WS_STREAM)
    ]


def data_frames_sent(srv: SimServer) -> int:
    return srv.stats.frames_sent - srv.stats.events_sent.get("status", 0)


async def quiesce(redis: Redis, srv: SimServer) -> list[tuple[int, bytes]]:
    """Silence the simulator and wait until every data frame it sent is in the stream."""
    srv.set_silent(True)

    async def done() -> bool:
        return await redis.xlen(keys.WS_STREAM) == data_frames_sent(srv)

    await eventually(done, timeout_s=10)
    return await stream(redis)


def count_events(payloads: list[bytes]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in payloads:
        for e in decode_frame(p).events:
            k = {Trade: "T", Quote: "Q", IndexValue: "V"}.get(type(e))
            if k:
                out[k] = out.get(k, 0) + 1
    return out


async def wait_subscribed(w: wi.WsIngest) -> None:
    async def ok() -> bool:
        want = await w.desired("options")
        return bool(want) and w.feeds["options"].subscribed == want and w.ready

    await eventually(ok, timeout_s=10)


# --- forwarding ----------------------------------------------------------------------------
async def test_frames_forwarded_byte_for_byte_with_counts(deps: Deps, sim: SimServer) -> None:
    epochs = await seed_both(deps.redis, sim)
    w = make(deps, sim, max_quotes=40)
    t0 = time.time_ns()
    async with running(w):
        await wait_subscribed(w)

        async def enough() -> bool:
            return all(sim.stats.events_sent.get(k, 0) >= 5 for k in ("T", "Q", "V"))

        await eventually(enough, timeout_s=15)
        entries = await quiesce(deps.redis, sim)
    payloads = [p for _t, p in entries]
    # every data frame the simulator sent, in order of receipt, events exactly as sent
    sent = {k: sim.stats.events_sent.get(k, 0) for k in ("T", "Q", "V")}
    assert count_events(payloads) == sent
    recv = [t for t, _p in entries]
    assert recv == sorted(recv) and t0 <= recv[0] and recv[-1] <= time.time_ns()
    assert all(p.startswith(b"[") for p in payloads)
    assert not any(b'"status"' in p for p in payloads)  # status frames are not forwarded
    # cheap counters agree with what was forwarded
    feeds = ("options", "indices")
    assert sum(metric(deps, "massive_ws_ingest_frames_total", feed=f) for f in feeds) == len(
        payloads
    )
    assert sum(metric(deps, "massive_ws_ingest_bytes_total", feed=f) for f in feeds) == sum(
        map(len, payloads)
    )
    assert sum(metric(deps, "massive_ws_ingest_events_total", feed=f) for f in feeds) == sum(
        sent.values()
    )
    assert metric(deps, "massive_ws_ingest_written_total") == len(payloads)
    last = await deps.redis.get(keys.WS_LAST_EVENT)
    assert last is not None and int(last) in set(recv)
    # subscriptions: T for the whole epoch; Q nearest to spot in the front expiries, <= budget
    subs = w.feeds["options"].subscribed
    all_cids = {c for cids in epochs.values() for c in cids}
    assert {p[2:] for p in subs if p.startswith("T.")} == all_cids
    quoted = {p[2:] for p in subs if p.startswith("Q.")}
    assert len(quoted) == 40
    for sym in ("SPX", "NDX"):
        spot = float(await deps.redis.hget(keys.SPOT_LATEST, sym))  # type: ignore[arg-type]
        front = sorted({c.exp_s for c in front_contracts(sim, sym)})[:2]
        cands = [c for c in front_contracts(sim, sym) if c.exp_s in front]
        mine = [c for c in cands if c.ticker in quoted]
        others = [c for c in cands if c.ticker not in quoted]
        assert len(mine) == 20  # equal shares
        assert max(abs(c.strike - spot) for c in mine) <= min(abs(c.strike - spot) for c in others)
    q_syms = {e.sym for p in payloads for e in decode_frame(p).events if isinstance(e, Quote)}
    assert q_syms <= quoted


# --- reconnect -----------------------------------------------------------------------------
async def test_reconnect_and_resubscribe_after_drop(deps: Deps, sim: SimServer) -> None:
    await seed_both(deps.redis, sim)
    w = make(deps, sim)
    async with running(w):
        await wait_subscribed(w)
        await eventually(lambda: _v(sim.stats.events_sent.get("T", 0) > 0), timeout_s=10)
        before = sim.stats.connections_total
        assert before == 2
        sim.drop_ws()
        await eventually(
            lambda: _v(w.feeds["options"].connections == 2 and w.feeds["indices"].connections == 2),
            timeout_s=10,
        )
        await wait_subscribed(w)
        assert sim.stats.connections_total == 4
        assert metric(deps, "massive_ws_ingest_reconnects_total", feed="options", reason="dropped")
        # events flow again on the new connections
        n = await deps.redis.xlen(keys.WS_STREAM)
        t_sent = sim.stats.events_sent.get("T", 0)

        async def flowing() -> bool:
            return (
                sim.stats.events_sent.get("T", 0) > t_sent
                and sim.stats.events_sent.get("V", 0) > 0
                and await deps.redis.xlen(keys.WS_STREAM) > n
            )

        await eventually(flowing, timeout_s=10)
        entries = await quiesce(deps.redis, sim)
    assert count_events([p for _t, p in entries])["T"] == sim.stats.events_sent["T"]


async def test_max_connections_reconnects_with_backoff(deps: Deps) -> None:
    async with simulator(max_connections=1) as srv:
        await seed_both(deps.redis, srv)
        other = await websockets.connect(f"{srv.ws_url}/options")
        await other.recv()
        await other.send(json.dumps({"action": "auth", "params": KEY}))
        assert "auth_success" in str(await other.recv())
        w = make(deps, srv)
        async with running(w):
            await eventually(
                lambda: _v(
                    metric(
                        deps,
                        "massive_ws_ingest_reconnects_total",
                        feed="options",
                        reason="max_connections",
                    )
                    >= 2
                ),
                timeout_s=10,
            )
            assert not w.ready
            await other.close()
            await wait_subscribed(w)
            assert (
                metric(
                    deps, "massive_ws_ingest_status_total", feed="options", status="max_connections"
                )
                >= 2
            )


# --- epoch change --------------------------------------------------------------------------
async def test_epoch_change_resubscribes_by_diff_without_reconnect(
    deps: Deps, sim: SimServer
) -> None:
    epochs = await seed_both(deps.redis, sim)
    w = make(deps, sim, quotes=False)
    async with running(w):
        await wait_subscribed(w)
        old = set(w.feeds["options"].subscribed)
        new_strike = sim.list_new_strike("SPX")
        # drop the 7 contracts nearest to spot (the busiest ones)
        spot = sim.market.indices["SPX"].value
        near = sorted(front_contracts(sim, "SPX"), key=lambda c: (abs(c.strike - spot), c.exp_s))
        dropped = [c.ticker for c in near[:7]]
        e2 = [c for c in epochs["SPX"] if c not in dropped] + new_strike
        await seed_epoch(deps.redis, sim, "SPX", "SPX-e2", e2)
        await wait_subscribed(w)
        new = w.feeds["options"].subscribed
        assert {f"T.{c}" for c in new_strike} <= new
        assert not {f"T.{c}" for c in dropped} & new
        assert old - new == {f"T.{c}" for c in dropped}
        # no reconnect, and exactly the diff went over the wire
        assert w.feeds["options"].connections == 1
        assert sim.stats.connections_total == 2
        assert metric(
            deps,
            "massive_ws_ingest_subscription_changes_total",
            feed="options",
            action="unsubscribe",
        ) == len(dropped)
        assert metric(
            deps, "massive_ws_ingest_subscription_changes_total", feed="options", action="subscribe"
        ) == len(old) + len(new_strike)
        # the unsubscribed contracts stop arriving, the rest keep flowing. Every options
        # frame received after the acks (counted below) was sent after the simulator
        # processed the unsubscribe.
        n_acked = int(metric(deps, "massive_ws_ingest_frames_total", feed="options"))
        t_before = sim.stats.events_sent.get("T", 0)
        await eventually(
            lambda: _v(sim.stats.events_sent.get("T", 0) > t_before + 50), timeout_s=15
        )
        entries = await quiesce(deps.redis, sim)
    options = [p for _t, p in entries if b'"sym":"O:' in p.replace(b" ", b"")]
    after = [e for p in options[n_acked:] for e in decode_frame(p).events]
    assert any(isinstance(e, Trade) for e in after)
    assert not any(isinstance(e, Trade) and e.sym in dropped for e in after)


# --- dormancy ------------------------------------------------------------------------------
async def control_messages(redis: Redis) -> list[ControlMessage]:
    return [from_entry(f, ControlMessage) for _i, f in await redis.xrange(keys.CONTROL_STREAM)]


async def test_dormancy_signal_after_silence(deps: Deps, sim: SimServer) -> None:
    await seed_both(deps.redis, sim)
    w = make(deps, sim, silence_s=0.3)
    async with running(w):
        await wait_subscribed(w)
        await eventually(lambda: _v(sim.stats.events_sent.get("T", 0) > 0), timeout_s=10)
        sim.set_silent(True)
        msgs = await eventually(lambda: control_messages(deps.redis), timeout_s=5)
        assert msgs[0].kind == "refresh_chain" and msgs[0].reason == "ws_dormant"
        # repeated once per silence period while the silence lasts
        t0 = time.monotonic()
        await eventually(lambda: _v(w.dormant_signals >= 3), timeout_s=5)
        assert time.monotonic() - t0 >= 2 * 0.3 * 0.9
        assert metric(deps, "massive_ws_ingest_dormancy_signals_total") == w.dormant_signals
        sim.set_silent(False)
        # data again: the signals stop (the next check sees fresh data)
        await eventually(
            lambda: _v(deps.clock.monotonic() - w._last_data_mono["options"] < 0.1), timeout_s=5
        )
        n = w.dormant_signals
        resumed_ns = time.time_ns()
        frames = metric(deps, "massive_ws_ingest_frames_total", feed="options")
        await eventually(
            lambda: _v(
                metric(deps, "massive_ws_ingest_frames_total", feed="options") > frames + 20
            ),
            timeout_s=10,
        )
        extra = w.dormant_signals - n
        end_ns = time.time_ns()
        assert len(await control_messages(deps.redis)) == w.dormant_signals
    # While data flows, a signal may only follow a real gap >= silence_s between options
    # frames (a loaded CI machine can stall the simulator): compare with the receive times.
    times = [resumed_ns]
    for t, p in await stream(deps.redis):
        if t >= resumed_ns and b'"sym":"O:' in p.replace(b" ", b""):
            times.append(t)
    times.append(end_ns)
    allowed = sum(int((b - a) / 1e9 // 0.3) for a, b in itertools.pairwise(times))
    assert extra <= allowed


async def test_no_dormancy_signal_when_market_closed(deps: Deps, sim: SimServer) -> None:
    await seed_both(deps.redis, sim)
    sim.set_silent(True)
    w = make(deps, sim, silence_s=0.2, market_hours="never")
    async with running(w):
        await wait_subscribed(w)
        # indices frames are also silenced: wait several silence periods of real silence
        t0 = time.monotonic()
        await eventually(lambda: _v(time.monotonic() - t0 > 1.0), timeout_s=3)
    assert w.dormant_signals == 0 and await deps.redis.xlen(keys.CONTROL_STREAM) == 0


def test_market_hours() -> None:
    s = wi.WsSettings()

    def ns(y: int, m: int, d: int, hh: int, mm: int) -> int:
        return int(dt.datetime(y, m, d, hh, mm, tzinfo=NY).timestamp() * 1e9)

    assert wi.market_expected_open(ns(2026, 1, 7, 9, 30), s)  # Wednesday, EST
    assert wi.market_expected_open(ns(2026, 7, 7, 16, 14), s)  # Tuesday, EDT
    assert not wi.market_expected_open(ns(2026, 1, 7, 9, 29), s)
    assert not wi.market_expected_open(ns(2026, 1, 7, 16, 15), s)
    assert not wi.market_expected_open(ns(2026, 1, 10, 12, 0), s)  # Saturday
    assert wi.market_expected_open(0, wi.WsSettings(market_hours="always"))
    assert not wi.market_expected_open(ns(2026, 1, 7, 12, 0), wi.WsSettings(market_hours="never"))


# --- malformed frames ----------------------------------------------------------------------
async def test_malformed_frames_forwarded_and_counted(deps: Deps, sim: SimServer) -> None:
    epochs = await seed_both(deps.redis, sim)
    known = {c for cids in epochs.values() for c in cids} | {"I:SPX", "I:NDX"}
    w = make(deps, sim)
    async with running(w):
        await wait_subscribed(w)
        await eventually(lambda: _v(sim.stats.events_sent.get("T", 0) > 10), timeout_s=10)
        sim.inject_malformed(10)
        await eventually(lambda: _v(sim.stats.malformed_sent == 10), timeout_s=10)
        t_sent = sim.stats.events_sent.get("T", 0)
        await eventually(lambda: _v(sim.stats.events_sent.get("T", 0) > t_sent + 10), timeout_s=10)
        entries = await quiesce(deps.redis, sim)
        assert w.feeds["options"].connections == 1  # malformed frames never broke the socket
        assert w.feeds["indices"].connections == 1
    payloads = [p for _t, p in entries]

    def is_good(p: bytes) -> bool:
        d = decode_frame(p)
        syms = {e.sym if not isinstance(e, IndexValue) else e.ticker for e in d.events}
        return not d.errors and syms <= known

    good = [p for p in payloads if is_good(p)]
    bad = [p for p in payloads if not is_good(p)]
    assert len(bad) == sim.stats.malformed_sent == 10  # every malformed frame forwarded
    # the good frames around them: every event the simulator sent, none lost
    sent = {k: sim.stats.events_sent.get(k, 0) for k in ("T", "Q", "V")}
    assert count_events(good) == {k: v for k, v in sent.items() if v}

    def strict(const: str) -> Any:
        raise ValueError(f"{const} is not JSON")

    def not_an_array(p: bytes) -> bool:  # strict JSON: NaN/Infinity literals are invalid
        try:
            return not isinstance(json.loads(p, parse_constant=strict), list)
        except ValueError:
            return True

    n_syntax = sum(map(not_an_array, payloads))
    assert n_syntax >= 1
    assert (
        metric(deps, "massive_ws_ingest_malformed_frames_total", feed="options")
        + metric(deps, "massive_ws_ingest_malformed_frames_total", feed="indices")
        == n_syntax
    )


# --- auth ----------------------------------------------------------------------------------
async def test_auth_failed_is_fatal_and_clear(deps: Deps, sim: SimServer) -> None:
    w = make(deps, sim, api_key="wrong")
    stop = asyncio.Event()
    with pytest.raises(wi.WsAuthError, match="MASSIVE_API_KEY"):
        await asyncio.wait_for(w.run(stop), 10)
    assert metric(deps, "massive_ws_ingest_auth_failed") == 1
    assert (
        metric(deps, "massive_ws_ingest_status_total", feed="options", status="auth_failed")
        + (metric(deps, "massive_ws_ingest_status_total", feed="indices", status="auth_failed"))
        >= 1
    )


# --- pure helpers --------------------------------------------------------------------------
@given(
    st.dictionaries(
        st.sampled_from(["SPX", "NDX", "RUT"]),
        st.lists(st.integers(min_value=0, max_value=99), max_size=30, unique=True),
    ),
    st.integers(min_value=0, max_value=60),
)
@settings(deadline=None)
def test_allocate_quote_budget(raw: dict[str, list[int]], budget: int) -> None:
    ranked = {sym: [f"{sym}{i}" for i in v] for sym, v in raw.items()}
    out = wi.allocate(ranked, budget)
    total = sum(len(v) for v in ranked.values())
    assert len(out) == len(set(out)) == min(budget, total)
    for items in ranked.values():
        got = [x for x in out if x in set(items)]
        assert got == items[: len(got)]  # each symbol takes its best-ranked first
        # fair: a symbol left short still got at least an equal share of the budget
        if len(got) < len(items):
            assert len(got) >= budget // len(ranked)


def test_settings_from_env() -> None:
    s = from_env(
        wi.WsSettings,
        {"MASSIVE_API_KEY": "k", "MASSIVE_WS_SILENCE_S": "0.5", "MASSIVE_WS_QUOTES": "false"},
    )
    assert (s.api_key, s.silence_s, s.quotes) == ("k", 0.5, False)
    with pytest.raises(ValueError, match="max_quotes"):
        from_env(wi.WsSettings, {"MASSIVE_WS_MAX_QUOTES": "1001"})


def test_build_via_processor_loader(deps: Deps, monkeypatch: pytest.MonkeyPatch) -> None:
    from processors.registry import load

    monkeypatch.setenv("MASSIVE_API_KEY", "env-key")
    monkeypatch.setenv("MASSIVE_WS_URL", "ws://127.0.0.1:1")
    w = load("ws-ingest", deps)
    assert isinstance(w, wi.WsIngest) and w.name == "ws-ingest" and not w.ready
    assert (w.settings.api_key, w.settings.url) == ("env-key", "ws://127.0.0.1:1")
    assert set(w.feeds) == {"options", "indices"}
    assert load("ws-ingest:ndx", deps).symbols == ("NDX",)  # type: ignore[attr-defined]


def test_reconnects_use_the_one_backoff_policy_with_equal_jitter(deps: Deps) -> None:
    from streams.retry import Backoff

    s = wi.WsSettings(reconnect_base_s=0.5, reconnect_max_s=8.0)
    w = wi.WsIngest(deps, s)
    assert w._backoff == Backoff(base_s=0.5, cap_s=8.0, jitter="equal")
    delays = [w._backoff.delay_s(3) for _ in range(400)]  # window min(8, 0.5 * 2**3) = 4
    assert all(2.0 <= d <= 4.0 for d in delays) and max(delays) > 3.5
    with pytest.raises(ValueError, match="backoff"):
        from_env(wi.WsSettings, {"MASSIVE_WS_RECONNECT_MAX_S": "0.1"})


async def test_stock_symbols_take_their_spot_from_the_stocks_feed(deps: Deps) -> None:
    async with simulator(symbols=("SPX", "SPY", "AAPL"), index_interval_s=0.1) as srv:
        w = make(deps, srv, symbols=("SPX", "SPY", "AAPL"), trades=False, quotes=False)
        assert sorted(w.feeds) == ["indices", "stocks"]
        assert await w.desired("indices") == {"V.I:SPX"}
        assert await w.desired("stocks") == {"T.SPY", "Q.SPY", "T.AAPL", "Q.AAPL"}
        async with running(w):

            async def both() -> bool:
                got = count_events([p for _t, p in await stream(deps.redis)])
                return got.get("V", 0) >= 2 and got.get("T", 0) >= 4 and got.get("Q", 0) >= 4

            await eventually(both, timeout_s=15)
            assert w.feeds["stocks"].subscribed == {"T.SPY", "Q.SPY", "T.AAPL", "Q.AAPL"}
    syms = {
        getattr(e, "sym", None) or getattr(e, "ticker", None)
        for _t, p in await stream(deps.redis)
        for e in decode_frame(p).events
    }
    assert syms == {"I:SPX", "SPY", "AAPL"}
    assert metric(deps, "massive_ws_ingest_connected", feed="stocks") == 0
    assert metric(deps, "massive_ws_ingest_connections_total", feed="stocks") >= 1
    # only equities: no /indices connection at all
    eq = make(deps, srv, symbols=("SPY",))
    assert sorted(eq.feeds) == ["options", "stocks"]
