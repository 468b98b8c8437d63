from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from streams.clock import SystemClock
from streams.processor import Deps
from streams.redis_client import connect
from streams.settings import RuntimeSettings
from tests.redis_cluster import LocalCluster
from tests.util import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    srv = RedisServer().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """A private 3-master Redis Cluster (no replicas) shared by the tests that do not change
    its topology; failover tests start their own."""
    cluster = LocalCluster(masters=3).start()
    yield cluster
    cluster.stop()


@pytest.fixture
async def cluster_redis(redis_cluster: LocalCluster) -> AsyncIterator[Redis]:
    """A client of :func:`redis_cluster` (``redis+cluster://`` from ``connect``), on empty
    nodes without scripts."""
    redis_cluster.flushall()
    r = connect(redis_cluster.url)
    yield r
    await r.aclose()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    r = connect(redis_server.url)
    await r.flushall()
    yield r
    await r.aclose()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def settings(redis_server: RedisServer) -> RuntimeSettings:
    return RuntimeSettings(
        redis_url=redis_server.url,
        consumer="test-1",
        block_ms=50,
        min_idle_ms=200,
        reclaim_interval_s=0.1,
        max_deliveries=3,
        grace_s=5.0,
    )


@pytest.fixture
def deps(redis: Redis, settings: RuntimeSettings, registry: CollectorRegistry) -> Deps:
    return Deps(redis=redis, settings=settings, registry=registry, clock=SystemClock())
