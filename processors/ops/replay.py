"""``massive-pipeline record`` / ``massive-pipeline replay``: capture the raw feeds and run
them through the same pipeline again, deterministically and as fast as causality allows.

Recording file (``*.mrec.gz``): a gzip stream of length-prefixed msgpack frames (4-byte
big-endian length, then the frame). The first frame is a :class:`RecordingHeader`, every
other one a :class:`Record`: one raw stream entry (its fields byte for byte) with its receive
time and, for chain pointers, the snapshot blob it points at (blobs expire in Redis, so they
are captured when recording). Records are ordered by receive time:

* ``massive:{ws}:stream``: the entry's ``recv_ts_ns`` (ws-ingest stamps it on receipt);
* ``massive:{chain}:stream``: the pointer's ``ts_ns`` (fetch completion, the poller's clock);
* ``massive:{chain}:spot:stream`` and anything unreadable: the entry id's time (when Redis got it).

A recording is self-contained: it starts with the state at its first record
(:func:`start_records`: the newest chain snapshot of every symbol, and its index spot as a WS
``V`` frame), so one started mid-session replays on its own.

Replay modes (``replay_file``):

* **causal** (default): the model path (``processors.MODEL_PATH``, or ``--run``) runs in this
  process on a :class:`StepClock` whose time is the recording's. The clock moves through
  *instants* on a grid of ``--step-ms``: the next one is the earlier of the next record's
  receive time and the earliest time a clock-driven processor (publisher: max interval,
  reconcile retry, idle checkpoint; GEX: build cadence) asked for, rounded up to the grid
  (so at most one instant per step). Every record received up to an instant is written, as
  fast as the pipeline takes it, and the consumer groups (normalizer, hydrator, builders)
  drain; then the publishers and GEX run exactly one iteration at the instant, on that
  state. A chain snapshot is applied alone: what came before it drains first, and its epoch
  is promoted before anything after it is written, so every WS event meets the epoch it met
  in the recording's order. No sleeps: the only waits are for the groups' lag and pending to reach
  0 (:class:`Quiescence`) and for the clock-driven processors to finish their instant.
* **lockstep** (the reference, ``--lockstep``): the same instants, but one record at a time
  with every group drained after each; slow, and equal to causal by construction (below).
* **feed** (``--feed``, ``--speed N``, ``--as-fast-as-possible``): only XADD the records, at
  N x the recorded pace or unpaced, for processors running elsewhere on their own clocks
  (not deterministic: their batches form by timing).

Why causal equals lockstep and itself: between instants only the consumers run, and what
they leave at an instant does not depend on how records were batched (admission keeps the
newest value per contract and kind whatever the order; a tile's staged value is a function
of its legs; the publisher folds every announced tile against its model, so its pending set
is exactly the staged views that differ from the model). Everything that depends on time
(publish conditions, checkpoints, GEX cadence, diff timestamps) is decided at instants, on
the recording's clock, from that state. Guarantee: replays of one recording into an empty
Redis with the same processors, settings and ``--step-ms`` publish the same diffs per model
(everything but the stream ids ``prev_id`` / ``diff_id`` and ``src_recv_ts_ns``, the
receive time of the oldest event behind a version, which depends on batching) and the same
final models, GEX included (``processors/ops/replay_compare.py`` checks it: ``--compare``).
Not reproduced: stream entry ids, TTL deadlines, metrics, log lines. ``--step-ms`` is the
finest time resolution of the clock-driven decisions: a publisher's value condition is seen
at the instant after the records that met it (live, it is seen at its next read).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gzip
import logging
import os
import signal
import struct
import sys
import time
from collections import Counter
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from processors import MODEL_PATH
from processors.registry import load
from schemas import keys
from schemas.messages import WS_PAYLOAD_FIELD, WS_RECV_FIELD, ChainPointer, SpotTick, from_entry
from streams import admin
from streams.clock import ReplayAborted, StepClock
from streams.consumer import GroupConsumer
from streams.logs import one_line, redact, setup_logging
from streams.processor import ConsumerProcessor, Deps, Processor
from streams.producer import DEFAULT_MAXLEN
from streams.redis_client import CONNECT_ERRORS, admin_client, as_str, unreachable
from streams.runner import cancel_and_wait
from streams.settings import RuntimeSettings, SettingsError, from_env

logger = logging.getLogger(__name__)

FORMAT = "massive-recording"
VERSION = 1
NS = 1_000_000_000
MS = 1_000_000

LONG_LEASE_MS = 7 * 24 * 3600 * 1000
DEFAULT_STEP_MS = 250.0  # the publishers' default max interval
# A deadline this close after an instant counts as at it (float seconds of the participants)
DUE_TOLERANCE_NS = 1_000

FEEDS = {"chain": keys.CHAIN_STREAM, "ws": keys.WS_STREAM, "spot": keys.SPOT_STREAM}


class RecordingHeader(msgspec.Struct, kw_only=True):
    format: str = FORMAT
    version: int = VERSION
    created_ns: int
    streams: list[str]


class Record(msgspec.Struct, array_like=True):
    t_ns: int  # receive time
    stream: str
    fields: list[tuple[bytes, bytes]]
    blob_key: str | None = None
    blob: bytes | None = None


# Stream names of recordings made before the cluster key schema (schemas/keys.py): read as
# the streams they are now, so an older recording replays unchanged.
LEGACY_STREAMS = {
    "massive:chain:stream": keys.CHAIN_STREAM,
    "massive:ws:stream": keys.WS_STREAM,
    "massive:spot:stream": keys.SPOT_STREAM,
}


class RecordingError(ValueError):
    """Not a recording, a newer format, or a truncated/corrupt file."""


_enc = msgspec.msgpack.Encoder()
_header_dec = msgspec.msgpack.Decoder(RecordingHeader)
_record_dec = msgspec.msgpack.Decoder(Record)
_LEN = struct.Struct(">I")


class FrameWriter:
    """A gzip file of length-prefixed frames (4-byte big-endian length, then the frame): the
    layout of recordings and of saved replay outputs."""

    def __init__(self, path: str | Path, compresslevel: int = 6) -> None:
        self._f = gzip.GzipFile(path, "wb", compresslevel=compresslevel)

    def frame(self, payload: bytes) -> None:
        self._f.write(_LEN.pack(len(payload)))
        self._f.write(payload)

    def close(self) -> None:
        self._f.close()


class RecordingWriter(FrameWriter):
    """Append records to a ``.mrec.gz`` file; the header is written on open."""

    def __init__(self, path: str | Path, streams: Sequence[str], created_ns: int) -> None:
        super().__init__(path)
        self.count = 0
        self.frame(_enc.encode(RecordingHeader(created_ns=created_ns, streams=list(streams))))

    def write(self, rec: Record) -> None:
        self.frame(_enc.encode(rec))
        self.count += 1

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _frames(f: gzip.GzipFile) -> Iterator[bytes]:
    while True:
        head = f.read(_LEN.size)
        if not head:
            return
        if len(head) < _LEN.size:
            raise RecordingError("truncated frame header")
        (n,) = _LEN.unpack(head)
        payload = f.read(n)
        if len(payload) < n:
            raise RecordingError("truncated frame")
        yield payload


def read_frames(path: str | Path) -> Generator[bytes, None, None]:
    """The frames of a :class:`FrameWriter` file, lazily; RecordingError when truncated or
    not gzip."""
    f = gzip.GzipFile(path, "rb")
    try:
        yield from _frames(f)
    except (OSError, EOFError) as exc:
        raise RecordingError(f"{path}: {exc}") from None
    finally:
        f.close()


def read_recording(path: str | Path) -> tuple[RecordingHeader, Iterator[Record]]:
    """The header, and a lazy iterator over the records (raises RecordingError if bad)."""
    f = gzip.GzipFile(path, "rb")
    frames = _frames(f)
    try:
        header = _header_dec.decode(next(frames))
    except (StopIteration, msgspec.DecodeError, OSError, EOFError) as exc:
        f.close()
        raise RecordingError(f"{path}: not a {FORMAT} file ({exc or 'empty'})") from None
    if header.format != FORMAT or header.version > VERSION:
        f.close()
        raise RecordingError(f"{path}: format {header.format!r} v{header.version} unsupported")
    header.streams = [LEGACY_STREAMS.get(s, s) for s in header.streams]

    def records() -> Iterator[Record]:
        try:
            for payload in frames:
                try:
                    rec = _record_dec.decode(payload)
                    rec.stream = LEGACY_STREAMS.get(rec.stream, rec.stream)
                    yield rec
                except msgspec.DecodeError as exc:
                    raise RecordingError(f"{path}: bad record: {exc}") from None
        except (OSError, EOFError) as exc:  # gzip: truncated or corrupt
            raise RecordingError(f"{path}: {exc}") from None
        finally:
            f.close()

    return header, records()


# --- recording -------------------------------------------------------------------------
def _id_ns(eid: bytes | str) -> int:
    return int(as_str(eid).partition("-")[0]) * 1_000_000


def receive_time_ns(stream: str, eid: bytes | str, fields: dict[bytes, bytes]) -> int:
    """When the pipeline received this raw entry (see the module docstring)."""
    if stream == keys.WS_STREAM:
        raw = fields.get(WS_RECV_FIELD)
        if raw is not None and raw.isdigit():
            return int(raw)
    elif stream == keys.CHAIN_STREAM:
        with contextlib.suppress(msgspec.DecodeError):
            return from_entry(fields, ChainPointer).ts_ns
    return _id_ns(eid)


@dataclass
class RecordStats:
    records: Counter[str] = field(default_factory=Counter)
    missing_blobs: int = 0
    first_ns: int | None = None
    last_ns: int | None = None


async def _to_records(
    redis: Redis, stream: str, entries: list[tuple[bytes, dict[bytes, bytes]]], stats: RecordStats
) -> list[Record]:
    """Raw entries -> records; chain pointers get their blob (GET, pipelined)."""
    out: list[Record] = []
    blob_keys: list[str | None] = []
    for eid, fields in entries:
        key = None
        if stream == keys.CHAIN_STREAM:
            with contextlib.suppress(msgspec.DecodeError):
                key = from_entry(fields, ChainPointer).snapshot_key
        blob_keys.append(key)
        out.append(Record(receive_time_ns(stream, eid, fields), stream, list(fields.items())))
    wanted = [k for k in blob_keys if k is not None]
    if wanted:
        blobs = iter(await redis.mget(wanted))
        kept = []
        for rec, k in zip(out, blob_keys, strict=True):
            if k is None:
                kept.append(rec)  # unreadable pointer: kept as is (replay reproduces it)
                continue
            blob = next(blobs)
            if blob is None:
                stats.missing_blobs += 1
                logger.warning("record: blob %s expired; pointer skipped", k)
                continue
            kept.append(
                msgspec.structs.replace(
                    rec, blob_key=k, blob=blob if isinstance(blob, bytes) else blob.encode()
                )
            )
        out = kept
    return out


def _range_start(pos: str) -> str:
    return "-" if pos == "0" else "(" + pos


async def _active_symbols(redis: Redis) -> set[str]:
    """The symbols (configured or with a spec) that have an active epoch."""
    from processors.ops.monitor import every_symbol

    syms = every_symbol()
    pipe = redis.pipeline(transaction=False)
    for sym in syms:
        pipe.exists(keys.epoch_active(sym))
    return {s for s, n in zip(syms, await pipe.execute(), strict=True) if n}


async def start_records(
    redis: Redis,
    streams: Sequence[str],
    upto: str,
    start_ns: int,
    *,
    live_spot: bool,
    scan_max: int = 5000,
) -> list[Record]:
    """The state a recording starts from, as records, so that a replay of the file alone
    meets the epochs, GEX sources and spots the live pipeline had: per symbol the newest
    chain pointer of each scope (the heatmap's window, the whole chain for GEX) at or before
    entry id ``upto`` whose snapshot blob still exists, and the index spot, as a WS
    ``V`` frame received at the start (the hydrator applies it with the usual admission):
    ``massive:spot:latest`` when recording from now on (``live_spot``), else the newest spot
    tick at or before ``upto``. Ordered by receive time, none later than ``start_ns``."""
    out: list[Record] = []
    chain_t = 0
    if keys.CHAIN_STREAM in streams:
        out += await _start_chain(redis, upto, scan_max)
        chain_t = max((r.t_ns for r in out), default=0)
    if keys.WS_STREAM in streams:
        spots = await _start_spots(redis, upto, live_spot)
        for sym, (value, ts) in sorted(spots.items()):
            frame = msgspec.json.encode([{"ev": "V", "T": f"I:{sym}", "val": value, "t": ts // MS}])
            t = min(start_ns, max(ts, chain_t))
            fields = [(WS_RECV_FIELD, str(t).encode()), (WS_PAYLOAD_FIELD, frame)]
            out.append(Record(t, keys.WS_STREAM, fields))
    return out


async def _start_chain(redis: Redis, upto: str, scan_max: int) -> list[Record]:
    """Per symbol with an active epoch, the newest chain pointer of each scope at or before
    ``upto`` whose blob still exists (at most ``scan_max`` entries scanned), by receive time."""
    active = await _active_symbols(redis)
    found: dict[tuple[str, str], Record] = {}  # (symbol, scope): window / full chain
    stats = RecordStats()
    end, seen = upto, 0
    while seen < scan_max and not (active and active <= {s for s, _ in found}):
        batch: Any = await redis.xrevrange(keys.CHAIN_STREAM, max=end, min="-", count=200)
        if not batch:
            break
        seen += len(batch)
        for rec in await _to_records(redis, keys.CHAIN_STREAM, batch, stats):
            if rec.blob is None:
                continue
            ptr = from_entry(dict(rec.fields), ChainPointer)
            found.setdefault((ptr.symbol, ptr.scope), rec)  # newest first
        end = "(" + as_str(batch[-1][0])
    return sorted(found.values(), key=lambda r: r.t_ns)


async def _start_spots(redis: Redis, upto: str, live_spot: bool) -> dict[str, tuple[float, int]]:
    """symbol -> (spot, ts_ns): ``massive:spot:latest`` (``live_spot``), else the newest spot
    tick of each symbol at or before ``upto``."""
    spots: dict[str, tuple[float, int]] = {}
    if live_spot:
        h = {as_str(k): as_str(v) for k, v in (await redis.hgetall(keys.SPOT_LATEST)).items()}
        for k, v in h.items():
            at = h.get(k + ":ts_ns")
            if not k.endswith(":ts_ns") and at is not None and at.isdigit():
                with contextlib.suppress(ValueError):
                    spots[k] = (float(v), int(at))
    else:
        ticks: Any = await redis.xrevrange(keys.SPOT_STREAM, max=upto, min="-", count=200)
        for _, fields in ticks:
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                tick = from_entry(fields, SpotTick)
                spots.setdefault(tick.symbol, (tick.value, tick.ts_ns))
    return spots


async def record_range(
    redis: Redis,
    streams: Sequence[str],
    since: str = "0",
    until: str | None = None,
    page: int = 1000,
    with_start: bool = True,
) -> tuple[list[Record], RecordStats]:
    """Everything currently in ``streams`` after ``since`` (and up to ``until``), ordered by
    receive time; ``with_start`` and a ``since`` after the streams' beginning: preceded by
    the state at ``since`` (:func:`start_records`)."""
    stats = RecordStats()
    records: list[Record] = []
    since_pos = admin.parse_position(since)
    until_pos = admin.parse_position(until) if until else "+"
    prefix: list[Record] = []
    if with_start and since_pos not in ("0", "$"):
        prefix = await start_records(redis, streams, since_pos, _id_ns(since_pos), live_spot=False)
    for s in streams:
        if since_pos == "$":
            continue
        start = _range_start(since_pos)
        while True:
            batch: Any = await redis.xrange(s, min=start, max=until_pos, count=page)
            records += await _to_records(redis, s, batch, stats)
            if len(batch) < page:
                break
            start = "(" + as_str(batch[-1][0])
    order = {s: i for i, s in enumerate(streams)}
    records.sort(key=lambda r: (r.t_ns, order[r.stream]))
    records = prefix + records
    for r in records:
        stats.records[r.stream] += 1
    if records:
        stats.first_ns, stats.last_ns = records[0].t_ns, records[-1].t_ns
    return records, stats


async def record_follow(
    redis: Redis,
    streams: Sequence[str],
    writer: RecordingWriter,
    stop: asyncio.Event,
    since: str = "$",
    reorder_window_s: float = 2.0,
    block_ms: int = 500,
    with_start: bool = True,
) -> RecordStats:
    """Tail ``streams`` until ``stop``; records are written in receive-time order once they
    are ``reorder_window_s`` older than the newest one seen (the rest at the end).
    ``with_start``: the file begins with the state at the start (:func:`start_records`), so
    a recording started at any moment replays on its own."""
    stats = RecordStats()
    pos = admin.parse_position(since)
    last: dict[str, str] = {}
    for s in streams:
        if pos == "$":
            info = await redis.xinfo_stream(s) if await redis.exists(s) else None
            last[s] = as_str(info["last-generated-id"]) if info else "0-0"
        else:
            last[s] = "0-0" if pos == "0" else pos
    buf: list[Record] = []
    window_ns = int(reorder_window_s * NS)
    order = {s: i for i, s in enumerate(streams)}
    if with_start and pos != "0":
        upto = last.get(keys.CHAIN_STREAM, pos) if pos == "$" else pos
        start_ns = time.time_ns() if pos == "$" else _id_ns(pos)
        for r in await start_records(redis, streams, upto, start_ns, live_spot=pos == "$"):
            writer.write(r)
            stats.records[r.stream] += 1
            stats.first_ns = r.t_ns if stats.first_ns is None else stats.first_ns
            stats.last_ns = r.t_ns

    def flush(upto: int | None) -> None:
        buf.sort(key=lambda r: (r.t_ns, order[r.stream]))
        n = len(buf) if upto is None else sum(1 for r in buf if r.t_ns <= upto)
        for r in buf[:n]:
            writer.write(r)
            stats.records[r.stream] += 1
            stats.first_ns = r.t_ns if stats.first_ns is None else stats.first_ns
            stats.last_ns = r.t_ns
        del buf[:n]

    while not stop.is_set():
        res: Any = await redis.xread(dict(last), count=1000, block=block_ms)  # type: ignore[arg-type]
        for sname, entries in res or []:
            s = as_str(sname)
            buf += await _to_records(redis, s, entries, stats)
            last[s] = as_str(entries[-1][0])
        if buf:
            flush(max(r.t_ns for r in buf) - window_ns)
    flush(None)
    return stats


# --- replay ----------------------------------------------------------------------------
@dataclass
class ReplayStats:
    records: Counter[str] = field(default_factory=Counter)
    max_late_s: float = 0.0  # feed mode, paced: worst delay behind the recorded schedule
    wall_s: float = 0.0
    span_s: float = 0.0  # recorded time covered
    instants: int = 0  # causal / lockstep: instants the participants ran at


Hook = Callable[[Record], Awaitable[None]]


class _Writer:
    """XADDs records into their streams, pipelined; a chain pointer goes out only once the
    SET of its blob has been answered, so a reader of the pointer finds the blob. (One
    pipeline is not enough on a Redis Cluster: the blob and the pointer live in different
    slots, and a cluster pipeline sends to their nodes in parallel.)"""

    def __init__(self, redis: Redis, maxlen: int, blob_ttl_s: int) -> None:
        self.redis = redis
        self.maxlen = maxlen
        self.blob_ttl_s = blob_ttl_s
        # pipelines executed in order: a new one starts after each blob SET
        self._pipes: list[Pipeline] = [redis.pipeline(transaction=False)]
        self.queued = 0

    def queue(self, rec: Record) -> None:
        if rec.blob is not None and rec.blob_key is not None:
            self._pipes[-1].set(rec.blob_key, rec.blob, ex=self.blob_ttl_s)
            self._pipes.append(self.redis.pipeline(transaction=False))
        self._pipes[-1].xadd(rec.stream, dict(rec.fields), maxlen=self.maxlen, approximate=True)
        self.queued += 1

    async def flush(self) -> None:
        if self.queued:
            for pipe in self._pipes:
                await pipe.execute()
            self._pipes = [self.redis.pipeline(transaction=False)]
            self.queued = 0


async def replay_records(
    redis: Redis,
    records: Iterable[Record],
    *,
    speed: float | None,
    after_write: Hook | None = None,
    maxlen: int = DEFAULT_MAXLEN,
    blob_ttl_s: int = 3600,
    stop: asyncio.Event | None = None,
    batch: int = 500,
) -> ReplayStats:
    """Feed mode: XADD every record into its stream, at ``speed`` x the recorded pace (None:
    as fast as possible), for processors running elsewhere on their own clocks. Records
    already due are pipelined, ``batch`` per round trip; with ``after_write`` every record
    is its own round trip."""
    stats = ReplayStats()
    t0: int | None = None
    real0 = time.perf_counter()
    w = _Writer(redis, maxlen, blob_ttl_s)
    for rec in records:
        if stop is not None and stop.is_set():
            break
        if t0 is None:
            t0, real0 = rec.t_ns, time.perf_counter()
        if speed is not None:
            due = real0 + (rec.t_ns - t0) / NS / speed
            delay = due - time.perf_counter()
            if delay > 0:
                await w.flush()  # what was due before goes out before we wait
                await asyncio.sleep(delay)
            stats.max_late_s = max(stats.max_late_s, time.perf_counter() - due)
        w.queue(rec)
        stats.records[rec.stream] += 1
        stats.span_s = (rec.t_ns - t0) / NS
        if after_write is not None or w.queued >= batch:
            await w.flush()
        if after_write is not None:
            await after_write(rec)
    await w.flush()
    stats.wall_s = time.perf_counter() - real0
    return stats


def pipeline_streams(symbols: Iterable[str] | None = None) -> list[str]:
    from processors.ops.monitor import pipeline_streams as streams

    return streams(symbols)


# Groups whose consumer keeps entries pending on purpose while it holds their effect in
# memory: the heatmap publishers ack only once the changes are published (which may wait for
# a time boundary of the clock). For these only the lag must be 0 (all delivered).
HOLD_GROUPS = frozenset({keys.PUBLISHER_GROUP})


async def busy_groups(
    redis: Redis,
    streams: Sequence[str] | None = None,
    hold_groups: frozenset[str] = HOLD_GROUPS,
) -> list[admin.GroupLag]:
    """Consumer groups of the pipeline's streams with a lag (or unknown lag) or, except
    ``hold_groups``, pending entries; empty when the pipeline is quiescent."""
    names = list(streams) if streams is not None else pipeline_streams()
    pipe = redis.pipeline(transaction=False)
    for n in names:
        pipe.exists(n)
    present = [n for n, e in zip(names, await pipe.execute(), strict=True) if e]
    return [
        g
        for g in await admin.lag(redis, present)
        if g.lag != 0 or (g.pending != 0 and g.group not in hold_groups)
    ]


class Quiescence:
    """Waits until given consumer groups have caught up: nothing undelivered (lag 0) and
    nothing delivered but unacknowledged (pending 0). One MULTI of XINFO GROUPS per check,
    so every group is seen at one instant: a consumer acks a batch only after writing its
    output entries, so an output stream can never look caught up while the entries that
    feed it are still in flight. This is the replay's only backpressure: no sleeps of a
    fixed length, just re-checks until the groups drain. The consumers of those groups that
    run in this process (``consumers``) say when they wait in their next read, holding
    nothing: Redis is asked only then (and again once one of them has read anew), not on a
    timer while they are still working; at most every 4 ms otherwise."""

    def __init__(
        self,
        redis: Redis,
        groups: Iterable[tuple[str, str]],
        consumers: Sequence[GroupConsumer] = (),
    ) -> None:
        self.redis = redis
        self.groups: dict[str, set[str]] = {}
        for stream, group in groups:
            self.groups.setdefault(stream, set()).add(group)
        self.checks = 0
        self.reads = 0  # reads sent by the in-process consumers
        self.consumers = list(consumers)
        self._read = asyncio.Event()
        for c in self.consumers:
            c.on_read = self._on_read

    async def busy(self) -> list[str]:
        """``stream/group`` of every watched group that has not caught up."""
        if not self.groups:
            return []
        pipe = self.redis.pipeline(transaction=True)
        for s in self.groups:
            pipe.xinfo_groups(s)
        replies = await pipe.execute(raise_on_error=False)
        self.checks += 1
        out: list[str] = []
        for (s, wanted), rep in zip(self.groups.items(), replies, strict=True):
            if isinstance(rep, Exception):  # stream or groups not created yet
                out += [f"{s}/{g}" for g in sorted(wanted)]
                continue
            seen = set()
            for g in rep:
                name = as_str(g["name"])
                if name in wanted:
                    seen.add(name)
                    if g["lag"] is None or int(g["lag"]) or int(g["pending"]):
                        out.append(f"{s}/{name}")
            out += [f"{s}/{g}" for g in sorted(wanted - seen)]
        return out

    def _on_read(self) -> None:
        self.reads += 1
        self._read.set()

    async def _next_read(self, since: int, timeout_s: float) -> None:
        """Until an in-process consumer has sent a read after the first ``since`` (or
        ``timeout_s``)."""
        if self.reads == since:
            self._read.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._read.wait(), timeout_s)

    async def wait(self, timeout_s: float, check: Callable[[], None] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        interval = 0.0
        while True:
            while not all(c.reading for c in self.consumers):
                await self._next_read(self.reads, 0.004)  # one still works on what it read
                if check is not None:
                    check()
                if time.monotonic() > deadline:
                    working = [c.spec.group for c in self.consumers if not c.reading]
                    raise TimeoutError(f"consumers still working after {timeout_s}s: {working}")
            since = self.reads
            busy = await self.busy()
            if not busy:
                return
            if check is not None:
                check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"pipeline not caught up after {timeout_s}s: {busy}")
            if self.consumers:
                await self._next_read(since, 0.004)  # entries on their way to a consumer
            else:
                await asyncio.sleep(interval)
                interval = min(max(interval * 2, 0.0005), 0.004)


# --- in-process pipeline on the recording's clock -------------------------------------
MODES = ("causal", "lockstep", "feed")


@dataclass
class ReplayOptions:
    """``mode``: causal (default) or lockstep run ``processors`` in this process on a
    :class:`StepClock`; feed only writes the raw streams (at ``speed`` x the recorded pace,
    None = as fast as possible) for processors running elsewhere."""

    mode: str = "causal"
    processors: list[str] = field(default_factory=lambda: list(MODEL_PATH))
    step_ms: float = DEFAULT_STEP_MS
    drain_s: float = 5.0
    speed: float | None = None
    timeout_s: float = 60.0
    # Snapshot blobs: in feed mode the processors elsewhere may lag, here the normalizer has
    # read a blob before the next record is written (a whole chain is ~4 MB; a day holds
    # hundreds of them).
    blob_ttl_s: int | None = None  # None: 3600 in feed mode, else 60

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"replay mode {self.mode!r} (choose from {MODES})")
        if self.step_ms <= 0 or self.drain_s < 0 or self.timeout_s <= 0:
            raise ValueError("step_ms and timeout_s must be > 0, drain_s >= 0")


async def replay_file(
    redis: Redis,
    path: str | Path,
    opts: ReplayOptions,
    settings: RuntimeSettings,
    registry: CollectorRegistry | None = None,
    stop: asyncio.Event | None = None,
    on_instant: Callable[[], Awaitable[None]] | None = None,
) -> ReplayStats:
    """Replay ``path`` into ``redis`` (see the module docstring for the modes);
    ``on_instant`` runs after every instant (e.g. saving the diffs published so far)."""
    _, records = read_recording(path)
    if opts.mode == "feed":
        return await replay_records(
            redis,
            records,
            speed=opts.speed,
            maxlen=settings.stream_maxlen,
            blob_ttl_s=opts.blob_ttl_s or 3600,
            stop=stop,
        )
    it = iter(records)
    first = next(it, None)
    if first is None:
        return ReplayStats()
    clock = StepClock(first.t_ns)
    deps = Deps(
        redis=redis, settings=settings, registry=registry or CollectorRegistry(), clock=clock
    )
    procs: list[Processor] = [load(n, deps) for n in opts.processors]
    consumers = [p for p in procs if isinstance(p, ConsumerProcessor)]
    consumed = [(sp.stream, sp.group) for p in consumers for sp in p.specs]
    pstop = asyncio.Event()
    tasks = [asyncio.create_task(p.run(pstop), name=p.name) for p in procs]

    def ended(task: asyncio.Task[None]) -> None:
        if not pstop.is_set():
            clock.fail(task.get_name())

    for t in tasks:
        t.add_done_callback(ended)

    def check_tasks() -> None:
        _check_tasks(tasks, pstop)

    try:
        await _wait_ready(procs, opts.timeout_s, check_tasks)
        quiet = Quiescence(redis, consumed, [c for p in consumers for c in p.consumers])
        driver = _Driver(redis, clock, opts, settings, quiet, check_tasks)
        driver.on_instant = on_instant
        await driver.settle_participants()
        return await driver.run(_chain([first], it), stop)
    finally:
        pstop.set()
        await _stop_tasks(tasks, settings.grace_s)


def _check_tasks(tasks: list[asyncio.Task[None]], pstop: asyncio.Event) -> None:
    """Raise ReplayAborted if a processor stopped before the replay asked it to."""
    for t in tasks:
        if t.done() and not pstop.is_set():
            exc = t.exception() if not t.cancelled() else None
            raise ReplayAborted(f"processor {t.get_name()} stopped during the replay") from exc


async def _wait_ready(procs: list[Processor], timeout_s: float, check: Callable[[], None]) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(p.ready for p in procs):
        check()
        if time.monotonic() > deadline:
            raise TimeoutError(
                "processors not ready: " + ",".join(p.name for p in procs if not p.ready)
            )
        await asyncio.sleep(0.005)


async def _stop_tasks(tasks: list[asyncio.Task[None]], grace_s: float) -> None:
    """Wait ``grace_s`` for the processors (stop already set), cancel the rest, await all
    and log each failure."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=grace_s)
    await cancel_and_wait(pending)  # again until each ended: one may meet it as a Redis error
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for task, res in zip(tasks, results, strict=True):
        if isinstance(res, Exception):
            logger.error("processor %s failed", task.get_name(), exc_info=res)


class _Driver:
    """Feeds records to the in-process pipeline and moves the :class:`StepClock`.

    Instants are on a grid of ``step_ms``: the next one is the earlier of the next record's
    receive time and the earliest time a participant asked for, rounded up to the grid.
    Every record received at or before an instant is applied, and the consumers caught up,
    before the participants run at it. Between instants the
    records are written as fast as the pipeline takes them (causal) or one at a time with
    the consumers caught up after each (lockstep, the reference). Either way a chain
    snapshot is applied alone: everything before it is caught up first, and it is caught
    up (its epoch promoted) before any later record is written, so every WS event meets
    the epoch it met in the recording's order."""

    def __init__(
        self,
        redis: Redis,
        clock: StepClock,
        opts: ReplayOptions,
        settings: RuntimeSettings,
        quiet: Quiescence,
        check: Callable[[], None],
    ) -> None:
        self.clock = clock
        self.opts = opts
        self.quiet = quiet
        self.check = check
        self.step_ns = max(1, int(opts.step_ms * 1_000_000))
        self.writer = _Writer(redis, settings.stream_maxlen, opts.blob_ttl_s or 60)
        self.stats = ReplayStats()
        self.on_instant: Callable[[], Awaitable[None]] | None = None

    async def caught_up(self) -> None:
        await self.quiet.wait(self.opts.timeout_s, self.check)

    async def settle_participants(self) -> None:
        await asyncio.wait_for(self.clock.settled(), self.opts.timeout_s)

    async def instant(self, t_ns: int) -> None:
        self.clock.advance(t_ns)
        self.stats.instants += 1
        await self.settle_participants()
        if self.on_instant is not None:
            await self.on_instant()

    async def apply(self, batch: list[Record]) -> None:
        """Write ``batch`` (records up to the next instant) and wait until consumed."""
        lock = self.opts.mode == "lockstep"
        for rec in batch:
            isolated = lock or rec.stream == keys.CHAIN_STREAM
            if isolated and self.writer.queued:
                await self.writer.flush()
                await self.caught_up()
            self.clock.set(rec.t_ns)
            self.writer.queue(rec)
            if isolated or self.writer.queued >= 500:
                await self.writer.flush()
            if isolated:
                await self.caught_up()
        await self.writer.flush()
        await self.caught_up()

    async def run(self, records: Iterable[Record], stop: asyncio.Event | None) -> ReplayStats:
        real0 = time.perf_counter()
        it = iter(records)
        nxt = next(it, None)
        t0 = nxt.t_ns if nxt is not None else self.clock.time_ns()
        last_t = t0
        step = self.step_ns
        while stop is None or not stop.is_set():
            due = self.clock.next_due_ns()
            if due is not None:  # on the grid too: the first instant at or after it
                now = self.clock.time_ns()
                due = max(-(-(due - DUE_TOLERANCE_NS) // step) * step, now - now % step + step)
            if nxt is not None:
                grid = -(-nxt.t_ns // step) * step
                at = grid if due is None else min(grid, due)
            elif due is not None and due <= last_t + int(self.opts.drain_s * NS):
                at = due  # drain: what the participants still hold after the last record
            else:
                break
            batch: list[Record] = []
            while nxt is not None and nxt.t_ns <= at:
                batch.append(nxt)
                self.stats.records[nxt.stream] += 1
                last_t = nxt.t_ns
                nxt = next(it, None)
            if batch:
                await self.apply(batch)
            await self.instant(at)
        self.stats.span_s = (last_t - t0) / NS
        self.stats.wall_s = time.perf_counter() - real0
        return self.stats


def _chain(*its: Iterable[Record]) -> Iterator[Record]:
    for i in its:
        yield from i


# --- CLI ---------------------------------------------------------------------------------
def _settings(redis_url: str | None) -> RuntimeSettings:
    s = from_env(RuntimeSettings)
    return replace(s, redis_url=redis_url) if redis_url else s


def _feeds(arg: str) -> list[str]:
    out = []
    for name in arg.split(","):
        name = name.strip()
        if name not in FEEDS:
            raise argparse.ArgumentTypeError(f"unknown feed {name!r} (choose from {sorted(FEEDS)})")
        out.append(FEEDS[name])
    return out


def record_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="massive-pipeline record",
        description="Capture the raw feeds (chain pointers + blobs, WS frames, spot) from "
        "Redis into a .mrec.gz file ordered by receive time.",
    )
    p.add_argument("--out", "-o", required=True, help="output file, e.g. session.mrec.gz")
    p.add_argument("--redis-url", help="default: MASSIVE_REDIS_URL")
    p.add_argument(
        "--streams",
        type=_feeds,
        default=list(FEEDS.values()),
        help="comma separated: chain,ws,spot (default: all)",
    )
    p.add_argument(
        "--since",
        default=None,
        help="record entries after this position: 0 | $ | <id> | <millis>ms | "
        "ISO-8601 (default: 0, or $ with --follow)",
    )
    p.add_argument("--until", default=None, help="stop at this position (not with --follow)")
    p.add_argument(
        "--follow", action="store_true", help="tail the streams until SIGINT/SIGTERM or --duration"
    )
    p.add_argument("--duration", type=float, default=None, help="seconds to follow")
    p.add_argument("--reorder-window-s", type=float, default=2.0)
    return p


def replay_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="massive-pipeline replay",
        description="Replay a recording through the pipeline on the recording's clock "
        "(default: causal, as fast as causality allows, deterministic), or only feed its raw "
        "streams to processors running elsewhere (--feed), or compare two replays.",
    )
    p.add_argument("file", nargs="?", help="the recording (.mrec.gz)")
    p.add_argument("--redis-url", help="target Redis (default: MASSIVE_REDIS_URL)")
    p.add_argument(
        "--lockstep",
        action="store_true",
        help="the reference: one record at a time, every consumer group caught up after "
        "each (same output as the default causal mode, much slower)",
    )
    p.add_argument(
        "--run",
        nargs="+",
        default=None,
        metavar="PROCESSOR",
        help="processors to run in this process on the recording's clock (default: "
        + " ".join(MODEL_PATH)
        + ")",
    )
    p.add_argument(
        "--step-ms",
        type=float,
        default=DEFAULT_STEP_MS,
        help="grid of the instants at which clock-driven work (publish conditions, GEX) is "
        "evaluated after records arrive (default %(default)s; participants' own deadlines, "
        "e.g. a publisher's max interval, are met exactly)",
    )
    p.add_argument(
        "--drain-s",
        type=float,
        default=5.0,
        help="keep the clock going this long past the last record while a processor still "
        "has work due (held changes, checkpoints)",
    )
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.add_argument(
        "--blob-ttl-s",
        type=int,
        default=None,
        help="TTL of the snapshot blobs written (default 3600 with --feed, else 60: the "
        "in-process normalizer has read a blob before the next record is written)",
    )
    p.add_argument(
        "--output",
        metavar="FILE",
        help="after the replay, save the published diffs and final models to FILE "
        "(.mout.gz) for --compare",
    )
    feed = p.add_argument_group("feed mode (raw streams only, for processors running elsewhere)")
    feed.add_argument("--feed", action="store_true", help="only XADD the records")
    pace = feed.add_mutually_exclusive_group()
    pace.add_argument(
        "--speed", type=float, default=None, help="N x recorded pace (implies --feed)"
    )
    pace.add_argument(
        "--as-fast-as-possible", action="store_true", help="no pacing (implies --feed)"
    )
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="report the first difference between two replays' outputs: each a redis:// URL "
        "(a Redis a replay ran into) or a file saved with --output",
    )
    p.add_argument("--summary", action="store_true", help="print what the file holds and exit")
    return p


def _print_stats(prefix: str, records: Counter[str], extra: str = "") -> None:
    parts = " ".join(f"{s}={n}" for s, n in sorted(records.items()))
    print(f"{prefix}: {sum(records.values())} records ({parts}){extra}")


async def _record(args: argparse.Namespace, settings: RuntimeSettings) -> int:
    redis = admin_client(settings.redis_url)
    created = time.time_ns()
    try:
        if args.follow:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            if args.duration:
                loop.call_later(args.duration, stop.set)
            with RecordingWriter(args.out, args.streams, created) as w:
                stats = await record_follow(
                    redis, args.streams, w, stop, args.since or "$", args.reorder_window_s
                )
        else:
            records, stats = await record_range(redis, args.streams, args.since or "0", args.until)
            with RecordingWriter(args.out, args.streams, created) as w:
                for r in records:
                    w.write(r)
    finally:
        await redis.aclose()
    span = ((stats.last_ns or 0) - (stats.first_ns or 0)) / NS
    _print_stats(
        f"recorded {args.out}",
        stats.records,
        f", {span:.3f} s, {stats.missing_blobs} pointers without blob skipped",
    )
    return 0


async def _replay(args: argparse.Namespace, settings: RuntimeSettings) -> int:
    if args.compare:
        from processors.ops import replay_compare

        return await replay_compare.compare_cli(args.compare[0], args.compare[1])
    if args.summary:
        header, records = read_recording(args.file)
        counts: Counter[str] = Counter()
        first = last = None
        for r in records:
            counts[r.stream] += 1
            first = r.t_ns if first is None else first
            last = r.t_ns
        span = ((last or 0) - (first or 0)) / NS
        _print_stats(
            f"{args.file} (v{header.version}, streams {','.join(header.streams)})",
            counts,
            f", {span:.3f} s from t={first}",
        )
        return 0
    feed = args.feed or args.speed is not None or args.as_fast_as_possible
    mode = "feed" if feed else "lockstep" if args.lockstep else "causal"
    if mode != "feed":
        # Lease TTLs run in Redis real time while the clock is the recording's: keep the
        # in-process leaders' leases for the whole replay unless configured otherwise.
        for var in ("MASSIVE_PUBLISHER_LEASE_TTL_MS", "MASSIVE_GEX_LEASE_TTL_MS"):
            os.environ.setdefault(var, str(LONG_LEASE_MS))
    opts = ReplayOptions(
        mode=mode,
        processors=list(MODEL_PATH if args.run is None else args.run),
        step_ms=args.step_ms,
        drain_s=args.drain_s,
        speed=args.speed,
        timeout_s=args.timeout_s,
        blob_ttl_s=args.blob_ttl_s,
    )
    redis = admin_client(settings.redis_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    out = None
    try:
        if mode != "feed" and await redis.dbsize():
            logger.warning(
                "target Redis is not empty: a replay's output is reproducible only into an "
                "empty Redis"
            )
        hook = None
        if args.output:
            from processors.ops.replay_compare import OutputWriter

            out = OutputWriter(args.output)
            hook = functools.partial(out.collect, redis)
        stats = await replay_file(redis, args.file, opts, settings, stop=stop, on_instant=hook)
        if out is not None:
            await out.finish(redis)
            print(f"output saved to {args.output}: {out.n_diffs} diffs and the final models")
    finally:
        if out is not None:
            out.close()
        await redis.aclose()
    n = sum(stats.records.values())
    speed = stats.span_s / stats.wall_s if stats.wall_s else 0.0
    extra = f", {stats.span_s:.3f} s recorded in {stats.wall_s:.3f} s wall ({speed:.1f}x)"
    if mode == "feed":
        extra += f", max late {stats.max_late_s * 1000:.1f} ms"
    else:
        extra += (
            f", {mode}, {stats.instants} instants, {n / max(stats.wall_s, 1e-9):,.0f} records/s"
        )
    _print_stats(f"replayed {args.file}", stats.records, extra)
    return 0


def _main(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace, RuntimeSettings], Coroutine[Any, Any, int]],
    argv: Sequence[str],
) -> int:
    args = parser.parse_args(list(argv))
    if getattr(args, "speed", None) is not None and args.speed <= 0:
        parser.error("--speed must be > 0")
    if parser.prog.endswith("replay") and not args.compare and not args.file:
        parser.error("a recording file is required (or --compare A B)")
    if getattr(args, "follow", False) and args.until:
        parser.error("--until cannot be combined with --follow")
    try:
        settings = _settings(args.redis_url)
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    from processors.ops.cli import run_loop

    result: list[int] = []

    async def main() -> None:
        result.append(await run(args, settings))

    try:
        run_loop(main(), settings.event_loop)
        return result[0]
    except CONNECT_ERRORS as exc:
        print(unreachable(settings.redis_url, exc), file=sys.stderr)
        return 2
    except OSError as exc:  # the recording file; TimeoutError (a pipeline that does not drain)
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    except (RecordingError, ValueError, ReplayAborted) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 1


def record_main(argv: Sequence[str]) -> int:
    return _main(record_parser(), _record, argv)


def replay_main(argv: Sequence[str]) -> int:
    return _main(replay_parser(), _replay, argv)
