"""Access control of the SSE gateway (processors/serve/access.py) against a real uvicorn
server and a real Redis: bearer tokens, connection caps, the admin port, security headers,
and 503 (never 500) while Redis is loading or just restarted."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from processors.serve.access import CSP, Tokens, token_ok
from streams.clock import SystemClock
from streams.processor import Deps
from streams.redis_client import connect
from streams.settings import RuntimeSettings
from tests import browser
from tests.harness import DurableRedis
from tests.sse_publisher import FakeMarket, ModelWriter, publish_full
from tests.test_sse_gateway import SETTINGS, admin, base, gateway, metric
from tests.util import eventually

TOKEN = "t0k3n-right"


@contextlib.asynccontextmanager
async def stream(
    http: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None
) -> AsyncIterator[httpx.Response]:
    """An SSE request whose status is known once this yields (the body stays open)."""
    async with http.stream("GET", url, headers=headers or {}) as resp:
        yield resp


async def test_bearer_token_auth(deps: Deps, redis: Redis, tmp_path: Path) -> None:
    await publish_full(ModelWriter(redis), FakeMarket("SPX"), 1)
    token_file = tmp_path / "tokens"
    token_file.write_text("# rotated 2026-12-01\nfrom-file\n")
    settings = replace(SETTINGS, tokens=(TOKEN,), token_file=str(token_file))
    assert TOKEN not in repr(settings)  # settings may be logged; tokens never
    async with gateway(deps, settings) as gw, httpx.AsyncClient(base_url=base(gw)) as http:
        for path in ("/sse/gex?symbol=SPX", "/api/gex?symbol=SPX", "/api/symbols"):
            r = await http.get(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"].startswith("Bearer")
            bad = await http.get(path, headers={"Authorization": "Bearer nope"})
            assert bad.status_code == 401, path
            bad = await http.get(path + "&access_token=nope" if "?" in path else path)
            assert bad.status_code == 401, path
        ok = await http.get("/api/gex?symbol=SPX", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json()["kind"] == "gex"
        ok = await http.get("/api/gex?symbol=SPX", headers={"Authorization": "Bearer from-file"})
        assert ok.status_code == 200
        # EventSource cannot set headers: the token rides in the query
        async with stream(http, f"/sse/gex?symbol=SPX&access_token={TOKEN}") as resp:
            assert resp.status_code == 200
            async for chunk in resp.aiter_bytes():
                if b"event: snapshot" in chunk:
                    break
        hdr = {"Authorization": f"Bearer {TOKEN}"}
        async with stream(http, "/sse/gex?symbol=SPX", hdr) as resp:
            assert resp.status_code == 200
        # the page, its files and the liveness probe hold no data: open
        for path in ("/", "/static/app.js", "/healthz"):
            assert (await http.get(path)).status_code == 200, path
        rejected = 'massive_sse_http_rejected_total{reason="unauthorized"}'
        assert await metric(gw, rejected) == 9


def test_tokens_constant_time_check_and_file_rotation(tmp_path: Path) -> None:
    assert token_ok("a", (b"b", b"a")) and not token_ok("a", (b"b",))
    assert not token_ok(None, (b"a",)) and not token_ok("", (b"a",))
    assert Tokens((" a ", "")).current() == (b"a",) and not Tokens().enabled
    with pytest.raises(ValueError, match="token file") as err:
        Tokens((), str(tmp_path / "missing"))
    assert "missing" in str(err.value)
    f = tmp_path / "tokens"
    f.write_text("")
    empty = Tokens((), str(f))
    assert empty.enabled and empty.current() == ()  # a configured file: closed, not open
    f.write_text("old\n")
    tokens = Tokens(("fixed",), str(f))
    assert tokens.current() == (b"fixed", b"old")
    # a Secret update swaps the file: the new tokens apply without a restart
    new = tmp_path / "tokens.new"
    new.write_text("# rotated\nnew-1\nnew-2\n")
    new.replace(f)
    assert tokens.current() == (b"fixed", b"new-1", b"new-2")
    f.unlink()  # unreadable later: the last tokens stay
    assert tokens.current() == (b"fixed", b"new-1", b"new-2")


async def test_connection_caps_give_429_and_free_on_disconnect(deps: Deps, redis: Redis) -> None:
    await publish_full(ModelWriter(redis), FakeMarket("SPX"), 1)
    settings = replace(SETTINGS, max_clients=3, max_per_ip=2, trusted_proxy_hops=1)
    url = "/sse/gex?symbol=SPX"

    def ip(addr: str) -> dict[str, str]:
        # what the Ingress appends after whatever the client sent
        return {"X-Forwarded-For": f"203.0.113.99, {addr}"}

    async with (
        gateway(deps, settings) as gw,
        httpx.AsyncClient(base_url=base(gw), timeout=httpx.Timeout(10, read=None)) as http,
        contextlib.AsyncExitStack() as open_streams,
    ):
        a1 = await open_streams.enter_async_context(stream(http, url, ip("10.0.0.1")))
        a2 = await open_streams.enter_async_context(stream(http, url, ip("10.0.0.1")))
        assert a1.status_code == a2.status_code == 200
        over_ip = await http.get(url, headers=ip("10.0.0.1"))
        assert over_ip.status_code == 429 and over_ip.headers["retry-after"] == "2"
        async with stream(http, url, ip("10.0.0.2")) as b1:
            assert b1.status_code == 200  # another client IP has its own allowance
            full = await http.get(url, headers=ip("10.0.0.3"))
            assert full.status_code == 429 and "retry-after" in full.headers
            assert await metric(gw, "massive_sse_connections") == 3
        # b1 disconnected: its slot is free again

        async def slot_freed() -> bool:
            return await metric(gw, "massive_sse_connections") == 2

        await eventually(slot_freed)
        async with stream(http, url, ip("10.0.0.3")) as c1:
            assert c1.status_code == 200
        rejected = "massive_sse_http_rejected_total"
        assert await metric(gw, rejected + '{reason="per_ip_limit"}') == 1
        assert await metric(gw, rejected + '{reason="over_capacity"}') == 1
        # JSON requests are not streams: no slot needed
        assert (await http.get("/api/gex?symbol=SPX", headers=ip("10.0.0.1"))).status_code == 200


async def test_admin_port_and_security_headers(deps: Deps, redis: Redis) -> None:
    await publish_full(ModelWriter(redis), FakeMarket("SPX"), 1)
    async with gateway(deps) as gw, httpx.AsyncClient() as http:
        assert gw.admin_port not in (gw.port, 0, -1)
        for path in ("/metrics", "/api/epochs", "/readyz"):
            assert (await http.get(base(gw) + path)).status_code == 404, path
            assert (await http.get(admin(gw) + path)).status_code == 200, path
        assert (await http.get(admin(gw) + "/healthz")).text == "ok\n"
        assert (await http.get(admin(gw) + "/sse/gex?symbol=SPX")).status_code == 404
        for url in (
            base(gw) + "/",
            base(gw) + "/static/app.js",
            base(gw) + "/api/gex?symbol=SPX",
            base(gw) + "/api/gex?symbol=NOPE",  # errors too
            base(gw) + "/nothing",
            admin(gw) + "/metrics",
        ):
            h = (await http.get(url)).headers
            assert h["content-security-policy"] == CSP, url
            assert "frame-ancestors 'none'" in h["content-security-policy"]
            assert h["x-content-type-options"] == "nosniff"
            assert h["referrer-policy"] == "no-referrer"
        async with stream(http, base(gw) + "/sse/gex?symbol=SPX") as resp:
            assert resp.headers["x-content-type-options"] == "nosniff"
    # no admin server unless asked for
    async with gateway(deps, replace(SETTINGS, admin_port=-1)) as gw:
        assert gw.admin_port == -1 and gw.admin_server is None


@pytest.mark.browser
@pytest.mark.skipif(browser.missing() is not None, reason=str(browser.missing()))
@pytest.mark.timeout(60)
async def test_page_under_csp_and_auth(deps: Deps, redis: Redis) -> None:
    """The dashboard works under its CSP (no violation; cells keep their colours) and passes
    its own URL's access_token to its streams and fetches."""
    await publish_full(ModelWriter(redis), FakeMarket("SPX", n_strikes=20), 1)
    errors: list[str] = []
    console: list[str] = []
    async with (
        gateway(deps, replace(SETTINGS, tokens=(TOKEN,))) as gw,
        browser.open_page(errors, console) as page,
    ):
        responses: list[tuple[str, int]] = []
        page.on("response", lambda r: responses.append((r.url, r.status)))
        await page.goto(f"{base(gw)}/?symbol=SPX&access_token={TOKEN}")
        await page.wait_for_selector('#status-heatmap[data-state="live"]', timeout=10_000)
        await page.wait_for_selector('#status-gex[data-state="live"]', timeout=10_000)
        await page.wait_for_selector("#heatmap td.cell[data-id]", timeout=10_000)
        bg = await page.eval_on_selector(
            "#heatmap td.cell[data-id]:not(.na)", "e => getComputedStyle(e).backgroundColor"
        )
        assert bg.startswith("rgb(") and bg != "rgba(0, 0, 0, 0)"
        # the header's epoch line comes from /api/symbols, fetched with the token
        await page.wait_for_function("document.getElementById('epoch').textContent !== ''")
        models = await browser.page_models(page)
        assert models["heatmap"]["model"]["version"] == 1
        # the GEX charts poll /api/gex and its history with the token too

        async def charts_polled() -> bool:
            return any("/api/gex/history" in u and st == 200 for u, st in responses)

        await eventually(charts_polled, timeout_s=15, interval_s=0.1)
        unauthorized = await metric(gw, 'massive_sse_http_rejected_total{reason="unauthorized"}')
    assert not [(u, st) for u, st in responses if st >= 400], responses
    assert unauthorized == 0
    assert not errors, errors
    assert not [c for c in console if "Content Security Policy" in c], console


