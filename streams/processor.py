"""The processor unit: one lifecycle (start, run loop, stop) with injected dependencies.

``massive-pipeline run <name>[:<arg>]`` builds processors by name from the registry in
``processors/registry.py`` (e.g. ``tile-builder:butterfly``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from streams.clock import Clock, SystemClock
from streams.consumer import Entry, GroupConsumer
from streams.heartbeat import Heartbeats
from streams.settings import RuntimeSettings
from streams.spec import StreamSpec


class FatalError(RuntimeError):
    """A processor cannot go on and a restart will not help until someone acts (e.g. the
    provider refused the API key). ``massive-pipeline`` prints its message on one line and
    exits 2, without a traceback."""


@dataclass(frozen=True)
class Deps:
    redis: Redis
    settings: RuntimeSettings
    registry: CollectorRegistry
    clock: Clock = field(default_factory=SystemClock)
    heartbeats: Heartbeats = field(default_factory=Heartbeats)


class Processor(Protocol):
    name: str

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; finish (and ack) in-flight work, then return."""
        ...

    @property
    def ready(self) -> bool: ...


class PerSymbol:
    """One processor made of one member per symbol (each with its own lease and ``{<SYM>}``
    keys), run side by side in one ``asyncio.TaskGroup``: ready when every member is."""

    def __init__(self, name: str, members: Sequence[Processor]) -> None:
        self.name = name
        self.members = list(members)

    @property
    def ready(self) -> bool:
        return all(m.ready for m in self.members)

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            for m in self.members:
                tg.create_task(m.run(stop), name=m.name)


class ConsumerProcessor:
    """Base for processors that consume one group on one stream, or on several streams (one
    per symbol: a Redis Cluster serves each from the symbol's shard).

    Subclasses set ``name`` and implement ``handle(entries)``; the effect of a batch must be
    in Redis when ``handle`` returns (the runtime acks right after). A batch holds entries of
    one stream. With several streams, one ``GroupConsumer`` per stream reads; their batches
    reach ``handle`` one at a time (a lock), so a handler never runs concurrently with
    itself.
    """

    name = "consumer"

    def __init__(
        self, deps: Deps, stream: str | Sequence[str], group: str, **spec_overrides: object
    ) -> None:
        s = deps.settings
        streams = [stream] if isinstance(stream, str) else list(dict.fromkeys(stream))
        if not streams:
            raise ValueError(f"{self.name}: no stream to consume")
        self.deps = deps
        self.redis = deps.redis
        self.specs: list[StreamSpec] = []
        for name in streams:
            params: dict[str, object] = dict(
                stream=name,
                group=group,
                consumer=s.consumer,
                count=s.count,
                block_ms=s.block_ms,
                min_idle_ms=s.min_idle_ms,
                reclaim_interval_s=s.reclaim_interval_s,
                max_deliveries=s.max_deliveries,
            )
            params.update(spec_overrides)
            self.specs.append(StreamSpec(**params))  # type: ignore[arg-type]
        self.spec = self.specs[0]
        handler = self.handle if len(self.specs) == 1 else self._serial_handle
        self._lock = asyncio.Lock()
        self.consumers = [
            GroupConsumer(deps.redis, sp, handler, deps.registry, self.name, deps.heartbeats)
            for sp in self.specs
        ]
        self.consumer = self.consumers[0]

    @property
    def ready(self) -> bool:
        return all(c.ready for c in self.consumers)

    async def _serial_handle(self, entries: list[Entry]) -> None:
        async with self._lock:
            await self.handle(entries)

    async def handle(self, entries: list[Entry]) -> None:
        raise NotImplementedError

    async def run(self, stop: asyncio.Event) -> None:
        if len(self.consumers) == 1:
            await self.consumer.run(stop)
            return
        async with asyncio.TaskGroup() as tg:
            for c in self.consumers:
                tg.create_task(c.run(stop))
