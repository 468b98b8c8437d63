"""The monitor processor against a real Redis, and scraped by a real Prometheus server."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from processors.ops.monitor import STAMP_PREFIX_BYTES, Monitor, MonitorSettings, _stamp, build
from schemas import keys
from schemas.messages import PublishedModel, RawModel, encode
from streams import admin
from streams.clock import ManualClock
from streams.processor import Deps
from streams.runner import run_processors
from streams.settings import RuntimeSettings
from tests.util import eventually, free_port

ROOT = Path(__file__).resolve().parent.parent
NOW_NS = 1_764_000_000_000_000_000


def val(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


async def fill(redis: Redis, stream: str, n: int) -> None:
    pipe = redis.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(stream, {b"n": str(i).encode()})
    await pipe.execute()


async def consume(redis: Redis, stream: str, group: str, n: int, ack: int) -> None:
    """Create ``group`` at 0, deliver ``n`` entries to consumer c1 and ack the first ``ack``."""
    await redis.xgroup_create(stream, group, id="0")
    if not n:
        return
    res = await redis.xreadgroup(group, "c1", {stream: ">"}, count=n)
    ids = [eid for eid, _ in res[0][1]]
    if ack:
        await redis.xack(stream, group, *ids[:ack])


def monitor(
    deps: Deps, clock: ManualClock, symbols: tuple[str, ...] | None = None, **kw: object
) -> Monitor:
    rt = deps.settings if symbols is None else dataclasses.replace(deps.settings, symbols=symbols)
    d = Deps(redis=deps.redis, settings=rt, registry=deps.registry, clock=clock)
    return Monitor(d, MonitorSettings(**kw))  # type: ignore[arg-type]


async def test_exports_streams_groups_dead_letters_epochs_models_and_dormancy(
    redis: Redis, deps: Deps, registry: CollectorRegistry
) -> None:
    clock = ManualClock(NOW_NS)
    tiles = keys.tiles_stream("butterfly", "SPX")
    await fill(redis, keys.WS_STREAM, 10)
    await consume(redis, keys.WS_STREAM, keys.HYDRATOR_GROUP, n=4, ack=1)
    await fill(redis, keys.contracts_dirty_stream("SPX"), 7)
    for s in keys.STRATEGIES:
        await consume(redis, keys.contracts_dirty_stream("SPX"), keys.tile_builder_group(s), 0, 0)
    await redis.xreadgroup(
        keys.tile_builder_group("single"), "c1", {keys.contracts_dirty_stream("SPX"): ">"}, count=7
    )
    await fill(redis, tiles, 3)
    await fill(redis, keys.dead_letter_stream(keys.WS_STREAM), 2)
    await redis.set(keys.epoch_active("SPX"), "e1")
    await redis.hset(keys.epoch_meta("SPX", "e1"), mapping={"created_ns": NOW_NS - 90 * 10**9})
    await redis.hset(keys.epoch_meta("SPX", "e1"), "promoted_ns", NOW_NS - 30 * 10**9)
    model = PublishedModel("SPX", "heatmap:butterfly", "e1", 12, NOW_NS - 2_500_000_000, {})
    await redis.set(keys.heatmap_model("SPX", "butterfly"), encode(model))
    gex = PublishedModel("NDX", "gex", "e2", 3, NOW_NS - 7 * 10**9, {"a": 1})
    await redis.set(keys.gex_model("NDX"), encode(gex))
    await redis.set(keys.WS_LAST_EVENT, NOW_NS - 4_200_000_000)

    m = monitor(deps, clock)
    assert not m.ready
    assert await m.poll_once()
    assert m.ready

    assert val(registry, "massive_stream_length", stream=keys.WS_STREAM) == 10
    ws = {"stream": keys.WS_STREAM, "group": keys.HYDRATOR_GROUP}
    assert val(registry, "massive_stream_group_lag", **ws) == 6
    assert val(registry, "massive_stream_group_pending", **ws) == 3
    assert val(registry, "massive_stream_group_consumers", **ws) == 1
    assert val(registry, "massive_stream_group_lag_unknown", **ws) == 0
    for s, lag in (("single", 0), ("vertical", 7), ("butterfly", 7)):
        lbl = {"stream": keys.contracts_dirty_stream("SPX"), "group": keys.tile_builder_group(s)}
        assert val(registry, "massive_stream_group_lag", **lbl) == lag
    assert val(registry, "massive_stream_length", stream=tiles) == 3
    assert val(registry, "massive_dead_letter_length", stream=keys.WS_STREAM) == 2
    assert val(registry, "massive_dead_letter_length", stream=keys.CHAIN_STREAM) is None
    assert val(registry, "massive_epoch_active_age_seconds", symbol="SPX") == 30
    assert val(registry, "massive_epoch_active_age_seconds", symbol="NDX") is None
    hb = {"symbol": "SPX", "model": "heatmap:butterfly"}
    assert val(registry, "massive_model_publish_age_seconds", **hb) == 2.5
    assert val(registry, "massive_model_version", **hb) == 12
    gx = {"symbol": "NDX", "model": "gex"}
    assert val(registry, "massive_model_publish_age_seconds", **gx) == 7
    assert val(registry, "massive_model_version", **gx) == 3
    assert val(registry, "massive_model_version", symbol="SPX", model="gex") is None
    assert val(registry, "massive_ws_last_event_age_seconds") == pytest.approx(4.2)
    assert val(registry, "massive_monitor_polls_total") == 1
    assert val(registry, "massive_monitor_last_poll_timestamp_seconds") == NOW_NS / 1e9

    # Time passes (ages grow with the injected clock) and the hydrator catches up.
    clock.advance(10)
    res = await redis.xreadgroup(keys.HYDRATOR_GROUP, "c2", {keys.WS_STREAM: ">"}, count=100)
    await redis.xack(keys.WS_STREAM, keys.HYDRATOR_GROUP, *[e for e, _ in res[0][1]])
    assert await m.poll_once()
    assert val(registry, "massive_stream_group_lag", **ws) == 0
    assert val(registry, "massive_stream_group_pending", **ws) == 3
    assert val(registry, "massive_stream_group_consumers", **ws) == 2
    assert val(registry, "massive_model_publish_age_seconds", **hb) == 12.5
    assert val(registry, "massive_ws_last_event_age_seconds") == pytest.approx(14.2)
    assert val(registry, "massive_epoch_active_age_seconds", symbol="SPX") == 40


@settings(max_examples=300, deadline=None)
@given(
    symbol=st.text(max_size=40),
    kind=st.text(max_size=40),
    epoch=st.text(max_size=300),
    version=st.integers(0, 2**62),
    ts_ns=st.integers(0, 2**63 - 1),
    raw=st.booleans(),
)
def test_model_stamp_from_the_key_prefix_is_exact_or_declined(
    symbol: str, kind: str, epoch: str, version: int, ts_ns: int, raw: bool
) -> None:
    items = {"k": msgspec.Raw(b"1")} if raw else {"k": 1}
    cls = RawModel if raw else PublishedModel
    blob = encode(cls(symbol, kind, epoch, version, ts_ns, items))  # type: ignore[arg-type]
    got = _stamp(blob[:STAMP_PREFIX_BYTES])
    if got is not None:  # never a wrong stamp; declined only for unusual strings
        assert (got.version, got.ts_ns) == (version, ts_ns)
    elif len(blob[: blob.index(b',"items"')]) < STAMP_PREFIX_BYTES:
        assert any(c in symbol + kind + epoch for c in '"\\') or not (
            (symbol + kind + epoch).isprintable()
        )


async def test_model_stamps_are_read_from_a_key_prefix_not_the_whole_model(
    redis: Redis, deps: Deps, registry: CollectorRegistry
) -> None:
    items = {
        f"SPX:2026-12-18:butterfly:{k}-{k + 5}-{k + 10}:C": {"debit": 1.25} for k in range(20_000)
    }
    big = PublishedModel("SPX", "heatmap:butterfly", "e1", 41, NOW_NS - 3 * 10**9, items)
    await redis.set(keys.heatmap_model("SPX", "butterfly"), encode(big))
    odd = PublishedModel('S"PX', "gex", "e2", 7, NOW_NS - 10**9, {})  # declined: read whole
    await redis.set(keys.gex_model("SPX"), encode(odd))
    await redis.config_resetstat()
    m = monitor(deps, ManualClock(NOW_NS), symbols=("SPX",))
    assert await m.poll_once()
    lbl = {"symbol": "SPX", "model": "heatmap:butterfly"}
    assert val(registry, "massive_model_version", **lbl) == 41
    assert val(registry, "massive_model_publish_age_seconds", **lbl) == 3.0
    assert val(registry, "massive_model_version", symbol="SPX", model="gex") == 7
    stats = await redis.info("commandstats")
    assert stats["cmdstat_getrange"]["calls"] == 4  # 3 heatmap models + gex
    # the odd model, the WS last-event key, the symbol's active-epoch pointer
    assert stats["cmdstat_get"]["calls"] == 3


async def test_nil_lag_is_nan_and_flagged_not_zero(
    redis: Redis, deps: Deps, registry: CollectorRegistry
) -> None:
    await fill(redis, keys.CHAIN_STREAM, 5)
    await consume(redis, keys.CHAIN_STREAM, keys.NORMALIZER_GROUP, n=5, ack=5)
    second = (await redis.xrange(keys.CHAIN_STREAM))[1][0]
    # The pitfall: SETID without ENTRIESREAD leaves Redis unable to compute the lag.
    await redis.xgroup_setid(keys.CHAIN_STREAM, keys.NORMALIZER_GROUP, second)
    m = monitor(deps, ManualClock())
    assert await m.poll_once()
    lbl = {"stream": keys.CHAIN_STREAM, "group": keys.NORMALIZER_GROUP}
    lag = val(registry, "massive_stream_group_lag", **lbl)
    assert lag is not None and math.isnan(lag)
    assert val(registry, "massive_stream_group_lag_unknown", **lbl) == 1
    # The CLI's reset (ENTRIESREAD) makes it known again.
    await admin.reset_offset(redis, keys.CHAIN_STREAM, keys.NORMALIZER_GROUP, second.decode())
    assert await m.poll_once()
    assert val(registry, "massive_stream_group_lag", **lbl) == 3
    assert val(registry, "massive_stream_group_lag_unknown", **lbl) == 0


async def test_vanished_series_are_removed_and_bad_input_is_counted(
    redis: Redis, deps: Deps, registry: CollectorRegistry
) -> None:
    await fill(redis, keys.SPOT_STREAM, 2)
    await consume(redis, keys.SPOT_STREAM, "g", n=1, ack=0)
    await redis.set(keys.heatmap_model("SPX", "single"), b"{not json")
    await redis.set(keys.WS_LAST_EVENT, NOW_NS)
    m = monitor(deps, ManualClock(NOW_NS))
    assert await m.poll_once()
    assert val(registry, "massive_stream_group_pending", stream=keys.SPOT_STREAM, group="g") == 1
    assert val(registry, "massive_monitor_poll_errors_total", reason="bad_model") == 1
    assert val(registry, "massive_model_version", symbol="SPX", model="heatmap:single") is None
    assert val(registry, "massive_ws_last_event_age_seconds") == 0

    await redis.delete(keys.SPOT_STREAM, keys.WS_LAST_EVENT)
    assert await m.poll_once()
    assert val(registry, "massive_stream_length", stream=keys.SPOT_STREAM) is None
    assert val(registry, "massive_stream_group_pending", stream=keys.SPOT_STREAM, group="g") is None
    age = val(registry, "massive_ws_last_event_age_seconds")
    assert age is not None and math.isnan(age)

    # A key of the wrong type fails the poll (counted), keeps the last values, no crash.
    await fill(redis, keys.CONTROL_STREAM, 4)
    assert await m.poll_once()
    await redis.set(keys.WS_LAST_EVENT, b"yesterday")
    assert not await m.poll_once()
    assert val(registry, "massive_monitor_poll_errors_total", reason="ValueError") == 1
    assert val(registry, "massive_stream_length", stream=keys.CONTROL_STREAM) == 4
    assert val(registry, "massive_monitor_polls_total") == 3


async def test_scan_pattern_adds_streams_and_build_reads_env(
    redis: Redis, deps: Deps, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fill(redis, "massive:extra:stream", 3)
    await redis.set("massive:extra:string", b"x")
    monkeypatch.setenv("MASSIVE_MONITOR_SCAN_PATTERN", "massive:extra:*")
    monkeypatch.setenv("MASSIVE_MONITOR_INTERVAL_S", "0.05")
    m = build(deps, None)
    assert m.settings.interval_s == 0.05
    assert await m.poll_once()
    assert val(registry, "massive_stream_length", stream="massive:extra:stream") == 3
    with pytest.raises(ValueError):
        build(deps, "extra")


async def test_run_loop_serves_metrics_and_readiness_over_http(
    redis: Redis, settings: RuntimeSettings, registry: CollectorRegistry
) -> None:
    await fill(redis, keys.WS_STREAM, 4)
    await consume(redis, keys.WS_STREAM, keys.HYDRATOR_GROUP, n=1, ack=1)
    port = free_port()
    s = RuntimeSettings(redis_url=settings.redis_url, consumer="m", metrics_port=port)
    deps = Deps(redis=redis, settings=s, registry=registry)
    m = Monitor(deps, MonitorSettings(interval_s=0.05))
    stop = asyncio.Event()
    task = asyncio.create_task(run_processors(deps, [m], stop, install_signals=False))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

        async def ready() -> bool:
            try:
                return (await http.get("/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(ready)
        assert (await http.get("/healthz")).status_code == 200

        async def scraped_lag() -> float | None:
            text = (await http.get("/metrics")).text
            for fam in text_string_to_metric_families(text):
                for smp in fam.samples:
                    if smp.name == "massive_stream_group_lag" and smp.labels == {
                        "stream": keys.WS_STREAM,
                        "group": keys.HYDRATOR_GROUP,
                    }:
                        return smp.value
            return None

        assert await scraped_lag() == 3
        await fill(redis, keys.WS_STREAM, 2)

        async def lag5() -> bool:
            return await scraped_lag() == 5

        await eventually(lag5)
    stop.set()
    await asyncio.wait_for(task, 5)


# --- a real Prometheus server scrapes the monitor -------------------------------------

PROMETHEUS = shutil.which("prometheus")


class PrometheusServer:
    """``prometheus`` on a free loopback port, temp config and data dir, 1 s scrapes."""

    def __init__(self, target: str) -> None:
        assert PROMETHEUS is not None
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="massive-prom-")
        cfg = Path(self.dir, "prometheus.yml")
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "rule_files:\n"
            f"  - {ROOT / 'deploy/grafana/alerts.rules.yml'}\n"
            "scrape_configs:\n"
            "  - job_name: massive\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.log = open(Path(self.dir, "prometheus.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={self.dir}/data",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def metrics_port() -> int:
    return free_port()


@pytest.fixture
def prometheus(metrics_port: int) -> Iterator[PrometheusServer]:
    if PROMETHEUS is None:
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    srv = PrometheusServer(f"127.0.0.1:{metrics_port}")
    yield srv
    srv.stop()


def dashboard_queries() -> list[str]:
    dash = json.loads((ROOT / "deploy/grafana/massive-pipeline.json").read_text())
    out = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            # Grafana variables -> concrete values a plain Prometheus understands.
            expr = t["expr"].replace("$__rate_interval", "1m").replace("$__range", "5m")
            out.append(re.sub(r"\$\{?(\w+)\}?", ".*", expr))
    return out


@pytest.mark.slow
async def test_prometheus_scrapes_monitor_and_lag_is_queryable(
    redis: Redis,
    settings: RuntimeSettings,
    registry: CollectorRegistry,
    metrics_port: int,
    prometheus: PrometheusServer,
) -> None:
    await fill(redis, keys.WS_STREAM, 9)
    await consume(redis, keys.WS_STREAM, keys.HYDRATOR_GROUP, n=2, ack=2)
    s = RuntimeSettings(redis_url=settings.redis_url, consumer="m", metrics_port=metrics_port)
    deps = Deps(redis=redis, settings=s, registry=registry)
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_processors(
            deps, [Monitor(deps, MonitorSettings(interval_s=0.2))], stop, install_signals=False
        )
    )
    query = f'massive_stream_group_lag{{stream="{keys.WS_STREAM}",group="{keys.HYDRATOR_GROUP}"}}'
    try:
        async with httpx.AsyncClient(base_url=prometheus.url, timeout=5) as http:

            async def series(q: str) -> list[dict[str, object]]:
                try:
                    r = await http.get("/api/v1/query", params={"query": q})
                except httpx.TransportError:
                    return []
                if r.status_code == 503:  # still starting (TSDB, WAL replay)
                    return []
                body = r.json()
                assert body["status"] == "success", body
                res: list[dict[str, object]] = body["data"]["result"]
                return res

            found = await eventually(lambda: series(query), timeout_s=30, interval_s=0.25)
            assert found[0]["value"][1] == "7"  # type: ignore[index]
            await fill(redis, keys.WS_STREAM, 5)

            async def lag12() -> bool:
                res = await series(query)
                return bool(res) and res[0]["value"][1] == "12"  # type: ignore[index]

            await eventually(lag12, timeout_s=30, interval_s=0.25)
            up = await series('up{job="massive"}')
            assert up[0]["value"][1] == "1"  # type: ignore[index]

            # Every dashboard expression is valid PromQL for this Prometheus.
            for q in dashboard_queries():
                r = await http.get("/api/v1/query", params={"query": q})
                assert r.json()["status"] == "success", (q, r.text)

            # The alert rules file loaded and its rules are evaluated against this data.
            async def rules_ok() -> list[dict[str, object]]:
                body = (await http.get("/api/v1/rules")).json()
                groups: list[dict[str, object]] = body["data"]["groups"]
                return groups

            groups = await eventually(rules_ok, timeout_s=10)
            rules = [r for g in groups for r in g["rules"]]  # type: ignore[attr-defined]
            assert rules and all(r["health"] in ("ok", "unknown") for r in rules), rules
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
