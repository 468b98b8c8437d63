"""Redis outages survived in-process, with NO supervisor: nobody restarts what exits.

* kill -9 of Redis and a restart from its AOF while every processor of the live pipeline
  (simulator -> chain-poller, ws-ingest -> ... -> publishers, GEX, monitor, SSE gateway) runs
  as its own process: no process exits, heatmap and GEX versions advance within 10 s of the
  restart, and the HTTP API answers (never a 500).
* a lossy restart (SAVE, publish on, kill -9, restart from that older RDB: a failover that
  lost its last writes does the same): the publishers re-issue versions Redis lost with other
  content; every connected SSE client, which holds versions that no longer exist, must end
  equal to ``/api`` (the diff chain's ``prev_id`` tells it apart, and the gateway resyncs):
  the Python SSE client of the tests, and the dashboard page in headless Chromium (its live
  models read through ``window.__model()``) when Chromium and Playwright are installed.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from schemas import keys
from tests import browser
from tests import harness as h
from tests.sse_client import ModelClient
from tests.util import eventually, free_port

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

HEATMAP = ("single", "vertical", "butterfly")
ALL_SPECS = (
    *h.INGEST,
    "normalizer",
    "hydrator",
    *(f"tile-builder:{s}" for s in HEATMAP),
    *(f"publisher:{s}" for s in HEATMAP),
    "gex",
    "monitor",
    "sse-gateway",
)


def _sim() -> Any:
    from simulator.market import MarketConfig
    from simulator.server import SimConfig, SimServer

    return SimServer(
        SimConfig(seed=11, symbols=("SPX",), events_per_s=1500.0, market=MarketConfig())
    )


async def _versions(r: Redis) -> dict[str, int]:
    """Published versions: the heatmap version keys (the model key is a checkpoint that may
    trail them by seconds) and the GEX model."""
    names = [keys.heatmap_version("SPX", s) for s in HEATMAP]
    raw = await r.mget(names)
    out = {n: int(v or 0) for n, v in zip(names, raw, strict=True)}
    gex = (await h.published_models(r))[keys.gex_model("SPX")]
    out[keys.gex_model("SPX")] = gex.version if gex else 0
    return out


def _exits(p: h.Pipeline) -> dict[str, int]:
    return {s: rc for s, pr in p.procs.items() if (rc := pr.exited()) is not None}


async def test_redis_restart_from_aof_without_supervisor(tmp_path: Path) -> None:
    srv = h.redis_server(aof=True)
    sim = _sim()
    await sim.start()
    r = h.resilient_client(srv.url)
    gw_port = free_port()
    env = h.sim_env(sim.rest_url, sim.ws_url, sim.config.api_key)
    per = {"sse-gateway": {"MASSIVE_SSE_PORT": str(gw_port), "MASSIVE_SSE_HOST": "127.0.0.1"}}
    api = f"http://127.0.0.1:{gw_port}"
    try:
        async with h.pipeline(
            srv.url, tmp_path, ALL_SPECS, extra_env=env, per_env=per, supervise=False
        ) as p:
            await h.wait_epoch(r)

            async def all_published() -> bool:
                v = await _versions(r)
                return all(n > 1 for n in v.values())  # past the epoch's first publish

            await eventually(all_published, timeout_s=90, interval_s=0.2)
            before = await _versions(r)
            srv.restart()  # SIGKILL, then start on the same port and dir (AOF replayed)
            t_up = time.monotonic()

            async def advanced() -> dict[str, int] | None:
                now = await _versions(r)
                return now if all(now[k] > before[k] for k in now) else None

            after = await eventually(advanced, timeout_s=30, interval_s=0.1)
            took_s = time.monotonic() - t_up
            async with httpx.AsyncClient(timeout=5) as c:
                for path in ("/api/heatmap/single?symbol=SPX", "/api/gex?symbol=SPX"):
                    resp = await c.get(api + path)
                    assert resp.status_code == 200, (path, resp.status_code, resp.text[:200])
            exits = _exits(p)
            logs = {s: p.log_tail(s) for s in exits}
            outages = {
                s: h.metric_sum(await p.metrics(s), "massive_redis_errors_total")
                for s in ("publisher:butterfly", "gex")
            }
    finally:
        await r.aclose()
        await sim.stop()
        srv.stop()
    assert not exits, (exits, logs)
    print(f"versions {before} -> {after} within {took_s:.2f}s of the restart; {outages}")
    assert took_s <= 10.0, f"versions advanced only {took_s:.1f}s after the restart"


async def test_lossy_restart_leaves_no_client_on_a_rewritten_history(tmp_path: Path) -> None:
    """SAVE at some version, publish on (the clients apply those versions), kill -9 and
    restart from that RDB. The publishers re-issue the lost versions with other content;
    every connected client must end equal to /api."""
    srv = h.DurableRedis()  # no AOF: a restart loads the last SAVE (dump.rdb)
    srv.start()
    sim = _sim()
    await sim.start()
    r = h.resilient_client(srv.url)
    gw_port = free_port()
    env = h.sim_env(sim.rest_url, sim.ws_url, sim.config.api_key)
    per = {"sse-gateway": {"MASSIVE_SSE_PORT": str(gw_port), "MASSIVE_SSE_HOST": "127.0.0.1"}}
    api = f"http://127.0.0.1:{gw_port}"
    channels = [f"heatmap/{s}" for s in HEATMAP] + ["gex"]
    clients = [ModelClient(api, ch, "SPX") for ch in channels]
    no_browser = browser.missing()
    if no_browser:
        warnings.warn(f"lossy restart: the browser page is not checked: {no_browser}", stacklevel=1)
    page_errors: list[str] = []
    stack = contextlib.AsyncExitStack()
    try:
        async with h.pipeline(
            srv.url, tmp_path, ALL_SPECS, extra_env=env, per_env=per, supervise=False
        ) as p:
            await h.wait_epoch(r)
            for c in clients:
                c.start()
            page = await _open_page(stack, no_browser, page_errors, api)
            await eventually(
                lambda: _true(all(c.version > 0 for c in clients)), timeout_s=90, interval_s=0.2
            )
            if page is not None:
                await eventually(lambda: _page_versions(page, 1), timeout_s=30)
            await r.save()
            page_mark = await _page_versions(page, 0) if page is not None else None
            saved = await _versions(r)
            # publish on: the clients take versions that the RDB will not have
            for c in clients:
                c.mark()
            await eventually(
                lambda: _true(all(c.version >= c.version_at_mark + 3 for c in clients)),
                timeout_s=60,
                interval_s=0.1,
            )
            lost = {c.channel: c.version for c in clients}
            if page is not None:  # the page too holds versions the RDB will not have
                assert page_mark is not None
                page_lost = await eventually(
                    lambda: _page_versions(page, {k: v + 3 for k, v in page_mark.items()}),
                    timeout_s=30,
                )
            srv.kill()
            srv.start()  # loads dump.rdb: the versions after the SAVE are gone
            restored = await _versions(r)
            # the pipeline goes on; stop the market so everything settles, then compare
            await eventually(
                lambda: _true(all(c.version > lost[c.channel] for c in clients)),
                timeout_s=60,
                interval_s=0.2,
            )
            exits = _exits(p)
            _stop_feed(p)  # so the models settle
            await h.wait_settled(r, timeout_s=90)
            async with httpx.AsyncClient(timeout=10) as http:

                async def clients_equal_api() -> list[str]:
                    bad = await _client_differences(http, api, clients)
                    if page is not None:
                        bad += await _page_differences(http, api, page)
                    return bad

                async def converged() -> bool:
                    return not await clients_equal_api()

                try:
                    await eventually(converged, timeout_s=30, interval_s=0.3)
                except AssertionError:
                    raise AssertionError(await clients_equal_api()) from None
    finally:
        await stack.aclose()
        for c in clients:
            await c.stop()
        await r.aclose()
        await sim.stop()
        srv.stop()
    print(f"saved {saved}; clients had {lost}; restored {restored}")
    if not no_browser:
        print(f"the page had {page_lost}")
        assert not page_errors, page_errors
    print({c.channel: (c.snapshots, c.chain_breaks) for c in clients})
    # the restore took away versions each client held: it must have been re-based (a fresh
    # snapshot) rather than having skipped the re-issued ones as "seen"
    assert all(c.snapshots >= 2 for c in clients), {c.channel: c.snapshots for c in clients}
    assert all(c.chain_breaks == 0 for c in clients), {c.channel: c.chain_breaks for c in clients}
    assert not exits, exits


def _stop_feed(p: h.Pipeline) -> None:
    for spec in h.INGEST:
        p.procs[spec].popen.terminate()  # type: ignore[union-attr]


async def _open_page(
    stack: contextlib.AsyncExitStack, no_browser: str | None, errors: list[str], api: str
) -> Any:
    """The dashboard page on ``api`` (closed with ``stack``); None without a browser."""
    if no_browser:
        return None
    page = await stack.enter_async_context(browser.open_page(errors))
    await page.goto(api + "/?symbol=SPX")
    return page


async def _client_differences(
    http: httpx.AsyncClient, api: str, clients: list[ModelClient]
) -> list[str]:
    """How each client's model differs from /api (empty: all equal)."""
    bad = []
    for c in clients:
        truth = (await http.get(f"{api}/api/{c.channel}?symbol=SPX")).json()
        if c.model is None or c.version != truth["version"]:
            bad.append(f"{c.channel}: client v{c.version} api v{truth['version']}")
        elif c.model["items"] != truth["items"]:
            bad.append(f"{c.channel}: items differ at v{c.version}")
    return bad


async def _page_differences(http: httpx.AsyncClient, api: str, page: Any) -> list[str]:
    """How each of the page's views differs from its /api twin (same path and view query)."""
    bad = []
    for name, view in (await browser.page_models(page)).items():
        truth = (await http.get(api + view["url"].replace("/sse/", "/api/"))).json()
        m = view["model"]
        # a view's version is the model version that last changed it
        if m is None or m["version"] > truth["version"]:
            got = m and m["version"]
            bad.append(f"page {name}: v{got} api v{truth['version']}")
        elif m["epoch"] != truth["epoch"] or m["items"] != truth["items"]:
            bad.append(f"page {name}: items differ at v{m['version']}")
    return bad


async def _true(v: bool) -> bool:
    return v


async def _page_versions(page: Any, at_least: int | dict[str, int]) -> dict[str, int] | None:
    """The page's model versions (by stream name) once each is at least ``at_least`` (one
    figure for all, or per name)."""
    models = await browser.page_models(page)
    vs = {k: int((v["model"] or {}).get("version", 0)) for k, v in models.items()}
    low = at_least if isinstance(at_least, dict) else dict.fromkeys(vs, at_least)
    return vs if all(v >= low[k] for k, v in vs.items()) else None
