"""ws-ingest: Massive WebSocket feeds -> raw frames on massive:{ws}:stream.

Up to three connections: ``<ws_url>/options`` (``T.`` for every contract of the active
epochs, plus ``Q.`` for at most ``max_quotes`` contracts per connection: the nearest-to-spot
contracts of the front expiries), ``<ws_url>/indices`` (``V.I:SPX``, ``V.I:NDX``: the spot of
the index symbols) and ``<ws_url>/stocks`` (``T.SPY``, ``Q.SPY``: the spot of the stock and
ETF symbols, whose frames the hydrator turns into spot updates). Which symbol is which comes
from its spec (schemas/symbols.py); a feed no configured symbol needs is not opened.

* Handshake: ``connected`` -> ``{"action":"auth"}`` -> ``auth_success``. ``auth_failed`` is
  fatal (:class:`WsAuthError` propagates out of ``run``: "check MASSIVE_API_KEY").
  ``max_connections`` / ``force_disconnect`` / ``slow_consumer`` / ``auth_timeout`` and any
  drop: counted, reconnect with exponential backoff + jitter, resubscribe everything.
* Subscriptions follow the active epoch (``GET massive:epoch:active:{<SYM>}``,
  ``SMEMBERS epoch:{<SYM>}:<eid>:contracts``, polled every ``epoch_poll_s``) by DIFF on the live
  connection: unsubscribe removed, subscribe added, in chunks of ``subscribe_chunk`` params.
* Every data frame is forwarded byte for byte with its receive time
  (``{recv_ts_ns, payload}``) through one writer task that pipelines bounded XADDs (a batch
  grows with the backlog, so one round trip carries many frames under load). Status frames
  are handled, not forwarded. Frames are not validated here (the hydrator does it); a
  shallow msgspec pass counts events and flags frames that are not a JSON array (counted as
  malformed, still forwarded).
* Dormancy: no options data for ``silence_s`` while the market is expected open -> XADD
  ``ControlMessage(kind="refresh_chain", reason="ws_dormant")`` on massive:{control}:stream,
  then again every ``silence_s`` while the silence lasts. ``massive:ws:last_event_ns`` is
  refreshed at most every ``last_event_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

import msgspec
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from processors.epochs.topology import ActiveTopology
from schemas import keys, ticker
from schemas import symbols as symbol_specs
from schemas.massive import Status, decode_frame
from schemas.messages import WS_PAYLOAD_FIELD, WS_RECV_FIELD, ControlMessage, entry
from streams import metrics
from streams.clock import NY
from streams.logs import add_secret
from streams.processor import Deps, FatalError
from streams.producer import xadd
from streams.retry import REDIS_BACKOFF, Backoff, sleep_or_stop
from streams.runner import Supervisor, cancel_and_wait
from streams.settings import env_settings, fallback_env, from_env, stage_symbols

logger = logging.getLogger(__name__)

DISCONNECT_STATUSES = frozenset({"max_connections", "force_disconnect", "slow_consumer"})
KNOWN_STATUSES = frozenset(
    {
        "connected",
        "auth_success",
        "auth_failed",
        "auth_timeout",
        "success",
        "auth_required",
        "error",
        *DISCONNECT_STATUSES,
    }
)
_raw_list = msgspec.json.Decoder(list[msgspec.Raw])


@env_settings("MASSIVE_WS_")
@dataclass(frozen=True, slots=True)
class WsSettings:
    """Env prefix ``MASSIVE_WS_``; the key is also read from ``MASSIVE_API_KEY``."""

    api_key: str = fallback_env("MASSIVE_API_KEY", "")
    url: str = "wss://socket.massive.com"
    trades: bool = True
    quotes: bool = True
    max_quotes: int = 1000  # provider limit: 1,000 Q contracts per connection
    quote_expiries: int = 2  # Q only for the front expiries (0DTE first)
    quote_recenter_pct: float = 0.0025  # move the Q window when spot moved this much
    indices: bool = True  # V.I:<index> on /indices for the index symbols
    stocks: bool = True  # T.<ticker> (and Q. when stock_quotes) on /stocks for stocks/ETFs
    stock_quotes: bool = True
    subscribe_chunk: int = 500  # params per subscribe/unsubscribe message
    epoch_poll_s: float = 1.0
    ack_timeout_s: float = 5.0  # wait for the per-param answers of one (un)subscribe message
    silence_s: float = 5.0
    market_hours: str = "auto"  # auto (NY Mon-Fri open..close) | always | never
    market_open: str = "09:30"
    market_close: str = "16:15"
    last_event_interval_s: float = 1.0
    reconnect_base_s: float = 0.5
    reconnect_max_s: float = 30.0
    auth_timeout_s: float = 10.0
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 30.0
    max_frame_bytes: int = 16 * 1024 * 1024
    batch_max: int = 2000  # frames per pipelined XADD round trip
    queue_max: int = 100_000  # frames buffered before the reader waits (backpressure)
    stream_maxlen: int = 500_000

    def __post_init__(self) -> None:
        if self.market_hours not in ("auto", "always", "never"):
            raise ValueError(f"market_hours must be auto|always|never: {self.market_hours!r}")
        if not 1 <= self.max_quotes <= 1000:
            raise ValueError("max_quotes must be 1..1000 (provider limit per connection)")
        if self.subscribe_chunk < 1 or self.batch_max < 1 or self.queue_max < 1:
            raise ValueError("subscribe_chunk, batch_max and queue_max must be >= 1")
        if self.silence_s <= 0 or self.epoch_poll_s <= 0:
            raise ValueError("silence_s and epoch_poll_s must be > 0")
        for t in (self.market_open, self.market_close):
            dt.time.fromisoformat(t)
        self.backoff()  # raises on a bad backoff

    def backoff(self) -> Backoff:
        """Reconnects: equal jitter (at least half the window: a restarting server is not
        hit by an immediate reconnect)."""
        return Backoff(base_s=self.reconnect_base_s, cap_s=self.reconnect_max_s, jitter="equal")


def market_expected_open(now_ns: int, s: WsSettings) -> bool:
    """Regular session of SPX/NDX options (NY time, Mon-Fri; exchange holidays are not
    modelled: on a holiday the dormancy signal only costs an extra chain fetch)."""
    if s.market_hours != "auto":
        return s.market_hours == "always"
    now = dt.datetime.fromtimestamp(now_ns / 1e9, NY)
    if now.weekday() >= 5:
        return False
    t = now.time()
    return dt.time.fromisoformat(s.market_open) <= t < dt.time.fromisoformat(s.market_close)


class WsAuthError(FatalError):
    """auth_failed: the key is wrong or not entitled to this feed (fatal: the CLI says so
    on one line and exits non-zero)."""


class _Disconnect(Exception):
    """The server announced a disconnect (status) or the handshake went wrong."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(slots=True)
