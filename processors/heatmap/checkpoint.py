"""The one reader of "a model checkpoint + the diffs after it", and the heatmap
publisher's piecewise checkpoint writer (``write_pieces``).

A model key holds a checkpoint: the model at some version with ``diff_id`` = the diff
stream entry of that version (processors/heatmap/publisher.py writes it every
``checkpoint_ms``; GEX every version). The versions after it are the entries of the diff
stream after ``diff_id``. A new publisher leader reads them to continue the chain; the SSE
gateway reads them to bring its mirrors, ``/api`` answers and whole-model streams to the
latest version.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

from redis.asyncio import Redis

from streams.redis_client import as_str

REPLAY_PAGE_BYTES = 8 * 1024 * 1024  # a butterfly diff is ~1 MB under load


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
    """Every entry of ``stream`` after ``after`` as (id, diff JSON), read in pages of about
    ``page_bytes`` (the first page is small: the entry size is learnt from it). ``slots``
    bounds the concurrent reads of a process (held per page, not across the caller's work)."""
    count = 16
    while True:
        async with slots if slots is not None else contextlib.nullcontext():
            page = await diffs_page(redis, stream, after, count)
        size = 0
        for eid, body in page:
            after = eid
            if body is None:
                continue
            size += len(body)
            yield eid, body
        if len(page) < count:
            return
        avg = max(1, size // max(1, len(page)))
        count = max(1, min(1000, page_bytes // avg))


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
