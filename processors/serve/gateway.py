"""``sse-gateway``: published models to browsers over Server-Sent Events, plus JSON and the
dashboard page (DESIGN.md "Stages and streams", invariant 6).

Endpoints
---------
* ``GET /sse/heatmap/{strategy}?symbol=SPX[&expiry=YYYY-MM-DD|front][&right=C|P]
  [&strikes=lo-hi][&widths=5,10]`` and ``GET /sse/gex?symbol=SPX[&expiry=all|0dte|<today>]``:
  a **view** of the model (processors/serve/views.py). Event ``snapshot`` (the view's items,
  compact), then events ``diff`` (what changed in the view, compact: changed fields only).
  No filter = the whole model as published: ``snapshot`` = the stored model, ``diff`` = the
  diff stream entries as they are (:meth:`Gateway.whole_session`). Every frame's SSE ``id``
  is a diff stream entry id, so ``Last-Event-ID`` (header, or ``?last_event_id=``) resumes
  without loss while the gateway still holds the view's diffs after that id
  (``history_bytes`` per view; whole models: while the id is in the diff stream); else a
  fresh snapshot. Event ``status`` says ``{"state": "no_model"}`` while nothing has been
  published yet (the snapshot follows as soon as the model appears). An unknown symbol or
  expiry gives 404, a malformed filter 400.
* ``GET /api/heatmap/{strategy}?symbol=`` (same filters), ``/api/gex?symbol=[&expiry=]``: the
  view as PublishedModel JSON at the model's latest version (checkpoint + the diffs after
  it; 404 if none); ``/api/symbols``: symbols and active epochs (what the page's header
  shows); ``/healthz``; ``/`` the dashboard (``processors/serve/static``).
* Admin port (``admin_port``, a second server sharing this process's state; never the public
  port): ``/metrics``, ``/api/epochs`` (active epoch and full meta per symbol), ``/healthz``,
  ``/readyz``.
* Access control (tokens, connection caps, 503 while Redis loads, security headers):
  processors/serve/access.py.

Fan-out
-------
One :class:`DiffFeed` per diff stream runs a plain ``XREAD BLOCK`` loop from the stream's tail.
Whole-model clients get each entry, decoded (its head) and framed once, by reference; their
backlog is merged into one diff beyond ``whole_conflate_bytes`` and bounded by
``whole_pending_max_bytes`` (then a resync). For views, the
feed hands each entry of a symbol to that symbol's :class:`Mirror` (one per model and symbol
with subscribers): the gateway's own copy of the model, loaded once from the model key (a
checkpoint) plus the diffs after its ``diff_id``, then kept current. Each distinct view has
one ``ViewFeed`` that turns a model diff into one compact view diff, encoded once and shared
by reference by all its subscribers; its snapshot is encoded once per view version and
streamed to each client in slices (no per-client copy). Diffs a reader gets in one reply (it
fell behind) are merged as JSON first and applied once (``coalesce_s`` of CPU at most per
merge): one view diff per view for them all, so neither the decoding nor the sends (one per
client per view diff, the gateway's main cost with 1,000 clients) grow with the backlog.

A subscriber holds references to the view diffs it has not been sent. A slow client's
pending diffs are **conflated** (merged per item and field) when they exceed
``conflate_bytes``; once even the merged diff exceeds ``pending_max_bytes`` it is dropped
for a fresh snapshot (a ``resync``). So a slow client never delays the reader or others.

A model diff that does not continue the mirror's ``(epoch, version, prev_id)`` chain (a new
epoch, a gap, a history rewritten after Redis lost writes) reloads the mirror and resyncs
its clients.

Settings: env prefix ``MASSIVE_SSE_`` (:class:`SseSettings`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import msgspec
import orjson
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sse_starlette.sse import EventSourceResponse, SendTimeoutError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from processors.gex import calculator as gex
from processors.heatmap import checkpoint
from processors.serve import gex_expiry
from processors.serve.access import Guard, SecurityHeaders, Tokens
from processors.serve.views import (
    FRONT,
    GEX_0DTE_KEEP,
    Model,
    PartKey,
    Subscriber,
    ViewDiff,
    ViewFeed,
    ViewSpec,
    apply_changes,
    frame,
    gc_paused,
    gex_part,
    heat_part,
    merge_diff,
    parse_view,
)
from schemas import keys
from schemas.messages import (
    ITEMS_PER_PIECE,
    ModelHead,
    ModelTail,
    RawDiff,
    RawModel,
    encode_model_pieces,
)
from streams.health import QuietServer
from streams.memory import fix_mmap_threshold, release_freed_memory
from streams.metrics import counter, gauge, histogram
from streams.processor import Deps
from streams.redis_client import as_str, opt_str
from streams.runner import cancel_and_wait
from streams.settings import env_settings, from_env

__all__ = ["SseGateway", "SseSettings", "build", "create_app", "frame", "parse_id"]

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
SEP = b"\r\n"
SNAPSHOT_SLICE = 64 * 1024  # a snapshot goes out in slices: the transport never copies it whole
# a diff frame goes out as it is (the transport makes its one copy), a huge one (a merged
# whole-model backlog) in slices
DIFF_SLICE = 1024 * 1024
SNAPSHOT_SHARE_S = 2.0  # clients joining within this share one read of a stored model
# Keep-alive comments come from the session itself, between frames (sse-starlette's own
# pings could land between two slices of a snapshot).
PING = b": ping" + SEP + SEP
_NO_PING_S = 10**9


@env_settings("MASSIVE_SSE_")
@dataclass(frozen=True, slots=True)
class SseSettings:
    """Env prefix ``MASSIVE_SSE_``."""

    host: str = "0.0.0.0"
    port: int = 8000
    ping_s: float = 15.0  # keep-alive comment interval
    # Unsent diffs of a view client (references to shared frames): merged per item when
    # they exceed pending_max_bytes; a client whose merged backlog still does is resynced.
    pending_max_bytes: int = 1024 * 1024
    history_bytes: int = 1024 * 1024  # recent diffs kept per view for Last-Event-ID resume
    # whole-model streams (no filter): unsent diffs (shared frames) of a client, and the
    # diffs replayed on a resume, before it gets a snapshot instead. Merged, a backlog is at
    # most one model (~15 MB for 49k butterfly tiles, 18 MB for 100k), so the bound sits
    # above that.
    whole_pending_max_bytes: int = 32 * 1024 * 1024
    # A slow whole-model client's backlog is merged once its frames after the (merged) head
    # exceed this and the head's size: it then holds about one merged diff plus this much,
    # not whole_pending_max_bytes of frames (what a few slow clients swing the RSS by), and
    # each merge covers at least as many new bytes as the head it rewrites (linear CPU).
    whole_conflate_bytes: int = 4 * 1024 * 1024
    view_linger_s: float = 10.0  # a view (and its mirror) without clients is kept this long
    block_ms: int = 1000  # XREAD BLOCK of the shared readers
    # XREAD COUNT of the shared readers: a butterfly diff is ~1 MB under load, so a reader
    # that fell behind would otherwise pull up to a GB in one reply (the RSS high-water mark)
    read_count: int = 32
    # CPU a reader spends merging the entries of one reply before they are applied: the
    # entries merged make one view diff per view (a reader behind catches up at once)
    coalesce_s: float = 0.25
    # A shared reader reads at most this often (0: as soon as entries are there): diffs
    # published in between are merged into one view diff per view, so a view client gets a
    # bounded number of sends per second however often the model is published (a send
    # costs the gateway tens of us of CPU per client); it is also the most a diff waits.
    read_interval_s: float = 0.0
    replay_page_bytes: int = 8 * 1024 * 1024  # XRANGE page (in entry bytes) of a mirror load
    # Where /api reads and whole-model snapshots copy a heatmap checkpoint (~15 MB for 50k
    # tiles) to take it a piece at a time ("": the system's temp dir, $TMPDIR).
    spool_dir: str = ""
    no_model_poll_s: float = 1.0  # re-read interval of a model that does not exist yet
    send_timeout_s: float = 30.0  # a client that accepts no bytes for this long is dropped
    retry_ms: int = 1000  # EventSource reconnection delay announced to browsers
    static_dir: str = ""  # dashboard files ("" = processors/serve/static)
    log_level: str = "warning"  # uvicorn's own logger
    # Concurrent Redis reads of mirror loads and JSON endpoints.
    redis_concurrency: int = 32
    # glibc malloc: a fixed mmap threshold (0 = glibc's sliding one), see streams/memory.py
    mmap_threshold_kb: int = 256
    # Access control (processors/serve/access.py). Bearer tokens: none configured = open.
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
        if min(self.pending_max_bytes, self.history_bytes) < 1:
            raise ValueError("pending_max_bytes and history_bytes must be >= 1")
        if not 1 <= self.whole_conflate_bytes <= self.whole_pending_max_bytes:
            raise ValueError("whole_conflate_bytes must be in [1, whole_pending_max_bytes]")
        if self.ping_s <= 0 or self.block_ms <= 0 or self.read_count <= 0:
            raise ValueError("ping_s, block_ms and read_count must be > 0")
        if self.coalesce_s < 0 or self.read_interval_s < 0:
            raise ValueError("coalesce_s and read_interval_s must be >= 0")
        if self.redis_concurrency < 1:
            raise ValueError("redis_concurrency must be >= 1")
        if self.replay_page_bytes <= 0 or self.no_model_poll_s <= 0 or self.view_linger_s < 0:
            raise ValueError("replay_page_bytes and no_model_poll_s must be > 0")

        if min(self.max_clients, self.max_per_ip, self.trusted_proxy_hops) < 0:
            raise ValueError("max_clients, max_per_ip and trusted_proxy_hops must be >= 0")
        if self.retry_after_s < 1:
            raise ValueError("retry_after_s must be >= 1")


# --- ids ---------------------------------------------------------------------------------------
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


class _DiffHead(msgspec.Struct):
    symbol: str


class _WholeHead(msgspec.Struct):
    """The fields of a ModelDiff a whole-model stream routes on (the rest is forwarded)."""

    symbol: str
    epoch: str
    version: int
    prev_version: int
    prev_id: str | None = None
    snapshot: bool = False  # the version's model is the model key (ModelDiff.snapshot)


class _Diff(msgspec.Struct):
    """A diff stream entry with its changed items decoded (once, for every view)."""

    symbol: str
    epoch: str
    version: int
    prev_version: int
    ts_ns: int = 0
    changed: dict[str, msgspec.Raw] = {}  # decoded per item where a view looks (views.Model)
    removed: list[str] = []
    meta: msgspec.Raw = msgspec.Raw(b"{}")
    prev_id: str | None = None
    src_recv_ts_ns: int | None = None


class _Model(msgspec.Struct):
    symbol: str
    epoch: str
    version: int
    ts_ns: int = 0
    items: dict[str, msgspec.Raw] = {}
    meta: msgspec.Raw = msgspec.Raw(b"{}")
    diff_id: str | None = None


class _WholeModelHead(msgspec.Struct):
    epoch: str
    version: int
    diff_id: str | None = None


_diff_head = msgspec.json.Decoder(_DiffHead)
_diff_dec = msgspec.json.Decoder(_Diff)
_model_dec = msgspec.json.Decoder(_Model)
_whole_head = msgspec.json.Decoder(_WholeHead)
_whole_model_head = msgspec.json.Decoder(_WholeModelHead)
_full_model = msgspec.json.Decoder(RawModel)
_items_dec = msgspec.json.Decoder(dict[str, msgspec.Raw])
_full_diff = msgspec.json.Decoder(RawDiff)
_json_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Channel:
    """A model family (``heatmap:<strategy>`` or ``gex``): per symbol, its diff stream and
    model key (one ``{<SYM>}`` slot)."""

    name: str
    strategy: str | None

    def stream(self, symbol: str) -> str:
        if self.strategy is None:
            return keys.gex_diffs_stream(symbol)
        return keys.heatmap_diffs_stream(self.strategy, symbol)

    def model_key(self, symbol: str) -> str:
        if self.strategy is None:
            return keys.gex_model(symbol)
        return keys.heatmap_model(symbol, self.strategy)

    def part_of(self, key: str) -> PartKey:
        return heat_part(key) if self.strategy is not None else gex_part(key)


def channels() -> dict[str, Channel]:
    out = {f"heatmap:{s}": Channel(f"heatmap:{s}", s) for s in keys.STRATEGIES}
    out["gex"] = Channel("gex", None)
    return out


class Metrics:
    def __init__(self, deps: Deps) -> None:
        r = deps.registry
        self.clients: Gauge = gauge(r, "massive_sse_clients", "Connected SSE clients", ("channel",))
        self.views: Gauge = gauge(
            r, "massive_sse_views", "Distinct views held (with or without clients)", ("channel",)
        )
        self.events: Counter = counter(
            r, "massive_sse_events_sent_total", "SSE events sent", ("channel", "event")
        )
        self.bytes: Counter = counter(
            r, "massive_sse_bytes_sent_total", "SSE bytes handed to the server", ("channel",)
        )
        self.resyncs: Counter = counter(
            r,
            "massive_sse_resyncs_total",
            "Fresh snapshots sent instead of diffs (overflow, gap, epoch, rewrite, resume)",
            ("channel", "reason"),
        )
        self.conflated: Counter = counter(
            r,
            "massive_sse_conflated_total",
            "Backlogs of a slow client merged into one diff",
            ("channel",),
        )
        self.dropped: Counter = counter(
            r,
            "massive_sse_dropped_total",
            "Backlogs dropped for a client too far behind (it is resynced)",
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
            "Mirror loads that failed on a Redis error (retried)",
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
        self.dispatch_cpu: Counter = counter(
            r,
            "massive_sse_dispatch_cpu_seconds_total",
            "CPU time of the shared readers handing diff entries to mirrors, views and "
            "subscribers (decode, apply, encode once per view)",
            ("channel",),
        )
        self.dispatched: Counter = counter(
            r, "massive_sse_dispatched_entries_total", "Diff stream entries read", ("channel",)
        )
        self.spool_bytes: Gauge = gauge(
            r,
            "massive_sse_spool_bytes",
            "Bytes of the checkpoint spool files open (MASSIVE_SSE_SPOOL_DIR): /api answers "
            "and whole-model snapshots being sent",
        )
        self.read_lag: Histogram = histogram(
            r,
            "massive_sse_read_lag_seconds",
            "Age of the last diff stream entry of a batch when the reader hands it on (its "
            "stream id's time to now): how far the reader is behind the publishers",
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

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        """sse-starlette's per-send timeout (same contract) with asyncio's timeout instead of
        an anyio cancel scope: a send happens per client per view diff, and the cancel
        scope's bookkeeping costs several times asyncio's."""
        deadline = asyncio.timeout(self.send_timeout)
        try:
            async with deadline:
                await send(message)
        except BaseException as exc:
            self._send_interrupted = True
            if isinstance(exc, TimeoutError) and deadline.expired():
                raise SendTimeoutError() from None
            raise

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


def _rows(raw: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XRANGE/XREAD entries as returned by a bytes (decode_responses=False) client."""
    return cast(list[tuple[bytes, dict[bytes, bytes]]], raw or [])


