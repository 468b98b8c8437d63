"""The one retry policy of the pipeline: capped exponential backoff with jitter, stop-aware.

Every long-lived loop that talks to Redis (or the provider) waits between attempts with
:class:`Backoff` and survives a Redis outage in-process with :func:`run_resilient` or
:func:`retrying`: a restart, a failover or an AOF load (``BusyLoadingError``, a subclass of
redis-py's ``ConnectionError``) is logged, counted and retried, never a crashed process.

Command-level retries inside redis-py (``Retry`` on the client) are not used for this: a
retried XADD or INCR after a lost reply would be applied twice. Our loops retry whole
iterations whose writes are idempotent or checked (admission, fences, version = current + 1).
The formula is redis-py's own (``redis.backoff``); only the stop-awareness is ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import Counter
from redis.backoff import EqualJitterBackoff, FullJitterBackoff
from redis.exceptions import (
    AskError,
    ClusterError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streams.logs import one_line

T = TypeVar("T")

# Redis is (temporarily) unreachable: restarting, failing over, loading its dataset
# (BusyLoadingError is a ConnectionError), or the socket died. OSError covers a refused
# connect that redis-py did not wrap. On a cluster, also what a slot moving or a master
# failing over answers once redis-py's own redirects and retries are spent: CLUSTERDOWN
# (ClusterError covers it and "TTL exhausted"), MOVED/ASK (AskError), TRYAGAIN, a slot that
# no known node serves. None of these ran the command, so retrying the iteration is safe.
REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    OSError,
    ClusterError,
    AskError,
    TryAgainError,
    SlotNotCoveredError,
)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before retry ``attempt`` (1-based): ``min(cap_s, base_s * 2**attempt)`` with
    jitter. ``full`` jitter spreads a herd of reconnecting clients over the whole window
    (provider calls); ``equal`` keeps at least half of it (Redis reconnects, so a
    restarting server is not hammered at once)."""

    base_s: float = 0.05
    cap_s: float = 5.0
    jitter: str = "equal"  # "equal" | "full"

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.cap_s < self.base_s:
            raise ValueError("backoff: need 0 < base_s <= cap_s")
        if self.jitter not in ("equal", "full"):
            raise ValueError(f"backoff: unknown jitter {self.jitter!r} (equal|full)")

    def delay_s(self, attempt: int) -> float:
        n = max(0, min(attempt, 30))
        if self.jitter == "full":
            return float(FullJitterBackoff(cap=self.cap_s, base=self.base_s).compute(n))
        return float(EqualJitterBackoff(cap=self.cap_s, base=self.base_s).compute(n))


REDIS_BACKOFF = Backoff(base_s=0.05, cap_s=5.0, jitter="equal")


async def sleep_or_stop(stop: asyncio.Event | None, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``stop`` is set first; True when stopped."""
    if stop is None:
        await asyncio.sleep(max(0.0, seconds))
        return False
    if stop.is_set():
        return True
    # asyncio.timeout, not wait_for: Python 3.11's wait_for can turn a cancellation that
    # lands as its timeout fires into a TimeoutError, which would be suppressed here and
    # leave a cancelled loop running.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, seconds)):
            await stop.wait()
    return stop.is_set()


async def run_resilient(
    name: str,
    body: Callable[[], Awaitable[None]],
    stop: asyncio.Event,
    *,
    log: logging.Logger,
    errors: Counter | None = None,
    backoff: Backoff = REDIS_BACKOFF,
    on_unavailable: Callable[[], None] | None = None,
) -> None:
    """Run ``body`` until ``stop`` is set, re-entering it after a Redis outage.

    ``body`` is the loop itself (it returns when ``stop`` is set). An exception of
    :data:`REDIS_UNAVAILABLE` is counted in ``errors`` (the caller's labelled child of
    ``massive_redis_errors_total``), logged on one line and retried after
    ``backoff.delay_s(attempt)``; ``on_unavailable`` runs first (e.g. drop leadership, mark
    not ready). An attempt that ran for a while without failing resets the count. Any other
    exception propagates: a bug must not spin."""
    attempt = 0
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t0 = loop.time()
        try:
            await body()
            return
        except REDIS_UNAVAILABLE as exc:
            if _cancelling():
                raise  # a cancelled task whose cancellation surfaced as a dead socket
            if loop.time() - t0 > backoff.cap_s * 2:
                attempt = 0
            attempt += 1
            if errors is not None:
                errors.inc()
            if on_unavailable is not None:
                on_unavailable()
            if await _wait_after_outage(name, exc, attempt, stop, log, backoff):
                return


async def retrying(
    name: str,
    call: Callable[[], Awaitable[T]],
    stop: asyncio.Event | None,
    *,
    log: logging.Logger,
    errors: Counter | None = None,
    backoff: Backoff = REDIS_BACKOFF,
    attempts: int | None = None,
) -> T:
    """``await call()`` until it does not raise a :data:`REDIS_UNAVAILABLE` error (at most
    ``attempts`` times, forever when None). Raises the last error when attempts run out and
    ``asyncio.CancelledError`` when ``stop`` is set while waiting."""
    attempt = 0
    while True:
        try:
            return await call()
        except REDIS_UNAVAILABLE as exc:
            if _cancelling():
                raise
            attempt += 1
            if errors is not None:
                errors.inc()
            if attempts is not None and attempt >= attempts:
                raise
            if await _wait_after_outage(name, exc, attempt, stop, log, backoff):
                raise asyncio.CancelledError(f"{name}: stopped while waiting for redis") from exc


async def _wait_after_outage(
    name: str,
    exc: BaseException,
    attempt: int,
    stop: asyncio.Event | None,
    log: logging.Logger,
    backoff: Backoff,
) -> bool:
    """Log the outage on one line and wait ``backoff.delay_s(attempt)``; True when stopped."""
    delay = backoff.delay_s(attempt)
    log.warning(
        "%s: redis unavailable (attempt %d, retry in %.2fs): %s",
        name,
        attempt,
        delay,
        one_line(exc),
    )
    return await sleep_or_stop(stop, delay)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
