"""Operator tools: offset reset with ENTRIESREAD (lag stays right) and a lag view."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from streams.redis_client import as_str

MAX_SEQ = 18446744073709551615
_ENTRY_ID = re.compile(r"\d+-\d+")


@dataclass(frozen=True, slots=True)
class GroupLag:
    stream: str
    group: str
    length: int
    consumers: int
    pending: int
    lag: int | None  # None when Redis cannot tell (e.g. SETID without ENTRIESREAD)
    entries_read: int | None
    last_delivered_id: str


def parse_position(to: str) -> str:
    """``0``, ``$``, an entry id (``1764000000000-0``), epoch millis (``1764000000000ms``) or
    an ISO-8601 time: returns the last-delivered id such that entries at or after a time are
    re-delivered, and entries after an id are re-delivered."""
    if to in ("0", "$") or _ENTRY_ID.fullmatch(to):  # (not "2026-11-28": a date)
        return to
    if to.endswith("ms") and to[:-2].isdigit():
        ms = int(to[:-2])
    else:
        try:
            t = dt.datetime.fromisoformat(to.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(
                f"--to {to!r}: expected 0, $, an entry id like 1764000000000-0, "
                "<millis>ms or an ISO-8601 time"
            ) from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.UTC)
        ms = int(t.timestamp() * 1000)
    return f"{ms - 1}-{MAX_SEQ}" if ms > 0 else "0"


def _id_tuple(eid: str) -> tuple[int, int]:
    a, _, b = eid.partition("-")
    return int(a), int(b or 0)


async def count_after(redis: Redis, stream: str, after_id: str, page: int = 10_000) -> int:
    """Entries in ``stream`` with id > ``after_id``."""
    n = 0
    start = "(" + after_id
    while True:
        batch: list[Any] = await redis.xrange(stream, min=start, max="+", count=page)  # type: ignore[assignment]
        n += len(batch)
        if len(batch) < page:
            return n
        last = batch[-1][0]
        start = "(" + (last.decode() if isinstance(last, bytes) else last)


async def reset_offset(redis: Redis, stream: str, group: str, to: str) -> tuple[str, int]:
    """XGROUP SETID with ENTRIESREAD so XINFO lag (and KEDA lagCount) stay correct.
    Returns (last-delivered id, entries_read)."""
    info: dict[Any, Any] = await redis.xinfo_stream(stream)
    added = int(info.get("entries-added", info.get(b"entries-added", 0)))
    pos = parse_position(to)
    first = info.get("first-entry", info.get(b"first-entry"))
    if pos == "$" or first is None:
        entries_read = added
    elif _id_tuple(as_str(first[0])) > _id_tuple(pos):
        # Before the first entry (also "0" after trimming): every entry left is unread.
        entries_read = added - int(info.get("length", info.get(b"length", 0)))
    else:
        entries_read = added - await count_after(redis, stream, pos)
    await redis.execute_command(  # type: ignore[no-untyped-call]
        "XGROUP", "SETID", stream, group, pos, "ENTRIESREAD", entries_read
    )
    return pos, entries_read


def _g(d: dict[Any, Any], k: str) -> Any:
    return d.get(k, d.get(k.encode()))


async def stream_names(redis: Redis, pattern: str = "massive:*") -> list[str]:
    names = []
    async for k in redis.scan_iter(match=pattern, _type="STREAM", count=1000):
        names.append(k.decode() if isinstance(k, bytes) else k)
    return sorted(names)


async def _checked_lag(redis: Redis, stream: str, last_delivered_id: str, reported: int) -> int:
    """Redis 7.0 can report a positive lag that no entry backs (seen after an AOF restart:
    entries-read is not persisted exactly). One entry after last-delivered-id says whether
    anything is unread: 0 if none, else the lag Redis reports. Counting the entries would
    read them whole: up to the lag's worth of MB-sized tile deltas or WS frames per group
    and poll (the monitor polls every second; its RSS stepped up by ~20 MB in a soak)."""
    after: list[Any] = await redis.xrange(  # type: ignore[assignment]
        stream, min="(" + last_delivered_id, max="+", count=1
    )
    return reported if after else 0


async def lag(redis: Redis, streams: list[str] | None = None) -> list[GroupLag]:
    out = []
    for s in streams if streams is not None else await stream_names(redis):
        length = await redis.xlen(s)
        for g in await redis.xinfo_groups(s):
            lag_v = _g(g, "lag")
            er = _g(g, "entries-read")
            ldid = _g(g, "last-delivered-id")
            name = _g(g, "name")
            ldid_s = ldid.decode() if isinstance(ldid, bytes) else str(ldid)
            lag_n = int(lag_v) if lag_v is not None else None
            if lag_n:
                lag_n = await _checked_lag(redis, s, ldid_s, lag_n)
            out.append(
                GroupLag(
                    stream=s,
                    group=name.decode() if isinstance(name, bytes) else str(name),
                    length=length,
                    consumers=int(_g(g, "consumers")),
                    pending=int(_g(g, "pending")),
                    lag=lag_n,
                    entries_read=int(er) if er is not None else None,
                    last_delivered_id=ldid_s,
                )
            )
    return out
