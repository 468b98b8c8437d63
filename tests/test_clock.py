"""StepClock: the replay's clock. Time moves only when the driver says so; participants run
one iteration per instant and say how long they can wait; the driver waits for them."""

from __future__ import annotations

import asyncio

import pytest

from streams.clock import NS, ReplayAborted, StepClock
from tests.util import eventually

T0 = 1_764_000_000_000_000_000


def test_set_moves_time_forward_only() -> None:
    c = StepClock(T0)
    assert (c.time_ns(), c.monotonic(), c.step) == (T0, 0.0, 0)
    # monotonic counts from the whole second before the start (exact grid differences)
    assert StepClock(T0 + 123 * 10**6).monotonic() == 0.123
    c.set(T0 + 2 * NS)
    assert (c.time_ns(), c.monotonic()) == (T0 + 2 * NS, 2.0)
    c.set(T0)
    assert c.time_ns() == T0 + 2 * NS
    assert c.step == 0  # set is not an instant


async def test_participants_run_once_per_instant_and_the_driver_waits_for_them() -> None:
    c = StepClock(T0)
    seen: dict[str, list[int]] = {"a": [], "b": []}
    gate = asyncio.Event()
    stop = asyncio.Event()

    async def participant(name: str, due_s: float | None, slow: bool) -> None:
        due: float | None = None
        while await c.wait_step(name, due, stop):
            if slow:
                await gate.wait()
            seen[name].append(c.time_ns())
            due = due_s

    for name in seen:
        c.join(name)
    tasks = [
        asyncio.create_task(participant("a", 0.25, slow=False)),
        asyncio.create_task(participant("b", None, slow=True)),
    ]
    await asyncio.wait_for(c.settled(), 5)  # both parked before the first instant
    assert c.next_due_ns() is None
    c.advance(T0 + NS)
    settled = asyncio.ensure_future(c.settled())
    await eventually(lambda: _true(seen["a"] == [T0 + NS]))
    assert not settled.done()  # b is still working on the instant
    gate.set()
    await asyncio.wait_for(settled, 5)
    assert seen == {"a": [T0 + NS], "b": [T0 + NS]}
    # a asked for another iteration 0.25 s of clock time later; b only with records.
    assert c.next_due_ns() == T0 + NS + NS // 4
    c.advance(T0 + 2 * NS)
    await asyncio.wait_for(c.settled(), 5)
    assert seen == {"a": [T0 + NS, T0 + 2 * NS], "b": [T0 + NS, T0 + 2 * NS]}
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def test_a_due_in_the_past_is_now() -> None:
    c = StepClock(T0)
    c.join("p")
    stop = asyncio.Event()

    async def p() -> None:
        await c.wait_step("p", -5.0, stop)

    task = asyncio.create_task(p())
    await asyncio.wait_for(c.settled(), 5)
    assert c.next_due_ns() == T0  # never before now
    stop.set()
    await task


async def test_a_participant_that_ends_aborts_the_wait() -> None:
    c = StepClock(T0)
    c.join("p")
    c.join("q")
    stop = asyncio.Event()
    task = asyncio.create_task(c.wait_step("p", None, stop))
    c.fail("q")
    with pytest.raises(ReplayAborted, match="q"):
        await asyncio.wait_for(c.settled(), 5)
    stop.set()
    assert await task is False


async def _true(v: bool) -> bool:
    return v
