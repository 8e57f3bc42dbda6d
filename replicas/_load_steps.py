"""Calls that find their model loaded wait out the load step under way.

A replica's loader thread and the thread serving its calls share one
CPython interpreter lock. A load's blocking code (building the network,
unpickling the weights, copying them in) needs the lock between torch
operations, and a thread that wants it back waits until the holder blocks
or the interpreter's switch interval (5 ms) has passed. So a call that runs
Python beside a load stretches the load, and with it the latency of every
request waiting for that model: measured on the peer model, a 6.6 ms load
took 8 ms beside a serving thread running Python a third of the time and
137 ms beside one that never paused (docs/benchmarks.md, "What the
closed-loop p99 target asks of a schedule").

With ``hits_wait_for_loads`` (a deployment field, on by default; the
replica sets :attr:`LoadSteps.enabled` from its spec; elsewhere, as in a
test process, it is off) a call whose model is already loaded therefore
waits while the loader thread runs a *step* of a load (its code between
two ``await`` suspensions), up to :data:`MAX_WAIT_S`, then goes on:

- only the step running when the call arrived: a step that starts later
  does not hold it, so a stream of loads never starves the hits;
- only steps: a load suspended on storage (an ``await``) holds nobody;
- at most :data:`MAX_WAIT_S`: a step that runs for seconds (a very large
  model) delays the hits by that much, then they run beside it as before;
- not a call made from a loader's body (it runs on the replica's loop
  while its own load is suspended, and waits for nobody else's either).

A load's last step (the one that returns the model) stays open until the
replica's loop has taken the model back (:class:`LastStep`) and the
requests waiting for that model have been made ready: the hand-over is
part of the load, and those requests, which have waited longest, go on
before the hits the step held. They are otherwise unaffected: they wait
for the load anyway.
Measured on the peer benchmark's closed loop in docs/benchmarks.md ("Hits
wait out a load step", "The wait by default"): a fifth off the p99 for
0-5 % of throughput, and a twentieth more loads.

:class:`LoadSteps` is shared by the process's loader thread (which marks
the steps, :func:`stepped`) and the ``@multiplexed`` wrappers (which wait,
:meth:`LoadSteps.wait_for_step`). Written here, not with a library lock:
the waiters are on the replica's event loop, the steps on another thread,
and a waiter wants the *current* step's end, not a turn of its own.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Generator
from typing import Any, Final

from muxgate.replicas._cache_stats import COUNTERS
from muxgate.replicas._coro_steps import drive_steps

__all__ = ["MAX_WAIT_S", "LastStep", "LoadSteps", "stepped"]

#: the longest a call waits for a load step under way before it runs beside it
MAX_WAIT_S: Final = 0.05


class LoadSteps:
    """The load steps of a process, and the calls waiting for them to end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: calls wait for steps (the replica sets it from ``hits_wait_for_loads``)
        self.enabled = False
        self._begun = 0
        self._ended = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def running(self) -> bool:
        """A step is running (read without the lock: a stale read only lets a
        call run beside a step that just started, or look once more)."""
        return self._ended < self._begun

    def __repr__(self) -> str:
        state = "running" if self.running else "idle"
        return f"<LoadSteps {state} begun={self._begun} waiters={len(self._waiters)}>"

    def reset_after_fork(self) -> None:
        """A forked child runs no step and has no waiters."""
        self._lock = threading.Lock()
        self._begun = self._ended = 0
        self._waiters = []

    def begin(self) -> None:
        """A step starts (on the loader thread)."""
        with self._lock:
            self._begun += 1

    def end(self) -> None:
        """A step ends: wake the calls that were waiting for the steps begun
        before they came. (A load's last step ends on the replica's loop, so
        it may end after the next load's first step began.)"""
        with self._lock:
            self._ended += 1
            ended = self._ended
            woken = [fut for step, fut in self._waiters if step <= ended]
            self._waiters = [(step, fut) for step, fut in self._waiters if step > ended]
        for fut in woken:
            _wake(fut)

    async def wait_for_step(self) -> None:
        """Wait for the load step running now to end, at most :data:`MAX_WAIT_S`.

        Returns at once when waiting is off or no step runs.
        """
        if not (self.enabled and self.running):
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if not self.running:
                return
            step = self._begun
            self._waiters.append((step, fut))
        timer = loop.call_later(MAX_WAIT_S, _wake_here, fut)
        start = time.perf_counter()
        try:
            await fut
        finally:
            timer.cancel()
            COUNTERS["load_step_waits"] += 1
            COUNTERS["load_step_wait_seconds_sum"] += time.perf_counter() - start
            # Woken by the cap or cancelled: no longer a waiter. (Woken by
            # ``end``, it is gone already.)
            with self._lock:
                self._waiters = [(s, f) for s, f in self._waiters if f is not fut]


def _wake_here(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _wake(fut: asyncio.Future[None]) -> None:
    """Resolve ``fut`` on its own loop, from whichever thread."""
    loop = fut.get_loop()
    if loop.is_closed():
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        _wake_here(fut)
    else:
        loop.call_soon_threadsafe(_wake_here, fut)


class LastStep:
    """Whether a load's last step is still open: it ends (:meth:`close`) on
    the replica's loop, one turn after the loop took the load's outcome, not
    on the loader thread (see ``LoaderThread.run``)."""

    __slots__ = ("_steps", "open")

    def __init__(self, steps: LoadSteps) -> None:
        self._steps = steps
        self.open = False

    def close(self) -> None:
        if self.open:
            self.open = False
            self._steps.end()


class _Stepped:
    """Drives a coroutine, marking each of its steps on ``steps``."""

    __slots__ = ("_coro", "_last", "_steps")

    def __init__(self, coro: Coroutine[Any, Any, Any], steps: LoadSteps, last: LastStep) -> None:
        self._coro = coro
        self._steps = steps
        self._last = last

    def __await__(self) -> Generator[Any, Any, Any]:
        steps, last = self._steps, self._last

        def after(is_last: bool) -> None:
            if is_last:
                last.open = True  # ends when the replica's loop takes the outcome
            else:
                steps.end()

        return (yield from drive_steps(self._coro.__await__(), steps.begin, after))


async def stepped(coro: Coroutine[Any, Any, Any], steps: LoadSteps, last: LastStep) -> Any:
    """``await coro``, each of its steps marked on ``steps``; the last one
    stays open until ``last.close()``."""
    return await _Stepped(coro, steps, last)
