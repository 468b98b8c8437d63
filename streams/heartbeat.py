"""Liveness beats, in the style of arq's ``record_health``.

A loop proves it is alive by recording a beat on every iteration (``Heartbeats.beat``), and
``/healthz`` fails when a loop that has beaten once has not beaten again within
``MASSIVE_LIVENESS_S``. An event loop that still answers HTTP is not enough: a processor stuck
on one await (a reply that never comes) answers every probe while doing nothing, and only a
restart helps it.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Heartbeats:
    """Last beat per loop name (monotonic seconds)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[str, float] = {}

    def beat(self, name: str) -> None:
        self._last[name] = self._clock()

    def forget(self, name: str) -> None:
        """A loop that ended on purpose (stop, or leadership handed over) is not stuck."""
        self._last.pop(name, None)

    def stuck(self, max_silence_s: float) -> list[str]:
        """Loops whose last beat is older than ``max_silence_s``."""
        now = self._clock()
        return sorted(n for n, t in self._last.items() if now - t > max_silence_s)
