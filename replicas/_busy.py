"""How busy a replica has been: calls finished and the wall seconds with at
least one call in flight, as cumulative counters for ``Pong`` and ``Drained``
(keys in ``muxgate.replicas._counters``).

A plain object with an injected clock; the replica server calls
:meth:`BusyClock.started` and :meth:`BusyClock.finished` around each call.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from muxgate.replicas._counters import BUSY_SECONDS_KEY, CALLS_FINISHED_KEY

__all__ = ["BusyClock"]


class BusyClock:
    """Cumulative calls finished and busy seconds (some call in flight)."""

    __slots__ = ("_busy_s", "_clock", "_since", "calls_finished", "in_flight")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._busy_s = 0.0
        self._since = 0.0  # clock time the current busy period began
        self.calls_finished = 0
        self.in_flight = 0

    def started(self) -> None:
        """A call arrived."""
        if self.in_flight == 0:
            self._since = self._clock()
        self.in_flight += 1

    def finished(self) -> None:
        """A call left (answered, failed or cancelled)."""
        if self.in_flight <= 0:
            return  # unmatched: nothing was started
        self.in_flight -= 1
        self.calls_finished += 1
        if self.in_flight == 0:
            self._busy_s += self._clock() - self._since

    def busy_s(self) -> float:
        """Busy seconds so far, the current busy period included."""
        if self.in_flight:
            return self._busy_s + (self._clock() - self._since)
        return self._busy_s

    def counters(self) -> dict[str, float]:
        """The cumulative counters under their report keys."""
        return {CALLS_FINISHED_KEY: float(self.calls_finished), BUSY_SECONDS_KEY: self.busy_s()}

    def __repr__(self) -> str:
        return (
            f"<BusyClock in_flight={self.in_flight} calls_finished={self.calls_finished} "
            f"busy={self.busy_s():.3f}s>"
        )