# --- shared readers ------------------------------------------------------------------------------
class DiffFeed:
    """The one reader of a diff stream (one model family, one symbol); hands each entry to
    the mirror of its symbol."""

    def __init__(
        self,
        redis: Redis,
        channel: Channel,
        symbol: str,
        settings: SseSettings,
        metrics: Metrics,
    ) -> None:
        self.redis = redis
        self.channel = channel
        self.stream = channel.stream(symbol)
        self.settings = settings
        self.mirrors: dict[str, Mirror] = {}
        self.whole: dict[str, set[WholeSubscriber]] = {}  # unfiltered streams, by symbol
        self.last_id: StreamId = ZERO_ID
        self.reject_decode = metrics.rejected.labels(channel=channel.name, reason="bad_diff")
        self.read_errors = metrics.read_errors.labels(channel=channel.name)
        self.dropped = metrics.dropped.labels(channel=channel.name)
        self.conflated = metrics.conflated.labels(channel=channel.name)
        self.dispatch_cpu = metrics.dispatch_cpu.labels(channel=channel.name)
        self.dispatched = metrics.dispatched.labels(channel=channel.name)
        self.read_lag = metrics.read_lag.labels(channel=channel.name)
        # merged backlogs of whole-model clients, by (prev_id of the first, last id): the
        # clients that fall behind together reach the bound on the same entry and share one
        # merge. Only that entry's merges are kept: an older merge (up to a whole model's
        # size) is held by the clients that took it, not here.
        self._merged: dict[tuple[str | None, StreamId], Item | None] = {}

    async def prime(self) -> None:
        """Start at the stream's current tail (earlier diffs are inside the models)."""
        last = await self.redis.xrevrange(self.stream, "+", "-", count=1)
        if last:
            self.last_id = parse_id(last[0][0]) or ZERO_ID

    def dispatch(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Hand ``entries`` to the whole-model clients and mirrors; the mirrors' view diffs
        (one per view for all of them) go out at the end."""
        for entry in entries:
            self.route(entry)
        self.flush()

    def flush(self) -> None:
        for mirror in self.mirrors.values():
            mirror.flush()

    def route(self, entry: tuple[bytes, dict[bytes, bytes]]) -> None:
        raw_id, fields = entry
        sid = parse_id(raw_id)
        if sid is None:
            return
        self.last_id = sid
        if self.whole:
            item = decode_item(sid, raw_id.decode(), fields)
            if item is not None:
                for sub in self.whole.get(item.head.symbol, ()):
                    if not sub.push(item):
                        self.dropped.inc()
            self._merged.clear()
        if not self.mirrors:
            return  # nobody watches this model: not even its symbol is needed
        raw = fields.get(b"d")
        try:
            symbol = _diff_head.decode(raw).symbol if raw is not None else None
        except (msgspec.ValidationError, msgspec.DecodeError):
            symbol = None
        if symbol is None or raw is None:
            self.reject_decode.inc()
            logger.warning("channel=%s id=%s: undecodable diff entry", self.channel.name, sid)
            return
        mirror = self.mirrors.get(symbol)
        if mirror is not None:
            mirror.on_entry(sid, raw_id.decode(), raw)

    def merge(self, items: list[Item]) -> Item | None:
        key = (items[0].head.prev_id, items[-1].id)
        if key in self._merged:
            return self._merged[key]
        merged = self._merged[key] = merge_items(items)
        self.conflated.inc()
        return merged

    def subscribe_whole(self, symbol: str, max_bytes: int, conflate_bytes: int) -> WholeSubscriber:
        sub = WholeSubscriber(symbol, max_bytes, conflate_bytes, self.merge)
        self.whole.setdefault(symbol, set()).add(sub)
        return sub

    def unsubscribe_whole(self, sub: WholeSubscriber) -> None:
        group = self.whole.get(sub.symbol)
        if group is not None:
            group.discard(sub)
            if not group:
                del self.whole[sub.symbol]

    def close(self) -> None:
        for group in self.whole.values():
            for sub in group:
                sub.close()
        for mirror in self.mirrors.values():
            mirror.stop()

    async def run(self, stop: asyncio.Event, prime: bool = False) -> None:
        """Read until ``stop``; ``prime``: start at the stream's tail (a feed added after the
        gateway started)."""
        backoff_s = 0.1
        while prime and not stop.is_set():
            try:
                await self.prime()
                break
            except (RedisError, OSError) as exc:
                self.read_errors.inc()
                logger.warning("channel=%s prime failed: %s", self.channel.name, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff_s)
        read_at = 0.0
        while not stop.is_set():
            wait_s = read_at + self.settings.read_interval_s - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            read_at = time.monotonic()
            try:
                resp = await self.redis.xread(
                    {self.stream: format_id(self.last_id)},
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
            entries = [e for _s, es in cast(list[Any], resp or []) for e in _rows(es)]
            lag = self.read_lag
            i = 0
            while i < len(entries):
                # The entries of a reply are merged into their mirror (Mirror.stage), up to
                # ``coalesce_s`` of CPU, then applied at once (Mirror.flush): a reader that
                # fell behind catches up with one view diff, not one per entry. The clients
                # get it before the next entries are worked on.
                t0 = time.thread_time()
                j = i
                with gc_paused():
                    while j < len(entries):
                        self.route(entries[j])
                        j += 1
                        if time.thread_time() - t0 >= self.settings.coalesce_s:
                            break
                    self.flush()
                last = parse_id(entries[j - 1][0]) or ZERO_ID
                lag.observe(max(0.0, time.time() - last[0] / 1000))
                self.dispatched.inc(j - i)
                self.dispatch_cpu.inc(time.thread_time() - t0)
                i = j
                await asyncio.sleep(0)


# --- whole-model streams (no filter): the diff stream entries as they are -----------------------
@dataclass(frozen=True, slots=True)
class Item:
    """One diff stream entry, decoded (its head) and framed once, shared by every client."""

    id: StreamId
    head: _WholeHead
    frame: bytes


def decode_item(sid: StreamId, raw_id: str, fields: dict[bytes, bytes]) -> Item | None:
    raw = fields.get(b"d")
    if raw is None:
        return None
    try:
        head = _whole_head.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    return Item(sid, head, frame("diff", raw, raw_id))


class _MergeDiff(msgspec.Struct):
    """A ModelDiff with its items and meta left as raw JSON, for merging a backlog."""

    symbol: str
    kind: str
    epoch: str
    version: int
    prev_version: int
    ts_ns: int
    changed: dict[str, msgspec.Raw]
    removed: list[str] = []
    meta: msgspec.Raw = msgspec.Raw(b"{}")
    prev_id: str | None = None
    src_recv_ts_ns: int | None = None


_merge_dec = msgspec.json.Decoder(_MergeDiff)


def merge_items(items: list[Item]) -> Item | None:
    """One diff equal to applying ``items`` in order (later values win per item), or None
    when they are not one unbroken chain of one epoch (the client then needs a snapshot)."""
    if any(it.head.snapshot for it in items):
        return None
    for a, b in itertools.pairwise(items):
        hb = b.head
        if (
            hb.epoch != a.head.epoch
            or hb.prev_version != a.head.version
            or (hb.prev_id is not None and hb.prev_id != format_id(a.id))
        ):
            return None
    changed: dict[str, msgspec.Raw] = {}
    removed: set[str] = set()
    first = last = None
    for item in items:
        try:
            d = _merge_dec.decode(_frame_data(item.frame))
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None
        if first is None:
            first = d
        last = d
        for k in d.removed:
            changed.pop(k, None)
            removed.add(k)
        removed.difference_update(d.changed)
        changed.update(d.changed)
    assert first is not None and last is not None
    last.changed, last.removed = changed, sorted(removed)
    last.prev_version, last.prev_id = first.prev_version, first.prev_id
    h = items[-1].head
    head = _WholeHead(h.symbol, h.epoch, h.version, first.prev_version, first.prev_id)
    id_s = format_id(items[-1].id)
    return Item(items[-1].id, head, frame("diff", _json_encoder.encode(last), id_s))


def _frame_data(fr: bytes) -> memoryview:
    """The ``data`` of one SSE frame built by :func:`frame`, without copying it (a merge
    decodes MBs of frames; the Raw values it keeps point into them)."""
    start = fr.index(b"data: ") + 6
    return memoryview(fr)[start : len(fr) - 2 * len(SEP)]


class WholeSubscriber:
    """A whole-model client's unsent diffs (shared frames), bounded in bytes: once the
    frames after the head pass ``conflate_bytes`` (and the head's own size) the backlog is
    merged into one diff (shared by the clients with the same backlog); when even that
    exceeds ``max_bytes``, or the backlog does not chain, it is marked for a fresh
    snapshot. ``push`` never blocks."""

    __slots__ = (
        "buf",
        "closed",
        "conflate_bytes",
        "floor",
        "max_bytes",
        "merge",
        "nbytes",
        "overflowed",
        "symbol",
        "wake",
    )

    def __init__(
        self,
        symbol: str,
        max_bytes: int,
        conflate_bytes: int,
        merge: Callable[[list[Item]], Item | None],
    ) -> None:
        self.symbol = symbol
        self.max_bytes = max_bytes
        self.conflate_bytes = conflate_bytes
        self.merge = merge
        self.buf: list[Item] = []
        self.nbytes = 0
        self.wake = asyncio.Event()
        self.overflowed = False
        self.closed = False
        self.floor: StreamId | None = None  # entries up to it are in what the client holds

    def push(self, item: Item) -> bool:
        """False when the backlog is dropped (the client is marked for a resync)."""
        if self.overflowed:
            return False
        if self.floor is not None and item.id <= self.floor:
            return True
        self.buf.append(item)
        self.nbytes += len(item.frame)
        self.wake.set()
        if self.nbytes <= self.max_bytes and (
            self.floor is None  # no base to merge onto yet: only the bound applies
            or self.nbytes - len(self.buf[0].frame)
            <= max(self.conflate_bytes, len(self.buf[0].frame))
        ):
            return True
        merged = self.merge(self.buf) if self.floor is not None else None
        if merged is None or len(merged.frame) > self.max_bytes:
            self.overflowed = True
            self.buf, self.nbytes = [], 0
            return False
        self.buf, self.nbytes = [merged], len(merged.frame)
        return True

    def hold(self, last_id: StreamId) -> None:
        """The client holds the model up to entry ``last_id``: older entries are dropped."""
        self.floor = last_id
        if self.buf and self.buf[0].id <= last_id:
            self.buf = [it for it in self.buf if it.id > last_id]
            self.nbytes = sum(len(it.frame) for it in self.buf)

    def close(self) -> None:
        self.closed = True
        self.wake.set()

    async def wait(self, timeout_s: float) -> None:
        if self.buf or self.overflowed or self.closed:
            return
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):  # no task per wait (wait_for makes one)
                await self.wake.wait()

    def take(self) -> list[Item]:
        items, self.buf, self.nbytes = self.buf, [], 0
        return items

    def reset(self) -> None:
        self.buf, self.nbytes = [], 0
        self.overflowed = False
        self.floor = None


def _slices(data: bytes) -> Iterator[bytes]:
    for i in range(0, len(data), SNAPSHOT_SLICE):
        yield data[i : i + SNAPSHOT_SLICE]


class _Sent:
    """A session's counters, and its frames cut for the transport: a large frame goes out
    in slices (the transport copies what it is given), small ones joined."""

    def __init__(self, metrics: Metrics, channel: str) -> None:
        self.metrics = metrics
        self.channel = channel
        self.n_diff = metrics.events.labels(channel=channel, event="diff")
        self.n_snap = metrics.events.labels(channel=channel, event="snapshot")
        self.n_bytes = metrics.bytes.labels(channel=channel)
        self.clients = metrics.clients.labels(channel=channel)

    def resync(self, reason: str) -> None:
        self.metrics.resyncs.labels(channel=self.channel, reason=reason).inc()

    def snapshot(self, data: bytes | _WholeSnap) -> Iterator[bytes]:
        self.n_snap.inc()
        if isinstance(data, _WholeSnap):
            self.n_bytes.inc(data.size)
            return data.chunks()
        self.n_bytes.inc(len(data))
        return _slices(data)

    def diffs(self, frames: list[bytes]) -> Iterator[bytes]:
        if not frames:
            return
        self.n_diff.inc(len(frames))
        small: list[bytes] = []
        size = 0
        for fr in frames:
            self.n_bytes.inc(len(fr))
            if len(fr) > SNAPSHOT_SLICE:
                if small:
                    yield b"".join(small)
                    small, size = [], 0
                for i in range(0, len(fr), DIFF_SLICE):
                    yield fr if len(fr) <= DIFF_SLICE else fr[i : i + DIFF_SLICE]
                continue
            small.append(fr)
            size += len(fr)
            if size >= SNAPSHOT_SLICE:
                yield b"".join(small)
                small, size = [], 0
        if small:
            yield b"".join(small)


@dataclass(frozen=True, slots=True)
class _WholeSnap:
    """A stored model framed as a snapshot event, shared by the clients that join together:
    the frame, or the spooled checkpoint it frames (sent from the file, a slice at a time)."""

    frame: bytes | checkpoint.Spooled
    epoch: str
    version: int
    diff_id: str | None

    @property
    def size(self) -> int:
        return len(self.frame) if isinstance(self.frame, bytes) else self.frame.size

    def chunks(self) -> Iterator[bytes]:
        if isinstance(self.frame, bytes):
            yield from _slices(self.frame)
            return
        # a marked checkpoint holds no CR or LF: one data line, as frame() would write it
        yield frame("snapshot", b"", self.diff_id)[: -2 * len(SEP)]
        yield from self.frame.slices(SNAPSHOT_SLICE)
        yield SEP + SEP


@dataclass(slots=True)
class _Since:
    """The diffs after a checkpoint, folded: the version they reach and the latest value of
    each item they touch (or its removal)."""

    version: int
    ts_ns: int
    meta: dict[str, Any]
    diff_id: str
    items: checkpoint.Overlay


@dataclass(frozen=True, slots=True)
class SpooledModel:
    """A model at its latest version as a spooled checkpoint with the diffs after it laid
    over it: answered a piece of items at a time, never held whole. Never mutated (readers
    share it)."""

    base: checkpoint.Spooled
    since: _Since | None

    def pieces(self, keep: Callable[[str, msgspec.Raw], Any] | None = None) -> Iterator[bytes]:
        """The model's JSON; ``keep`` (key, item) -> what to send for it (None: leave it
        out), for a view's items."""
        h, t, s = self.base.head, self.base.tail, self.since
        if s is None:
            if keep is None:
                yield from self.base.slices(SNAPSHOT_SLICE)  # as stored
                return
            version, ts_ns, meta, diff_id = h.version, h.ts_ns, t.meta, t.diff_id
        else:
            version, ts_ns, meta, diff_id = s.version, s.ts_ns, s.meta, s.diff_id
        over = None if s is None else s.items
        head = ModelHead(h.symbol, h.kind, h.epoch, version, ts_ns)
        yield _json_encoder.encode(head)[:-1] + b',"items":{'
        sep = b""
        met = bytearray(0 if over is None else len(over))  # overlay keys the checkpoint has
        for piece in self.base.item_pieces():
            out = _laid_over(_items_dec.decode(piece).items(), over, keep, met)
            if out:
                yield sep + memoryview(_json_encoder.encode(out))[1:-1]
                sep = b","
        if over is not None:  # the keys the diffs added, a piece at a time too
            new = (i for i, m in enumerate(met) if not m)
            while ids := list(itertools.islice(new, ITEMS_PER_PIECE)):
                added = _laid_over(((over.key(i), over.value(i)) for i in ids), None, keep, met)
                if added:
                    yield sep + memoryview(_json_encoder.encode(added))[1:-1]
                    sep = b","
        yield b"}," + _json_encoder.encode(ModelTail(meta, diff_id))[1:]


