"""Injectable clock: processors never call time.time() directly."""

from __future__ import annotations

import time
from typing import Protocol


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