# --- Redis loading or just restarted --------------------------------------------------------
def _start_without_waiting(srv: DurableRedis) -> None:
    """Start redis-server and return while it may still be loading its dataset
    (``RedisServer.start`` waits for a PONG, i.e. for the load to end)."""
    srv.proc = subprocess.Popen(srv.args, stdout=subprocess.DEVNULL)


def _loading(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"EXISTS x\r\n")
            return s.recv(64).startswith(b"-LOADING")
    except OSError:
        return False


@pytest.mark.timeout(90)
async def test_api_and_sse_answer_503_while_redis_loads_then_recover() -> None:
    # ~0.4 ms per key while loading, and clients answered (-LOADING) every 1 kB loaded: the
    # restart below stays in LOADING for a few seconds
    srv = DurableRedis("--key-load-delay", "400", "--loading-process-events-interval-bytes", "1024")
    srv.start()
    r = connect(srv.url)
    deps = Deps(
        redis=r,
        settings=RuntimeSettings(redis_url=srv.url, consumer="t", grace_s=5.0),
        registry=CollectorRegistry(),
        clock=SystemClock(),
    )
    try:
        writer = ModelWriter(r)
        await publish_full(writer, FakeMarket("SPX"), 1)
        pipe = r.pipeline(transaction=False)
        for i in range(8000):
            pipe.set(f"filler:{i}", "x")
        await pipe.execute()
        await r.save()
        async with gateway(deps) as gw, httpx.AsyncClient(base_url=base(gw), timeout=10) as http:
            assert (await http.get("/api/gex?symbol=SPX")).status_code == 200  # pooled conn
            srv.kill()
            _start_without_waiting(srv)
            await eventually(lambda: _true(_loading(srv.port)), timeout_s=10)
            for path in ("/api/heatmap/butterfly?symbol=SPX", "/sse/gex?symbol=SPX"):
                resp = await http.get(path)
                assert resp.status_code == 503, (path, resp.status_code, resp.text[:300])
                assert resp.headers["retry-after"] == "2"
                assert "redis unavailable" in resp.text
            unavailable = 'massive_sse_http_rejected_total{reason="redis_unavailable"}'
            assert await metric(gw, unavailable) == 2

            async def served() -> bool:
                return (await http.get("/api/gex?symbol=SPX")).status_code == 200

            await eventually(served, timeout_s=30, interval_s=0.2)
            # a plain crash and restart (Redis up again before the next request): the pooled
            # connections are dead; the request is retried on a fresh one, never a 500
            srv.kill()
            srv.start()  # returns once the dataset is loaded
            for path in ("/api/gex?symbol=SPX", "/api/heatmap/single?symbol=SPX"):
                resp = await http.get(path)
                assert resp.status_code == 200, (path, resp.status_code, resp.text[:300])
            async with stream(http, "/sse/gex?symbol=SPX") as resp:
                assert resp.status_code == 200
    finally:
        await r.aclose()
        srv.stop()


async def _true(v: bool) -> bool:
    return v