async def _fill(model: Model, got: checkpoint.Spooled | bytes) -> None:
    """``model`` from a checkpoint: a spooled one a piece of items at a time (a checkpoint
    held whole with its decoded items was the gateway's peak at every promotion, when each
    view feed reloads), any other decoded whole."""
    if isinstance(got, checkpoint.Spooled):
        try:
            h, t = got.head, got.tail
            model.epoch, model.version, model.ts_ns = h.epoch, h.version, h.ts_ns
            model.head, model.meta = t.diff_id, _json_encoder.encode(t.meta)
            await _set_all(model, (_items_dec.decode(p).items() for p in got.item_pieces()))
        finally:
            got.close()
        return
    with gc_paused():
        pm = _model_dec.decode(got)
    del got
    model.epoch, model.version, model.ts_ns = pm.epoch, pm.version, pm.ts_ns
    model.head, model.meta = pm.diff_id, bytes(pm.meta)
    items, pm.items = pm.items, {}
    batch = list(items.items())
    del items
    await _set_all(model, (batch[i : i + 4096] for i in range(0, len(batch), 4096)))


async def _set_all(model: Model, batches: Iterable[Iterable[tuple[str, msgspec.Raw]]]) -> None:
    for batch in batches:
        with gc_paused():
            for key, obj in batch:
                model.set(key, obj)
        await asyncio.sleep(0)  # a 100k-item model: let the other clients run


