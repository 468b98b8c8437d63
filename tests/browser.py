"""Headless Chromium for tests (Debian ``chromium`` driven by Playwright for Python, no
``playwright install``): :func:`open_page` and :func:`page_models`, the page's live models
read through its one test accessor ``window.__model()`` (processors/serve/static/app.js)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")  # not MASSIVE_*: those are settings
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

try:
    from playwright.async_api import Page, async_playwright
except ImportError:  # pragma: no cover - depends on the machine
    async_playwright = None  # type: ignore[assignment]


def missing() -> str | None:
    """Why no browser test can run here (None: it can)."""
    if async_playwright is None:
        return "playwright not installed (pip)"
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} missing (apt-get install chromium)"
    return None


@asynccontextmanager
async def open_page(
    errors: list[str] | None = None, console: list[str] | None = None
) -> AsyncIterator[Page]:
    """A fresh page; uncaught page errors go to ``errors``, console errors (e.g. a CSP
    violation) to ``console``."""
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            ctx = await browser.new_context(viewport={"width": 1600, "height": 920})
            pg = await ctx.new_page()
            if errors is not None:
                pg.on("pageerror", lambda e: errors.append(str(e)))
            if console is not None:
                pg.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
            yield pg
        finally:
            await browser.close()


async def page_models(page: Page) -> dict[str, Any]:
    """``{"heatmap": {"url", "model"}, "gex": {...}}``: each model as ``{epoch, version,
    items}`` in the published JSON shape (None before its snapshot)."""
    out: dict[str, Any] = await page.evaluate("() => window.__model()")
    return out
