"""``sse-gateway``: published models to browsers over Server-Sent Events, plus JSON and the
dashboard page (DESIGN.md "Stages and streams", invariant 6).

Endpoints
---------
* ``GET /sse/heatmap/{strategy}?symbol=SPX`` and ``GET /sse/gex?symbol=SPX``: event
  ``snapshot`` (the PublishedModel JSON stored at the model key, byte for byte), then events
  ``diff`` (the ModelDiff JSON of that symbol from the diff stream). Every frame's SSE ``id``
  is a diff stream entry id (a snapshot carries its model's ``diff_id``), so ``Last-Event-ID``
  (header, or ``?last_event_id=`` for a hand-made reconnect) resumes without loss: entries
  after the id are replayed while the id is still in the stream; a trimmed id, a changed
  epoch or a version gap yields a fresh snapshot instead. Event ``status`` says
  ``{"state": "no_model"}`` while nothing has been published yet (the stream then waits and
  sends the snapshot as soon as the model appears).
* ``GET /api/heatmap/{strategy}?symbol=``, ``/api/gex?symbol=``: the model JSON at its latest
  version (checkpoint + the diffs after it; 404 if none); ``/api/symbols``: symbols and
  active epochs (what the page's header shows); ``/healthz``; ``/`` the dashboard
  (``processors/static``).
* Admin port (``admin_port``, a second server sharing this process's state; never the public
  port): ``/metrics``, ``/api/epochs`` (active epoch and full meta per symbol), ``/healthz``,
  ``/readyz``.
* Access control (tokens, connection caps, 503 while Redis loads, security headers):
  processors/sse_access.py.

Fan-out
-------
One :class:`DiffFeed` per diff stream runs a plain ``XREAD BLOCK`` loop from the stream's tail
(primed before the server accepts clients) and pushes each entry, decoded once and framed
once, into the bounded buffer of every subscriber of that symbol. A push never waits: when a
subscriber's buffer is full the entry is dropped for it and the subscriber is marked
overflowed; its session then discards the buffer and sends a fresh snapshot (a ``resync``).
So a slow client costs only its own buffer and never delays the reader or other clients.

No loss at the snapshot/diff hand-off: a session subscribes first, then reads the model and
the diffs of its symbol after the model's ``diff_id`` (XRANGE: a heatmap model key is a
checkpoint that may be a few versions behind, see processors/publisher.py), sends the
snapshot and those diffs, and skips buffered entries at or below the last id sent.
Every forwarded diff is checked to continue the session's ``(epoch, version)`` chain
(``prev_version`` = last sent version); anything else triggers a resync.

Settings: env prefix ``MASSIVE_SSE_`` (:class:`SseSettings`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import msgspec
import orjson
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sse_starlette.sse import EventSourceResponse, SendTimeoutError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from processors import gex
from processors.sse_access import Guard, SecurityHeaders, Tokens
from schemas import keys
from schemas.messages import RawDiff, RawModel
from streams.health import QuietServer
from streams.metrics import counter, gauge
from streams.processor import Deps
from streams.settings import env_settings, from_env

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
SEP = b"\r\n"


@env_settings("MASSIVE_SSE_")
@dataclass(frozen=True, slots=True)
class SseSettings:
    """Env prefix ``MASSIVE_SSE_``."""

    host: str = "0.0.0.0"
    port: int = 8000
    ping_s: float = 15.0  # keep-alive comment interval
    queue_max: int = 512  # diffs buffered per client before it is resynced
    block_ms: int = 1000  # XREAD BLOCK of the shared readers
    read_count: int = 1000  # XREAD COUNT of the shared readers
    replay_page: int = 1000  # XRANGE page when resuming from Last-Event-ID
    no_model_poll_s: float = 1.0  # re-read interval of a model that does not exist yet
    send_timeout_s: float = 30.0  # a client that accepts no bytes for this long is dropped
    retry_ms: int = 1000  # EventSource reconnection delay announced to browsers
    static_dir: str = ""  # dashboard files ("" = processors/static)
    log_level: str = "warning"  # uvicorn's own logger
    # Concurrent Redis reads of client sessions and JSON endpoints (snapshot GETs, replays).
    # Keeps a reconnect storm inside the client's connection pool (redis-py: 100 by default;
    # the feeds hold one blocking connection each on top).
    redis_concurrency: int = 32
    # Access control (processors/sse_access.py). Bearer tokens: none configured = open.
    tokens: tuple[str, ...] = field(default=(), repr=False)
    token_file: str = ""  # one token per line (a mounted Secret), re-read when it changes
    max_clients: int = 0  # SSE streams in total (0: unlimited); over it: 429
    max_per_ip: int = 0  # SSE streams per client IP (0: unlimited); over it: 429
    trusted_proxy_hops: int = 0  # proxies in front (Ingress: 1): client IP from X-Forwarded-For
    retry_after_s: int = 2  # Retry-After of a 429 or 503
    # /metrics, /api/epochs, /healthz, /readyz on their own port, never on the public one
    # (-1: no admin server; the runner's MASSIVE_METRICS_PORT still serves /metrics).
    admin_host: str = "0.0.0.0"
    admin_port: int = -1

    def __post_init__(self) -> None:
        if self.queue_max < 1:
            raise ValueError("queue_max must be >= 1")
        if self.ping_s <= 0 or self.block_ms <= 0 or self.read_count <= 0:
            raise ValueError("ping_s, block_ms and read_count must be > 0")
        if self.redis_concurrency < 1:
            raise ValueError("redis_concurrency must be >= 1")
        if self.replay_page <= 0 or self.no_model_poll_s <= 0:
            raise ValueError("replay_page and no_model_poll_s must be > 0")
        if min(self.max_clients, self.max_per_ip, self.trusted_proxy_hops) < 0:
            raise ValueError("max_clients, max_per_ip and trusted_proxy_hops must be >= 0")
        if self.retry_after_s < 1:
            raise ValueError("retry_after_s must be >= 1")


# --- ids and frames ---------------------------------------------------------------------------
StreamId = tuple[int, int]
ZERO_ID: StreamId = (0, 0)


def parse_id(raw: str | bytes | None) -> StreamId | None:
    """``"1700000000000-3"`` -> (1700000000000, 3); None when malformed."""
    if raw is None:
        return None
    s = raw.decode() if isinstance(raw, bytes) else raw
    ms, dash, seq = s.strip().partition("-")
    try:
        t = (int(ms), int(seq) if dash else 0)
    except ValueError:
        return None
    return t if t[0] >= 0 and t[1] >= 0 else None


def format_id(t: StreamId) -> str:
    return f"{t[0]}-{t[1]}"


def frame(event: str, data: bytes, event_id: str | None = None) -> bytes:
    """One SSE frame. ``data`` is single-line JSON (raw newlines in JSON are whitespace)."""
    if b"\n" in data or b"\r" in data:
        data = data.replace(b"\r", b" ").replace(b"\n", b" ")
    head = b"" if event_id is None else b"id: " + event_id.encode() + SEP
    return head + b"event: " + event.encode() + SEP + b"data: " + data + SEP + SEP


class _DiffHead(msgspec.Struct):
    """The fields of a ModelDiff the gateway routes on (the rest is forwarded untouched)."""

    symbol: str
    epoch: str
    version: int
    prev_version: int
    ts_ns: int = 0
    prev_id: str | None = None


class _ModelHead(msgspec.Struct):
    symbol: str
    epoch: str
    version: int
    diff_id: str | None = None


_diff_head = msgspec.json.Decoder(_DiffHead)
_model_head = msgspec.json.Decoder(_ModelHead)


_full_model = msgspec.json.Decoder(RawModel)
_full_diff = msgspec.json.Decoder(RawDiff)
_json_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Item:
    """One diff stream entry, decoded and framed once, shared by every subscriber."""

    id: StreamId
    head: _DiffHead
    frame: bytes


@dataclass(frozen=True, slots=True)
class Channel:
    """A model family: its diff stream and model key (``heatmap:<strategy>`` or ``gex``)."""

    name: str
    stream: str
    strategy: str | None

    def model_key(self, symbol: str) -> str:
        if self.strategy is None:
            return keys.gex_model(symbol)
        return keys.heatmap_model(symbol, self.strategy)


def channels() -> dict[str, Channel]:
    out = {
        f"heatmap:{s}": Channel(f"heatmap:{s}", keys.heatmap_diffs_stream(s), s)
        for s in keys.STRATEGIES
    }
    out["gex"] = Channel("gex", keys.GEX_DIFFS_STREAM, None)
    return out


class Metrics:
    def __init__(self, deps: Deps) -> None:
        r = deps.registry
        self.clients: Gauge = gauge(r, "massive_sse_clients", "Connected SSE clients", ("channel",))
        self.events: Counter = counter(
            r, "massive_sse_events_sent_total", "SSE events sent", ("channel", "event")
        )
        self.resyncs: Counter = counter(
            r,
            "massive_sse_resyncs_total",
            "Fresh snapshots sent instead of diffs (overflow, gap, epoch, trimmed resume id)",
            ("channel", "reason"),
        )
        self.dropped: Counter = counter(
            r,
            "massive_sse_dropped_total",
            "Diffs dropped for a client whose buffer was full (it is resynced)",
            ("channel",),
        )
        self.rejected: Counter = counter(
            r,
            "massive_sse_rejected_total",
            "Diff stream entries or models the gateway could not decode",
            ("channel", "reason"),
        )
        self.session_errors: Counter = counter(
            r,
            "massive_sse_session_errors_total",
            "SSE streams ended by a Redis error (clients reconnect and resume)",
            ("channel",),
        )
        self.read_errors: Counter = counter(
            r, "massive_sse_read_errors_total", "Failed XREAD calls of a feed", ("channel",)
        )
        self.send_timeouts: Counter = counter(
            r,
            "massive_sse_send_timeouts_total",
            "Clients dropped because they accepted no bytes for send_timeout_s",
            ("channel",),
        )


class SlowClientDropping(EventSourceResponse):
    """An event stream whose client stops reading is closed with one INFO line and a count.

    sse-starlette raises ``SendTimeoutError`` out of the ASGI app when a send waits longer
    than ``send_timeout``; uncaught, uvicorn logs it as an application error with a full
    traceback, for what is an ordinary event (a backgrounded tab, a dead mobile link)."""

    def __init__(self, *args: Any, channel: str, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._channel = channel
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            self._metrics.send_timeouts.labels(self._channel).inc()
            _INCOMPLETE.expect()
            client = scope.get("client")
            logger.info(
                "dropped SSE client %s on %s: it accepted no bytes for %.0f s",
                f"{client[0]}:{client[1]}" if client else "?",
                self._channel,
                self.send_timeout or 0.0,
            )


class _DroppedResponses(logging.Filter):
    """uvicorn closes a connection whose app returned mid-response with an ERROR line; the
    response of a dropped slow client is incomplete by design (its socket accepts nothing, so
    no final chunk can be sent), and was logged at INFO already. Each expected close turns
    the next such line into DEBUG; any other stays an ERROR."""

    MESSAGE = "ASGI callable returned without completing response."

    def __init__(self) -> None:
        super().__init__()
        self.expected = 0

    def expect(self) -> None:
        self.expected += 1

    def filter(self, record: logging.LogRecord) -> bool:
        if self.expected and record.getMessage() == self.MESSAGE:
            self.expected -= 1
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_INCOMPLETE = _DroppedResponses()
logging.getLogger("uvicorn.error").addFilter(_INCOMPLETE)


# --- subscribers and shared readers -------------------------------------------------------------
class Subscriber:
    """A client's bounded diff buffer. ``push`` never blocks; overflow marks it for resync."""

    __slots__ = ("buf", "closed", "maxlen", "overflowed", "symbol", "wake")

    def __init__(self, symbol: str, maxlen: int) -> None:
        self.symbol = symbol
        self.maxlen = maxlen
        self.buf: deque[Item] = deque()
        self.wake = asyncio.Event()
        self.overflowed = False
        self.closed = False

    def push(self, item: Item) -> bool:
        if self.overflowed or len(self.buf) >= self.maxlen:
            self.overflowed = True
            self.wake.set()
            return False
        self.buf.append(item)
        self.wake.set()
        return True

    def close(self) -> None:
        self.closed = True
        self.wake.set()

    async def wait(self, timeout_s: float | None = None) -> None:
        """Return when there is something to do (items, overflow, close) or on timeout."""
        if self.buf or self.overflowed or self.closed:
            return
        self.wake.clear()
        if timeout_s is None:
            await self.wake.wait()
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout_s)

    def take(self) -> list[Item]:
        items = list(self.buf)
        self.buf.clear()
        return items

    def reset(self) -> None:
        self.buf.clear()
        self.overflowed = False


