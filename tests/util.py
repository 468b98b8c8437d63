"""Test helpers: a private redis-server and condition polling (never bare sleeps)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from streams.local_redis import RedisServer, free_port

__all__ = ["RedisServer", "eventually", "free_port"]

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T]], timeout_s: float = 5.0, interval_s: float = 0.02
) -> T:
    """Poll ``check`` until it returns a truthy value; fail with the last value seen."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s (last={last!r})")
        await asyncio.sleep(interval_s)
