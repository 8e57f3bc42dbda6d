"""The CPU time a model load costs: its loader's own code, on whichever
thread ran it.

A load's wall time says how long its waiters waited; its CPU time says what
it cost the host, which is what sizing a pool needs (``num_cpus``, how many
loads a core can take per second). The two differ as soon as the replica's
core is shared: measured on the peer benchmark, a load of 5.3 ms of CPU took
7.8 ms at the median and 24 ms at the 99th percentile of wall time.

The cache opens a :func:`charging` scope around each load; the loader wrappers
of ``@multiplexed`` charge it:

- an ``async def`` loader, with :func:`charged`: the CPU of the thread
  running each of its steps, between two ``await`` suspensions, so time
  spent waiting (storage, another load's turn) is not counted and other
  coroutines interleaved on the same thread are not either;
- a plain ``def`` loader in a worker thread: that thread's CPU around the call.

The scope travels in a context variable: the loader thread and worker threads
run in a copy of the caller's context, which shares the scope's holder.
Measured with ``time.thread_time`` (``CLOCK_THREAD_CPUTIME_ID``); a few
calls per load step.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Awaitable, Callable, Generator, Iterator
from typing import Any, TypeVar

from muxgate.replicas._coro_steps import drive_steps

__all__ = ["charge", "charged", "charging", "thread_cpu_of"]

T = TypeVar("T")


class _Holder:
    """CPU seconds charged to one load so far."""

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds = 0.0


_CURRENT: contextvars.ContextVar[_Holder | None] = contextvars.ContextVar(
    "muxgate_load_cpu", default=None
)


@contextlib.contextmanager
def charging() -> Iterator[_Holder]:
    """A scope for one load: what the loader runs inside it is charged to the
    holder it yields (read ``.seconds`` once the load has ended)."""
    holder = _Holder()
    token = _CURRENT.set(holder)
    try:
        yield holder
    finally:
        _CURRENT.reset(token)


def charge(seconds: float) -> None:
    """Add ``seconds`` of CPU to the current load, if there is one."""
    holder = _CURRENT.get()
    if holder is not None:
        holder.seconds += seconds


def thread_cpu_of(func: Callable[[], T]) -> T:
    """``func()``, its calling thread's CPU time charged to the current load."""
    start = time.thread_time()
    try:
        return func()
    finally:
        charge(time.thread_time() - start)


class _Charged:
    """Awaits an awaitable, charging the CPU of each of its steps."""

    __slots__ = ("_awaitable", "_holder")

    def __init__(self, awaitable: Awaitable[T], holder: _Holder) -> None:
        self._awaitable = awaitable
        self._holder = holder

    def __await__(self) -> Generator[Any, Any, Any]:
        holder = self._holder
        start = 0.0

        def before() -> None:
            nonlocal start
            start = time.thread_time()

        def after(_last: bool) -> None:
            holder.seconds += time.thread_time() - start

        return (yield from drive_steps(self._awaitable.__await__(), before, after))


async def charged(awaitable: Awaitable[T]) -> T:
    """``await awaitable``, charging the CPU of its steps to the current load
    (just ``await`` it outside a load)."""
    holder = _CURRENT.get()
    if holder is None:
        return await awaitable
    result: T = await _Charged(awaitable, holder)
    return result