def _laid_over(
    items: Iterable[tuple[str, msgspec.Raw | None]],
    over: checkpoint.Overlay | None,
    keep: Callable[[str, msgspec.Raw], Any] | None,
    met: bytearray,
) -> dict[str, Any]:
    """``items`` with the overlay's values in place of theirs (a removed one left out; each
    overlay key met is marked in ``met``), each passed through ``keep``."""
    out: dict[str, Any] = {}
    for k, v in items:
        item: Any = v
        if over is not None and (i := over.index(k)) is not None:
            met[i] = 1
            item = over.value(i)
        if item is not None and keep is not None:
            item = keep(k, item)
        if item is not None:
            out[k] = item
    return out


# What ``/api`` answers from: the stored bytes, a decoded model, or a spooled one.
CurrentModel = bytes | RawModel | SpooledModel


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


def accept(state: _State, item: Item) -> bool:
    """Whether ``item`` is the next diff of the session (advancing ``state``); False for an
    entry already covered; raises Resync when the chain is broken."""
    if item.id <= state.last_id:
        return False
    h = item.head
    if h.epoch != state.epoch:
        raise Resync("epoch")
    if h.snapshot:
        raise Resync("snapshot")  # the whole model is in the model key, not in this entry
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


# --- the gateway's copy of one model -------------------------------------------------------------
LOADING, READY, NO_MODEL = "loading", "ready", "no_model"


@dataclass(slots=True)
class _Staged:
    """Live model diffs of a mirror merged before they are applied: the items as JSON (a
    later diff's value replaces an earlier one's), the removed keys, and the chain state
    they bring the model to."""

    changed: dict[str, msgspec.Raw]
    removed: set[str]
    version: int
    head: str | None
    head_sid: StreamId
    ts_ns: int
    src_recv_ts_ns: int | None  # the oldest of the merged diffs'
    meta: bytes

    def add(self, d: _Diff, id_s: str, sid: StreamId) -> None:
        """Merge the next diff of the chain."""
        merge_diff(self.changed, self.removed, d.changed, d.removed)
        self.version, self.head, self.head_sid, self.ts_ns = d.version, id_s, sid, d.ts_ns
        if d.src_recv_ts_ns is not None:
            old = self.src_recv_ts_ns
            self.src_recv_ts_ns = d.src_recv_ts_ns if old is None else min(old, d.src_recv_ts_ns)
        self.meta = bytes(d.meta)


_BUFFER_MAX = 10_000  # live entries kept while a mirror loads (beyond: load again)


