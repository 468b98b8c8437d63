"""Prometheus metrics with an explicit registry; get-or-create so several processors (or
several instances in tests) can share one registry without duplicate-name errors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)

_CACHE_ATTR = "_massive_metrics"

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _get(
    kind: type[M],
    registry: CollectorRegistry,
    name: str,
    doc: str,
    labels: Sequence[str],
    **kw: object,
) -> M:
    # The cache lives on the registry itself: keyed by id(registry) it would hand a dead
    # registry's metric to a new registry that happens to reuse the id.
    created: dict[str, MetricWrapperBase] | None = getattr(registry, _CACHE_ATTR, None)
    if created is None:
        created = {}
        setattr(registry, _CACHE_ATTR, created)
    found = created.get(name)
    if found is None:
        found = kind(name, doc, labelnames=tuple(labels), registry=registry, **kw)  # type: ignore[arg-type]
        created[name] = found
    if not isinstance(found, kind):
        raise TypeError(f"metric {name} already registered as {type(found).__name__}")
    return found


def counter(
    registry: CollectorRegistry, name: str, doc: str, labels: Sequence[str] = ()
) -> Counter:
    return _get(Counter, registry, name, doc, labels)


def gauge(registry: CollectorRegistry, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
    return _get(Gauge, registry, name, doc, labels)


def histogram(
    registry: CollectorRegistry,
    name: str,
    doc: str,
    labels: Sequence[str] = (),
    buckets: Sequence[float] = LATENCY_BUCKETS_S,
) -> Histogram:
    return _get(Histogram, registry, name, doc, labels, buckets=tuple(buckets))


def redis_outages(
    registry: CollectorRegistry, processor: str, stream: str = "", group: str = ""
) -> Counter:
    """``massive_redis_errors_total`` for a loop that is not a group consumer (empty
    ``stream``/``group`` labels): Redis outages it survived in-process."""
    return counter(
        registry,
        "massive_redis_errors_total",
        "Redis connection losses/timeouts retried in-process",
        ("processor", "stream", "group"),
    ).labels(processor=processor, stream=stream, group=group)


class ConsumerMetrics:
    """Per-processor stream-consumer metrics (labels: processor, stream, group)."""

    def __init__(self, registry: CollectorRegistry, processor: str, stream: str, group: str):
        lbl = {"processor": processor, "stream": stream, "group": group}
        names = ("processor", "stream", "group")
        self.processed = counter(
            registry, "massive_processed_total", "Stream entries processed and acked", names
        ).labels(**lbl)
        self.errors = counter(
            registry, "massive_errors_total", "Entries whose handler raised", names
        ).labels(**lbl)
        self.dead_lettered = counter(
            registry,
            "massive_dead_lettered_total",
            "Entries moved to the dead-letter stream",
            names,
        ).labels(**lbl)
        self.reclaimed = counter(
            registry, "massive_reclaimed_total", "Idle pending entries claimed from others", names
        ).labels(**lbl)
        self.group_recreated = counter(
            registry, "massive_group_recreated_total", "Consumer groups re-created (NOGROUP)", names
        ).labels(**lbl)
        self.redis_errors = redis_outages(registry, processor, stream, group)
        self.batch_seconds = histogram(
            registry, "massive_batch_duration_seconds", "Handler time per batch", names
        ).labels(**lbl)
        self.batch_size = histogram(
            registry,
            "massive_batch_size",
            "Entries per handled batch",
            names,
            buckets=(1, 10, 50, 100, 250, 500, 1000, 5000),
        ).labels(**lbl)
