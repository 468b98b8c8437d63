"""The one reader of "a model checkpoint + the diffs after it", the heatmap publisher's
piecewise checkpoint writer (``write_pieces``) and its piecewise reader (``spool``).

A model key holds a checkpoint: the model at some version with ``diff_id`` = the diff
stream entry of that version (processors/heatmap/publisher.py writes it every
``checkpoint_ms``; GEX every version). The versions after it are the entries of the diff
stream after ``diff_id``. A new publisher leader reads them to continue the chain; the SSE
gateway reads them to bring its mirrors, ``/api`` answers and whole-model streams to the
latest version.

A heatmap checkpoint is written marked (``encode_model_pieces(marked=True)``: a tab before
each piece of ~1,000 items). ``spool`` copies one into an unnamed temp file a chunk at a
time, and a reader then takes it a piece at a time from there: a 50k-tile checkpoint is
~15 MB, and held whole per ``/api`` read or whole-model snapshot it was the SSE gateway's
RSS swing (docs/performance.md "Spooled checkpoints").
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import tempfile
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import IO, Any, cast

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas.messages import PIECE_MARK, ModelHead, ModelTail
from streams.redis_client import as_str

REPLAY_PAGE_BYTES = 8 * 1024 * 1024  # a butterfly diff is ~1 MB under load
# GETRANGE of a spool, and the file reads of its pieces. Measured on a 14 MB checkpoint: 1 MiB
# replies left the reading process 3 MB larger (reply, parser buffer and the heap they grew),
# 512 KiB ones 0.1 MB, in the same time (70-110 ms); 256 KiB took twice as long.
SPOOL_CHUNK_BYTES = 512 * 1024
# A checkpoint is replaced every few seconds at most (publisher checkpoint_ms) and copied in
# well under one: a copy that saw a replacement this many times in a row gives up.
SPOOL_ATTEMPTS = 5
HEAD_BYTES = 4096  # the first read of a spool: enough for the head and its mark

_head_dec = msgspec.json.Decoder(ModelHead)
_tail_dec = msgspec.json.Decoder(ModelTail)


async def diffs_page(
    redis: Redis, stream: str, after: str | None, count: int
) -> list[tuple[str, bytes | None]]:
    """Up to ``count`` entries of ``stream`` after entry id ``after`` (None: from the first),
    as (id, diff JSON); None for an entry without a diff field."""
    raw: Any = await redis.xrange(stream, min="(" + after if after else "-", max="+", count=count)
    return [(as_str(eid), fields.get(b"d")) for eid, fields in raw or ()]


async def diffs_after(
    redis: Redis,
    stream: str,
    after: str | None,
    page_bytes: int = REPLAY_PAGE_BYTES,
    slots: asyncio.Semaphore | None = None,
) -> AsyncIterator[tuple[str, bytes]]:
    """Every entry of ``stream`` after ``after`` as (id, diff JSON), read in pages of at most
    about ``page_bytes`` (the first page is one entry: the entry size is learnt). ``slots``
    bounds the concurrent reads of a process (held per page, not across the caller's work)."""
    count, largest = 1, 1
    while True:
        async with slots if slots is not None else contextlib.nullcontext():
            page = await diffs_page(redis, stream, after, count)
        for eid, body in page:
            after = eid
            if body is None:
                continue
            largest = max(largest, len(body))
            yield eid, body
        if len(page) < count:
            return
        # by the largest entry seen, not the mean: a page of small entries followed by
        # ~1 MB ones (a butterfly diff under load) would otherwise be a page of 1,000 of those
        count = max(1, min(1000, page_bytes // largest))


async def write_pieces(redis: Redis, key: str, pieces: Iterable[bytes], ttl_ms: int) -> int:
    """Write the concatenation of ``pieces`` to STRING ``key`` (a temp key: readers never
    read it), one piece per round trip, expiring ``ttl_ms`` after the last piece; returns
    the bytes written. One multi-MB value would be one buffer in this process, joined
    again with its command (asyncio's ``writelines`` is ``b"".join`` on Python 3.11) and
    copied in part into the transport's send buffer: a swing of the writer's RSS at every
    write (bench/publisher_rss.py, docs/performance.md
    "Process RSS")."""
    size = 0
    for i, piece in enumerate(pieces):
        pipe = redis.pipeline(transaction=False)
        if i == 0:
            pipe.set(key, piece, px=ttl_ms)
        else:
            pipe.append(key, piece)
            pipe.pexpire(key, ttl_ms)
        await pipe.execute()
        size += len(piece)
    return size


class CheckpointMoving(RedisError):
    """Every copy ``spool`` began saw the checkpoint replaced before it was done."""


class Spooled:
    """A marked model checkpoint, copied into an unnamed temp file (gone with the last
    reference to this object). Read with ``os.pread``: readers share it, each at its own
    offsets. ``head``/``tail`` are the decoded fields before and after the items."""

    def __init__(self, file: IO[bytes], size: int, head_len: int, tail: bytes) -> None:
        self._file = file
        # closed (the file gone) when the last reader drops it: readers share it and none
        # knows it is the last
        self.close = weakref.finalize(self, file.close)
        self.size = size
        self._items_at = head_len + len(PIECE_MARK)
        self._items_end = size - len(tail) - len(PIECE_MARK)
        first = os.pread(file.fileno(), head_len, 0)
        self.head = _head_dec.decode(first[: -len(b',"items":{')] + b"}")
        self.tail = _tail_dec.decode(b"{" + tail[2:])

    def slices(self, n: int) -> Iterator[bytes]:
        """The checkpoint's bytes as stored, ``n`` at a time."""
        return self.raw(self._file, self.size, n)

    @staticmethod
    def raw(file: IO[bytes], size: int, n: int = SPOOL_CHUNK_BYTES) -> Iterator[bytes]:
        fd = file.fileno()
        for off in range(0, size, n):
            yield os.pread(fd, min(n, size - off), off)

    def item_pieces(self, read_bytes: int = SPOOL_CHUNK_BYTES) -> Iterator[bytes]:
        """Each piece of items as a JSON object (``{"k":...,...}``), in stored order."""
        fd, off, end = self._file.fileno(), self._items_at, self._items_end
        rest = b""
        while off < end:
            chunk = os.pread(fd, min(read_bytes, end - off), off)
            if not chunk:
                raise OSError(f"spool file ends at {off} of {end} bytes")
            off += len(chunk)
            parts = (rest + chunk).split(PIECE_MARK)
            rest = parts.pop()
            for part in parts:
                yield b"{" + part.removesuffix(b",") + b"}"
        if rest:
            yield b"{" + rest + b"}"


async def spool(
    redis: Redis,
    key: str,
    *,
    chunk_bytes: int = SPOOL_CHUNK_BYTES,
    slots: asyncio.Semaphore | None = None,
    spool_dir: str | None = None,
    attempts: int = SPOOL_ATTEMPTS,
) -> Spooled | bytes | None:
    """The model at STRING ``key``: None when there is none; its bytes, read whole, when it
    is not marked (a GEX model, or one written before checkpoints were marked); else a
    :class:`Spooled` copy, taken ``chunk_bytes`` at a time. Each chunk is read in one
    transaction with the value's length and head (symbol, epoch, version, ts_ns): when
    they changed, a new checkpoint replaced the one being copied, and the copy starts
    again (``CheckpointMoving`` after ``attempts``)."""
    held = slots if slots is not None else contextlib.nullcontext()
    for _ in range(attempts):
        async with held:
            pipe = redis.pipeline(transaction=True)
            pipe.strlen(key)
            pipe.getrange(key, 0, max(chunk_bytes, HEAD_BYTES) - 1)
            size, first = await pipe.execute()
        if not size:
            return None
        at = first.find(PIECE_MARK)
        if at <= 0:
            if len(first) >= size:
                return bytes(first)
            async with held:
                whole: Any = await redis.get(key)
            return cast(bytes | None, whole)
        head = bytes(first[:at])
        file = tempfile.TemporaryFile(dir=spool_dir)  # noqa: SIM115 -- owned by Spooled
        try:
            if await _copy(redis, key, held, file, first, size, head, chunk_bytes):
                try:
                    return Spooled(file, size, len(head), _tail(file, size))
                except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
                    # not a model after all: the caller judges the value as stored
                    stored = b"".join(Spooled.raw(file, size))
                    file.close()
                    return stored
        except BaseException:
            file.close()
            raise
        file.close()
    raise CheckpointMoving(f"{key}: replaced during each of {attempts} copies")


async def _copy(
    redis: Redis,
    key: str,
    held: Any,
    file: IO[bytes],
    first: bytes,
    size: int,
    head: bytes,
    chunk_bytes: int,
) -> bool:
    """Copy the value into ``file`` from ``first`` on; False when it was replaced."""
    file.write(first)
    off = len(first)
    while off < size:
        async with held:
            pipe = redis.pipeline(transaction=True)
            pipe.strlen(key)
            pipe.getrange(key, 0, len(head) - 1)
            pipe.getrange(key, off, off + chunk_bytes - 1)
            n, h, chunk = await pipe.execute()
        if n != size or h != head or not chunk:
            return False
        file.write(chunk)
        off += len(chunk)
    file.flush()
    return True


def _tail(file: IO[bytes], size: int) -> bytes:
    """The bytes after the last mark (``},"meta":...}``)."""
    n = 4096
    while True:
        back = min(n, size)
        end = os.pread(file.fileno(), back, size - back)
        at = end.rfind(PIECE_MARK)
        if at >= 0:
            return end[at + len(PIECE_MARK) :]
        if back == size:
            raise ValueError("a marked checkpoint without a mark before its tail")
        n *= 4


class Overlay:
    """Items laid over a spooled checkpoint (the diffs after it, folded): the latest value of
    each key, written to an unnamed temp file; only the keys and where their values are stay
    in memory. Under sustained changes nearly every tile changes between two checkpoints, and
    held as objects those values were a whole model again. Keys are numbered in the order
    they were first set: a reader marks the ones it met in a bitmap of ``len(overlay)``."""

    _REMOVED = -1

    def __init__(self, spool_dir: str | None = None) -> None:
        self._file = tempfile.TemporaryFile(dir=spool_dir)  # noqa: SIM115 -- owned here
        self.close = weakref.finalize(self, self._file.close)
        self._index: dict[str, int] = {}
        self._keys: list[str] = []
        self._loc = array.array("q")  # per key: offset << 32 | length, or _REMOVED
        self.size = 0

    def set(self, key: str, value: msgspec.Raw) -> None:
        n = self._file.write(value)
        self._put(key, self.size << 32 | n)
        self.size += n

    def remove(self, key: str) -> None:
        self._put(key, self._REMOVED)

    def _put(self, key: str, loc: int) -> None:
        i = self._index.get(key)
        if i is None:
            self._index[key] = len(self._keys)
            self._keys.append(key)
            self._loc.append(loc)
        else:
            self._loc[i] = loc

    def done(self) -> None:
        """Written: from now on read only."""
        self._file.flush()

    def __len__(self) -> int:
        return len(self._keys)

    def index(self, key: str) -> int | None:
        return self._index.get(key)

    def key(self, i: int) -> str:
        return self._keys[i]

    def value(self, i: int) -> msgspec.Raw | None:
        """Key ``i``'s latest value; None when it was removed."""
        loc = self._loc[i]
        if loc == self._REMOVED:
            return None
        return msgspec.Raw(os.pread(self._file.fileno(), loc & 0xFFFFFFFF, loc >> 32))

    def items(self) -> Iterator[tuple[str, msgspec.Raw | None]]:
        for i, key in enumerate(self._keys):
            yield key, self.value(i)
