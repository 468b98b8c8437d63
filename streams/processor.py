"""The processor unit: one lifecycle (start, run loop, stop) with injected dependencies.

``massive-pipeline run <name>[:<arg>]`` builds processors by name from the registry in
``processors/registry.py`` (e.g. ``tile-builder:butterfly``).
"""

from __future__ import annotations

import asyncio
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


class ConsumerProcessor:
    """Base for processors that consume one stream through one group.

    Subclasses set ``name`` and implement ``handle(entries)``; the effect of a batch must be
    in Redis when ``handle`` returns (the runtime acks right after).
    """

    name = "consumer"

    def __init__(self, deps: Deps, stream: str, group: str, **spec_overrides: object) -> None:
        s = deps.settings
        params: dict[str, object] = dict(
            stream=stream,
            group=group,
            consumer=s.consumer,
            count=s.count,
            block_ms=s.block_ms,
            min_idle_ms=s.min_idle_ms,
            reclaim_interval_s=s.reclaim_interval_s,
            max_deliveries=s.max_deliveries,
        )
        params.update(spec_overrides)
        self.deps = deps
        self.redis = deps.redis
        self.spec = StreamSpec(**params)  # type: ignore[arg-type]
        self.consumer = GroupConsumer(
            deps.redis, self.spec, self.handle, deps.registry, self.name, deps.heartbeats
        )

    @property
    def ready(self) -> bool:
        return self.consumer.ready

    async def handle(self, entries: list[Entry]) -> None:
        raise NotImplementedError

    async def run(self, stop: asyncio.Event) -> None:
        await self.consumer.run(stop)
