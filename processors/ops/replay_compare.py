"""What a replay published, saved and compared: ``massive-pipeline replay --output FILE`` and
``massive-pipeline replay --compare A B``.

A replay's output is every diff on the diff streams (heatmap per strategy, GEX), in stream
order, and the final models of every symbol that published (heatmap model per strategy, GEX
model and its legacy ``:calls``/``:puts`` maps). Saved (``*.mout.gz``: the recording's frame
layout, :class:`OutputHeader` then :class:`OutputEntry` frames) while the replay runs, after
every instant, so diffs the streams trim away (``MAXLEN``) are kept.

Compared without what a run assigns rather than computes (:data:`IGNORED_DIFF_FIELDS`,
:data:`IGNORED_MODEL_FIELDS`): stream entry ids (``diff_id``, ``prev_id``) and
``src_recv_ts_ns``, the receive time of the oldest event behind a version, a latency
measure that depends on which events one batch of a processor happened to hold (the one thing
a causal replay and the lockstep reference do differently). Every other field of every diff
and model must be equal, GEX included.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from redis.asyncio import Redis

from processors.ops.replay import FrameWriter, RecordingError, read_frames
from schemas import keys
from streams.redis_client import as_str, connect

FORMAT = "massive-replay-output"
VERSION = 1
IGNORED_DIFF_FIELDS = frozenset({"prev_id", "src_recv_ts_ns"})
IGNORED_MODEL_FIELDS = frozenset({"diff_id"})


def diff_streams(symbols: Iterable[str] | None = None) -> list[str]:
    """The diff streams of ``symbols`` (default: every symbol configured or with a spec)."""
    from processors.ops.monitor import every_symbol

    out: list[str] = []
    for sym in every_symbol() if symbols is None else symbols:
        out += [keys.heatmap_diffs_stream(s, sym) for s in keys.STRATEGIES]
        out.append(keys.gex_diffs_stream(sym))
    return out


def model_keys(symbols: Iterable[str]) -> list[str]:
    out = []
    for sym in sorted(symbols):
        out += [keys.heatmap_model(sym, s) for s in keys.STRATEGIES]
        out += [keys.gex_model(sym), keys.gex_model_calls(sym), keys.gex_model_puts(sym)]
    return out


class OutputHeader(msgspec.Struct, kw_only=True):
    format: str = FORMAT
    version: int = VERSION
    created_ns: int


class OutputEntry(msgspec.Struct, array_like=True):
    kind: str  # "diff" | "checkpoint" | "model"
    key: str  # diff stream (a diff, a checkpoint) or model key
    id: str  # stream entry id of a diff or of a checkpoint's diff ("" for a final model)
    value: bytes  # the diff's ``d`` field / the model JSON


class _Head(msgspec.Struct):
    symbol: str
    kind: str = ""
    snapshot: bool = False


_head_dec = msgspec.json.Decoder(_Head)


def checkpoint_key(value: bytes) -> str | None:
    """The model key that holds the items of a snapshot version (its diff carries none:
    ``ModelDiff.snapshot``), or None for any other diff."""
    if b'"snapshot":true' not in value:
        return None
    try:
        h = _head_dec.decode(value)
    except msgspec.DecodeError:
        return None
    if not h.snapshot or not h.kind.startswith("heatmap:"):
        return None
    return keys.heatmap_model(h.symbol, h.kind.split(":", 1)[1])


async def checkpoint_at(redis: Redis, eid: str, key: str) -> bytes | None:
    """Model key ``key`` while it is the checkpoint of diff ``eid`` (its ``diff_id``), else
    None (a later checkpoint replaced it)."""
    v = await redis.get(key)
    if v is None:
        return None
    raw = _b(v)
    return raw if _model_diff_id(raw) == eid else None


class _DiffId(msgspec.Struct):
    diff_id: str | None = None


def _model_diff_id(raw: bytes) -> str | None:
    # a marked checkpoint's diff_id is in its tail, after the items
    try:
        return msgspec.json.decode(raw, type=_DiffId).diff_id
    except msgspec.DecodeError:
        return None


_enc = msgspec.msgpack.Encoder()
_entry_dec = msgspec.msgpack.Decoder(OutputEntry)
_header_dec = msgspec.msgpack.Decoder(OutputHeader)


def _b(v: bytes | str) -> bytes:
    return v if isinstance(v, bytes) else v.encode()


class OutputWriter:
    """Saves a replay's output while it runs: :meth:`collect` after every instant appends
    the diffs added since the previous call, each snapshot version's diff followed by its
    checkpoint (the model key, still that version's then); :meth:`finish` the final
    models."""

    def __init__(self, path: str | Path) -> None:
        # gzip level 1: a replay's output is large (a 10-minute simulator session publishes
        # ~1 GB of diffs) and written while the replay runs
        self._w = FrameWriter(path, compresslevel=1)
        self._w.frame(_enc.encode(OutputHeader(created_ns=time.time_ns())))
        self._last = {s: "0-0" for s in diff_streams()}
        self.symbols: set[str] = set()
        self.n_diffs = 0

    async def collect(self, redis: Redis, page: int = 1000) -> None:
        while True:
            pipe = redis.pipeline(transaction=False)
            for s, last in self._last.items():
                pipe.xrange(s, min="(" + last, count=page)
            full = False
            for s, entries in zip(list(self._last), await pipe.execute(), strict=True):
                for eid, fields in entries:
                    value = fields.get(b"d", b"")
                    self._w.frame(_enc.encode(OutputEntry("diff", s, as_str(eid), value)))
                    with contextlib.suppress(msgspec.DecodeError):
                        self.symbols.add(msgspec.json.decode(value, type=_Sym).symbol)
                    self.n_diffs += 1
                    ck = checkpoint_key(value)
                    if ck is not None:
                        model = await checkpoint_at(redis, as_str(eid), ck)
                        if model is not None:
                            entry = OutputEntry("checkpoint", s, as_str(eid), model)
                            self._w.frame(_enc.encode(entry))
                if entries:
                    self._last[s] = as_str(entries[-1][0])
                full = full or len(entries) == page
            if not full:
                return

    async def finish(self, redis: Redis) -> None:
        await self.collect(redis)
        names = model_keys(self.symbols)
        if names:
            for k, v in zip(names, await redis.mget(names), strict=True):
                if v is not None:
                    self._w.frame(_enc.encode(OutputEntry("model", k, "", _b(v))))
        self._w.close()

    def close(self) -> None:
        self._w.close()


class _Sym(msgspec.Struct):
    symbol: str


async def save_output(redis: Redis, path: str | Path) -> int:
    """Save what ``redis`` holds now (diffs still in the streams, final models); returns the
    number of diffs."""
    out = OutputWriter(path)
    try:
        await out.finish(redis)
    finally:
        out.close()
    return out.n_diffs


# --- sources ----------------------------------------------------------------------------
# A diff as a source gives it: (entry id, the diff JSON, the checkpoint of a snapshot
# version when the source has it, else None).
Diff = tuple[str, bytes, bytes | None]


class _Source:
    name: str

    def diffs(self, stream: str) -> AsyncIterator[Diff]:
        raise NotImplementedError

    async def models(self) -> dict[str, bytes]:
        raise NotImplementedError

    async def close(self) -> None:
        return None


class _RedisSource(_Source):
    """A Redis a replay ran into (its streams may have trimmed early diffs: MAXLEN)."""

    def __init__(self, url: str) -> None:
        self.name = url
        self.redis = connect(url)
        self.symbols: set[str] = set()

    async def _entries(self, stream: str) -> AsyncIterator[tuple[str, bytes]]:
        start = "-"
        while True:
            batch: Any = await self.redis.xrange(stream, min=start, count=1000)
            for eid, fields in batch:
                value = fields.get(b"d", b"")
                with contextlib.suppress(msgspec.DecodeError):
                    self.symbols.add(msgspec.json.decode(value, type=_Sym).symbol)
                yield as_str(eid), value
            if len(batch) < 1000:
                return
            start = "(" + as_str(batch[-1][0])

    async def diffs(self, stream: str) -> AsyncIterator[Diff]:
        """The stream's diffs; a snapshot version's checkpoint only while the model key is
        still at it (after a replay, the last one's at most)."""
        async for eid, value in self._entries(stream):
            ck = checkpoint_key(value)
            yield eid, value, None if ck is None else await checkpoint_at(self.redis, eid, ck)

    async def models(self) -> dict[str, bytes]:
        for s in diff_streams():  # the symbols that published (no checkpoint read)
            async for _ in self._entries(s):
                pass
        names = model_keys(self.symbols)
        if not names:
            return {}
        got = await self.redis.mget(names)
        return {k: _b(v) for k, v in zip(names, got, strict=True) if v is not None}

    async def close(self) -> None:
        await self.redis.aclose()


class _FileSource(_Source):
    """A saved output: one pass over the file per stream (bounded memory)."""

    def __init__(self, path: str) -> None:
        self.name = path
        frames = read_frames(path)
        try:
            head = _header_dec.decode(next(frames))
        except (StopIteration, msgspec.DecodeError, RecordingError) as exc:
            raise RecordingError(f"{path}: not a {FORMAT} file ({exc or 'empty'})") from None
        finally:
            frames.close()
        if head.format != FORMAT or head.version > VERSION:
            raise RecordingError(f"{path}: format {head.format!r} v{head.version} unsupported")

    def _entries(self) -> Iterator[OutputEntry]:
        frames = read_frames(self.name)
        next(frames)
        for payload in frames:
            try:
                yield _entry_dec.decode(payload)
            except msgspec.DecodeError as exc:
                raise RecordingError(f"{self.name}: bad entry: {exc}") from None

    async def diffs(self, stream: str) -> AsyncIterator[Diff]:
        held: tuple[str, bytes] | None = None  # a diff whose checkpoint may come next
        for e in self._entries():
            if e.key != stream:
                continue
            if e.kind == "checkpoint" and held is not None and held[0] == e.id:
                yield held[0], held[1], e.value
                held = None
            elif e.kind == "diff":
                if held is not None:
                    yield held[0], held[1], None
                held = (e.id, e.value)
        if held is not None:
            yield held[0], held[1], None

    async def models(self) -> dict[str, bytes]:
        return {e.key: e.value for e in self._entries() if e.kind == "model"}


def open_source(spec: str) -> _Source:
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return _RedisSource(spec)
    if not Path(spec).is_file():
        raise RecordingError(f"{spec}: no such file (and not a redis:// URL)")
    return _FileSource(spec)


# --- comparison ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Difference:
    where: str  # stream or model key
    index: int | None  # position in the stream (0-based); None for a model
    detail: str

    def __str__(self) -> str:
        at = f" entry #{self.index}" if self.index is not None else ""
        return f"{self.where}{at}: {self.detail}"


def _decode(raw: bytes, ignored: frozenset[str]) -> Any:
    try:
        v = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return raw
    if isinstance(v, dict):
        for k in ignored:
            v.pop(k, None)
    return v


def _short(v: Any, limit: int = 160) -> str:
    s = msgspec.json.encode(v).decode() if not isinstance(v, bytes) else repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def first_field_difference(a: Any, b: Any, path: str = "") -> str | None:
    """Path and values of the first difference between two decoded JSON values (dict keys
    in sorted order), None when equal."""
    if type(a) is not type(b):
        return f"{path or '.'}: {_short(a)} != {_short(b)}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                side = "A" if k not in a else "B"
                return f"{path}.{k}: missing in {side}"
            d = first_field_difference(a[k], b[k], f"{path}.{k}")
            if d is not None:
                return d
        return None
    if isinstance(a, list):
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            d = first_field_difference(x, y, f"{path}[{i}]")
            if d is not None:
                return d
        if len(a) != len(b):
            return f"{path}: {len(a)} vs {len(b)} elements"
        return None
    return None if a == b else f"{path or '.'}: {_short(a)} != {_short(b)}"


@dataclass
class Comparison:
    difference: Difference | None
    diffs: dict[str, int]  # stream -> diffs compared (equal)
    models: int
    checkpoints: int = 0  # snapshot versions whose checkpoint both sides had (equal)
    checkpoints_missing: int = 0  # snapshot versions one side had no checkpoint of


def _checkpoint_difference(a: Diff, b: Diff) -> str | None:
    """Of two equal diffs: the first difference of their snapshot checkpoints, "" when
    equal, None when a side has none."""
    if a[2] is None or b[2] is None:
        return None
    ca, cb = _decode(a[2], IGNORED_MODEL_FIELDS), _decode(b[2], IGNORED_MODEL_FIELDS)
    if ca == cb:
        return ""
    return "checkpoint: " + (first_field_difference(ca, cb) or "differ")


async def compare(a: _Source, b: _Source) -> Comparison:
    """The first difference between two replays' outputs: diff streams in order (diff by
    diff), then the final models."""
    counted: dict[str, int] = {}
    n_ck = n_missing = 0
    for stream in diff_streams():
        ia, ib = a.diffs(stream).__aiter__(), b.diffs(stream).__aiter__()
        i = 0
        while True:
            xa = await anext(ia, None)
            xb = await anext(ib, None)
            if xa is None and xb is None:
                break
            if xa is None or xb is None:
                side, n = ("A", i) if xa is None else ("B", i)
                return Comparison(
                    Difference(stream, i, f"{side} ends after {n} diffs, the other goes on"),
                    counted,
                    0,
                )
            da, db = _decode(xa[1], IGNORED_DIFF_FIELDS), _decode(xb[1], IGNORED_DIFF_FIELDS)
            if da != db:
                head = ""
                if isinstance(da, dict):
                    head = f"{da.get('symbol')} v{da.get('version')} ({da.get('kind')}): "
                detail = first_field_difference(da, db) or "differ"
                return Comparison(Difference(stream, i, head + detail), counted, 0)
            ck = _checkpoint_difference(xa, xb)
            if ck:
                return Comparison(Difference(stream, i, ck), counted, 0)
            n_ck += ck == ""
            n_missing += ck is None and checkpoint_key(xa[1]) is not None
            i += 1
        counted[stream] = i
    ma, mb = await a.models(), await b.models()
    for k in sorted(set(ma) | set(mb)):
        if k not in ma or k not in mb:
            side = "A" if k not in ma else "B"
            return Comparison(Difference(k, None, f"no model in {side}"), counted, 0)
        va, vb = _decode(ma[k], IGNORED_MODEL_FIELDS), _decode(mb[k], IGNORED_MODEL_FIELDS)
        if va != vb:
            detail = first_field_difference(va, vb) or "differ"
            return Comparison(Difference(k, None, detail), counted, 0)
    return Comparison(None, counted, len(ma), n_ck, n_missing)


async def compare_cli(spec_a: str, spec_b: str) -> int:
    """Print the first difference (exit 1) or what was found identical (exit 0)."""
    a, b = open_source(spec_a), open_source(spec_b)
    try:
        res = await compare(a, b)
    finally:
        await a.close()
        await b.close()
    if res.difference is not None:
        print(f"first difference: {res.difference}")
        return 1
    per = ", ".join(f"{s}={n}" for s, n in res.diffs.items())
    missing = (
        f"; {res.checkpoints_missing} snapshot versions without a checkpoint on one side "
        "(a Redis keeps only the latest)"
        if res.checkpoints_missing
        else ""
    )
    print(
        f"identical: {sum(res.diffs.values())} diffs ({per}), {res.checkpoints} snapshot "
        f"checkpoints and {res.models} final models "
        f"(ignoring {', '.join(sorted(IGNORED_DIFF_FIELDS | IGNORED_MODEL_FIELDS))}){missing}"
    )
    return 0
