"""The one retry policy: bounded jittered delays, in-process survival of Redis outages,
prompt stop, bugs and cancellations not swallowed."""

from __future__ import annotations

import asyncio
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError

from streams.metrics import redis_outages
from streams.retry import Backoff, retrying, run_resilient

log = logging.getLogger("test")


@given(
    base=st.floats(0.001, 1.0),
    factor=st.floats(1.0, 100.0),
    attempt=st.integers(0, 1000),
    jitter=st.sampled_from(["equal", "full"]),
)
def test_delay_is_capped_and_jittered_within_its_window(
    base: float, factor: float, attempt: int, jitter: str
) -> None:
    b = Backoff(base_s=base, cap_s=base * factor, jitter=jitter)
    window = min(b.cap_s, base * 2 ** min(attempt, 30))
    d = b.delay_s(attempt)
    low = 0.0 if jitter == "full" else window / 2
    assert low - 1e-9 <= d <= window + 1e-9


def test_bad_backoff_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        Backoff(base_s=0)
    with pytest.raises(ValueError):
        Backoff(base_s=1, cap_s=0.5)
    with pytest.raises(ValueError):
        Backoff(jitter="none")


async def test_run_resilient_survives_outages_counts_them_and_returns_on_success() -> None:
    reg = CollectorRegistry()
    errors = redis_outages(reg, "t")
    calls = 0
    dropped = 0

    async def body() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RedisConnectionError("Connection closed by server.")
        if calls == 2:
            raise BusyLoadingError("Redis is loading the dataset in memory")

    def drop() -> None:
        nonlocal dropped
        dropped += 1

    fast = Backoff(base_s=0.001, cap_s=0.01)
    await run_resilient(
        "t", body, asyncio.Event(), log=log, errors=errors, backoff=fast, on_unavailable=drop
    )
    assert calls == 3 and dropped == 2
    assert (
        reg.get_sample_value(
            "massive_redis_errors_total", {"processor": "t", "stream": "", "group": ""}
        )
        == 2
    )


async def test_run_resilient_lets_bugs_through_and_stops_while_waiting() -> None:
    async def bug() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        await run_resilient("t", bug, asyncio.Event(), log=log)

    stop = asyncio.Event()

    async def down() -> None:
        stop.set()  # stop arrives during the outage: no further attempt, prompt return
        raise RedisConnectionError("down")

    await asyncio.wait_for(
        run_resilient("t", down, stop, log=log, backoff=Backoff(base_s=5, cap_s=10)), 1
    )


async def test_a_cancelled_task_is_not_kept_alive_by_a_dead_socket() -> None:
    started = asyncio.Event()

    async def body() -> None:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            # what a client library may do when cancelled mid-read
            raise RedisConnectionError("Connection closed by server.") from None

    task = asyncio.create_task(run_resilient("t", body, asyncio.Event(), log=log))
    await started.wait()
    task.cancel()
    with pytest.raises(RedisConnectionError):
        await asyncio.wait_for(task, 1)


async def test_retrying_returns_the_value_or_raises_after_its_attempts() -> None:
    n = 0

    async def flaky() -> int:
        nonlocal n
        n += 1
        if n < 3:
            raise RedisConnectionError("down")
        return 42

    fast = Backoff(base_s=0.001, cap_s=0.01)
    assert await retrying("t", flaky, None, log=log, backoff=fast) == 42

    async def never() -> int:
        raise RedisConnectionError("down")

    with pytest.raises(RedisConnectionError):
        await retrying("t", never, None, log=log, backoff=fast, attempts=3)
