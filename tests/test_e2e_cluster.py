"""The whole live path on a private 3-master Redis Cluster (issue 17): the simulator, then
chain-poller, ws-ingest, normalizer, hydrator, tile-builder:single, publisher:single, gex and
sse-gateway, each its own process with ``MASSIVE_REDIS_URL=redis+cluster://<one node>``,
publish SPX and NDX heatmap and GEX models that advance. Then a master failover on a cluster
with replicas: ``CLUSTER FAILOVER`` on the replica of the master that serves SPX, kill -9 of
the old master; the models go on advancing, no process dies, no consumer group loses what it
had read (its last delivered id never goes back) and nothing is dead-lettered."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from redis.asyncio import Redis

from processors import INGEST
from schemas import keys
from simulator.server import SimConfig, SimServer
from streams import admin
from streams.redis_client import connect
from streams.retry import Backoff, retrying
from tests import harness as h
from tests.redis_cluster import LocalCluster
from tests.util import eventually, free_port

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

log = logging.getLogger(__name__)
T = TypeVar("T")

SPECS = (
    *INGEST,
    "normalizer",
    "hydrator",
    "tile-builder:single",
    "publisher:single",
    "gex",
    "sse-gateway",
)
PATHS = tuple(
    f"/api/{model}?symbol={sym}" for model in ("heatmap/single", "gex") for sym in ("SPX", "NDX")
)


@dataclass
class Live:
    cluster: LocalCluster
    pipe: h.Pipeline
    api: str
    redis: Redis


@contextlib.asynccontextmanager
async def live(cluster: LocalCluster, log_dir: Path, url: str = "") -> AsyncIterator[Live]:
    """The live path on ``url`` (default: one seed node)."""
    url = url or cluster.url
    sim = SimServer(SimConfig(seed=7, symbols=("SPX", "NDX"), events_per_s=300.0))
    await sim.start()
    r = connect(url)
    gw_port = free_port()
    env = h.sim_env(
        sim.rest_url,
        sim.ws_url,
        sim.config.api_key,
        MASSIVE_SYMBOLS="SPX,NDX",
        MASSIVE_POLLER_FULL_INTERVAL_S="20",
    )
    per = {"sse-gateway": {"MASSIVE_SSE_PORT": str(gw_port), "MASSIVE_SSE_HOST": "127.0.0.1"}}
    try:
        async with h.pipeline(url, log_dir, SPECS, extra_env=env, per_env=per) as p:
            yield Live(cluster, p, f"http://127.0.0.1:{gw_port}", r)
    finally:
        await r.aclose()
        await sim.stop()


async def versions(api: str) -> dict[str, int]:
    out: dict[str, int] = {}
    async with httpx.AsyncClient(timeout=5) as c:
        for path in PATHS:
            try:
                resp = await c.get(api + path)
            except httpx.HTTPError:
                return {}
            if resp.status_code != 200:
                return {}
            body: dict[str, Any] = resp.json()
            if not body.get("items"):
                return {}
            out[path] = int(body.get("version", 0))
    return out


async def advanced_past(api: str, seen: dict[str, int]) -> dict[str, int]:
    """Every model published with a version above ``seen`` (empty: not yet)."""
    now = await versions(api)
    ok = now and all(now[p] > seen.get(p, 0) for p in PATHS)
    return now if ok else {}


def no_exits(p: h.Pipeline) -> dict[str, str]:
    return {s: p.log_tail(s, 8) for s, proc in p.procs.items() if proc.exits or not proc.alive()}


@pytest.fixture
def cluster3() -> Iterator[LocalCluster]:
    c = LocalCluster(masters=3).start()
    yield c
    c.stop()


@pytest.fixture
def cluster3x2() -> Iterator[LocalCluster]:
    c = LocalCluster(masters=3, replicas=1).start()
    yield c
    c.stop()


async def test_spx_and_ndx_models_advance_on_a_cluster(
    cluster3: LocalCluster, tmp_path: Path
) -> None:
    async with live(cluster3, tmp_path) as lv:
        first = await eventually(lambda: advanced_past(lv.api, {}), timeout_s=150, interval_s=0.5)
        await eventually(lambda: advanced_past(lv.api, first), timeout_s=60, interval_s=0.5)
        assert not no_exits(lv.pipe), no_exits(lv.pipe)
    # the data is spread over the masters: every one of them holds keys
    sizes = []
    for n in cluster3.masters():
        with n.client() as c:
            sizes.append(int(c.dbsize()))
    assert all(sizes), sizes


async def _again(call: Callable[[], Awaitable[T]]) -> T:
    """The test's own read through the retry policy (after a failover its first command may
    meet a connection the failover closed), as the processors' loops do."""
    return await retrying("test", call, None, log=log, backoff=Backoff(0.05, 0.3), attempts=30)


async def _last_delivered(redis: Redis) -> dict[tuple[str, str], str]:
    groups = await _again(lambda: admin.lag(redis))
    return {(g.stream, g.group): g.last_delivered_id for g in groups}


def _id(x: str) -> tuple[int, int]:
    ms, _, seq = x.partition("-")
    return int(ms or 0), int(seq or 0)


async def test_master_failover_models_converge_nothing_acked_lost(
    cluster3x2: LocalCluster, tmp_path: Path
) -> None:
    cluster = cluster3x2
    # every node as a seed: a process (re)started after the kill still finds the cluster
    async with live(cluster, tmp_path, cluster.all_url) as lv:
        first = await eventually(lambda: advanced_past(lv.api, {}), timeout_s=150, interval_s=0.5)
        before = await _last_delivered(lv.redis)
        old = cluster.master_of_key("{SPX}")
        replica = cluster.replica_of(old)
        await asyncio.to_thread(cluster.failover, replica)
        cluster.kill(old)
        assert cluster.master_of_key("{SPX}") is replica
        # the models converge again: every one published past what it was before
        await eventually(lambda: advanced_past(lv.api, first), timeout_s=120, interval_s=0.5)
        after = await _last_delivered(lv.redis)
        assert not no_exits(lv.pipe), no_exits(lv.pipe)
        dead = {s: n for s, n in (await _again(lambda: _dead_letters(lv.redis))).items() if n}
    lost = {k: (v, after.get(k)) for k, v in before.items() if _id(after.get(k, "0-0")) < _id(v)}
    assert not lost, lost
    assert not dead, dead


async def _dead_letters(redis: Redis) -> dict[str, int]:
    out: dict[str, int] = {}
    for g in await admin.lag(redis):
        dead = keys.dead_letter_stream(g.stream)
        out[dead] = int(await redis.xlen(dead))
    return out
