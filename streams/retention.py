"""Stream retention by age and bytes, never silently past a consumer group.

Producers XADD with a generous ``MAXLEN ~`` backstop only; this janitor keeps each stream at
what it is worth:

* **age**: entries older than ``max_age_s`` go (``XTRIM MINID ~``), but never an entry a
  consumer group still needs: the trim stops at the oldest pending entry and at the first
  undelivered entry of every group. A lagging group keeps its backlog, as long as the
  stream stays within its byte budget.
* **bytes**: when ``MEMORY USAGE`` says the stream holds more than ``max_bytes``, the oldest
  entries go (``XTRIM MAXLEN ~``) even if a group has not processed them: memory is the
  hard limit of a trading day. Those entries are counted per group in
  ``massive_stream_trimmed_unread_total`` (and logged), and an alert fires.

Diff streams (no groups; readers resume by id) are trimmed by their publishers on every
publish; the janitor applies their byte budget as a backstop.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streams.admin import count_after
from streams.metrics import counter, gauge
from streams.redis_client import as_str
from streams.settings import env_settings

logger = logging.getLogger(__name__)

MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Policy:
    """What one stream may keep. ``max_age_s`` 0: no age limit."""

    max_age_s: float
    max_bytes: int

    def __post_init__(self) -> None:
        if self.max_age_s < 0 or self.max_bytes <= 0:
            raise ValueError("retention: max_age_s must be >= 0 and max_bytes > 0")


@dataclass(frozen=True, slots=True)
class Trimmed:
    """Outcome of one pass over one stream."""

    stream: str
    by_age: int
    by_bytes: int
    unread: dict[str, int]  # group -> entries trimmed before the group processed them


@env_settings("MASSIVE_RETENTION_")
@dataclass(frozen=True, slots=True)
class RetentionSettings:
    """Env prefix ``MASSIVE_RETENTION_``: per stream family, an age (s) and a byte budget
    (MiB). Ages are judged on the stream ids, i.e. the writers' clocks."""

    enabled: bool = True
    interval_s: float = 1.0
    # raw WS frames: enough to re-process the last minutes with an offset reset
    ws_max_age_s: float = 120.0
    ws_max_mb: int = 256
    dirty_max_age_s: float = 60.0
    dirty_max_mb: int = 64
    tiles_max_age_s: float = 30.0
    tiles_max_mb: int = 64  # per strategy
    # chain pointers, spot ticks, control messages: small entries, kept an hour
    small_max_age_s: float = 3600.0
    small_max_mb: int = 16
    # heatmap/GEX diff streams: their publishers trim by age and bytes on every publish;
    # this is the backstop (no age: a resume window is the publishers' choice)
    diffs_max_mb: int = 256
    # massive:gex:levels:{SYM}: its writer trims by age (MASSIVE_GEX_HISTORY_RETENTION_S);
    # this is the backstop
    gex_levels_max_mb: int = 32
    dead_max_mb: int = 64  # each <stream>:dead (no age: an operator inspects them)

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError("interval_s must be > 0")

    def policies(self, symbols: Iterable[str] = ()) -> dict[str, Policy]:
        """Stream name -> policy, for every stream of the pipeline and its dead letters
        (per-symbol streams for ``symbols``)."""
        from schemas import keys

        out = {
            keys.WS_STREAM: Policy(self.ws_max_age_s, self.ws_max_mb * MB),
            keys.CHAIN_STREAM: Policy(self.small_max_age_s, self.small_max_mb * MB),
            keys.SPOT_STREAM: Policy(self.small_max_age_s, self.small_max_mb * MB),
            keys.CONTROL_STREAM: Policy(self.small_max_age_s, self.small_max_mb * MB),
        }
        for sym in symbols:
            dirty = keys.contracts_dirty_stream(sym)
            out[dirty] = Policy(self.dirty_max_age_s, self.dirty_max_mb * MB)
            out[keys.gex_diffs_stream(sym)] = Policy(0, self.diffs_max_mb * MB)
            for s in keys.STRATEGIES:
                tiles = keys.tiles_stream(s, sym)
                out[tiles] = Policy(self.tiles_max_age_s, self.tiles_max_mb * MB)
                out[keys.heatmap_diffs_stream(s, sym)] = Policy(0, self.diffs_max_mb * MB)
        for name in list(out):
            out[keys.dead_letter_stream(name)] = Policy(0, self.dead_max_mb * MB)
        for sym in symbols:
            out[keys.gex_levels_stream(sym)] = Policy(0, self.gex_levels_max_mb * MB)
        return out


def _id(v: Any) -> tuple[int, int]:
    a, _, b = as_str(v).partition("-")
    return int(a), int(b or 0)


def _fmt(t: tuple[int, int]) -> str:
    return f"{t[0]}-{t[1]}"


def _next(t: tuple[int, int]) -> tuple[int, int]:
    return (t[0], t[1] + 1)


