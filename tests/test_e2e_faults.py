"""The whole pipeline (processors as subprocesses, real Redis, the simulator) under faults.

One fixed recording is produced once per module from the simulator by the real chain-poller
and ws-ingest (a one-expiry SPX chain, ~120 contracts, a few thousand WS events), then:

* the undisturbed run replays it into a fresh Redis + fresh processors and gives the
  reference published models;
* every disturbed run replays the same recording while processes are SIGKILLed (each kind
  in turn; restarted by the harness's supervisor like Kubernetes would) or Redis is killed
  and restarted from its AOF (``--appendonly yes --appendfsync always`` in the server's temp
  dir), and must converge to the same published items (heatmap strategies + GEX), with the
  contract hashes holding exactly the newest event of each kind per contract (computed from
  the recording independently: nothing accepted was lost), every WS entry consumed by the
  hydrator group (read, acked) or dead-lettered.
* ingestion faults run live against the simulator: WS drop, 429/500 bursts on REST, WS
  silence (dormancy) -- the pipeline must catch up and keep publishing.

Timing: the recording is replayed at its recorded pace so kills land mid-flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from schemas import keys
from streams import admin
from streams.redis_client import connect
from tests import harness as h
from tests.redis_cluster import LocalCluster
from tests.util import eventually

pytestmark = [pytest.mark.timeout(240)]

HYD = "massive_hydrator_"


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-logs")


@pytest.fixture(scope="module")
def recording(logs: Path) -> h.Recording:
    rec = asyncio.run(h.make_recording(logs / "record", seconds=5.0, events_per_s=3000.0))
    assert h.ws_event_counts(rec.records)["quote"] > 100, "recording has too few WS events"
    assert len(h.chain_pointers(rec.records)) >= 2
    return rec


class Run:
    """Outcome of one replay: published models, hydrator counters, stream accounting."""

    def __init__(self) -> None:
        self.models: dict[str, Any] = {}
        self.eid = ""
        self.contract_diffs: list[str] = []
        self.hydrator: dict[str, float] = {}
        self.ws_len = 0
        self.ws_read = 0
        self.ws_pending = 0
        self.dead: dict[str, int] = {}
        self.exits: dict[str, list[int]] = {}
        self.lag_mismatch: list[h.Backlog] = []


async def _finish(r: Redis, p: h.Pipeline, rec: h.Recording, run: Run) -> Run:
    models = await h.wait_settled(r, timeout_s=90)
    run.models = h.normalized_items(models)
    run.eid = await h.wait_epoch(r)
    topo = {h.as_str(c) for c in await r.smembers(keys.epoch_contracts("SPX", run.eid))}
    exp = h.expected_state(rec.records, topo)
    run.contract_diffs = await h.check_contracts(r, run.eid, exp)
    ms = await p.metrics("hydrator")
    run.hydrator = {
        "in": h.metric_sum(ms, HYD + "events_total", kind="quote")
        + h.metric_sum(ms, HYD + "events_total", kind="trade"),
        "applied": h.metric_sum(ms, HYD + "applied_total"),
        "conflated": h.metric_sum(ms, HYD + "conflated_total"),
        "miss": h.metric_sum(ms, HYD + "geometry_miss_total"),
        "rejected": h.metric_sum(ms, HYD + "rejected_total"),
        "discarded": h.metric_sum(ms, HYD + "discarded_total"),
    }
    run.ws_len = int(await r.xlen(keys.WS_STREAM))
    for g in await admin.lag(r, [keys.WS_STREAM]):
        if g.group == keys.HYDRATOR_GROUP:
            run.ws_pending = g.pending
            # entries delivered to the group = those up to its last-delivered-id
            unread: Any = await r.xrange(keys.WS_STREAM, min="(" + g.last_delivered_id)
            assert not unread, g
            run.ws_read = g.length - len(unread)
    run.lag_mismatch = await h.lag_disagreements(r)
    for s in (keys.WS_STREAM, keys.CHAIN_STREAM, keys.contracts_dirty_stream("SPX")):
        run.dead[s] = int(await r.xlen(keys.dead_letter_stream(s)))
    for s in keys.STRATEGIES:
        run.dead[keys.tiles_stream(s, "SPX")] = int(
            await r.xlen(keys.dead_letter_stream(keys.tiles_stream(s, "SPX")))
        )
    run.exits = {s: list(pr.exits) for s, pr in p.procs.items()}
    return run


def _ws_count(rec: h.Recording) -> int:
    return sum(1 for x in rec.records if x.stream == keys.WS_STREAM)


@contextlib.asynccontextmanager
async def _redis(kind: str) -> AsyncIterator[tuple[str, Redis]]:
    """(URL, client) of a private single node or a private 3-master Redis Cluster."""
    if kind == "cluster":
        cluster = LocalCluster(masters=3).start()
        r = connect(cluster.url)
        try:
            yield cluster.url, r
        finally:
            await r.aclose()
            cluster.stop()
        return
    srv = h.redis_server()
    r = Redis.from_url(srv.url)
    try:
        yield srv.url, r
    finally:
        await r.aclose()
        srv.stop()


async def _replay_undisturbed(rec: h.Recording, logs: Path, kind: str = "node") -> Run:
    async with _redis(kind) as (url, r), h.pipeline(url, logs, h.DOWNSTREAM) as p:
        head, rest = h.split_at_first_chain(rec.records)
        await h.replay(r, head)
        await h.wait_settled(r, timeout_s=60)
        await h.replay(r, rest, speed=1.0)
        return await _finish(r, p, rec, Run())


@pytest.fixture(scope="module")
def baseline(recording: h.Recording, logs: Path) -> Run:
    return asyncio.run(_replay_undisturbed(recording, logs / "baseline"))


def _assert_converged(run: Run, base: Run, rec: h.Recording) -> None:
    assert run.eid == base.eid
    assert not run.contract_diffs, run.contract_diffs[:5]
    for k, m in base.models.items():
        assert m is not None, f"{k} never published"
        got = run.models.get(k)
        assert got is not None, f"{k} not published in the disturbed run"
        assert got["epoch"] == m["epoch"]
        assert set(got["items"]) == set(m["items"]), k
        bad = [i for i in m["items"] if got["items"][i] != m["items"][i]]
        assert not bad, f"{k}: {len(bad)} items differ, e.g. {bad[0]}"
    # every WS entry that went in was consumed by the hydrator group (read + acked) or
    # dead-lettered; nothing is left pending
    assert run.ws_len == _ws_count(rec)
    assert run.ws_pending == 0
    assert run.ws_read + run.dead[keys.WS_STREAM] == run.ws_len


@pytest.mark.slow
def test_undisturbed_run_matches_the_recording(recording: h.Recording, baseline: Run) -> None:
    """Reference run: contract state equals the independent model of the recording, and the
    hydrator's counters account for every WS event (in = applied + conflated + geometry_miss
    + rejected + admission discards)."""
    assert not baseline.contract_diffs, baseline.contract_diffs[:5]
    assert all(m is not None and m["items"] for m in baseline.models.values())
    assert baseline.ws_read == baseline.ws_len == _ws_count(recording)
    assert all(v == 0 for v in baseline.dead.values()), baseline.dead
    c = baseline.hydrator
    exp = h.expected_state(recording.records, set())
    assert c["in"] == exp.ws_events  # the hydrator decoded every recorded option event
    accounted = c["applied"] + c["conflated"] + c["miss"] + c["rejected"] + c["discarded"]
    print(f"hydrator counters: {c}")
    assert accounted == c["in"]


@pytest.mark.slow
async def test_a_cluster_run_publishes_what_the_single_node_run_does(
    recording: h.Recording, baseline: Run, logs: Path
) -> None:
    """The same recording through the same processors on a 3-master Redis Cluster
    (``redis+cluster://``): the same epoch, contract state and published items as on one
    node, every WS entry consumed, nothing dead-lettered, no process exit."""
    run = await _replay_undisturbed(recording, logs / "cluster", kind="cluster")
    _assert_converged(run, baseline, recording)
    assert all(v == 0 for v in run.dead.values()), run.dead
    assert not any(run.exits.values()), run.exits


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["node", "cluster"])
async def test_kill_each_processor_kind_mid_flight(
    recording: h.Recording, baseline: Run, logs: Path, kind: str
) -> None:
    """SIGKILL every processor kind in turn while the recording is being replayed; the
    supervisor restarts each. Published items converge to the undisturbed run's (on one
    node and on a 3-master cluster)."""
    async with (
        _redis(kind) as (url, r),
        h.pipeline(url, logs / f"kill-{kind}", h.DOWNSTREAM) as p,
    ):
        head, rest = h.split_at_first_chain(recording.records)
        await h.replay(r, head)
        await h.wait_settled(r, timeout_s=60)
        span_s = (rest[-1].t_ns - rest[0].t_ns) / 1e9
        kinds = list(h.DOWNSTREAM)
        killed: dict[str, int] = {}

        async def killer() -> None:
            step = max(span_s / (len(kinds) + 1), 0.2)
            for spec in kinds:
                await asyncio.sleep(step)
                killed[spec] = p.kill(spec, signal.SIGKILL)

        k = asyncio.create_task(killer())
        await h.replay(r, rest, speed=1.0)
        await k
        for spec, pid in killed.items():
            await p.wait_restarted(spec, pid, timeout_s=60)
        # and the hydrator once more right after a burst of input, with entries in flight
        tail = [x for x in rest if x.stream == keys.WS_STREAM][-50:]
        pid = p.kill("hydrator")
        await h.replay(r, tail)
        await p.wait_restarted("hydrator", pid)
        run = await _finish(r, p, recording, Run())
    for spec in kinds:
        assert -signal.SIGKILL in run.exits[spec], (spec, run.exits[spec])
    # the re-sent tail is the same events again: same final state, more entries read
    assert run.ws_len == _ws_count(recording) + len(tail)
    run.ws_len -= len(tail)
    run.ws_read -= len(tail)
    _assert_converged(run, baseline, recording)


@pytest.mark.slow
async def test_redis_restart_with_aof_keeps_state(
    recording: h.Recording, baseline: Run, logs: Path
) -> None:
    """Redis is SIGKILLed mid-replay and restarted from its AOF (appendfsync always, temp
    dir). Processors lose their connection; those that exit are restarted by the
    supervisor, the others reconnect. The replayer retries its writes until Redis is back.
    Final published items equal the undisturbed run's."""
    srv = h.redis_server(aof=True)
    r = Redis.from_url(srv.url)
    try:
        async with h.pipeline(srv.url, logs / "redis", h.DOWNSTREAM) as p:
            head, rest = h.split_at_first_chain(recording.records)
            await h.replay(r, head)
            await h.wait_settled(r, timeout_s=60)
            half = len(rest) // 2
            await h.replay(r, rest[:half], speed=1.0)
            t0 = time.monotonic()
            srv.restart()
            restarted_s = time.monotonic() - t0
            await _replay_retrying(r, rest[half:])
            run = await _finish(r, p, recording, Run())
    finally:
        await r.aclose()
        srv.stop()
    print(f"redis restart took {restarted_s:.2f}s; process exits: {run.exits}")
    # XINFO GROUPS lag after the AOF reload (what KEDA lagCount and the monitor read)
    print(f"groups whose XINFO lag != exact unread count: {run.lag_mismatch}")
    _assert_converged(run, baseline, recording)