class Mirror:
    """One model of one symbol as the gateway holds it, with the views clients asked for."""

    def __init__(self, gw: Gateway, channel: Channel, symbol: str) -> None:
        self.gw = gw
        self.channel = channel
        self.symbol = symbol
        self.views: dict[ViewSpec, ViewFeed] = {}
        self.model = Model(channel.part_of, self._wants)
        self.state = LOADING
        self.buffer: list[tuple[StreamId, str, bytes]] | None = []
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.reason = ""
        self.m_resyncs = gw.metrics.resyncs
        self.m_dropped = gw.metrics.dropped.labels(channel=channel.name)
        self.m_conflated = gw.metrics.conflated.labels(channel=channel.name)
        self.m_reject = gw.metrics.rejected.labels(channel=channel.name, reason="bad_diff")
        self.ready_event = asyncio.Event()
        self.created = time.monotonic()
        self.dates_due = asyncio.Event()
        self.dates_task: asyncio.Task[None] | None = None
        self.staged: _Staged | None = None  # live diffs read, not yet applied (``flush``)

    # -- views --
    def view(self, spec: ViewSpec) -> ViewFeed:
        v = self.views.get(spec)
        if v is None:
            s = self.gw.settings
            date = is_date(self.channel, spec)
            v = self.views[spec] = ViewFeed(
                spec,
                Model(self.channel.part_of) if date else self.model,
                self.channel.name,
                self.symbol,
                self.channel.strategy,
                s.history_bytes,
                s.pending_max_bytes,
            )
            v.reset("new")
            if date:
                v.filled = False
                self._refresh_dates()
            else:
                self.model.heat(spec.covers)
            self.gw.metrics.views.labels(channel=self.channel.name).inc()
        return v

    # -- GEX by expiry date (processors/serve/gex_expiry.py) --
    def _refresh_dates(self) -> None:
        """Bring the date views to the GEX model's latest version (in the background)."""
        self.dates_due.set()
        if self.dates_task is None or self.dates_task.done():
            self.dates_task = self.gw.spawn(self._dates_loop(), f"sse-gex-dates:{self.symbol}")

    async def _dates_loop(self) -> None:
        gw = self.gw
        while not gw.closing and any(is_date(self.channel, s) for s in self.views):
            await self.dates_due.wait()
            self.dates_due.clear()
            try:
                async with gw.redis_slots:
                    ge = await gex_expiry.read(gw.redis, self.symbol)
            except (RedisError, OSError, ValueError) as exc:
                gw.metrics.session_errors.labels(channel=self.channel.name).inc()
                logger.warning("gex dates %s: %s", self.symbol, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(gw._stop.wait(), gw.settings.no_model_poll_s)
                self.dates_due.set()
                continue
            if ge is None:  # no model yet, or a publish between the reads: the next diff
                continue
            for spec, view in list(self.views.items()):
                if is_date(self.channel, spec):
                    self._date_update(view, ge)

    def _date_update(self, view: ViewFeed, ge: gex_expiry.GexExpiries) -> None:
        m = view.model
        if view.filled and m.epoch == ge.epoch and m.version >= ge.version:
            return
        items = ge.items(cast(str, view.spec.scope))
        sid = (parse_id(ge.diff_id) if ge.diff_id else None) or ZERO_ID
        if not view.filled or m.epoch != ge.epoch:  # first fill, or a new epoch: a snapshot
            m = Model(self.channel.part_of)
            with gc_paused():
                apply_changes(m, items, [])
            m.epoch, m.version, m.head, m.head_sid, m.ts_ns = (
                ge.epoch, ge.version, ge.diff_id, sid, ge.ts_ns,
            )  # fmt: skip
            first = not view.filled
            view.model, view.filled = m, True
            n = view.reset("" if first else "epoch")
            if n:
                self.m_resyncs.labels(channel=self.channel.name, reason="epoch").inc(n)
            return
        gone = [k for p in m.parts.values() for k in p.items if k not in items]
        with gc_paused():
            changes = apply_changes(m, items, gone)
        m.version, m.head, m.head_sid, m.ts_ns = ge.version, ge.diff_id, sid, ge.ts_ns
        vd = view.on_diff(sid, ge.diff_id or format_id(sid), ge.ts_ns, None, changes, None)
        if vd is not None:
            for sub in view.subs:
                self.push(view, sub, vd)

    def _wants(self, pk: PartKey) -> bool:
        """Whether a view covers partition ``pk`` (only those are decoded and flattened)."""
        return any(spec.covers(pk) for spec in self.views)

    def drop_view(self, spec: ViewSpec) -> None:
        if self.views.pop(spec, None) is not None:
            self.gw.metrics.views.labels(channel=self.channel.name).dec()

    def _notify(self) -> None:
        for v in self.views.values():
            for sub in v.subs:
                sub.wake.set()

    # -- loading --
    def start(self) -> None:
        if self.task is None or self.task.done():
            self.task = self.gw.spawn(
                self._load_loop(), f"sse-mirror:{self.channel.name}:{self.symbol}"
            )

    def stop(self) -> None:
        for task in (self.task, self.dates_task):
            if task is not None:
                task.cancel()
        for v in self.views.values():
            for sub in v.subs:
                sub.close()

    def reload(self, reason: str) -> None:
        """The model no longer continues: read it again; every client gets a snapshot."""
        self.state = LOADING
        self.ready_event.clear()
        self.buffer = []
        self.staged = None
        for v in self.views.values():
            n = v.reset(reason)
            if n:
                self.m_resyncs.labels(channel=self.channel.name, reason=reason).inc(n)
        self.start()

    async def _load_loop(self) -> None:
        gw = self.gw
        while not gw.closing:
            self.buffer = []
            self.wake.clear()
            try:
                model = await self._load()
            except (RedisError, OSError) as exc:
                gw.metrics.session_errors.labels(channel=self.channel.name).inc()
                logger.warning(
                    "channel=%s symbol=%s: model load failed: %s",
                    self.channel.name,
                    self.symbol,
                    exc,
                )
                model = None
            if isinstance(model, Model):
                model.heat(self._wants)  # views added while it loaded
                old, self.model = self.model, model
                self.buffer = None
                self.state = READY
                for spec, v in self.views.items():
                    if is_date(self.channel, spec):
                        self._refresh_dates()
                        continue
                    v.model = model
                    v.reset("")
                self.ready_event.set()
                if old.n_items():
                    del old
                    release_freed_memory()  # the previous copy of the model is garbage now
                return
            if model == NO_MODEL and self.state != NO_MODEL:
                self.state = NO_MODEL
                self._notify()
                self.ready_event.set()  # no model is an answer too (the stream says so)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(gw.settings.no_model_poll_s):
                    await self.wake.wait()

    async def _load(self) -> Model | str | None:
        """The model at its latest version; NO_MODEL; None when its diffs do not chain."""
        gw, ch = self.gw, self.channel
        got = await gw.spool(ch, self.symbol)
        if got is None:
            return NO_MODEL
        model = Model(ch.part_of, self._wants)
        try:
            await _fill(model, got)
        except (msgspec.ValidationError, msgspec.DecodeError):
            gw.metrics.rejected.labels(channel=ch.name, reason="bad_model").inc()
            logger.warning("channel=%s symbol=%s: undecodable model", ch.name, self.symbol)
            return None
        model.head_sid = (parse_id(model.head) if model.head else None) or ZERO_ID
        # the checkpoint may be versions behind its diffs (processors/heatmap/publisher.py)
        async for sid, id_s, body in gw.entries_after(ch.stream(self.symbol), model.head_sid):
            if _diff_head.decode(body).symbol != self.symbol:
                continue
            if self.apply(model, sid, id_s, body) is not None:
                return None
        if self.buffer is None:  # live entries overflowed while we read: read again
            return None
        for sid, id_s, body in self.buffer:
            if self.apply(model, sid, id_s, body) is not None:
                return None
        return model

    # -- live --
    def on_entry(self, sid: StreamId, id_s: str, raw: bytes) -> None:
        if self.state != READY:
            if self.buffer is not None:
                self.buffer.append((sid, id_s, raw))
                if len(self.buffer) > _BUFFER_MAX:
                    self.buffer = None
            self.wake.set()
            return
        reason = self.stage(sid, id_s, raw)
        if reason is not None:
            self.reload(reason)

    def _continues(
        self, raw: bytes, epoch: str, version: int, head: str | None
    ) -> tuple[_Diff | None, str | None]:
        """The decoded diff entry, or a resync reason (and no entry) when it does not
        continue the model at (``epoch``, ``version``, ``head``); (None, None) for an
        undecodable entry (counted, skipped)."""
        try:
            # The head first: a feed that resyncs on an entry need not decode its items.
            h = _whole_head.decode(raw)
            if h.epoch != epoch:
                return None, "epoch"
            if h.snapshot:
                return None, "snapshot"
            if h.prev_id is not None and head is not None and h.prev_id != head:
                # A later entry that does not follow the diff we hold: versions we have were
                # re-issued with other content (Redis lost writes), or we missed one.
                return None, "rewrite" if h.version <= version else "gap"
            return _diff_dec.decode(raw), None
        except (msgspec.ValidationError, msgspec.DecodeError):
            self.m_reject.inc()
            return None, None

    def apply(self, m: Model, sid: StreamId, id_s: str, raw: bytes) -> str | None:
        """Apply one diff entry to ``m`` (a model being loaded); a resync reason when it does
        not continue it."""
        if sid <= m.head_sid:
            return None
        d, reason = self._continues(raw, m.epoch, m.version, m.head)
        if d is None or reason is not None:
            return reason
        if d.version <= m.version:
            m.head_sid = sid
            return None
        if d.prev_version != m.version:
            return "gap"
        apply_changes(m, d.changed, d.removed)
        m.version, m.head, m.head_sid, m.ts_ns = d.version, id_s, sid, d.ts_ns
        m.meta = bytes(d.meta)
        return None

    def stage(self, sid: StreamId, id_s: str, raw: bytes) -> str | None:
        """Merge a live diff entry into the staged ones (applied by ``flush``); a resync
        reason when it does not continue the model. Merging first means an item changed by
        several diffs read together (a reader behind) is decoded and compared once."""
        m, st = self.model, self.staged
        if st is None:
            version, head, head_sid = m.version, m.head, m.head_sid
        else:
            version, head, head_sid = st.version, st.head, st.head_sid
        if sid <= head_sid:
            return None
        d, reason = self._continues(raw, m.epoch, version, head)
        if d is None or reason is not None:
            return reason
        if d.version <= version:
            if st is None:
                m.head_sid = sid
            else:
                st.head_sid = sid
            return None
        if d.prev_version != version:
            return "gap"
        if st is None:
            st = self.staged = _Staged(
                d.changed, set(d.removed), d.version, id_s, sid, d.ts_ns,
                d.src_recv_ts_ns, bytes(d.meta),
            )  # fmt: skip
            return None
        st.add(d, id_s, sid)
        return None

    def flush(self) -> None:
        """Apply the staged diffs to the model: one view diff per view they touch, shared
        by its subscribers. Diffs read together (the reader was behind) make one view diff:
        the clients get the latest state at once, and neither the decoding nor the
        per-client work (a send per view diff) grows with the backlog."""
        st, m = self.staged, self.model
        if st is None:
            return
        self.staged = None
        changes = apply_changes(m, st.changed, st.removed)
        meta = st.meta if st.meta != m.meta else None
        m.version, m.head, m.head_sid, m.ts_ns = st.version, st.head, st.head_sid, st.ts_ns
        if meta is not None:
            m.meta = meta
        if self.dates_task is not None:
            self._refresh_dates()
        assert st.head is not None
        for spec, view in self.views.items():
            if is_date(self.channel, spec):
                continue
            vd = view.on_diff(st.head_sid, st.head, st.ts_ns, st.src_recv_ts_ns, changes, meta)
            if vd is not None:
                for sub in view.subs:
                    self.push(view, sub, vd)

    def push(self, view: ViewFeed, sub: Subscriber, vd: ViewDiff) -> None:
        if sub.push(vd):
            return
        # over its byte bound: merge the backlog per item; still over it -> resync
        backlog = sub.take()
        merged = view.merged(backlog)
        self.m_conflated.inc()
        if len(merged.frame) > sub.max_bytes:
            self.m_dropped.inc()
            sub.resync("overflow")
            return
        sub.pending, sub.pending_bytes = [merged], len(merged.frame)
        sub.wake.set()


class Gateway:
    """Shared state of one gateway process: feeds, mirrors, settings, metrics."""

    def __init__(self, deps: Deps, settings: SseSettings) -> None:
        self.deps = deps
        self.redis = deps.redis
        self.settings = settings
        self.metrics = Metrics(deps)
        self.channels = channels()
        # One reader per (model family, symbol) diff stream: the configured symbols' now,
        # another symbol's when a client first asks for it (``feed``).
        self.feeds = {
            (name, sym): DiffFeed(deps.redis, ch, sym, settings, self.metrics)
            for name, ch in self.channels.items()
            for sym in deps.settings.symbols
        }
        self._stop = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self.grace_s = min(deps.settings.grace_s, settings.block_ms / 1000 + 2)
        self.started = False
        self.redis_slots = asyncio.Semaphore(settings.redis_concurrency)
        self._snaps: dict[
            tuple[str, str], tuple[float, _WholeSnap | asyncio.Future[_WholeSnap | None]]
        ] = {}
        self._api_reads: dict[tuple[str, str], asyncio.Task[CurrentModel | None]] = {}

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The shared readers and the janitor (and every mirror's loader), as one task group,
        for the life of the server. On exit they are asked to stop, given ``grace_s``, then
        cancelled, and awaited either way; an error of any of them is raised."""
        self._stop = asyncio.Event()
        fix_mmap_threshold(self.settings.mmap_threshold_kb)
        for feed in self.feeds.values():
            await feed.prime()
        shutdown = asyncio.timeout(None)
        try:
            async with shutdown, asyncio.TaskGroup() as tg:
                self._tg = tg
                for (n, sym), f in self.feeds.items():
                    tg.create_task(f.run(self._stop), name=f"sse-feed:{n}:{sym}")
                tg.create_task(self._janitor(), name="sse-janitor")
                self.started = True
                try:
                    yield
                finally:
                    self.started = False
                    self.close_sessions()
                    shutdown.reschedule(asyncio.get_running_loop().time() + self.grace_s)
        except TimeoutError:
            logger.warning("sse-gateway: readers still busy after %.0f s: cancelled", self.grace_s)
        finally:
            self._tg = None

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A task of the gateway's group (feeds added later, mirror loaders): awaited at
        shutdown."""
        if self._tg is None:
            raise RuntimeError("sse-gateway: not running")
        return self._tg.create_task(coro, name=name)

    def close_sessions(self) -> None:
        """Ask every open SSE stream to end (server shutdown)."""
        self._stop.set()
        for feed in self.feeds.values():
            feed.close()

    @property
    def closing(self) -> bool:
        return self._stop.is_set()

    def feed(self, channel: Channel, symbol: str) -> DiffFeed:
        """The reader of ``symbol``'s diff stream of ``channel`` (started when new)."""
        f = self.feeds.get((channel.name, symbol))
        if f is None:
            f = DiffFeed(self.redis, channel, symbol, self.settings, self.metrics)
            self.feeds[(channel.name, symbol)] = f
            if self.started:
                name = f"sse-feed:{channel.name}:{symbol}"
                self.spawn(f.run(self._stop, prime=True), name)
        return f

    def mirror(self, channel: Channel, symbol: str) -> Mirror:
        feed = self.feed(channel, symbol)
        m = feed.mirrors.get(symbol)
        if m is None:
            m = feed.mirrors[symbol] = Mirror(self, channel, symbol)
            m.start()
        return m

    async def _janitor(self) -> None:
        """Drops views nobody watched for ``view_linger_s``, and mirrors without views."""
        linger = self.settings.view_linger_s
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.5, min(5.0, linger / 2)))
            dropped, stopped = self._drop_idle(time.monotonic(), linger)
            if stopped:
                # a cancelled loader's frame holds its mirror's model until it ends; one that
                # met the cancel as a Redis error (and retried, or went back to waiting for
                # dates) is cancelled again until it does
                await cancel_and_wait(stopped)
            if dropped:  # a view's tiles or a whole model graph were freed: hand them back
                release_freed_memory()

    def _drop_idle(self, now: float, linger: float) -> tuple[bool, list[asyncio.Task[None]]]:
        """The janitor's pass: whether a view or mirror was dropped, and the tasks of the
        stopped mirrors. A function of its own so that no loop variable of the (sleeping)
        janitor keeps the last dropped mirror, and its model, alive."""
        dropped = False
        stopped: list[asyncio.Task[None]] = []
        for key, (t, v) in list(self._snaps.items()):
            if isinstance(v, _WholeSnap) and now - t >= SNAPSHOT_SHARE_S:
                del self._snaps[key]
        for feed in self.feeds.values():
            for sym, mirror in list(feed.mirrors.items()):
                for spec, view in list(mirror.views.items()):
                    if not view.subs and now - view.idle_since >= linger:
                        mirror.drop_view(spec)
                        dropped = True
                if not mirror.views and now - mirror.created >= linger:
                    mirror.stop()
                    stopped += [t for t in (mirror.task, mirror.dates_task) if t]
                    del feed.mirrors[sym]
                    dropped = True
        return dropped, stopped

    async def entries_after(
        self, stream: str, after: StreamId, page_bytes: int | None = None
    ) -> AsyncIterator[tuple[StreamId, str, bytes]]:
        """Entries of ``stream`` with ids above ``after`` (processors/heatmap/checkpoint.py),
        in pages of about ``page_bytes`` (``replay_page_bytes``)."""
        async for id_s, body in checkpoint.diffs_after(
            self.redis,
            stream,
            format_id(after),
            page_bytes or self.settings.replay_page_bytes,
            self.redis_slots,
        ):
            sid = parse_id(id_s)
            if sid is not None:
                yield sid, id_s, body

    async def shared_model(self, channel: Channel, symbol: str) -> CurrentModel | None:
        """``current_model``, one read for the requests that ask while it is in flight: every
        dashboard polls ``/api/gex`` (a whole model, read from Redis and decoded per read),
        so a thousand browsers would otherwise be a thousand copies of it at once. The answer
        is never mutated (``filter_model`` builds its own; a spooled model is read with
        offsets of each reader's own)."""
        key = (channel.name, symbol)
        task = self._api_reads.get(key)
        if task is None:
            task = asyncio.ensure_future(self.current_model(channel, symbol))
            self._api_reads[key] = task

            def done(t: asyncio.Task[CurrentModel | None]) -> None:
                if self._api_reads.get(key) is t:
                    del self._api_reads[key]
                if not t.cancelled():
                    t.exception()  # retrieved: the awaiting requests re-raise it

            task.add_done_callback(done)
        # a request that goes away does not cancel the read the others wait for
        return await asyncio.shield(task)

    async def spool(self, channel: Channel, symbol: str) -> checkpoint.Spooled | bytes | None:
        """The model key of ``symbol``: a marked checkpoint copied into a spool file
        (counted in ``massive_sse_spool_bytes`` while open), else as stored."""
        got = await checkpoint.spool(
            self.redis,
            channel.model_key(symbol),
            slots=self.redis_slots,
            spool_dir=self.settings.spool_dir or None,
        )
        if isinstance(got, checkpoint.Spooled):
            self._spooled(got, got.size)
        return got

    async def current_model(self, channel: Channel, symbol: str) -> CurrentModel | None:
        """The model at its latest version: the checkpoint and the diffs after it. A marked
        checkpoint (heatmap) is spooled and answered from the file a piece at a time, the
        diffs laid over it; any other is read whole and answered as stored when no diff
        follows its ``diff_id`` (GEX writes one per version) or it is not a model's JSON,
        else decoded with the diffs applied (encoded by the caller as it sends it)."""
        got = await self.spool(channel, symbol)
        if got is None:
            return None
        if isinstance(got, checkpoint.Spooled):
            h = got.head
            since = await self._since(channel, symbol, h.epoch, h.version, got.tail.diff_id)
            return SpooledModel(got, since)
        raw = got
        try:
            head = _whole_model_head.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return raw
        folded = await self._since(channel, symbol, head.epoch, head.version, head.diff_id)
        if folded is None:
            return raw
        try:
            model = _full_model.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return raw
        for k, v in folded.items.items():
            if v is None:
                model.items.pop(k, None)
            else:
                model.items[k] = v
        model.version, model.ts_ns, model.meta = folded.version, folded.ts_ns, folded.meta
        model.diff_id = folded.diff_id
        return model

    async def _since(
        self, channel: Channel, symbol: str, epoch: str, version: int, diff_id: str | None
    ) -> _Since | None:
        """The diffs that continue a checkpoint (``epoch``, ``version``, ``diff_id``),
        folded; None when none does."""
        if diff_id is None:
            return None
        stream = channel.stream(symbol)
        since: _Since | None = None  # stays None when the checkpoint is current
        prev_id = diff_id
        # small pages: what the fold holds in memory is a page and the overlay's keys
        pages = checkpoint.SPOOL_CHUNK_BYTES
        after_id = parse_id(diff_id) or ZERO_ID
        async for _sid, id_s, body in self.entries_after(stream, after_id, pages):
            try:
                d = _full_diff.decode(body)
            except (msgspec.ValidationError, msgspec.DecodeError):
                continue
            if d.symbol != symbol:
                continue
            if (
                d.snapshot
                or d.epoch != epoch
                or d.prev_version != version
                or (d.prev_id is not None and d.prev_id != prev_id)
            ):
                break  # not a continuation: the checkpoint is what we have
            if since is None:
                since = _Since(version, d.ts_ns, d.meta, id_s, self._overlay())
            for k, v in d.changed.items():
                since.items.set(k, v)
            for k in d.removed:
                since.items.remove(k)
            version = since.version = d.version
            since.ts_ns, since.meta, since.diff_id = d.ts_ns, d.meta, id_s
            prev_id = id_s
        if since is not None:
            since.items.done()
            self._spooled(since.items, since.items.size)
        return since

    def _overlay(self) -> checkpoint.Overlay:
        return checkpoint.Overlay(self.settings.spool_dir or None)

    def _spooled(self, owner: object, size: int) -> None:
        """Counts ``size`` spool bytes in ``massive_sse_spool_bytes`` until ``owner`` goes."""
        self.metrics.spool_bytes.inc(size)
        weakref.finalize(owner, self.metrics.spool_bytes.dec, size)

    # -- whole-model streams --
    async def whole_snapshot(
        self, channel: Channel, symbol: str
    ) -> tuple[_WholeSnap, _State] | None:
        """The stored model framed as a ``snapshot`` event and the chain state it is at. One
        read and one frame shared by the clients that ask within ``SNAPSHOT_SHARE_S`` (a
        model is tens of MB: one copy, not one per joining client). An older checkpoint is
        fine: each client then gets the diffs after its diff_id."""
        key = (channel.name, symbol)
        hit = self._snaps.get(key)
        if hit is not None:
            t, held = hit
            if isinstance(held, asyncio.Future):  # a read in flight: share it
                snap = await asyncio.shield(held)
            elif time.monotonic() - t < SNAPSHOT_SHARE_S:
                snap = held
            else:
                snap = await self._read_snapshot(channel, symbol)
        else:
            snap = await self._read_snapshot(channel, symbol)
        if snap is None:
            return None
        last = parse_id(snap.diff_id) if snap.diff_id else None
        return snap, _State(snap.epoch, snap.version, last or ZERO_ID, snap.diff_id)

    def _forget_snapshot(
        self, channel: Channel, symbol: str, before: StreamId, *, inclusive: bool = False
    ) -> None:
        """Drop the shared snapshot when it is older than stream id ``before`` (or at it,
        ``inclusive``). One newer than that, or a read in flight, is kept: at a promotion
        every whole-model client resyncs at once, and each dropping what the first started
        reading made every client spool its own copy of the model (~3 MB of reads each). A
        read that began before the new version landed is caught by the catch-up after it
        (not a continuation: a gap), which drops exactly that snapshot."""
        key = (channel.name, symbol)
        hit = self._snaps.get(key)
        if hit is None or not isinstance(held := hit[1], _WholeSnap):
            return
        at = parse_id(held.diff_id) if held.diff_id else None
        if at is None or at < before or (inclusive and at == before):
            del self._snaps[key]

    async def _read_snapshot(self, channel: Channel, symbol: str) -> _WholeSnap | None:
        key = (channel.name, symbol)
        fut: asyncio.Future[_WholeSnap | None] = asyncio.get_running_loop().create_future()
        self._snaps[key] = (time.monotonic(), fut)
        try:
            got = await self.spool(channel, symbol)
            if got is None:
                snap = None
            elif isinstance(got, checkpoint.Spooled):
                h = got.head
                snap = _WholeSnap(got, h.epoch, h.version, got.tail.diff_id)
            else:
                snap = self._frame_snapshot(channel, symbol, got)
        except BaseException as exc:
            self._snaps.pop(key, None)
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters re-raise it
            raise
        fut.set_result(snap)
        if snap is None:
            self._snaps.pop(key, None)
        else:
            self._snaps[key] = (time.monotonic(), snap)
        return snap

    def _frame_snapshot(self, channel: Channel, symbol: str, raw: bytes) -> _WholeSnap | None:
        try:
            head = _whole_model_head.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError):
            self.metrics.rejected.labels(channel=channel.name, reason="bad_model").inc()
            logger.warning("channel=%s symbol=%s: undecodable model", channel.name, symbol)
            return None
        data = frame("snapshot", raw, head.diff_id)
        return _WholeSnap(data, head.epoch, head.version, head.diff_id)

    async def catch_up(self, channel: Channel, symbol: str, state: _State) -> list[bytes] | None:
        """Diffs of ``symbol`` after ``state`` (advanced): a heatmap model key is a checkpoint
        that may be some versions behind its diffs (processors/heatmap/publisher.py). None when they
        do not continue the chain, or exceed ``whole_pending_max_bytes`` (a snapshot is
        then cheaper)."""
        frames: list[bytes] = []
        size = 0
        async for sid, id_s, body in self.entries_after(channel.stream(symbol), state.last_id):
            item = decode_item(sid, id_s, {b"d": body})
            if item is None or item.head.symbol != symbol:
                continue
            try:
                if accept(state, item):
                    frames.append(item.frame)
                    size += len(item.frame)
            except Resync:
                return None
            if size > self.settings.whole_pending_max_bytes:
                return None
        return frames

    async def replay(
        self, channel: Channel, symbol: str, after: StreamId
    ) -> tuple[list[bytes], _State] | None:
        """Diffs of ``symbol`` after entry ``after``, or None if a snapshot is needed."""
        stream = channel.stream(symbol)
        async with self.redis_slots:
            first = _rows(await self.redis.xrange(stream, "-", "+", count=1))
            if not first or after < (parse_id(first[0][0]) or ZERO_ID):
                return None  # trimmed (or the stream is gone): the client missed diffs
            at = _rows(await self.redis.xrange(stream, format_id(after), format_id(after)))
            model = await self.redis.get(channel.model_key(symbol))
        if not at or model is None:
            return None
        base = decode_item(after, format_id(after), at[0][1])
        if base is None or base.head.symbol != symbol:
            return None
        try:
            if _whole_model_head.decode(model).epoch != base.head.epoch:
                return None
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None
        del model
        state = _State(base.head.epoch, base.head.version, after, format_id(after))
        frames = await self.catch_up(channel, symbol, state)
        return None if frames is None else (frames, state)

    async def whole_session(
        self, channel: Channel, symbol: str, last_event_id: str | None
    ) -> AsyncIterator[bytes]:
        """The whole model: the stored model, then the diff stream's entries as they are
        (shared frames; a backlog merged into one diff when it grows past the bound).
        Subscribes before it reads the model, so nothing is lost."""
        feed = self.feed(channel, symbol)
        out = _Sent(self.metrics, channel.name)
        sub = feed.subscribe_whole(
            symbol, self.settings.whole_pending_max_bytes, self.settings.whole_conflate_bytes
        )
        out.clients.inc()
        try:
            yield b"retry: " + str(self.settings.retry_ms).encode() + SEP + SEP
            state: _State | None = None
            chunks: Iterator[bytes] = iter(())
            resumed = await self._whole_resume(channel, symbol, last_event_id, out)
            if resumed is not None:
                frames, state = resumed
                sub.hold(state.last_id)
                chunks = out.diffs(frames)
            announced = False
            while True:
                for chunk in chunks:
                    yield chunk
                chunks = iter(())
                if sub.closed:
                    break
                if state is not None:
                    await sub.wait(self.settings.ping_s)
                    chunks, state = self._whole_next(channel, sub, state, out)
                    continue
                base = await self._whole_base(channel, symbol, out)
                if isinstance(base, tuple):
                    chunks, state = base
                    sub.hold(state.last_id)
                    continue
                if base == NO_MODEL and not announced:
                    announced = True
                    yield frame("status", b'{"state":"no_model"}')
                await sub.wait(self.settings.no_model_poll_s)
                sub.reset()  # diffs without a base are useless
        except (RedisError, OSError) as exc:
            # end this stream; the client reconnects (Last-Event-ID) once Redis is back
            self.metrics.session_errors.labels(channel=channel.name).inc()
            logger.warning("channel=%s symbol=%s: stream ended: %s", channel.name, symbol, exc)
        finally:
            feed.unsubscribe_whole(sub)
            out.clients.dec()

    async def _whole_resume(
        self, channel: Channel, symbol: str, last_event_id: str | None, out: _Sent
    ) -> tuple[list[bytes], _State] | None:
        """The diffs after ``Last-Event-ID`` while the diff stream holds them, or None."""
        after = parse_id(last_event_id)
        if after is None:
            return None
        resumed = await self.replay(channel, symbol, after)
        if resumed is None:
            out.resync("resume")
        return resumed

    async def _whole_base(
        self, channel: Channel, symbol: str, out: _Sent
    ) -> tuple[Iterator[bytes], _State] | str:
        """The snapshot and the diffs after it (as chunks) and the state they bring the
        client to; NO_MODEL; or "gap" when the checkpoint's diffs do not chain (read it
        again)."""
        snap = await self.whole_snapshot(channel, symbol)
        if snap is None:
            return NO_MODEL
        data, state = snap
        caught = await self.catch_up(channel, symbol, state)
        if caught is None:
            self._forget_snapshot(channel, symbol, state.last_id, inclusive=True)
            out.resync("gap")
            return "gap"
        return itertools.chain(out.snapshot(data), out.diffs(caught)), state

    def _whole_next(
        self, channel: Channel, sub: WholeSubscriber, state: _State, out: _Sent
    ) -> tuple[Iterator[bytes], _State | None]:
        """The chunks of the client's backlog that continues ``state`` (advanced; a ping
        when there is none), or None for the state when it needs a fresh snapshot."""
        if sub.overflowed:
            sub.reset()
            out.resync("overflow")
            return iter(()), None
        frames: list[bytes] = []
        try:
            for item in sub.take():
                if accept(state, item):
                    frames.append(item.frame)
        except Resync as rs:
            self._forget_snapshot(channel, sub.symbol, item.id)  # the model moved on
            sub.reset()
            out.resync(rs.reason)
            return iter(()), None
        sub.hold(state.last_id)
        if not frames and not sub.closed:
            return iter((PING,)), state
        return out.diffs(frames), state

    async def resolve(self, channel: Channel, symbol: str, spec: ViewSpec) -> ViewSpec | str:
        """The view to serve, or why it is unknown (-> 404): a symbol neither offered nor
        published, an expiry the model does not have, a GEX date other than today's (GEX by
        strike is published for all expiries and for 0DTE)."""
        key = channel.model_key(symbol)
        if symbol not in self.deps.settings.symbols:
            async with self.redis_slots:
                if not await self.redis.exists(key):
                    return f"unknown symbol {symbol!r}"
        if channel.strategy is None and spec.expiry is not None:
            return await self._gex_date(key, spec.expiry)
        if spec.expiry is not None:
            mirror = self.mirror(channel, symbol)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(mirror.ready_event.wait(), 10.0)
            expiries = mirror.model.expiries() if mirror.state == READY else []
            if spec.expiry == FRONT:
                if not expiries:
                    return f"no {channel.name} model of {symbol} yet"
                return dataclasses.replace(spec, expiry=expiries[0])
            if mirror.state == READY and spec.expiry not in expiries:
                return f"no expiry {spec.expiry} in the {channel.name} model of {symbol}"
        return spec

    async def _gex_date(self, key: str, expiry: str) -> ViewSpec | str:
        """A GEX date: today's is the 0DTE scope; another listed expiry its own view."""
        async with self.redis_slots:
            raw = await self.redis.get(key)
        expiries: list[str] = []
        today = None
        if raw is not None:
            with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                expiries, today = gex_expiry.listed(cast(bytes, raw))
        if expiry == today:
            return ViewSpec(scope="0dte")
        if expiry not in expiries:
            return f"no expiry {expiry} in the GEX model (listed: {', '.join(expiries)})"
        return ViewSpec(scope=expiry)

    async def session(
        self, channel: Channel, symbol: str, spec: ViewSpec, last_event_id: str | None
    ) -> AsyncIterator[bytes]:
        """A view: its snapshot (or the diffs after ``last_event_id``), then its diffs."""
        mirror = self.mirror(channel, symbol)
        view = mirror.view(spec)
        out = _Sent(self.metrics, channel.name)
        sub = view.subscribe()
        out.clients.inc()
        try:
            yield b"retry: " + str(self.settings.retry_ms).encode() + SEP + SEP
            announced = False
            resume = last_event_id
            while not sub.closed:
                if not sub.need_snapshot:
                    await sub.wait(self.settings.ping_s)
                    frames = _view_next(sub)
                    if frames == []:
                        yield PING
                    for chunk in out.diffs(frames or []):
                        yield chunk
                    continue
                if mirror.state != READY or not view.filled:
                    if mirror.state == NO_MODEL and not announced:
                        announced = True
                        yield frame("status", b'{"state":"no_model"}')
                    if not await sub.woken(self.settings.ping_s):
                        yield PING
                    continue
                view = mirror.views.get(spec) or view
                if sub.reason:
                    out.resync(sub.reason)
                    sub.reason = ""
                frames = _view_resume(view, sub, resume, out) if resume is not None else None
                resume = None
                if frames is None:  # a snapshot, shared by the view's clients, in slices
                    sub.need_snapshot = False
                    sub.head = view.head
                    chunks = out.snapshot(view.snapshot())
                else:
                    chunks = iter(frames)
                for chunk in chunks:
                    yield chunk
                del chunks, frames
        finally:
            view.unsubscribe(sub, time.monotonic())
            out.clients.dec()