class DiffFeed:
    """The one reader of a diff stream; fans entries out to the subscribers of their symbol."""

    def __init__(
        self, redis: Redis, channel: Channel, settings: SseSettings, metrics: Metrics
    ) -> None:
        self.redis = redis
        self.channel = channel
        self.settings = settings
        self.metrics = metrics
        self.subs: dict[str, set[Subscriber]] = {}
        self.last_id: StreamId = ZERO_ID
        self.dropped = metrics.dropped.labels(channel=channel.name)
        self.reject_decode = metrics.rejected.labels(channel=channel.name, reason="bad_diff")
        self.read_errors = metrics.read_errors.labels(channel=channel.name)

    async def prime(self) -> None:
        """Start at the stream's current tail (earlier diffs are inside the models)."""
        last = await self.redis.xrevrange(self.channel.stream, "+", "-", count=1)
        if last:
            self.last_id = parse_id(last[0][0]) or ZERO_ID

    def subscribe(self, symbol: str) -> Subscriber:
        sub = Subscriber(symbol, self.settings.queue_max)
        self.subs.setdefault(symbol, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        group = self.subs.get(sub.symbol)
        if group is not None:
            group.discard(sub)
            if not group:
                del self.subs[sub.symbol]

    def close(self) -> None:
        for group in self.subs.values():
            for sub in group:
                sub.close()

    def dispatch(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        for raw_id, fields in entries:
            sid = parse_id(raw_id)
            if sid is None:
                continue
            self.last_id = sid
            item = decode_item(sid, raw_id.decode(), fields)
            if item is None:
                self.reject_decode.inc()
                logger.warning("channel=%s id=%s: undecodable diff entry", self.channel.name, sid)
                continue
            for sub in self.subs.get(item.head.symbol, ()):
                if not sub.push(item):
                    self.dropped.inc()

    async def run(self, stop: asyncio.Event) -> None:
        backoff_s = 0.1
        while not stop.is_set():
            try:
                resp = await self.redis.xread(
                    {self.channel.stream: format_id(self.last_id)},
                    count=self.settings.read_count,
                    block=self.settings.block_ms,
                )
            except (RedisError, OSError) as exc:
                self.read_errors.inc()
                logger.warning(
                    "channel=%s xread failed: %s (retry in %.1fs)",
                    self.channel.name,
                    exc,
                    backoff_s,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                continue
            backoff_s = 0.1
            for _stream, entries in cast(list[Any], resp or []):
                self.dispatch(_rows(entries))


def _rows(raw: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XRANGE/XREAD entries as returned by a bytes (decode_responses=False) client."""
    return cast(list[tuple[bytes, dict[bytes, bytes]]], raw or [])


def _b(v: bytes | str) -> bytes:
    return v if isinstance(v, bytes) else v.encode()


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def decode_item(sid: StreamId, raw_id: str, fields: dict[bytes, bytes]) -> Item | None:
    raw = fields.get(b"d")
    if raw is None:
        return None
    try:
        head = _diff_head.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    return Item(sid, head, frame("diff", raw, raw_id))


# --- one client session -----------------------------------------------------------------------
@dataclass(slots=True)
class _State:
    epoch: str
    version: int
    last_id: StreamId  # the last stream entry looked at
    head: str | None  # id of the diff that produced ``version`` (None: unknown)


class Resync(Exception):
    """The session must send a fresh snapshot; ``reason`` labels the resync metric."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Gateway:
    """Shared state of one gateway process: feeds, settings, metrics."""

    def __init__(self, deps: Deps, settings: SseSettings) -> None:
        self.deps = deps
        self.redis = deps.redis
        self.settings = settings
        self.metrics = Metrics(deps)
        self.channels = channels()
        self.feeds = {
            name: DiffFeed(deps.redis, ch, settings, self.metrics)
            for name, ch in self.channels.items()
        }
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.started = False
        self.redis_slots = asyncio.Semaphore(settings.redis_concurrency)

    async def start(self) -> None:
        self._stop = asyncio.Event()
        for feed in self.feeds.values():
            await feed.prime()
        self._tasks = [
            asyncio.create_task(f.run(self._stop), name=f"sse-feed:{n}")
            for n, f in self.feeds.items()
        ]
        self.started = True

    def close_sessions(self) -> None:
        """Ask every open SSE stream to end (server shutdown)."""
        self._stop.set()
        for feed in self.feeds.values():
            feed.close()

    async def stop(self) -> None:
        self.close_sessions()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=self.settings.block_ms / 1000 + 2)
            for t in pending:
                t.cancel()
        self._tasks = []
        self.started = False

    @property
    def closing(self) -> bool:
        return self._stop.is_set()

    async def snapshot(self, channel: Channel, symbol: str) -> tuple[bytes, _State] | None:
        raw = await self.redis.get(channel.model_key(symbol))
        if raw is None:
            return None
        try:
            head = _model_head.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError):
            self.metrics.rejected.labels(channel=channel.name, reason="bad_model").inc()
            logger.warning("channel=%s symbol=%s: undecodable model", channel.name, symbol)
            return None
        last = parse_id(head.diff_id) if head.diff_id else None
        state = _State(head.epoch, head.version, last or ZERO_ID, head.diff_id)
        return frame("snapshot", _b(raw), head.diff_id), state

    async def catch_up(self, channel: Channel, symbol: str, state: _State) -> list[bytes] | None:
        """Diffs of ``symbol`` after the snapshot's ``diff_id`` (``state``, advanced): a
        heatmap model key is a checkpoint that may be some versions behind its diffs (see
        processors/publisher.py). None when they do not continue the snapshot's chain."""
        frames: list[bytes] = []
        async for raw_id, fields in self._entries_after(channel.stream, format_id(state.last_id)):
            sid = parse_id(raw_id)
            item = decode_item(sid, raw_id.decode(), fields) if sid is not None else None
            if item is None or item.head.symbol != symbol:
                continue
            try:
                if accept(state, item):
                    frames.append(item.frame)
            except Resync:
                return None
        return frames

    async def _entries_after(
        self, stream: str, after: str
    ) -> AsyncIterator[tuple[bytes, dict[bytes, bytes]]]:
        """Entries of ``stream`` with ids above ``after``, paged by ``replay_page``."""
        cursor = after
        while True:
            page = _rows(
                await self.redis.xrange(stream, "(" + cursor, "+", count=self.settings.replay_page)
            )
            for raw_id, fields in page:
                cursor = raw_id.decode()
                yield raw_id, fields
            if len(page) < self.settings.replay_page:
                return

    async def current_model(self, channel: Channel, symbol: str) -> bytes | None:
        """The model at its latest version: the model key (a checkpoint) with the diffs after
        its ``diff_id`` applied (usually none: returned as stored)."""
        raw = await self.redis.get(channel.model_key(symbol))
        if raw is None:
            return None
        try:
            head = _model_head.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return _b(raw)
        if head.diff_id is None:
            return _b(raw)
        model: RawModel | None = None
        async for raw_id, fields in self._entries_after(channel.stream, head.diff_id):
            body = fields.get(b"d")
            try:
                d = _full_diff.decode(body) if body is not None else None
            except (msgspec.ValidationError, msgspec.DecodeError):
                d = None
            if d is None or d.symbol != symbol:
                continue
            if model is None:
                model = _full_model.decode(raw)
            if (
                d.epoch != model.epoch
                or d.prev_version != model.version
                or (
                    d.prev_id is not None
                    and model.diff_id is not None
                    and d.prev_id != model.diff_id
                )
            ):
                return _b(raw)  # not a continuation: the checkpoint is what we have
            model.items.update(d.changed)
            for k in d.removed:
                model.items.pop(k, None)
            model.version, model.ts_ns, model.meta = d.version, d.ts_ns, d.meta
            model.diff_id = raw_id.decode()
        return _b(raw) if model is None else _json_encoder.encode(model)

    async def replay(
        self, channel: Channel, symbol: str, after: StreamId
    ) -> tuple[list[bytes], _State] | None:
        """Diffs of ``symbol`` after entry ``after``, or None if a snapshot is needed."""
        stream = channel.stream
        first = _rows(await self.redis.xrange(stream, "-", "+", count=1))
        if not first or after < (parse_id(first[0][0]) or ZERO_ID):
            return None  # trimmed (or the stream is gone): the client missed diffs
        at = _rows(await self.redis.xrange(stream, format_id(after), format_id(after), count=1))
        if not at:
            return None
        base = decode_item(after, format_id(after), at[0][1])
        if base is None or base.head.symbol != symbol:
            return None
        model = await self.redis.get(channel.model_key(symbol))
        if model is None:
            return None
        try:
            if _model_head.decode(model).epoch != base.head.epoch:
                return None
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None
        state = _State(base.head.epoch, base.head.version, after, format_id(after))
        frames = await self.catch_up(channel, symbol, state)
        return None if frames is None else (frames, state)

    async def session(
        self, channel: Channel, symbol: str, last_event_id: StreamId | None
    ) -> AsyncIterator[bytes]:
        feed = self.feeds[channel.name]
        m = self.metrics
        sent_diff = m.events.labels(channel=channel.name, event="diff")
        sent_snap = m.events.labels(channel=channel.name, event="snapshot")
        clients = m.clients.labels(channel=channel.name)
        sub = feed.subscribe(symbol)  # before any read: see the module docstring
        clients.inc()
        try:
            yield b"retry: " + str(self.settings.retry_ms).encode() + SEP + SEP
            state: _State | None = None
            if last_event_id is not None:
                async with self.redis_slots:
                    resumed = await self.replay(channel, symbol, last_event_id)
                if resumed is None:
                    m.resyncs.labels(channel=channel.name, reason="resume").inc()
                else:
                    frames, state = resumed
                    if frames:
                        sent_diff.inc(len(frames))
                        yield b"".join(frames)
            announced = False
            while not sub.closed:
                if state is None:
                    async with self.redis_slots:
                        snap = await self.snapshot(channel, symbol)
                    if snap is None:
                        if not announced:
                            announced = True
                            yield frame("status", b'{"state":"no_model"}')
                        await sub.wait(self.settings.no_model_poll_s)
                        sub.reset()  # diffs without a base are useless; re-read the model
                        continue
                    data, state = snap
                    async with self.redis_slots:
                        caught = await self.catch_up(channel, symbol, state)
                    if caught is None:  # the checkpoint's diffs do not chain: read again
                        m.resyncs.labels(channel=channel.name, reason="gap").inc()
                        state = None
                        await sub.wait(self.settings.no_model_poll_s)
                        continue
                    sent_snap.inc()
                    yield data
                    if caught:
                        sent_diff.inc(len(caught))
                        yield b"".join(caught)
                    continue
                await sub.wait()
                if sub.overflowed:
                    sub.reset()
                    m.resyncs.labels(channel=channel.name, reason="overflow").inc()
                    state = None
                    continue
                out: list[bytes] = []
                try:
                    for item in sub.take():
                        if accept(state, item):
                            out.append(item.frame)
                except Resync as rs:
                    m.resyncs.labels(channel=channel.name, reason=rs.reason).inc()
                    state = None
                if out:
                    sent_diff.inc(len(out))
                    yield b"".join(out)
        except (RedisError, OSError) as exc:
            # end this stream; the browser reconnects (Last-Event-ID) once Redis is back
            m.session_errors.labels(channel=channel.name).inc()
            logger.warning("channel=%s symbol=%s: stream ended: %s", channel.name, symbol, exc)
        finally:
            feed.unsubscribe(sub)
            clients.dec()


def accept(state: _State, item: Item) -> bool:
    """Whether ``item`` is the next diff of the session (advancing ``state``); False for an
    entry already covered; raises Resync when the chain is broken."""
    if item.id <= state.last_id:
        return False
    h = item.head
    if h.epoch != state.epoch:
        raise Resync("epoch")
    if h.prev_id is not None and state.head is not None and h.prev_id != state.head:
        # A later entry that does not follow the diff the client holds: versions it already
        # has were re-issued with other content (Redis lost writes), or it missed one.
        raise Resync("rewrite" if h.version <= state.version else "gap")
    if h.version <= state.version:
        state.last_id = item.id
        return False
    if h.prev_version != state.version:
        raise Resync("gap")
    state.version = h.version
    state.last_id = item.id
    state.head = format_id(item.id)
    return True


# --- HTTP application --------------------------------------------------------------------------
def _symbol(request: Request) -> str:
    sym = request.query_params.get("symbol", "SPX").strip().upper()
    if not sym.isalnum() or len(sym) > 12:
        raise ValueError(f"bad symbol {sym!r}")
    return sym


def create_app(deps: Deps, settings: SseSettings) -> Starlette:
    """The gateway's ASGI app; ``app.state.gateway`` is its :class:`Gateway`."""
    gw = Gateway(deps, settings)
    static = Path(settings.static_dir) if settings.static_dir else STATIC_DIR

    def channel_of(request: Request) -> Channel:
        strategy = request.path_params.get("strategy")
        name = "gex" if strategy is None else f"heatmap:{strategy}"
        ch = gw.channels.get(name)
        if ch is None:
            raise ValueError(f"unknown strategy {strategy!r}")
        return ch

    async def sse(request: Request) -> Response:
        try:
            ch, sym = channel_of(request), _symbol(request)
        except ValueError as exc:
            return PlainTextResponse(str(exc), status_code=400)
        raw_last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        return SlowClientDropping(
            gw.session(ch, sym, parse_id(raw_last)),
            ping=settings.ping_s,
            send_timeout=settings.send_timeout_s,
            headers={"Cache-Control": "no-store"},
            channel=ch.name,
            metrics=gw.metrics,
        )

    async def api_model(request: Request) -> Response:
        try:
            ch, sym = channel_of(request), _symbol(request)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        async with gw.redis_slots:
            raw = await gw.current_model(ch, sym)
        if raw is None:
            return JSONResponse({"error": f"no {ch.name} model for {sym}"}, status_code=404)
        return Response(raw, media_type="application/json", headers={"Cache-Control": "no-store"})

    async def api_gex_history(request: Request) -> Response:
        try:
            sym = _symbol(request)
            raw_since = request.query_params.get("since_ms")
            since = int(raw_since) if raw_since else None
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        async with gw.redis_slots:
            body = await gex.levels_history(deps.redis, sym, since)
        return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})

    async def api_symbols(request: Request) -> Response:
        """What the dashboard shows of the epochs (the full meta is on the admin port)."""
        out: dict[str, Any] = {}
        async with gw.redis_slots:
            active = await deps.redis.hgetall(keys.EPOCH_ACTIVE)
            for sym_b, eid_b in sorted(active.items()):
                eid = _s(eid_b)
                state, n = await deps.redis.hmget(keys.epoch_meta(eid), ["state", "n_contracts"])
                out[_s(sym_b)] = {
                    "epoch": eid,
                    "state": None if state is None else _s(state),
                    "n_contracts": None if n is None else _s(n),
                }
        body = {
            "active": out,
            "symbols": list(deps.settings.symbols),
            "strategies": list(keys.STRATEGIES),
        }
        return Response(orjson.dumps(body), media_type="application/json")

    async def api_epochs(request: Request) -> Response:
        out: dict[str, Any] = {}
        async with gw.redis_slots:
            active = await deps.redis.hgetall(keys.EPOCH_ACTIVE)
            for sym_b, eid_b in sorted(active.items()):
                eid = _s(eid_b)
                meta = await deps.redis.hgetall(keys.epoch_meta(eid))
                out[_s(sym_b)] = {"epoch": eid, "meta": {_s(k): _s(v) for k, v in meta.items()}}
        body = {
            "active": out,
            "symbols": list(deps.settings.symbols),
            "strategies": list(keys.STRATEGIES),
        }
        return Response(orjson.dumps(body), media_type="application/json")

    async def healthz(request: Request) -> Response:
        try:
            await asyncio.wait_for(deps.redis.ping(), 2)
        except (RedisError, OSError, TimeoutError) as exc:
            return PlainTextResponse(f"redis: {exc}\n", status_code=503)
        if not gw.started:
            return PlainTextResponse("feeds not started\n", status_code=503)
        return PlainTextResponse("ok\n")

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(deps.registry), media_type=CONTENT_TYPE_LATEST)

    async def readyz(request: Request) -> Response:
        if not gw.started or gw.closing:
            return PlainTextResponse("not ready\n", status_code=503)
        return PlainTextResponse("ready\n")

    async def index(request: Request) -> Response:
        return FileResponse(static / "index.html", headers={"Cache-Control": "no-cache"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    tokens = Tokens(settings.tokens, settings.token_file)
    app = Starlette(
        routes=[
            Route("/", index),
            Route("/sse/heatmap/{strategy}", sse),
            Route("/sse/gex", sse),
            Route("/api/heatmap/{strategy}", api_model),
            Route("/api/gex", api_model),
            Route("/api/gex/history", api_gex_history),
            Route("/api/symbols", api_symbols),
            Route("/healthz", healthz),
            Mount("/static", StaticFiles(directory=static), name="static"),
        ],
        middleware=[
            Middleware(SecurityHeaders),
            Middleware(
                Guard,
                tokens=tokens,
                max_clients=settings.max_clients,
                max_per_ip=settings.max_per_ip,
                trusted_proxy_hops=settings.trusted_proxy_hops,
                redis=deps.redis,
                registry=deps.registry,
                retry_after_s=settings.retry_after_s,
            ),
        ],
        lifespan=lifespan,
    )
    # The admin port: metrics and internal APIs, reachable only from inside the cluster
    # (deploy/k8s NetworkPolicy); no token, no caps. It shares the public app's Gateway.
    admin = Starlette(
        routes=[
            Route("/metrics", metrics),
            Route("/api/epochs", api_epochs),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
        ],
        middleware=[
            Middleware(SecurityHeaders),
            Middleware(
                Guard,
                redis=deps.redis,
                registry=deps.registry,
                retry_after_s=settings.retry_after_s,
            ),
        ],
    )
    app.state.gateway = gw
    app.state.admin = admin
    return app


# --- processor ---------------------------------------------------------------------------------
class SseGateway:
    name = "sse-gateway"

    def __init__(self, deps: Deps, settings: SseSettings) -> None:
        self.deps = deps
        self.settings = settings
        self.app = create_app(deps, settings)
        self.gateway: Gateway = self.app.state.gateway
        self.server: QuietServer | None = None
        self.admin_server: QuietServer | None = None

    @property
    def ready(self) -> bool:
        admin_up = self.admin_server is None or self.admin_server.started
        return self.server is not None and self.server.started and admin_up and self.gateway.started

    @property
    def port(self) -> int:
        """The bound port (useful with ``port=0``)."""
        return _bound_port(self.server, self.settings.port)

    @property
    def admin_port(self) -> int:
        """The bound admin port (-1: no admin server)."""
        return _bound_port(self.admin_server, self.settings.admin_port)

    def _config(
        self, app: Any, host: str, port: int, lifespan: Literal["on", "off"]
    ) -> uvicorn.Config:
        return uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=self.settings.log_level,
            lifespan=lifespan,
            timeout_graceful_shutdown=max(1, int(self.deps.settings.grace_s)),
            access_log=False,  # query strings may carry an access token
        )

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        self.server = QuietServer(self._config(self.app, s.host, s.port, "on"))
        servers = [(self.server, s.host, s.port)]
        if s.admin_port >= 0:
            self.admin_server = QuietServer(
                self._config(self.app.state.admin, s.admin_host, s.admin_port, "off")
            )
            servers.append((self.admin_server, s.admin_host, s.admin_port))

        async def serve(server: QuietServer, host: str, port: int) -> None:
            try:
                await server.serve()
            except SystemExit:  # uvicorn exits the process when it cannot bind
                raise RuntimeError(f"sse-gateway: cannot serve on {host}:{port}") from None

        serving = [
            asyncio.create_task(serve(*srv), name=f"sse-gateway:uvicorn:{i}")
            for i, srv in enumerate(servers)
        ]
        stopper = asyncio.create_task(stop.wait(), name="sse-gateway:stop")
        try:
            await asyncio.wait([*serving, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            self.gateway.close_sessions()  # open streams end, so uvicorn can drain
            for server, _, _ in servers:
                server.should_exit = True
            results = await asyncio.gather(*serving, return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException):
                raise res
        if not stop.is_set():  # startup failed (lifespan: Redis unreachable) or crashed
            raise RuntimeError("sse-gateway: the HTTP server stopped unexpectedly (see log)")


def _bound_port(server: uvicorn.Server | None, configured: int) -> int:
    if server is None or not server.servers:
        return configured
    sock = server.servers[0].sockets[0]
    return int(sock.getsockname()[1])


def build(deps: Deps, arg: str | None) -> SseGateway:
    if arg:
        raise ValueError(f"sse-gateway takes no argument (got {arg!r})")
    return SseGateway(deps, from_env(SseSettings))