async def _replay_retrying(r: Redis, records: list[Any], timeout_s: float = 30.0) -> None:
    """Replay one record at a time, retrying a record whose write failed (Redis down)."""
    from redis.exceptions import ConnectionError as RedisConnError

    deadline = time.monotonic() + timeout_s
    for rec in records:
        while True:
            try:
                await h.replay(r, [rec])
                break
            except (RedisConnError, OSError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)


# --- ingestion faults (live simulator) ----------------------------------------------------
@pytest.fixture
def live_logs(logs: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    yield logs / request.node.name


@pytest.mark.slow
async def test_ingestion_faults_pipeline_catches_up(live_logs: Path) -> None:
    """Against the live simulator: a WS drop (ws-ingest reconnects and resubscribes), a
    burst of 429s and one of 500s on REST (the chain-poller retries and the next snapshot
    arrives), and a WS silence longer than ``silence_s`` (ws-ingest signals dormancy, the
    chain-poller refreshes at once). After each, WS frames flow again and the models keep
    publishing new versions."""
    from simulator.market import MarketConfig
    from simulator.server import SimConfig, SimServer

    srv = h.redis_server()
    sim = SimServer(SimConfig(seed=5, symbols=("SPX",), events_per_s=2000.0, market=MarketConfig()))
    await sim.start()
    r = Redis.from_url(srv.url)
    env = h.sim_env(sim.rest_url, sim.ws_url, sim.config.api_key)
    specs = (*h.INGEST, "normalizer", "hydrator", "tile-builder:single", "publisher:single")
    model = keys.heatmap_model("SPX", "single")

    async def version() -> int:
        ms = await h.published_models(r)
        m = ms[model]
        return m.version if m else 0

    async def advances(what: str, timeout_s: float = 30.0) -> None:
        """WS frames keep arriving and the model publishes a newer version."""
        n0, v0 = await r.xlen(keys.WS_STREAM), await version()
        deadline = time.monotonic() + timeout_s
        while not (await r.xlen(keys.WS_STREAM) > n0 and await version() > v0):
            if time.monotonic() > deadline:
                raise AssertionError(f"no progress after {what}: {p.log_tail('ws-ingest')}")
            await asyncio.sleep(0.1)

    async def chain_reasons() -> list[str]:
        from schemas.messages import ChainPointer, from_entry

        entries: Any = await r.xrange(keys.CHAIN_STREAM)
        return [from_entry(f, ChainPointer).reason for _, f in entries]

    try:
        async with h.pipeline(srv.url, live_logs, specs, extra_env=env) as p:
            await h.wait_epoch(r)
            await advances("start")

            # 1. WS drop
            sim.drop_ws()
            await advances("ws drop")
            ms = await p.metrics("ws-ingest")
            assert h.metric_sum(ms, "massive_ws_ingest_connections_total", feed="options") >= 2

            # 2. REST 429 burst, then a 500 burst: retried, snapshots keep coming
            for status in (429, 500):
                sim.fail_next(4, status=status)

                async def answered(code: int = status) -> bool:
                    ms = await p.metrics("chain-poller")
                    got = h.metric_sum(ms, "massive_chain_poller_requests_total", status=str(code))
                    return got >= 1

                # a cycle already past its requests may write one more snapshot first: the
                # snapshots that count are those after the failures were answered
                await eventually(answered, timeout_s=30)
                n_chain = await r.xlen(keys.CHAIN_STREAM)
                deadline = time.monotonic() + 30
                while await r.xlen(keys.CHAIN_STREAM) <= n_chain:
                    assert time.monotonic() < deadline, p.log_tail("chain-poller")
                    await asyncio.sleep(0.1)
                ms = await p.metrics("chain-poller")
                assert h.metric_sum(ms, "massive_chain_poller_retries_total") >= 1
                await advances(f"REST {status} burst")

            # 3. WS silence: dormancy -> immediate chain refresh
            sim.set_silent(True)
            deadline = time.monotonic() + 20
            while "dormancy" not in await chain_reasons():
                assert time.monotonic() < deadline, p.log_tail("ws-ingest")
                await asyncio.sleep(0.1)
            ms = await p.metrics("ws-ingest")
            assert h.metric_sum(ms, "massive_ws_ingest_dormancy_signals_total") >= 1
            sim.set_silent(False)
            await advances("ws silence")
            for spec in specs:
                assert not p.procs[spec].exits, (spec, p.procs[spec].exits, p.log_tail(spec))
    finally:
        await r.aclose()
        await sim.stop()
        srv.stop()


# --- liveness under sustained load (found by bench/e2e_load.py) ---------------------------
@pytest.mark.slow
async def test_heatmap_publisher_keeps_publishing_under_sustained_load(logs: Path) -> None:
    """A 20,000-contract SPX epoch (~49,000 vertical tiles) and a steady 5,000 WS events/s:
    the only vertical publisher must keep publishing (target: a version every ~250 ms;
    asserted: at least one per 2 s over 12 s) even when one leader iteration takes longer
    than its lease TTL, as long as nobody else took the lease (the fence is unchanged).

    Regression test: the lease used to be renewed only between loop iterations and an
    expired lease counted as lost although the fence was unchanged, so an iteration
    (ingest of 1,000 deltas + encoding/sending a ~30 MB model) that outlasted the TTL made
    the leader drop out and restart with a full reconcile of the 49k-tile staging hash,
    which outlasted the TTL again: nothing was published under load. A 200 ms TTL makes an
    iteration longer than the TTL on any machine."""
    import datetime as dt

    from tests.factories import big_chain

    srv = h.redis_server()
    r = Redis.from_url(srv.url)
    lease = {  # an iteration longer than the TTL on any machine
        "MASSIVE_PUBLISHER_LEASE_TTL_MS": "200",
        "MASSIVE_PUBLISHER_RENEW_MS": "100",
        "MASSIVE_PUBLISHER_MAX_INTERVAL_MS": "250",
    }
    specs = ("normalizer", "hydrator", "tile-builder:vertical", "publisher:vertical")
    model = keys.heatmap_model("SPX", "vertical")
    try:
        async with h.pipeline(srv.url, logs / "sustained", specs, extra_env=lease) as p:
            first = (dt.date.today() + dt.timedelta(days=1)).isoformat()
            snap = big_chain("SPX", 20_000, first_expiry=first)
            await h.install_chain(r, snap)
            await h.wait_epoch(r, timeout_s=120)

            async def published() -> int:
                m = (await h.published_models(r))[model]
                return m.version if m else 0

            deadline = time.monotonic() + 40
            while await published() < 1:
                if time.monotonic() > deadline:
                    log = p.log_tail("publisher:vertical", 500)
                    raise AssertionError(
                        "the 49k-tile model was never published: lease lost "
                        f"{log.count('lost its lease')} times, publish rejected "
                        f"{log.count('rejected: lease_lost')} times (lease_lost)"
                    )
                await asyncio.sleep(0.2)
            cids = sorted(c.cid for c in snap.contracts)
            front = sorted({c.expiry for c in snap.contracts})[:2]
            near = sorted(
                (c for c in snap.contracts if c.expiry in front),
                key=lambda c: abs(c.strike - 6000.0),
            )
            rep = h.LoadReplayer(cids, [c.cid for c in near[:1000]])
            await rep.run(r, 5000, 2.0, 0.05)  # warm up
            v0 = await published()
            await rep.run(r, 5000, 12.0, 0.05)
            v1 = await published()
            lost = p.log_tail("publisher:vertical", 200).count("lost its lease")
    finally:
        await r.aclose()
        srv.stop()
    assert v1 - v0 >= 6, f"{v1 - v0} versions in 12 s under load; lease lost {lost} times"
