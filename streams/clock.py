"""Injectable clock: processors never call time.time() directly."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol
from zoneinfo import ZoneInfo

NS = 1_000_000_000
NY = ZoneInfo("America/New_York")  # the market's time zone: trading days, sessions, expiries


class Clock(Protocol):
    def time_ns(self) -> int: ...

    def monotonic(self) -> float: ...


class SystemClock:
    def time_ns(self) -> int:
        return time.time_ns()

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock tests move by hand."""

    def __init__(self, start_ns: int = 1_764_000_000_000_000_000) -> None:
        self.now_ns = start_ns
        self.mono = 0.0

    def time_ns(self) -> int:
        return self.now_ns

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now_ns += int(seconds * 1e9)
        self.mono += seconds


class ReplayAborted(RuntimeError):
    """A participant of a :class:`StepClock` stopped (raised or returned) mid-replay."""


@dataclass(slots=True)
class _Participant:
    parked_step: int = -1  # the step it finished (-1: none yet)
    due_ns: int | None = None  # clock time by which it wants an instant (None: no need)


class StepClock:
    """``Deps.clock`` of a deterministic replay: time is the recording's and moves only when
    the replay driver says so.

    Two kinds of movement:

    * :meth:`set` while records are being applied: consumers that read the clock (an epoch's
      creation time) see the receive time of the record in hand; nothing else happens.
    * :meth:`advance` to an *instant*: every participant runs exactly one iteration at that
      time and parks again (:meth:`wait_step`); the driver waits for all of them
      (:meth:`settled`) before it applies the next record.

    Participants are the processors whose decisions depend on time rather than on an input
    entry (a publisher's max interval and checkpoints, GEX's cadence). Running them once per
    instant, on the state left by every record up to it, is what makes a replay publish the
    same versions at the same instants whatever the batching of the records. Each tells, when
    it parks, how much clock time may pass before it needs another iteration, so the driver
    can jump over instants at which nobody has anything to do.
    """

    def __init__(self, start_ns: int) -> None:
        # monotonic() counts from the whole second at or before the start: differences of
        # instants on a grid of binary fractions of a second (the replay's 250 ms) are then
        # exact floats, so "now - last >= 0.25" holds at the instant it should
        self.origin_ns = start_ns - start_ns % NS
        self._now_ns = start_ns
        self._step = 0
        self._parts: dict[str, _Participant] = {}
        self._wake = asyncio.Event()
        self._all_parked = asyncio.Event()
        self._failed: str | None = None

    # --- Clock -------------------------------------------------------------------------
    def time_ns(self) -> int:
        return self._now_ns

    def monotonic(self) -> float:
        return (self._now_ns - self.origin_ns) / NS

    # --- driver side -------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self._step

    def set(self, t_ns: int) -> None:
        """Move the time forward (never back) without an instant."""
        self._now_ns = max(self._now_ns, t_ns)

    def advance(self, t_ns: int) -> None:
        """An instant at ``t_ns`` (never before the current time): wake every participant."""
        self.set(t_ns)
        self._step += 1
        self._all_parked.clear()
        self._wake.set()
        self._wake = asyncio.Event()
        self._check_parked()

    async def settled(self) -> None:
        """Until every participant has finished its iteration of the current instant."""
        while True:
            if self._failed is not None:
                raise ReplayAborted(f"participant {self._failed} stopped during the replay")
            if self._check_parked():
                return
            await self._all_parked.wait()

    def next_due_ns(self) -> int | None:
        """The earliest clock time a participant asked to be woken at (None: none asked)."""
        return min((p.due_ns for p in self._parts.values() if p.due_ns is not None), default=None)

    def fail(self, name: str) -> None:
        """``name`` (a processor task) ended early: :meth:`settled` raises from now on."""
        self._failed = self._failed or name
        self._all_parked.set()

    # --- participant side ---------------------------------------------------------------
    def join(self, name: str) -> None:
        """Register a participant before the first instant."""
        self._parts.setdefault(name, _Participant())
        self._all_parked.clear()

    def leave(self, name: str) -> None:
        self._parts.pop(name, None)
        self._check_parked()

    async def wait_step(self, name: str, due_s: float | None, stop: asyncio.Event) -> bool:
        """``name`` finished its iteration of the current instant: park until the next one.
        ``due_s``: clock seconds after which it needs an iteration even if no record came
        (None: only when records came; the driver rounds it to its instants).
        Returns False when ``stop`` is set."""
        p = self._parts[name]
        p.parked_step = self._step
        p.due_ns = None if due_s is None else self._now_ns + round(max(due_s, 0.0) * NS)
        self._check_parked()
        wake = self._wake
        if stop.is_set():
            return False
        stopper = asyncio.ensure_future(stop.wait())
        waker = asyncio.ensure_future(wake.wait())
        try:
            await asyncio.wait((stopper, waker), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            waker.cancel()
        return not stop.is_set()

    def _check_parked(self) -> bool:
        done = all(p.parked_step == self._step for p in self._parts.values())
        if done:
            self._all_parked.set()
        return done