def _view_next(sub: Subscriber) -> list[bytes] | None:
    """The frames of the diffs a view client has not been sent (the shared objects); None
    when it needs a snapshot (or is closed) instead."""
    if sub.need_snapshot or sub.closed:
        return None
    items = sub.take()
    if items and items[0].prev_id != sub.head:  # cannot happen: a view feeds in order
        sub.resync("gap")
        return None
    if items:
        sub.head = items[-1].id_s
    return [vd.frame for vd in items]


def _view_resume(view: ViewFeed, sub: Subscriber, last: str, out: _Sent) -> list[bytes] | None:
    """The chunks of the view diffs after id ``last`` while the view still holds them, or
    None (a snapshot is needed)."""
    replay = view.replay_after(last)
    if replay is None:
        out.resync("resume")
        return None
    sub.need_snapshot = False
    sub.head = view.head
    return list(out.diffs([vd.frame for vd in replay]))


# --- HTTP application --------------------------------------------------------------------------
def _symbol(request: Request) -> str:
    sym = request.query_params.get("symbol", "SPX").strip().upper()
    if not sym.isalnum() or len(sym) > 12:
        raise ValueError(f"bad symbol {sym!r}")
    return sym


def is_date(channel: Channel, spec: ViewSpec) -> bool:
    """A GEX view of one expiry date (not all expiries, not 0DTE)."""
    return channel.strategy is None and spec.scope not in (None, "all", "0dte")


