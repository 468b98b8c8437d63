"""The dashboard in headless Chromium (Debian ``chromium`` driven by Playwright for Python):
the page loads, heatmap cells and GEX bars appear, change as diffs flow, survive a version
gap (fresh snapshot) and a screenshot lands in artifacts/.

Needs /usr/bin/chromium (``apt-get install -y chromium``) and ``pip install playwright``
(no ``playwright install``: the system Chromium is used)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from redis.asyncio import Redis

from streams.processor import Deps
from tests import browser
from tests.sse_publisher import FakeMarket, ModelWriter, publish_full, publish_step
from tests.test_sse_gateway import SETTINGS, base, gateway
from tests.util import free_port

if TYPE_CHECKING:
    from playwright.async_api import Page

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(browser.missing() is not None, reason=str(browser.missing())),
]


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    errors: list[str] = []
    async with browser.open_page(errors) as pg:
        yield pg
    assert not errors, errors


async def _cells(page: Page) -> dict[str, str]:
    out: dict[str, str] = await page.eval_on_selector_all(
        "#heatmap td.cell[data-id]",
        "els => Object.fromEntries(els.map(e => [e.dataset.id, e.textContent]))",
    )
    return out


async def _bars(page: Page) -> list[str]:
    out: list[str] = await page.eval_on_selector_all(
        "#gex rect.bar", "els => els.map(e => e.getAttribute('width'))"
    )
    return out


async def _version(page: Page, which: str) -> int:
    v = await page.get_attribute(f"#status-{which}", "data-version")
    return int(v) if v else 0


async def _until(page: Page, cond: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await cond():
        assert time.monotonic() < deadline, "page condition not met in time"
        await page.wait_for_timeout(50)


async def _feed(writer: ModelWriter, market: FakeMarket, steps: int) -> None:
    for _ in range(steps):
        await publish_step(writer, market, time.time_ns())
        await asyncio.sleep(0.05)


def _view_ids(items: dict[str, Any], expiry: str, right: str) -> set[str]:
    return {tid for tid, t in items.items() if t["expiry"] == expiry and t["right"] == right}


@pytest.mark.timeout(60)
async def test_dashboard_live_heatmap_and_gex(deps: Deps, redis: Redis, page: Page) -> None:
    writer = ModelWriter(redis)
    market = FakeMarket("SPX", n_strikes=40)
    await publish_full(writer, market, time.time_ns())
    async with gateway(deps, SETTINGS) as gw:
        await page.goto(base(gw) + "/")
        await page.wait_for_selector("#heatmap td.cell[data-id]", timeout=10_000)
        await page.wait_for_selector("#gex rect.bar", state="attached", timeout=10_000)
        await page.wait_for_selector('#status-heatmap[data-state="live"]')
        await page.wait_for_selector('#status-gex[data-state="live"]')
        cells0, bars0 = await _cells(page), await _bars(page)
        assert len(cells0) > 50 and len(bars0) > 10
        # the grid shows the model's butterfly calls of the first expiry
        model = writer.models[("SPX", "heatmap:butterfly")]
        expiry = min(t["expiry"] for t in model.items.values())
        shown = {tid for tid in cells0}
        assert shown == _view_ids(model.items, expiry, "C")
        for tid in list(shown)[:20]:
            assert _same(cells0[tid], model.items[tid]["debit"]), tid

        # live data: publish steps while the page is open
        task = asyncio.create_task(_feed(writer, market, 40))
        v0 = await _version(page, "heatmap")

        async def moved() -> bool:
            return (
                await _version(page, "heatmap") >= v0 + 10
                and await _cells(page) != cells0
                and await _bars(page) != bars0
            )

        await _until(page, moved, 20)
        await task
        last = writer.models[("SPX", "heatmap:butterfly")].version

        # after all diffs the page's grid equals the published model, cell for cell (the
        # view's version is the last one that changed the view: up to the model's)
        async def caught_up() -> bool:
            model = writer.models[("SPX", "heatmap:butterfly")]
            cells = await _cells(page)
            return 0 < await _version(page, "heatmap") <= last and all(
                _same(text, model.items[tid]["debit"]) for tid, text in cells.items()
            )

        await _until(page, caught_up)

        # a version gap makes the page fetch a fresh snapshot (no silent divergence)
        gap_v = last + 3
        await writer.publish(
            "SPX", "heatmap:butterfly", market.epoch, market.tiles("butterfly"), version=gap_v
        )

        async def resynced() -> bool:
            return await _version(page, "heatmap") == gap_v

        await _until(page, resynced)

        # switching the expiry re-subscribes: the grid shows exactly that view, and stays live
        model = writer.models[("SPX", "heatmap:butterfly")]
        second = sorted({t["expiry"] for t in model.items.values()})[1]
        await page.select_option("#expiry", second)

        def view_ids(expiry: str, right: str) -> set[str]:
            return _view_ids(writer.models[("SPX", "heatmap:butterfly")].items, expiry, right)

        async def switched() -> bool:
            return set(await _cells(page)) == view_ids(second, "C")

        await _until(page, switched)
        v1 = await _version(page, "heatmap")

        async def feed_until_view_moves() -> None:
            for _ in range(200):
                await publish_step(writer, market, time.time_ns())
                if await _version(page, "heatmap") > v1:
                    return
                await asyncio.sleep(0.05)

        await feed_until_view_moves()
        assert await _version(page, "heatmap") > v1

        async def live_view() -> bool:
            model = writer.models[("SPX", "heatmap:butterfly")]
            cells = await _cells(page)
            return set(cells) == view_ids(second, "C") and all(
                _same(text, model.items[tid]["debit"]) for tid, text in cells.items()
            )

        await _until(page, live_view)

        # controls: puts, convexity, GEX net / 0DTE
        await page.click('#right button[data-v="P"]')
        await page.click('#metric button[data-v="convexity"]')
        await _until(page, lambda: _has_put_cells(page))
        await page.click('#gex-view button[data-v="net"]')
        await page.wait_for_selector("#gex rect.bar.net-pos, #gex rect.bar.net-neg")
        await page.hover("#heatmap tr.atm td.cell[data-id]")
        await page.wait_for_selector("#tooltip:not([hidden])")
        assert "Debit" in (await page.inner_text("#tooltip"))
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "dashboard-puts-net.png"))
        # back to the default view for the main screenshot
        await page.click('#right button[data-v="C"]')
        await page.click('#metric button[data-v="r2r"]')
        await page.click('#gex-view button[data-v="split"]')
        await page.mouse.move(5, 5)
        await page.wait_for_timeout(300)
        await page.screenshot(path=str(ARTIFACTS / "dashboard.png"))
        assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def _same(text: str, value: float | None) -> bool:
    """A cell shows ``value`` with 2 decimals (JS toFixed may round halves differently)."""
    if value is None:
        return text == "—"
    return abs(float(text) - value) <= 0.005 + 1e-9


async def _has_put_cells(page: Page) -> bool:
    ids = await _cells(page)
    return bool(ids) and all(i.endswith(":P") for i in ids)


@pytest.mark.slow
@pytest.mark.timeout(130)
async def test_dashboard_on_the_demo_pipeline(redis_server: Any, redis: Redis, page: Page) -> None:
    """``massive-pipeline demo`` (simulator + every processor) feeding the real page; the
    symbol picker then switches from the index SPX to the ETF SPY (issue 18)."""
    port = free_port()
    env = dict(
        os.environ,
        MASSIVE_REDIS_URL=redis_server.url,
        MASSIVE_POLLER_EXPIRATIONS="2",
        MASSIVE_POLLER_BAND_POINTS="200",
        MASSIVE_POLLER_MIN_INTERVAL_S="1",
        MASSIVE_GEX_INTERVAL_S="0.5",
        MASSIVE_LOG_LEVEL="WARNING",
        MASSIVE_GRACE_S="5",
    )
    exe = str(Path(sys.executable).with_name("massive-pipeline"))
    proc = await asyncio.create_subprocess_exec(
        exe,
        "demo",
        "--port",
        str(port),
        "--symbols",
        "SPX,SPY",
        "--duration-s",
        "110",
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = b""
        while b"dashboard:" not in line:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, "demo exited before serving the dashboard"
        await page.goto(f"http://127.0.0.1:{port}/")
        await page.wait_for_selector("#heatmap td.cell[data-id]", timeout=30_000)
        await page.wait_for_selector("#gex rect.bar", state="attached", timeout=30_000)
        cells0, bars0 = await _cells(page), await _bars(page)
        hv0, gv0 = await _version(page, "heatmap"), await _version(page, "gex")

        async def moved() -> bool:
            return (
                await _version(page, "heatmap") > hv0
                and await _version(page, "gex") > gv0
                and await _cells(page) != cells0
                and await _bars(page) != bars0
            )

        await _until(page, moved, 30)
        assert await page.get_attribute("#status-heatmap", "data-state") == "live"
        # the gamma profile and the levels history (issue 19), from /api/gex and its history
        await page.wait_for_selector("#gex-profile path.profile", state="attached", timeout=20_000)
        await page.wait_for_selector(
            "#gex-history path.hist.spot", state="attached", timeout=20_000
        )
        assert "untradable" in (await page.text_content("#heat-count") or "")
        await page.mouse.move(5, 5)
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "dashboard-demo.png"))
        # the picker lists the configured symbols; switch to the ETF
        options = await page.eval_on_selector_all("#symbol option", "els => els.map(e => e.value)")
        assert {"SPX", "SPY"} <= set(options)
        await page.select_option("#symbol", "SPY")

        async def spy_shown() -> bool:
            ids = await _cells(page)
            return bool(ids) and all(i.startswith("SPY:") for i in ids) and bool(await _bars(page))

        await _until(page, spy_shown, 40)
        assert "symbol=SPY" in page.url
        await page.screenshot(path=str(ARTIFACTS / "dashboard-demo-spy.png"))
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                rc = await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                raise
            assert rc == 0