@dataclass(slots=True)
class _Group:
    name: str
    last_delivered: tuple[int, int]
    lag: int | None
    pending: int
    oldest_pending: tuple[int, int] | None


class StreamJanitor:
    """Applies :class:`Policy` per stream; one pass per call of :meth:`trim`."""

    def __init__(self, redis: Redis, registry: CollectorRegistry) -> None:
        self.redis = redis
        self.m_trimmed = counter(
            registry,
            "massive_stream_trimmed_total",
            "Entries trimmed from a stream by the retention policy, by reason (age|bytes)",
            ("stream", "reason"),
        )
        self.m_unread = counter(
            registry,
            "massive_stream_trimmed_unread_total",
            "Entries trimmed (byte budget) before a consumer group processed them: never "
            "delivered, or delivered and not acked",
            ("stream", "group"),
        )
        self.m_bytes = gauge(
            registry,
            "massive_stream_memory_bytes",
            "MEMORY USAGE of a stream (sampled estimate) at the last retention pass",
            ("stream",),
        )

    async def _groups(self, stream: str) -> list[_Group]:
        try:
            raw: list[dict[Any, Any]] = await self.redis.xinfo_groups(stream)
        except ResponseError:  # no such key
            return []
        out = []
        for g in raw:
            d = {as_str(k): v for k, v in g.items()}
            pending = int(d.get("pending") or 0)
            lag = d.get("lag")
            oldest = None
            if pending:
                summary: Any = await self.redis.xpending(stream, as_str(d["name"]))
                if summary and summary.get("min") is not None:
                    oldest = _id(summary["min"])
            out.append(
                _Group(
                    as_str(d["name"]),
                    _id(d.get("last-delivered-id") or "0-0"),
                    None if lag is None else int(lag),
                    pending,
                    oldest,
                )
            )
        return out

    async def trim(self, stream: str, policy: Policy, now_ms: int) -> Trimmed:
        groups = await self._groups(stream)
        by_age = await self._trim_age(stream, policy, now_ms, groups)
        unread: dict[str, int] = {}
        used = await self.redis.memory_usage(stream, samples=5)
        if used is None:
            return Trimmed(stream, by_age, 0, unread)
        self.m_bytes.labels(stream).set(used)
        by_bytes = 0
        if used > policy.max_bytes:
            by_bytes = await self._trim_bytes(stream, policy, used, groups, unread)
        return Trimmed(stream, by_age, by_bytes, unread)

    async def _trim_age(
        self, stream: str, policy: Policy, now_ms: int, groups: list[_Group]
    ) -> int:
        """Trim entries older than ``max_age_s``, never past what a group still needs."""
        if policy.max_age_s <= 0:
            return 0
        cut = (now_ms - int(policy.max_age_s * 1000), 0)
        for g in groups:
            cut = min(cut, _next(g.last_delivered))
            if g.oldest_pending is not None:
                cut = min(cut, g.oldest_pending)
        if cut <= (0, 0):
            return 0
        by_age = int(await self.redis.xtrim(stream, minid=_fmt(cut), approximate=True))
        if by_age:
            self.m_trimmed.labels(stream, "age").inc(by_age)
        return by_age

    async def _trim_bytes(
        self, stream: str, policy: Policy, used: int, groups: list[_Group], unread: dict[str, int]
    ) -> int:
        """Trim to the byte budget; the entries a group had not processed that went with
        it are counted per group in ``unread`` and logged."""
        length = int(await self.redis.xlen(stream))
        keep = max(1, int(length * policy.max_bytes / used))
        before: dict[str, int] = {}
        for g in groups:
            before[g.name] = (
                g.lag
                if g.lag is not None
                else await count_after(self.redis, stream, _fmt(g.last_delivered))
            )
        by_bytes = int(await self.redis.xtrim(stream, maxlen=keep, approximate=True))
        if not by_bytes:
            return 0
        self.m_trimmed.labels(stream, "bytes").inc(by_bytes)
        after = int(await self.redis.xlen(stream))
        first = await self.redis.xrange(stream, "-", "+", count=1)
        first_id = _id(first[0][0]) if first else (2**63, 0)
        for g in groups:
            # unread entries are the newest ``before`` ones: those beyond ``after``
            lost = max(0, before[g.name] - after)
            if g.oldest_pending is not None and g.oldest_pending < first_id:
                gone: Any = await self.redis.xpending_range(
                    stream, g.name, "-", "(" + _fmt(first_id), g.pending
                )
                lost += len(gone)
            if lost:
                unread[g.name] = lost
                self.m_unread.labels(stream, g.name).inc(lost)
                logger.error(
                    "retention: %s over its byte budget (%d > %d bytes): %d entries "
                    "group %s had not processed were trimmed",
                    stream,
                    used,
                    policy.max_bytes,
                    lost,
                    g.name,
                )
        return by_bytes