async def _pieces(pieces: Iterator[bytes]) -> AsyncIterator[bytes]:
    """A model's JSON pieces, on the event loop: each is ~0.3 MB of encoding, not worth a
    thread hop (Starlette would give a sync iterator one per piece)."""
    for piece in pieces:
        yield piece


def _view_keep(channel: Channel, spec: ViewSpec) -> Callable[[str, msgspec.Raw], Any]:
    """What a view sends of a model item (None: it leaves the item out)."""
    zero = spec.scope == "0dte"

    def keep(key: str, item: msgspec.Raw) -> Any:
        if not spec.covers(channel.part_of(key)):
            return None
        if spec.rows_filtered and not spec.keep(key):
            return None
        if spec.scope is None:
            return item
        obj = msgspec.json.decode(item)
        if isinstance(obj, dict):
            return {k: x for k, x in obj.items() if k in GEX_0DTE_KEEP or (("_0dte" in k) == zero)}
        return obj

    return keep


def filter_model(raw: bytes | RawModel, channel: Channel, spec: ViewSpec) -> bytes:
    """A PublishedModel JSON narrowed to a view (the ``/api`` form of a view)."""
    model = _full_model.decode(raw) if isinstance(raw, bytes) else raw
    keep = _view_keep(channel, spec)
    items: dict[str, Any] = {}
    for key, item in model.items.items():
        kept = keep(key, item)
        if kept is not None:
            items[key] = kept
    return _json_encoder.encode(msgspec.structs.replace(model, items=items))