class _Feed:
    market: str  # "options" | "indices"
    subscribed: set[str] = field(default_factory=set)
    acks: int = 0  # success/error answers to (un)subscribe params on this connection
    ack_event: asyncio.Event = field(default_factory=asyncio.Event)
    connected: bool = False
    authed_once: bool = False
    connections: int = 0


@dataclass(slots=True)
class _EpochView:
    eid: str
    contracts: list[tuple[str, str, float]]  # (cid, expiry, strike), unparsable cids dropped


class WsIngest:
    name = "ws-ingest"

    def __init__(
        self, deps: Deps, settings: WsSettings, symbols: tuple[str, ...] | None = None
    ) -> None:
        self.deps = deps
        self.redis = deps.redis
        self.clock = deps.clock
        self.settings = settings
        self.symbols = symbols or deps.settings.symbols
        self._backoff = settings.backoff()
        self.feeds: dict[str, _Feed] = {}
        if settings.trades or settings.quotes:
            self.feeds["options"] = _Feed("options")
        known = symbol_specs.registry()
        self.specs = {sym: known.spec(sym) for sym in self.symbols}
        if settings.indices and any(sp.is_index for sp in self.specs.values()):
            self.feeds["indices"] = _Feed("indices")
        if settings.stocks and any(not sp.is_index for sp in self.specs.values()):
            self.feeds["stocks"] = _Feed("stocks")
        self._dormancy_feed = "options" if "options" in self.feeds else next(iter(self.feeds), "")
        self._queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue(settings.queue_max)
        self.topology = ActiveTopology(self.redis)
        self._epochs: dict[str, _EpochView] = {}  # parsed from the topology, per epoch
        self._q_center: dict[str, tuple[str, float]] = {}  # sym -> (eid, spot used)
        self._last_data_mono: dict[str, float] = {}
        self._last_signal_mono: float | None = None
        self._last_event_write = -1e18
        self._stop: asyncio.Event | None = None
        self.dormant_signals = 0
        add_secret(settings.api_key)
        if not settings.api_key:
            logger.warning("ws-ingest: no API key configured (set MASSIVE_API_KEY)")
        reg = deps.registry
        p = "massive_ws_ingest_"
        fl = ("feed",)
        self.m_conn = metrics.counter(reg, p + "connections_total", "WS connections opened", fl)
        self.m_connected = metrics.gauge(reg, p + "connected", "1 while authenticated", fl)
        self.m_frames = metrics.counter(reg, p + "frames_total", "Data frames received", fl)
        self.m_bytes = metrics.counter(reg, p + "bytes_total", "Data frame bytes received", fl)
        self.m_events = metrics.counter(reg, p + "events_total", "Events in data frames", fl)
        self.m_malformed = metrics.counter(
            reg, p + "malformed_frames_total", "Data frames that are not a JSON array", fl
        )
        self.m_status = metrics.counter(
            reg, p + "status_total", "Status messages by status", ("feed", "status")
        )
        self.m_reconnects = metrics.counter(
            reg, p + "reconnects_total", "Reconnects by reason", ("feed", "reason")
        )
        self.m_subs = metrics.gauge(
            reg, p + "subscriptions", "Current subscriptions", ("feed", "channel")
        )
        self.m_sub_changes = metrics.counter(
            reg, p + "subscription_changes_total", "Params (un)subscribed", ("feed", "action")
        )
        self.m_dormant = metrics.counter(
            reg, p + "dormancy_signals_total", "refresh_chain requests sent on WS silence"
        )
        self.m_written = metrics.counter(reg, p + "written_total", "Frames XADDed")
        self.m_batch = metrics.histogram(
            reg,
            p + "write_batch_frames",
            "Frames per pipelined XADD round trip",
            buckets=(1, 2, 5, 10, 50, 100, 500, 1000, 2000, 5000),
        )
        self.m_redis_errors = metrics.counter(
            reg, p + "redis_errors_total", "Failed Redis writes (retried)"
        )
        self.m_queue = metrics.gauge(reg, p + "queue_frames", "Frames waiting for the writer")
        self.m_auth_failed = metrics.gauge(reg, p + "auth_failed", "1 after auth_failed")

    @property
    def ready(self) -> bool:
        return bool(self.feeds) and all(f.connected for f in self.feeds.values())

    # --- lifecycle ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """The feeds, the dormancy watch and the writer as one ``asyncio.TaskGroup``, until
        ``stop`` or until one of them ends (an error: raised once all have stopped, several
        as an ``ExceptionGroup``). On the way out the feeds are cancelled first, then the
        writer flushes what was received, within ``grace_s``."""
        self._stop = stop
        now = self.clock.monotonic()
        for market in self.feeds:
            self._last_data_mono[market] = now
        # an error raised while stopping (e.g. a second feed's auth_failed) is said once
        sup = Supervisor(late_errors=False)
        try:
            async with asyncio.TaskGroup() as tg:
                writer = tg.create_task(sup.watch(self._writer()), name="ws-writer")
                readers = [tg.create_task(sup.watch(self._dormancy(stop)), name="ws-dormancy")]
                readers += [
                    tg.create_task(sup.watch(self._feed_loop(f, stop)), name=f"ws-{f.market}")
                    for f in self.feeds.values()
                ]
                relay = tg.create_task(_relay(stop, sup.ended), name="ws-stop")
                await sup.ended.wait()
                await cancel_and_wait((relay, *readers))
                # flush what was received before stopping
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.deps.settings.grace_s):
                        if not writer.done():
                            await self._queue.join()
                await cancel_and_wait((writer,))
        finally:
            for f in self.feeds.values():
                f.connected = False
                self.m_connected.labels(f.market).set(0)
        sup.raise_errors("ws-ingest tasks")

    async def _sleep(self, seconds: float) -> None:
        await sleep_or_stop(self._stop, seconds)

    # --- connection -----------------------------------------------------------------------
    async def _feed_loop(self, feed: _Feed, stop: asyncio.Event) -> None:
        url = f"{self.settings.url.rstrip('/')}/{feed.market}"
        attempt = 0
        while not stop.is_set():
            reason = "closed"
            try:
                async with websockets.connect(
                    url,
                    max_size=self.settings.max_frame_bytes,
                    ping_interval=self.settings.ping_interval_s,
                    ping_timeout=self.settings.ping_timeout_s,
                    open_timeout=self.settings.auth_timeout_s,
                    close_timeout=2,
                ) as ws:
                    feed.connections += 1
                    self.m_conn.labels(feed.market).inc()
                    await self._handshake(feed, ws)
                    attempt = 0
                    feed.subscribed = set()
                    feed.acks = 0
                    feed.connected = feed.authed_once = True
                    self.m_connected.labels(feed.market).set(1)
                    logger.info("ws-ingest: %s connected and authenticated", feed.market)
                    subs = asyncio.create_task(self._subscriber(feed, ws))
                    try:
                        await self._read(feed, ws, subs)
                    finally:
                        await cancel_and_wait([subs])
            except WsAuthError:
                self.m_auth_failed.set(1)
                raise
            except _Disconnect as exc:
                reason = exc.reason
                logger.warning("ws-ingest: %s disconnect: %s", feed.market, exc)
            except ConnectionClosed as exc:
                reason = "dropped"
                logger.warning("ws-ingest: %s connection closed: %s", feed.market, exc)
            except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
                reason = "connect_failed"
                logger.warning("ws-ingest: %s connect failed: %r", feed.market, exc)
            feed.connected = False
            feed.subscribed = set()
            self.m_connected.labels(feed.market).set(0)
            if stop.is_set():
                break
            self.m_reconnects.labels(feed.market, reason).inc()
            delay = self._backoff.delay_s(attempt)
            attempt += 1
            logger.info("ws-ingest: %s reconnecting in %.2fs (%s)", feed.market, delay, reason)
            await self._sleep(delay)

    @staticmethod
    async def _recv(ws: ClientConnection) -> bytes:
        raw = await ws.recv(decode=False)  # bytes as received: no UTF-8 decode, no copy
        return raw if isinstance(raw, bytes) else raw.encode()

    async def _handshake(self, feed: _Feed, ws: ClientConnection) -> None:
        # asyncio.timeout, not wait_for, in this module: Python 3.11's wait_for can swallow a
        # cancellation that lands as its awaitable completes, and a stopping feed or
        # subscriber would then go on (streams/retry.py, sleep_or_stop)
        try:
            async with asyncio.timeout(self.settings.auth_timeout_s):
                first = await self._recv(ws)
            for st in self._statuses(first):
                self._on_status(feed, st)
            await ws.send(
                msgspec.json.encode({"action": "auth", "params": self.settings.api_key}).decode()
            )
            while True:
                async with asyncio.timeout(self.settings.auth_timeout_s):
                    frame = await self._recv(ws)
                for st in self._statuses(frame):
                    self._on_status(feed, st)
                    if st.status == "auth_success":
                        return
        except TimeoutError:
            raise _Disconnect("handshake_timeout", "no auth answer") from None

    @staticmethod
    def _statuses(frame: bytes) -> list[Status]:
        return [e for e in decode_frame(frame).events if isinstance(e, Status)]

    def _on_status(self, feed: _Feed, st: Status) -> None:
        label = st.status if st.status in KNOWN_STATUSES else "other"
        self.m_status.labels(feed.market, label).inc()
        if st.status in ("success", "error"):
            feed.acks += 1
            feed.ack_event.set()
        if st.status == "auth_failed":  # said once, by whoever stops on it (the CLI)
            raise WsAuthError(
                f"ws-ingest: {feed.market}: auth_failed: {st.message} (check MASSIVE_API_KEY)"
            )
        if st.status in DISCONNECT_STATUSES or st.status == "auth_timeout":
            raise _Disconnect(st.status, st.message)
        if st.status in ("error", "auth_required") or label == "other":
            logger.warning("ws-ingest: %s status %s: %s", feed.market, st.status, st.message)
        else:
            logger.debug("ws-ingest: %s status %s: %s", feed.market, st.status, st.message)

    async def _read(self, feed: _Feed, ws: ClientConnection, subs: asyncio.Task[None]) -> None:
        market = feed.market
        frames = self.m_frames.labels(market)
        nbytes = self.m_bytes.labels(market)
        nevents = self.m_events.labels(market)
        malformed = self.m_malformed.labels(market)
        q = self._queue
        while True:
            if subs.done() and not subs.cancelled() and subs.exception() is not None:
                raise subs.exception()  # type: ignore[misc]
            frame = await self._recv(ws)
            now = self.clock.time_ns()
            if b'"status"' in frame[:128]:
                decoded = decode_frame(frame)
                statuses = [e for e in decoded.events if isinstance(e, Status)]
                for st in statuses:
                    self._on_status(feed, st)
                if statuses and len(statuses) == len(decoded.events) and not decoded.errors:
                    continue  # handled, not forwarded
            try:
                n = len(_raw_list.decode(frame))
            except (msgspec.DecodeError, msgspec.ValidationError):
                n = 0
                malformed.inc()
            frames.inc()
            nbytes.inc(len(frame))
            nevents.inc(n)
            self._last_data_mono[market] = self.clock.monotonic()
            if q.full():
                await q.put((now, frame))  # backpressure: stop reading until Redis catches up
            else:
                q.put_nowait((now, frame))

    # --- subscriptions --------------------------------------------------------------------
    async def _subscriber(self, feed: _Feed, ws: ClientConnection) -> None:
        while True:
            try:
                desired = await self.desired(feed.market)
            except Exception as exc:  # Redis hiccup: keep the current subscriptions
                logger.warning("ws-ingest: reading epochs failed: %r", exc)
                desired = None
            if desired is not None:
                await self._apply(feed, ws, desired)
            if feed.market != "options":
                await asyncio.Event().wait()  # static: nothing more to do on this connection
            await asyncio.sleep(self.settings.epoch_poll_s)

    async def _send_chunk(
        self, feed: _Feed, ws: ClientConnection, action: str, chunk: list[str]
    ) -> None:
        """Send one (un)subscribe message, then wait (bounded) until the server answered
        each param (it acks every param with its own status frame): pacing keeps a large
        resubscription from flooding the server's send queue (slow_consumer)."""
        target = feed.acks + len(chunk)
        await ws.send(msgspec.json.encode({"action": action, "params": ",".join(chunk)}).decode())
        self.m_sub_changes.labels(feed.market, action).inc(len(chunk))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.ack_timeout_s
        while feed.acks < target:
            feed.ack_event.clear()
            left = deadline - loop.time()
            if left <= 0:
                logger.warning(
                    "ws-ingest: %s %s: %d of %d params unanswered after %.1fs",
                    feed.market,
                    action,
                    target - feed.acks,
                    len(chunk),
                    self.settings.ack_timeout_s,
                )
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await feed.ack_event.wait()

    async def _apply(self, feed: _Feed, ws: ClientConnection, desired: set[str]) -> None:
        removed = sorted(feed.subscribed - desired)
        added = sorted(desired - feed.subscribed)
        n = self.settings.subscribe_chunk
        # unsubscribe first: the Q budget per connection is never exceeded
        for i in range(0, len(removed), n):
            chunk = removed[i : i + n]
            await self._send_chunk(feed, ws, "unsubscribe", chunk)
            feed.subscribed.difference_update(chunk)
        for i in range(0, len(added), n):
            chunk = added[i : i + n]
            await self._send_chunk(feed, ws, "subscribe", chunk)
            feed.subscribed.update(chunk)
        if removed or added:
            logger.info(
                "ws-ingest: %s subscriptions +%d -%d (now %d)",
                feed.market,
                len(added),
                len(removed),
                len(feed.subscribed),
            )
            counts: dict[str, int] = {}
            for prm in feed.subscribed:
                ch = prm.partition(".")[0]
                counts[ch] = counts.get(ch, 0) + 1
            for ch in ("T", "Q", "V"):
                self.m_subs.labels(feed.market, ch).set(counts.get(ch, 0))

    def _spot_params(self, market: str) -> set[str]:
        """The subscriptions of the ``indices`` or ``stocks`` feed: the configured symbols'
        spots (``V.`` of an index; ``T.``, and ``Q.`` when configured, of a stock or ETF)."""
        if market == "indices":
            return {f"V.{sp.underlying}" for sp in self.specs.values() if sp.is_index}
        out: set[str] = set()
        for sp in self.specs.values():
            if not sp.is_index:
                out.add(f"T.{sp.underlying}")
                if self.settings.stock_quotes:
                    out.add(f"Q.{sp.underlying}")
        return out

    async def desired(self, market: str) -> set[str]:
        """The subscription params this connection should hold now."""
        if market in ("indices", "stocks"):
            return self._spot_params(market)
        syms = list(self.symbols)
        eids = await self._active_epochs(syms)
        spots = await self.redis.hmget(keys.SPOT_LATEST, syms)
        out: set[str] = set()
        ranked: dict[str, list[str]] = {}
        for sym, raw_eid, raw_spot in zip(syms, eids, spots, strict=True):
            if raw_eid is None:
                continue
            eid = raw_eid.decode() if isinstance(raw_eid, bytes) else str(raw_eid)
            view = self._epochs.get(sym)
            if view is None or view.eid != eid:
                view = self._epochs[sym] = await self._load_epoch(sym, eid)
            if self.settings.trades:
                out.update(f"T.{cid}" for cid, _e, _k in view.contracts)
            if self.settings.quotes:
                spot = await self._quote_center(sym, eid, raw_spot)
                ranked[sym] = self._rank_quotes(view, spot)
        if self.settings.quotes:
            out.update(f"Q.{cid}" for cid in allocate(ranked, self.settings.max_quotes))
        return out

    async def _active_epochs(self, syms: list[str]) -> list[Any]:
        """Each symbol's active-epoch pointer (one key, one slot, per symbol)."""
        pipe = self.redis.pipeline(transaction=False)
        for sym in syms:
            pipe.get(keys.epoch_active(sym))
        return list(await pipe.execute())

    async def _load_epoch(self, sym: str, eid: str) -> _EpochView:
        contracts = []
        for cid in await self.topology.epoch(sym, eid):
            try:
                t = ticker.parse(cid)
            except ticker.TickerError:
                logger.warning("ws-ingest: epoch %s holds a bad contract id %r", eid, cid)
                continue
            contracts.append((cid, t.expiry.isoformat(), t.strike))
        contracts.sort()
        return _EpochView(eid, contracts)

    async def _quote_center(self, sym: str, eid: str, raw_spot: Any) -> float | None:
        spot: float | None = None
        if raw_spot is not None:
            with contextlib.suppress(ValueError):
                spot = float(raw_spot)
        if spot is None:
            meta = await self.redis.hget(keys.epoch_meta(sym, eid), "spot")
            if meta is not None:
                with contextlib.suppress(ValueError):
                    spot = float(meta)
        if spot is None:
            return None
        prev = self._q_center.get(sym)
        if (
            prev is not None
            and prev[0] == eid
            and abs(spot - prev[1]) <= self.settings.quote_recenter_pct * prev[1]
        ):
            return prev[1]  # hysteresis: the Q window moves only when spot moved enough
        self._q_center[sym] = (eid, spot)
        return spot

    def _rank_quotes(self, view: _EpochView, spot: float | None) -> list[str]:
        """Front expiries (today first), nearest strikes to spot first."""
        today = dt.datetime.fromtimestamp(self.clock.time_ns() / 1e9, NY).date().isoformat()
        expiries = sorted({e for _c, e, _k in view.contracts if e >= today})
        front = set(expiries[: self.settings.quote_expiries])
        cands = [c for c in view.contracts if c[1] in front]
        if spot is None:
            return [c[0] for c in sorted(cands, key=lambda c: (c[1], c[0]))]
        return [c[0] for c in sorted(cands, key=lambda c: (abs(c[2] - spot), c[1], c[0]))]

    # --- writer ---------------------------------------------------------------------------
    async def _writer(self) -> None:
        q = self._queue
        s = self.settings
        while True:
            first = await q.get()
            batch = [first]
            while len(batch) < s.batch_max and not q.empty():
                batch.append(q.get_nowait())
            self.m_queue.set(q.qsize())
            attempt = 0
            while True:
                try:
                    await self._flush(batch)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # Redis unavailable: keep the batch, retry
                    self.m_redis_errors.inc()
                    attempt += 1
                    delay = REDIS_BACKOFF.delay_s(attempt)
                    logger.warning("ws-ingest: XADD failed (%r), retry in %.2fs", exc, delay)
                    # not stop-aware: on stop the writer still flushes within the grace period
                    await asyncio.sleep(delay)
            for _ in batch:
                q.task_done()

    async def _flush(self, batch: list[tuple[int, bytes]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        maxlen = self.settings.stream_maxlen
        for ts, frame in batch:
            pipe.xadd(
                keys.WS_STREAM,
                {WS_RECV_FIELD: str(ts).encode(), WS_PAYLOAD_FIELD: frame},
                maxlen=maxlen,
                approximate=True,
            )
        mono = self.clock.monotonic()
        if mono - self._last_event_write >= self.settings.last_event_interval_s:
            pipe.set(keys.WS_LAST_EVENT, str(batch[-1][0]))
            self._last_event_write = mono
        await pipe.execute()
        self.m_written.inc(len(batch))
        self.m_batch.observe(len(batch))

    # --- dormancy -------------------------------------------------------------------------
    async def _dormancy(self, stop: asyncio.Event) -> None:
        s = self.settings
        tick = min(0.25, s.silence_s / 4)
        feed = self._dormancy_feed
        while not stop.is_set():
            self.deps.heartbeats.beat(self.name)
            await self._sleep(tick)
            mono = self.clock.monotonic()
            now_ns = self.clock.time_ns()
            if not market_expected_open(now_ns, s):
                self._last_data_mono[feed] = mono  # silence counts from the open
                self._last_signal_mono = None
                continue
            idle = mono - self._last_data_mono.get(feed, mono)
            if idle < s.silence_s:
                self._last_signal_mono = None
                continue
            if self._last_signal_mono is not None and mono - self._last_signal_mono < s.silence_s:
                continue
            msg = ControlMessage(
                kind="refresh_chain", ts_ns=now_ns, reason="ws_dormant", symbol=None
            )
            try:
                await xadd(self.redis, keys.CONTROL_STREAM, entry(msg), maxlen=10_000)  # type: ignore[arg-type]
            except Exception as exc:
                self.m_redis_errors.inc()
                logger.warning("ws-ingest: dormancy signal failed: %r", exc)
                continue
            self._last_signal_mono = mono
            self.dormant_signals += 1
            self.m_dormant.inc()
            logger.warning("ws-ingest: no %s data for %.1fs: asked for a chain refresh", feed, idle)


def allocate(ranked: dict[str, list[str]], budget: int) -> list[str]:
    """Split ``budget`` across symbols: equal shares, unused share flows to the others;
    each symbol takes its best-ranked items."""
    out: list[str] = []
    order = sorted(ranked, key=lambda k: (len(ranked[k]), k))
    remaining = budget
    for i, sym in enumerate(order):
        share = remaining // (len(order) - i)
        take = ranked[sym][:share]
        out.extend(take)
        remaining -= len(take)
    return out


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


def build(deps: Deps, arg: str | None) -> WsIngest:
    """``ws-ingest`` or ``ws-ingest:SPX`` (the argument overrides MASSIVE_SYMBOLS)."""
    return WsIngest(deps, from_env(WsSettings), stage_symbols(deps.settings, arg))
