"""The runner: structured shutdown (grace, then cancel, awaited while Redis is open), every
error reported, heartbeat liveness over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal

import httpx
import pytest
from redis.asyncio import Redis

from streams.consumer import Entry
from streams.heartbeat import Heartbeats
from streams.processor import ConsumerProcessor, Deps
from streams.runner import cancel_and_wait, run_processors
from tests.util import eventually, free_port


class Fails:
    def __init__(self, name: str, exc: Exception) -> None:
        self.name = name
        self.exc = exc
        self.ready = True

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.sleep(0)
        raise self.exc


class Polite:
    """Returns when ``stop`` is set, writing its last state on the way out."""

    name = "polite"
    ready = True

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def run(self, stop: asyncio.Event) -> None:
        await stop.wait()
        await self.redis.set("polite:flushed", "1")


class Deaf:
    """Ignores ``stop``: only a cancellation ends it; its cleanup needs Redis (a lease
    release, a final flush)."""

    name = "deaf"
    ready = True

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.cancelled = False

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            await self.redis.set("deaf:released", "1")
            raise


def short_grace(deps: Deps, **kw: object) -> Deps:
    s = dataclasses.replace(deps.settings, grace_s=0.2, **kw)  # type: ignore[arg-type]
    return dataclasses.replace(deps, settings=s)


async def test_a_failing_processor_stops_the_others_cleanly_and_its_error_is_raised(
    redis: Redis, deps: Deps
) -> None:
    d = short_grace(deps)
    deaf = Deaf(redis)
    with pytest.raises(ValueError, match="boom"):
        await run_processors(
            d, [Polite(redis), Fails("bad", ValueError("boom")), deaf], install_signals=False
        )
    # Both cleanups ran before run_processors returned, with the client still open.
    assert deaf.cancelled
    assert await redis.get("polite:flushed") == b"1"
    assert await redis.get("deaf:released") == b"1"


async def test_every_error_is_reported(redis: Redis, deps: Deps) -> None:
    procs = [Fails("a", ValueError("first")), Fails("b", RuntimeError("second")), Polite(redis)]
    with pytest.raises(ExceptionGroup) as ei:
        await run_processors(short_grace(deps), procs, install_signals=False)
    assert sorted(str(e) for e in ei.value.exceptions) == ["first", "second"]


async def test_stop_cancels_a_processor_past_grace_and_awaits_it(redis: Redis, deps: Deps) -> None:
    stop = asyncio.Event()
    deaf = Deaf(redis)
    task = asyncio.create_task(
        run_processors(short_grace(deps), [deaf], stop, install_signals=False)
    )
    await asyncio.sleep(0)
    stop.set()
    await task
    assert deaf.cancelled and await redis.get("deaf:released") == b"1"


def test_heartbeats_name_the_loops_silent_for_too_long() -> None:
    now = [100.0]
    hb = Heartbeats(clock=lambda: now[0])
    hb.beat("a")
    hb.beat("b")
    now[0] += 5
    hb.beat("b")
    assert hb.stuck(4.0) == ["a"]
    hb.forget("a")
    assert hb.stuck(4.0) == []
    now[0] += 10
    assert hb.stuck(4.0) == ["b"]


class Hangs(ConsumerProcessor):
    """Its handler awaits a reply that never comes."""

    name = "hangs"

    async def handle(self, entries: list[Entry]) -> None:
        await asyncio.Event().wait()


async def test_a_loop_stuck_on_an_await_is_not_live(redis: Redis, deps: Deps) -> None:
    port = free_port()
    d = short_grace(deps, metrics_port=port, liveness_s=0.5)
    proc = Hangs(d, "test:hang", "g")
    stop = asyncio.Event()
    task = asyncio.create_task(run_processors(d, [proc], stop, install_signals=False))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

            async def status(path: str) -> int:
                try:
                    return (await http.get(path)).status_code
                except httpx.TransportError:
                    return 0

            async def ready() -> bool:
                return await status("/readyz") == 200

            await eventually(ready)
            assert await status("/healthz") == 200  # the loop beats every XREADGROUP
            assert await status("/metrics") == 200
            await redis.xadd("test:hang", {"k": "v"})

            async def stuck() -> str | None:
                r = await http.get("/healthz")
                return r.text if r.status_code == 503 else None

            assert await eventually(stuck) == "stuck: hangs:test:hang\n"
    finally:
        stop.set()
        await task


async def test_cancel_and_wait_sends_a_swallowed_cancellation_again() -> None:
    ended = asyncio.Event()

    async def stubborn() -> None:
        # swallowed, as by a library that turned it into a retried socket error
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(30)
        try:
            await asyncio.sleep(30)
        finally:
            ended.set()

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait([task], resend_s=0.05), 5)
    assert task.cancelled() and ended.is_set()


async def test_sigusr1_logs_where_every_task_waits(
    deps: Deps, caplog: pytest.LogCaptureFixture
) -> None:
    """A live process that makes no progress says what it waits on: the whole await chain
    of each processor's task, not only its outermost frame."""
    never = asyncio.Event()

    class Waits:
        name = "waits"
        ready = True

        async def run(self, stop: asyncio.Event) -> None:
            await self._deep()

        async def _deep(self) -> None:
            await never.wait()

    stop = asyncio.Event()
    d = short_grace(deps, metrics_port=0)
    task = asyncio.create_task(run_processors(d, [Waits()], stop))
    try:
        await asyncio.sleep(0.05)
        with caplog.at_level(logging.WARNING, logger="streams.runner"):
            os.kill(os.getpid(), signal.SIGUSR1)

            async def logged() -> str | None:
                hits = [r.getMessage() for r in caplog.records if "asyncio tasks" in r.message]
                return hits[0] if hits else None

            text = await eventually(logged)
        block = text.split("task waits:\n", 1)[1]
        frames = block.splitlines()
        assert "Supervisor.watch" in frames[0] and "Waits.run" in frames[1], text
        assert "Waits._deep" in frames[2] and "Event.wait" in frames[3], text
    finally:
        stop.set()
        await task