class Endpoints:
    """The HTTP handlers of both ports, over one :class:`Gateway`."""

    def __init__(self, gw: Gateway, deps: Deps, settings: SseSettings) -> None:
        self.gw = gw
        self.deps = deps
        self.settings = settings
        self.static = Path(settings.static_dir) if settings.static_dir else STATIC_DIR

    def channel_of(self, request: Request) -> Channel:
        strategy = request.path_params.get("strategy")
        name = "gex" if strategy is None else f"heatmap:{strategy}"
        ch = self.gw.channels.get(name)
        if ch is None:
            raise ValueError(f"unknown strategy {strategy!r}")
        return ch

    async def view_of(self, request: Request) -> tuple[Channel, str, ViewSpec] | Response:
        try:
            ch, sym = self.channel_of(request), _symbol(request)
            spec = parse_view(request.query_params, ch.strategy is None)
        except ValueError as exc:
            return PlainTextResponse(str(exc), status_code=400)
        found = await self.gw.resolve(ch, sym, spec)
        if isinstance(found, str):
            return PlainTextResponse(found, status_code=404)
        return ch, sym, found

    async def sse(self, request: Request) -> Response:
        v = await self.view_of(request)
        if isinstance(v, Response):
            return v
        ch, sym, spec = v
        raw_last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        last = raw_last.strip() if raw_last and parse_id(raw_last) is not None else None
        if spec == ViewSpec():  # the whole model, as published (no mirror needed)
            stream = self.gw.whole_session(ch, sym, last)
        else:
            stream = self.gw.session(ch, sym, spec, last)
        return SlowClientDropping(
            stream,
            ping=_NO_PING_S,
            send_timeout=self.settings.send_timeout_s,
            headers={"Cache-Control": "no-store"},
            channel=ch.name,
            metrics=self.gw.metrics,
        )

    async def api_model(self, request: Request) -> Response:
        v = await self.view_of(request)
        if isinstance(v, Response):
            return JSONResponse({"error": bytes(v.body).decode()}, status_code=v.status_code)
        ch, sym, spec = v
        raw: CurrentModel | None
        headers = {"Cache-Control": "no-store"}
        if is_date(ch, spec):
            async with self.gw.redis_slots:
                ge = await gex_expiry.read(self.deps.redis, sym)
            raw = None if ge is None else ge.model_json(cast(str, spec.scope))
        else:
            try:
                raw = await self.gw.shared_model(ch, sym)
            except checkpoint.CheckpointMoving as exc:
                headers["Retry-After"] = str(self.settings.retry_after_s)
                return JSONResponse({"error": str(exc)}, status_code=503, headers=headers)
        if raw is None:
            return JSONResponse({"error": f"no {ch.name} model for {sym}"}, status_code=404)
        if isinstance(raw, SpooledModel):
            # read from the spool and encoded a piece at a time as it is sent
            keep = None if spec == ViewSpec() else _view_keep(ch, spec)
            return StreamingResponse(
                _pieces(raw.pieces(keep)), media_type="application/json", headers=headers
            )
        if spec != ViewSpec() and not is_date(ch, spec):
            raw = filter_model(raw, ch, spec)
        if isinstance(raw, RawModel):
            # encoded a piece at a time as it is sent: never one ~15 MB buffer per request
            return StreamingResponse(
                _pieces(encode_model_pieces(raw)), media_type="application/json", headers=headers
            )
        return Response(raw, media_type="application/json", headers=headers)

    async def api_gex_history(self, request: Request) -> Response:
        try:
            sym = _symbol(request)
            raw_since = request.query_params.get("since_ms")
            since = int(raw_since) if raw_since else None
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        async with self.gw.redis_slots:
            body = await gex.levels_history(self.deps.redis, sym, since)
        return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})

    async def _epochs(self, fields: list[str] | None) -> Response:
        """Active epoch per configured symbol with its meta (``fields`` of it; None: all), in
        two pipelined round trips whatever the number of symbols."""
        redis = self.deps.redis
        symbols = sorted(self.deps.settings.symbols)
        async with self.gw.redis_slots:
            pipe = redis.pipeline(transaction=False)
            for sym in symbols:
                pipe.get(keys.epoch_active(sym))
            eids = await pipe.execute() if symbols else []
            active = [(sym, as_str(e)) for sym, e in zip(symbols, eids, strict=True) if e]
            pipe = redis.pipeline(transaction=False)
            for sym, eid in active:
                if fields is None:
                    pipe.hgetall(keys.epoch_meta(sym, eid))
                else:
                    pipe.hmget(keys.epoch_meta(sym, eid), fields)
            metas = await pipe.execute() if active else []
        out: dict[str, Any] = {}
        for (sym, eid), meta in zip(active, metas, strict=True):
            if fields is None:
                out[sym] = {"epoch": eid, "meta": {as_str(k): as_str(v) for k, v in meta.items()}}
            else:
                out[sym] = {"epoch": eid} | {
                    f: opt_str(v) for f, v in zip(fields, meta, strict=True)
                }
        body = {
            "active": out,
            "symbols": list(self.deps.settings.symbols),
            "strategies": list(keys.STRATEGIES),
        }
        return Response(orjson.dumps(body), media_type="application/json")

    async def api_symbols(self, request: Request) -> Response:
        """What the dashboard shows of the epochs (the full meta is on the admin port)."""
        return await self._epochs(["state", "n_contracts"])

    async def api_epochs(self, request: Request) -> Response:
        return await self._epochs(None)

    async def healthz(self, request: Request) -> Response:
        try:
            await asyncio.wait_for(self.deps.redis.ping(), 2)
        except (RedisError, OSError, TimeoutError) as exc:
            return PlainTextResponse(f"redis: {exc}\n", status_code=503)
        if not self.gw.started:
            return PlainTextResponse("feeds not started\n", status_code=503)
        return PlainTextResponse("ok\n")

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.deps.registry), media_type=CONTENT_TYPE_LATEST)

    async def readyz(self, request: Request) -> Response:
        if not self.gw.started or self.gw.closing:
            return PlainTextResponse("not ready\n", status_code=503)
        return PlainTextResponse("ready\n")

    async def index(self, request: Request) -> Response:
        return FileResponse(self.static / "index.html", headers={"Cache-Control": "no-cache"})


def create_app(deps: Deps, settings: SseSettings) -> Starlette:
    """The gateway's ASGI app; ``app.state.gateway`` is its :class:`Gateway`."""
    gw = Gateway(deps, settings)
    ep = Endpoints(gw, deps, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with gw.running():
            yield

    tokens = Tokens(settings.tokens, settings.token_file)
    app = Starlette(
        routes=[
            Route("/", ep.index),
            Route("/sse/heatmap/{strategy}", ep.sse),
            Route("/sse/gex", ep.sse),
            Route("/api/heatmap/{strategy}", ep.api_model),
            Route("/api/gex", ep.api_model),
            Route("/api/gex/history", ep.api_gex_history),
            Route("/api/symbols", ep.api_symbols),
            Route("/healthz", ep.healthz),
            Mount("/static", StaticFiles(directory=ep.static), name="static"),
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
                redis_slots=gw.redis_slots,
            ),
        ],
        lifespan=lifespan,
    )
    # The admin port: metrics and internal APIs, reachable only from inside the cluster
    # (deploy/k8s NetworkPolicy); no token, no caps. It shares the public app's Gateway.
    admin = Starlette(
        routes=[
            Route("/metrics", ep.metrics),
            Route("/api/epochs", ep.api_epochs),
            Route("/healthz", ep.healthz),
            Route("/readyz", ep.readyz),
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

        failed: list[Exception] = []

        async def serve(server: QuietServer, host: str, port: int) -> None:
            # A failure ends this task normally: the other server then shuts down gracefully
            # (closing its sockets) instead of being cancelled by the group.
            try:
                await server.serve()
            except SystemExit:  # uvicorn exits the process when it cannot bind
                failed.append(RuntimeError(f"sse-gateway: cannot serve on {host}:{port}"))
            except Exception as exc:
                failed.append(exc)

        try:
            async with asyncio.TaskGroup() as tg:
                serving = [
                    tg.create_task(serve(*srv), name=f"sse-gateway:uvicorn:{i}")
                    for i, srv in enumerate(servers)
                ]
                stopper = tg.create_task(stop.wait(), name="sse-gateway:stop")
                try:
                    await asyncio.wait([*serving, stopper], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopper.cancel()
                    self.gateway.close_sessions()  # open streams end, so uvicorn can drain
                    for server, _, _ in servers:
                        server.should_exit = True
        except BaseExceptionGroup as eg:
            raise eg.exceptions[0] from None  # the first failure, as a plain exception
        if failed:
            raise failed[0]
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
