"""``massive-pipeline record`` / ``massive-pipeline replay``: capture the raw feeds and feed
them through the same pipeline again.

Recording file (``*.mrec.gz``): a gzip stream of length-prefixed msgpack frames (4-byte
big-endian length, then the frame). The first frame is a :class:`RecordingHeader`, every
other one a :class:`Record`: one raw stream entry (its fields byte for byte) with its receive
time and, for chain pointers, the snapshot blob it points at (blobs expire in Redis, so they
are captured when recording). Records are ordered by receive time:

* ``massive:ws:stream``: the entry's ``recv_ts_ns`` (ws-ingest stamps it on receipt);
* ``massive:chain:stream``: the pointer's ``ts_ns`` (fetch completion, the poller's clock);
* ``massive:spot:stream`` and anything unreadable: the entry id's time (when Redis got it).

Replay XADDs each record into the same stream of a target Redis (a chain pointer after SET
of its blob), at the recorded pace (``--speed 1``), faster (``--speed N``) or with no
waiting (``--as-fast-as-possible``). Entry ids are new; fields are the recorded bytes.

Determinism (``--run`` processors in-process + ``--lockstep``): the processors get a
:class:`ReplayClock` as ``Deps.clock`` whose time is the receive time of the record being
fed, never the wall clock, and records are fed one at a time: the clock moves to the
record's receive time; the pipeline settles (every consumer group caught up, then
``--settle-s`` of real time so clock-driven work due at that time, e.g. a time-boundary
publish or a GEX rebuild, runs on the state before the record, then caught up again); the
record is written; the pipeline processes it and settles again with the same clock reading.
After the last record the clock is stepped ``--drain-s`` further so held changes publish.
"Caught up" = lag 0 and nothing pending in every group of the pipeline's streams, except
that the publishers' group may keep entries pending (they ack once published).

Guarantee: two lockstep replays of one recording into an empty Redis, with the same
processors and settings, publish the same sequence of diffs per model (version,
prev_version, epoch, ts_ns, changed, removed, meta) and the same final models. Excluded:
what Redis assigns at run time (stream entry ids, hence ``diff_id`` and SSE event ids; TTL
deadlines), and metrics. Conditions: ``--settle-s`` longer than the processors' real-time
loop periods (publisher tick, GEX poll), and lease TTLs (Redis real time) longer than the
replay, since lease renewals follow the replay clock. Without ``--lockstep`` the streams are
processed concurrently and batches form by timing: version sequences differ between runs,
and so can final values around an epoch change (a WS event processed before the promotion
lands in the old epoch; the new epoch is seeded from its snapshot), as in live operation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import logging
import os
import signal
import struct
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from schemas import keys
from schemas.messages import WS_RECV_FIELD, ChainPointer, from_entry
from streams import admin
from streams.logs import one_line, redact, setup_logging
from streams.processor import Deps, Processor, load
from streams.producer import DEFAULT_MAXLEN
from streams.redis_client import CONNECT_ERRORS, admin_client, unreachable
from streams.settings import RuntimeSettings, SettingsError, from_env

logger = logging.getLogger(__name__)

FORMAT = "massive-recording"
VERSION = 1
NS = 1_000_000_000

LONG_LEASE_MS = 7 * 24 * 3600 * 1000

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


class RecordingError(ValueError):
    """Not a recording, a newer format, or a truncated/corrupt file."""


_enc = msgspec.msgpack.Encoder()
_header_dec = msgspec.msgpack.Decoder(RecordingHeader)
_record_dec = msgspec.msgpack.Decoder(Record)
_LEN = struct.Struct(">I")


class RecordingWriter:
    """Append records to a ``.mrec.gz`` file; the header is written on open."""

    def __init__(self, path: str | Path, streams: Sequence[str], created_ns: int) -> None:
        self._f = gzip.GzipFile(path, "wb", compresslevel=6)
        self.count = 0
        self._frame(_enc.encode(RecordingHeader(created_ns=created_ns, streams=list(streams))))

    def _frame(self, payload: bytes) -> None:
        self._f.write(_LEN.pack(len(payload)))
        self._f.write(payload)

    def write(self, rec: Record) -> None:
        self._frame(_enc.encode(rec))
        self.count += 1

    def close(self) -> None:
        self._f.close()

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

    def records() -> Iterator[Record]:
        try:
            for payload in frames:
                try:
                    yield _record_dec.decode(payload)
                except msgspec.DecodeError as exc:
                    raise RecordingError(f"{path}: bad record: {exc}") from None
        except (OSError, EOFError) as exc:  # gzip: truncated or corrupt
            raise RecordingError(f"{path}: {exc}") from None
        finally:
            f.close()

    return header, records()


# --- recording -------------------------------------------------------------------------
def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _id_ns(eid: bytes | str) -> int:
    return int(_s(eid).partition("-")[0]) * 1_000_000


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


async def record_range(
    redis: Redis,
    streams: Sequence[str],
    since: str = "0",
    until: str | None = None,
    page: int = 1000,
) -> tuple[list[Record], RecordStats]:
    """Everything currently in ``streams`` after ``since`` (and up to ``until``), ordered by
    receive time."""
    stats = RecordStats()
    records: list[Record] = []
    since_pos = admin.parse_position(since)
    until_pos = admin.parse_position(until) if until else "+"
    for s in streams:
        if since_pos == "$":
            continue
        start = _range_start(since_pos)
        while True:
            batch: Any = await redis.xrange(s, min=start, max=until_pos, count=page)
            records += await _to_records(redis, s, batch, stats)
            if len(batch) < page:
                break
            start = "(" + _s(batch[-1][0])
    order = {s: i for i, s in enumerate(streams)}
    records.sort(key=lambda r: (r.t_ns, order[r.stream]))
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
) -> RecordStats:
    """Tail ``streams`` until ``stop``; records are written in receive-time order once they
    are ``reorder_window_s`` older than the newest one seen (the rest at the end)."""
    stats = RecordStats()
    pos = admin.parse_position(since)
    last: dict[str, str] = {}
    for s in streams:
        if pos == "$":
            info = await redis.xinfo_stream(s) if await redis.exists(s) else None
            last[s] = _s(info["last-generated-id"]) if info else "0-0"
        else:
            last[s] = "0-0" if pos == "0" else pos
    buf: list[Record] = []
    window_ns = int(reorder_window_s * NS)
    order = {s: i for i, s in enumerate(streams)}

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
            s = _s(sname)
            buf += await _to_records(redis, s, entries, stats)
            last[s] = _s(entries[-1][0])
        if buf:
            flush(max(r.t_ns for r in buf) - window_ns)
    flush(None)
    return stats


# --- replay ----------------------------------------------------------------------------
class ReplayClock:
    """``Deps.clock`` during a replay: time is the receive time of the record being fed.

    Stepwise (``speed=None``): time jumps from record to record and stands still between
    them, so processors read the same times in every run. Paced (``speed=N``): between
    records time flows at N x real time. Never goes backwards."""

    def __init__(self, start_ns: int, speed: float | None = None) -> None:
        self.origin_ns = start_ns
        self.speed = speed
        self._anchor_ns = start_ns
        self._anchor_real = time.perf_counter()

    def set(self, t_ns: int) -> None:
        self._anchor_ns = max(t_ns, self.time_ns())
        self._anchor_real = time.perf_counter()

    def time_ns(self) -> int:
        if self.speed is None:
            return self._anchor_ns
        return self._anchor_ns + int((time.perf_counter() - self._anchor_real) * self.speed * NS)

    def monotonic(self) -> float:
        return (self.time_ns() - self.origin_ns) / NS


@dataclass
class ReplayStats:
    records: Counter[str] = field(default_factory=Counter)
    max_late_s: float = 0.0  # paced mode: worst delay behind the recorded schedule
    wall_s: float = 0.0
    span_s: float = 0.0  # recorded time covered


Hook = Callable[[Record], Awaitable[None]]


async def replay_records(
    redis: Redis,
    records: Iterable[Record],
    *,
    speed: float | None,
    clock: ReplayClock | None = None,
    before_write: Hook | None = None,
    after_write: Hook | None = None,
    maxlen: int = DEFAULT_MAXLEN,
    blob_ttl_s: int = 3600,
    stop: asyncio.Event | None = None,
    batch: int = 500,
) -> ReplayStats:
    """XADD every record into its stream (a chain pointer after SET of its blob, on the
    same connection, so a reader of the pointer finds the blob); ``speed`` None = as fast as
    possible. Records already due are pipelined, ``batch`` per round trip; with hooks
    (lockstep) every record is its own round trip."""
    stats = ReplayStats()
    t0: int | None = None
    real0 = time.perf_counter()
    per_record = before_write is not None or after_write is not None
    pipe = redis.pipeline(transaction=False)
    queued = 0

    async def flush() -> None:
        nonlocal pipe, queued
        if queued:
            await pipe.execute()
            pipe = redis.pipeline(transaction=False)
            queued = 0

    for rec in records:
        if stop is not None and stop.is_set():
            break
        if t0 is None:
            t0, real0 = rec.t_ns, time.perf_counter()
        if speed is not None:
            due = real0 + (rec.t_ns - t0) / NS / speed
            delay = due - time.perf_counter()
            if delay > 0:
                await flush()  # what was due before goes out before we wait
                await asyncio.sleep(delay)
            stats.max_late_s = max(stats.max_late_s, time.perf_counter() - due)
        if clock is not None:
            clock.set(rec.t_ns)
        if before_write is not None:
            await before_write(rec)
        if rec.blob is not None and rec.blob_key is not None:
            pipe.set(rec.blob_key, rec.blob, ex=blob_ttl_s)
        pipe.xadd(rec.stream, dict(rec.fields), maxlen=maxlen, approximate=True)
        queued += 1
        stats.records[rec.stream] += 1
        stats.span_s = (rec.t_ns - t0) / NS
        if per_record or queued >= batch:
            await flush()
        if after_write is not None:
            await after_write(rec)
    await flush()
    stats.wall_s = time.perf_counter() - real0
    return stats


def pipeline_streams() -> list[str]:
    from processors.monitor import pipeline_streams as streams

    return streams()


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


async def wait_quiescent(redis: Redis, timeout_s: float = 30.0) -> None:
    """Until every consumer group has caught up (see :func:`busy_groups`)."""
    deadline = time.monotonic() + timeout_s
    interval = 0.001
    while busy := await busy_groups(redis):
        if time.monotonic() > deadline:
            raise TimeoutError(f"pipeline not quiescent after {timeout_s}s: {busy}")
        await asyncio.sleep(interval)
        interval = min(interval * 2, 0.01)


# --- in-process pipeline ---------------------------------------------------------------
@dataclass
class ReplayOptions:
    speed: float | None = 1.0
    lockstep: bool = False
    settle_s: float = 0.0
    drain_s: float = 0.0
    drain_step_s: float = 1.0
    timeout_s: float = 60.0
    blob_ttl_s: int = 3600
    processors: list[str] = field(default_factory=list)


async def replay_file(
    redis: Redis,
    path: str | Path,
    opts: ReplayOptions,
    settings: RuntimeSettings,
    registry: CollectorRegistry | None = None,
    stop: asyncio.Event | None = None,
) -> ReplayStats:
    """Replay ``path`` into ``redis``; with ``opts.processors`` run them in this process
    (sharing a :class:`ReplayClock`) until the replay and the drain are done."""
    _, records = read_recording(path)
    it = iter(records)
    first = next(it, None)
    if first is None:
        return ReplayStats()
    clock = ReplayClock(first.t_ns, None if opts.lockstep else opts.speed)
    deps = Deps(
        redis=redis, settings=settings, registry=registry or CollectorRegistry(), clock=clock
    )
    procs: list[Processor] = [load(n, deps) for n in opts.processors]
    pstop = asyncio.Event()
    tasks = [asyncio.create_task(p.run(pstop), name=p.name) for p in procs]

    async def check_tasks() -> None:
        for t in tasks:
            if t.done():
                exc = t.exception()
                raise RuntimeError(f"processor {t.get_name()} stopped during replay") from exc

    async def settle(_: Record | None = None) -> None:
        """Caught up, then ``settle_s`` for clock-driven work (and for consumers that
        act after delivery, e.g. a publisher evaluating what it just read), caught up."""
        await wait_quiescent(redis, opts.timeout_s)
        if opts.settle_s > 0:
            await asyncio.sleep(opts.settle_s)
            await wait_quiescent(redis, opts.timeout_s)
        await check_tasks()

    try:
        deadline = time.monotonic() + opts.timeout_s
        while not all(p.ready for p in procs):
            await check_tasks()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    "processors not ready: " + ",".join(p.name for p in procs if not p.ready)
                )
            await asyncio.sleep(0.01)
        lock = opts.lockstep
        stats = await replay_records(
            redis,
            _chain([first], it),
            speed=opts.speed,
            clock=clock,
            # Lockstep: the clock moves to the record's time and clock-driven work due then
            # runs on the state before the record (settle); the record is written; the
            # pipeline processes it and settles again with the same clock reading.
            before_write=settle if lock else None,
            after_write=settle if lock else None,
            maxlen=settings.stream_maxlen,
            blob_ttl_s=opts.blob_ttl_s,
            stop=stop,
        )
        if procs or opts.lockstep:
            await settle()
        # Drain: let clock-driven work (time-boundary publishes) run past the last record.
        t = clock.time_ns()
        steps = int(opts.drain_s / opts.drain_step_s) if opts.drain_s > 0 else 0
        for i in range(1, steps + 1):
            clock.set(t + int(i * opts.drain_step_s * NS))
            await settle()
        return stats
    finally:
        pstop.set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=settings.grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


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
        description="XADD a recording into the raw streams of a target Redis, keeping the "
        "recorded inter-arrival times.",
    )
    p.add_argument("file")
    p.add_argument("--redis-url", help="target Redis (default: MASSIVE_REDIS_URL)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=float, default=1.0, help="N x recorded speed (default 1)")
    pace.add_argument("--as-fast-as-possible", action="store_true")
    p.add_argument(
        "--lockstep",
        action="store_true",
        help="after each record wait until every consumer group is caught up "
        "(lag 0, nothing pending): deterministic processing order",
    )
    p.add_argument(
        "--run",
        nargs="+",
        default=[],
        metavar="PROCESSOR",
        help="run these processors in this process with the replay clock, e.g. "
        "normalizer hydrator tile-builder:single publisher:single gex",
    )
    p.add_argument(
        "--settle-s",
        type=float,
        default=None,
        help="lockstep: real seconds for clock-driven work (publisher tick, GEX poll) at each "
        "step; must exceed their loop periods (default 0.3 with --run, else 0)",
    )
    p.add_argument(
        "--drain-s",
        type=float,
        default=0.0,
        help="advance the replay clock this far past the last record, in steps",
    )
    p.add_argument("--drain-step-s", type=float, default=1.0)
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.add_argument("--blob-ttl-s", type=int, default=3600)
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
    if args.run:
        # Lease renewals follow the replay clock, which stands still between records while
        # the lease TTL runs in Redis real time: keep in-process leaders' leases for the
        # whole replay unless configured otherwise.
        for var in ("MASSIVE_PUBLISHER_LEASE_TTL_MS", "MASSIVE_GEX_LEASE_TTL_MS"):
            os.environ.setdefault(var, str(LONG_LEASE_MS))
    settle = args.settle_s if args.settle_s is not None else (0.3 if args.run else 0.0)
    opts = ReplayOptions(
        speed=None if args.as_fast_as_possible else args.speed,
        lockstep=args.lockstep,
        settle_s=settle,
        drain_s=args.drain_s,
        drain_step_s=args.drain_step_s,
        timeout_s=args.timeout_s,
        blob_ttl_s=args.blob_ttl_s,
        processors=list(args.run),
    )
    redis = admin_client(settings.redis_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        stats = await replay_file(redis, args.file, opts, settings, stop=stop)
    finally:
        await redis.aclose()
    _print_stats(
        f"replayed {args.file}",
        stats.records,
        f", {stats.span_s:.3f} s recorded in {stats.wall_s:.3f} s wall, "
        f"max late {stats.max_late_s * 1000:.1f} ms",
    )
    return 0


def _main(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace, RuntimeSettings], Coroutine[Any, Any, int]],
    argv: Sequence[str],
) -> int:
    args = parser.parse_args(list(argv))
    if getattr(args, "speed", 1.0) is not None and getattr(args, "speed", 1.0) <= 0:
        parser.error("--speed must be > 0")
    if getattr(args, "follow", False) and args.until:
        parser.error("--until cannot be combined with --follow")
    try:
        settings = _settings(args.redis_url)
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        return asyncio.run(run(args, settings))
    except CONNECT_ERRORS as exc:
        print(unreachable(settings.redis_url, exc), file=sys.stderr)
        return 2
    except OSError as exc:  # the recording file; TimeoutError (lockstep)
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    except (RecordingError, ValueError) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 1


def record_main(argv: Sequence[str]) -> int:
    return _main(record_parser(), _record, argv)


def replay_main(argv: Sequence[str]) -> int:
    return _main(replay_parser(), _replay, argv)
