"""A stock and an ETF end to end (issue 18): ``MASSIVE_SYMBOLS=SPY,AAPL`` against
``simulate --symbols SPY,AAPL``, every processor of the path as its own process
(chain-poller, ws-ingest, normalizer, hydrator, tile-builder:vertical, publisher:vertical,
gex, sse-gateway): the gateway publishes ``/api/heatmap/vertical?symbol=SPY`` and
``/api/gex?symbol=AAPL`` with versions > 0, SPY's GEX has strikes, and the spots come from
the chains' ``underlying_asset.price`` and the ``/stocks`` feed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from schemas import keys
from simulator.server import SimConfig, SimServer
from tests import harness as h
from tests.util import eventually, free_port

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

SPECS = (
    *h.INGEST,
    "normalizer",
    "hydrator",
    "tile-builder:vertical",
    "publisher:vertical",
    "gex",
    "sse-gateway",
)
SYMBOLS = "SPY,AAPL"


async def test_spy_and_aapl_publish_heatmap_and_gex(tmp_path: Path) -> None:
    srv = h.redis_server()
    sim = SimServer(SimConfig(seed=5, symbols=("SPY", "AAPL"), events_per_s=600.0))
    await sim.start()
    r = h.resilient_client(srv.url)
    gw_port = free_port()
    env = h.sim_env(
        sim.rest_url,
        sim.ws_url,
        sim.config.api_key,
        MASSIVE_SYMBOLS=SYMBOLS,
        MASSIVE_POLLER_EXPIRATIONS="2",
        MASSIVE_POLLER_BAND_POINTS="0",
        MASSIVE_POLLER_BAND_PCT="0.05",
        MASSIVE_POLLER_FULL_INTERVAL_S="20",
    )
    per = {"sse-gateway": {"MASSIVE_SSE_PORT": str(gw_port), "MASSIVE_SSE_HOST": "127.0.0.1"}}
    api = f"http://127.0.0.1:{gw_port}"
    got: dict[str, Any] = {}
    try:
        async with h.pipeline(srv.url, tmp_path, SPECS, extra_env=env, per_env=per) as p:
            for sym in ("SPY", "AAPL"):
                await h.wait_epoch(r, sym, timeout_s=60)
            async with httpx.AsyncClient(timeout=5) as c:

                async def published() -> bool:
                    for path in ("/api/heatmap/vertical?symbol=SPY", "/api/gex?symbol=AAPL",
                                 "/api/gex?symbol=SPY"):  # fmt: skip
                        resp = await c.get(api + path)
                        if resp.status_code != 200:
                            return False
                        got[path] = resp.json()
                    return all(m.get("version", 0) > 0 and m.get("items") for m in got.values())

                await eventually(published, timeout_s=120, interval_s=0.5)
                symbols_info = (await c.get(api + "/api/symbols")).json()

            async def stock_events() -> bool:  # the /stocks feed may follow the first models
                seen = await p.metrics("hydrator")
                return h.metric_sum(seen, "massive_hydrator_events_total", kind="stock") > 0

            await eventually(stock_events, timeout_s=60, interval_s=0.5)
            spot = {k.decode(): v.decode() for k, v in (await r.hgetall(keys.SPOT_LATEST)).items()}
            hyd = await p.metrics("hydrator")
            poller = await p.metrics("chain-poller")
            ws = await p.metrics("ws-ingest")
            logs = {s: p.log_tail(s, 5) for s in p.procs if p.procs[s].exits}
    finally:
        await r.aclose()
        await sim.stop()
        srv.stop()
    assert not logs, logs
    heat = got["/api/heatmap/vertical?symbol=SPY"]
    assert heat["symbol"] == "SPY" and all(t.startswith("SPY:") for t in heat["items"])
    widths = {round(float(t.split(":")[3].split("-")[1]) - float(t.split(":")[3].split("-")[0]), 3)
              for t in heat["items"]}  # fmt: skip
    assert widths == {1.0, 2.0, 3.0, 4.0, 5.0, 10.0}  # SPY's spec widths
    gex_spy, gex_aapl = got["/api/gex?symbol=SPY"], got["/api/gex?symbol=AAPL"]
    assert len(gex_spy["items"]) > 20 and gex_aapl["version"] > 0
    for g in (gex_spy, gex_aapl):
        assert g["meta"]["params"]["multiplier"] == 100.0
        assert g["meta"]["params"]["exercise"] == "american"
        assert g["meta"]["spot"] > 0
    assert gex_spy["meta"]["params"]["div_yield"] == 0.012  # SPY's spec
    # spots: the chains' underlying_asset.price and the /stocks feed
    assert float(spot["SPY"]) == pytest.approx(sim.market.indices["SPY"].value, rel=0.02)
    assert float(spot["AAPL"]) == pytest.approx(sim.market.indices["AAPL"].value, rel=0.02)
    assert h.metric_sum(hyd, "massive_hydrator_events_total", kind="stock") > 0
    assert h.metric_sum(ws, "massive_ws_ingest_connections_total", feed="stocks") >= 1
    assert h.metric_sum(ws, "massive_ws_ingest_connections_total", feed="indices") == 0
    assert h.metric_sum(poller, "massive_chain_poller_fetches_total", outcome="ok") > 0
    assert h.metric_sum(poller, "massive_chain_poller_errors_total") == 0
    # metrics name the configured symbols, never "other"
    assert h.metric_sum(hyd, "massive_hydrator_epoch_refresh_total", symbol="AAPL") >= 1
    assert h.metric_sum(hyd, "massive_hydrator_epoch_refresh_total", symbol="other") == 0
    # the dashboard's symbol picker offers the configured symbols (and the active ones)
    assert symbols_info["symbols"] == ["SPY", "AAPL"] and set(symbols_info["active"]) == {
        "SPY",
        "AAPL",
    }
