"""Event loops that run ``async def`` model loaders off the replica's event loop.

A loader written as ``async def`` often does blocking work in its body (torch
builds the network and copies the weights on the calling thread). On the
replica's own loop, such a load holds the loop for its whole duration: calls
sent meanwhile are not even read, and hits wait behind the load. So an async
loader runs, by default, on a *loader loop*: an asyncio event loop of its own
in a daemon thread. The replica's loop only waits for the result.

One loader loop serves every cache of the process, started on first use.
Its loads keep the concurrency they had on the replica's loop: their
``await``s interleave (and ``max_concurrent_loads`` bounds them), while
blocking code in their bodies runs one load at a time. With a CPU budget of
one core per replica that is also the faster order: blocking loads that ran
side by side would share the core and all finish late (measured on the peer
benchmark: docs/benchmarks.md).

Each load runs in a copy of the caller's :mod:`contextvars` context (the
request scope, so ``get_multiplexed_model_id()`` works; the load span; any
variable the app set before calling the loader). Objects bound to the
replica's loop (an ``asyncio.Event`` it waits on, a client session created
there) cannot be awaited on a loader loop: asyncio raises a ``RuntimeError``
("attached to a different loop"), which becomes a :class:`LoaderLoopError`
naming the opt-out, ``@multiplexed(load_on_loop=True)``.

Priority: in a replica (``loads_first``, the default), the thread that
starts the loader thread (the replica's event loop, which serves the calls)
then lowers its own CPU priority by ``CALLS_NICE`` (Linux: ``nice`` is per
thread). Under contention for the replica's core a running load goes first:
the requests waiting for it have waited longest, and a hit costs a fraction
of a load, so the hits queued behind a load wait less than the load's
waiters would wait behind them (measured on the peer benchmark:
docs/benchmarks.md). Only lowering is allowed to an unprivileged process, so
the serving thread goes down rather than the loader thread up; the threads
it starts afterwards (worker threads for sync calls and sync loaders)
inherit its priority. Lowering is all a process can do without privileges,
so it is also what holds in a container.

Calls may wait out load steps: with ``hits_wait_for_loads`` a call whose
model is already loaded waits (briefly) while a load's blocking code runs
here, since the two threads share the interpreter lock
(:mod:`muxgate.replicas._load_steps`).

Cancellation: cancelling the waiting side cancels the loader's task on its
loop, then waits for it to end (blocking code cannot be interrupted, the
same as a sync loader in a worker thread), so no load is still running when
a cache's ``aclose()`` returns. A model the loader returned all the same is
not handed out: its unload hook runs, and the cancellation propagates.

Written here rather than on ``anyio.from_thread.start_blocking_portal``,
which serves calls from worker threads into a loop: here the caller is an
event loop itself, hands each load its context and waits out a cancelled
load, with a few of asyncio's thread-safe calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import logging
import os
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Final

from muxgate.replicas._load_steps import LastStep, LoadSteps, stepped
from muxgate.replicas._unload_hooks import run_unload_hook

__all__ = [
    "CALLS_NICE",
    "LoaderLoopError",
    "LoaderThread",
    "home_loop",
    "in_a_load",
    "is_async_callable",
    "is_other_loop_error",
    "loader_thread",
    "run_on",
]

_log = logging.getLogger("muxgate.replica")

#: how much lower (``nice`` steps) the replica's serving thread runs than its
#: loader thread with ``loads_first``: about a tenth of the CPU weight
CALLS_NICE: Final = 10

#: the event loop that handed the running load to the loader thread (in the load's context)
_HOME: contextvars.ContextVar[asyncio.AbstractEventLoop | None] = contextvars.ContextVar(
    "muxgate_loader_home", default=None
)


def home_loop() -> asyncio.AbstractEventLoop | None:
    """The replica's loop when called from a load on the loader thread, else None.

    A ``@multiplexed`` loader called from another loader's body uses it to
    run on the loop its cache belongs to.
    """
    home = _HOME.get()
    if home is None or home.is_closed():
        return None
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return home if running is not home else None


def in_a_load() -> bool:
    """Whether the caller runs on behalf of a load on the loader thread (its
    body, or a call it made on the replica's loop)."""
    return _HOME.get() is not None


async def run_on(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]) -> Any:
    """Await ``coro`` on ``loop`` (another thread's), in a copy of the current context."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


#: what asyncio says when a coroutine awaits an object of another event loop
_OTHER_LOOP_MESSAGES: Final = (
    "attached to a different loop",
    "different event loop",
    "event loop other than the current one",
)


class LoaderLoopError(RuntimeError):
    """An async loader awaited an object bound to the replica's event loop.

    It ran on a loader loop (the default); the message names the opt-out.
    """


def is_other_loop_error(exc: BaseException) -> bool:
    """Whether ``exc`` is asyncio's error for an object awaited on the wrong loop."""
    if not isinstance(exc, RuntimeError):
        return False
    message = str(exc)
    return any(text in message for text in _OTHER_LOOP_MESSAGES)


class _LoaderLoop:
    """One asyncio event loop running forever in a daemon thread."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.busy = 0  # loads handed to it and not finished (under the pool's lock)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self._run, name=f"muxgate-loader-{index}", daemon=True
        )
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()


class _Submission:
    """One coroutine on a loader loop: ``done`` mirrors its task's outcome."""

    def __init__(
        self,
        loader_loop: _LoaderLoop,
        make_coro: Callable[[], Coroutine[Any, Any, Any]],
        context: contextvars.Context,
    ) -> None:
        self._loop = loader_loop.loop
        self._make_coro = make_coro
        self._context = context
        self._task: asyncio.Task[Any] | None = None
        self.done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        # The callbacks run in the order they were queued: start before any cancel.
        self._loop.call_soon_threadsafe(self._start)

    def _start(self) -> None:  # on the loader loop
        if not self.done.set_running_or_notify_cancel():
            return
        try:
            coro = self._context.run(self._make_coro)
        except BaseException as exc:
            self.done.set_exception(exc)
            return
        self._task = self._loop.create_task(coro, context=self._context)
        self._task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:  # on the loader loop
        if task.cancelled():
            # Asked for by ``cancel`` (the waiting side then raises its own
            # CancelledError), or the loader cancelled itself: a failed load.
            self.done.set_exception(RuntimeError("The loader's task was cancelled."))
        elif (exc := task.exception()) is not None:
            self.done.set_exception(exc)
        else:
            self.done.set_result(task.result())

    def cancel(self) -> None:
        """Ask the task to stop (it ends at its next ``await``)."""
        self._loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:  # on the loader loop
        if self._task is not None:
            self._task.cancel()


class LoaderThread:
    """The process's loader loop, started on first use (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: _LoaderLoop | None = None
        #: nice steps the thread that starts the loader thread drops (see "Priority")
        self._calls_nice = 0
        #: the steps of the loads run here, which calls with a loaded model may
        #: wait out (``steps.enabled``: the replica sets it from its spec)
        self.steps = LoadSteps()

    def calls_yield_to_loads(self, enabled: bool) -> None:
        """With ``enabled``, the thread that starts the loader thread lowers
        its priority by ``CALLS_NICE`` once it has (the replica sets this from
        its spec; elsewhere, e.g. a test process, priorities stay alone)."""
        self._calls_nice = CALLS_NICE if enabled else 0

    def __repr__(self) -> str:
        loader_loop = self._loop
        busy = "not started" if loader_loop is None else f"busy={loader_loop.busy}"
        return f"<LoaderThread {busy}>"

    def _take(self) -> _LoaderLoop:
        with self._lock:
            if self._loop is None:
                self._loop = _LoaderLoop(0)
                # After the start: the loader thread keeps the priority it was born with.
                _lower_calling_thread(self._calls_nice)
            self._loop.busy += 1
            return self._loop

    def _give_back(self, loader_loop: _LoaderLoop) -> None:
        with self._lock:
            loader_loop.busy -= 1

    def reset_after_fork(self) -> None:
        """A forked child has none of the parent's threads: start afresh."""
        self._lock = threading.Lock()
        self._loop = None
        self.steps.reset_after_fork()

    async def run(self, make_coro: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """Run ``make_coro()`` on the loader loop, in a copy of the current context."""
        loader_loop = self._take()
        try:
            context = contextvars.copy_context()
            context.run(_HOME.set, asyncio.get_running_loop())
            last = LastStep(self.steps)
            if self.steps.enabled:
                steps = self.steps
                submission = _Submission(
                    loader_loop, lambda: stepped(make_coro(), steps, last), context
                )
            else:
                submission = _Submission(loader_loop, make_coro, context)
            waiter = asyncio.wrap_future(submission.done)
            try:
                # shield: cancelling this caller must not cancel ``done`` before the task ends
                return await asyncio.shield(waiter)
            except asyncio.CancelledError:
                if not waiter.done():
                    submission.cancel()
                    await _wait_out(waiter)
                if not waiter.cancelled() and waiter.exception() is None:
                    await run_unload_hook(waiter.result())  # built anyway: never handed out
                raise
        finally:
            if last.open:
                # After the callbacks this outcome makes ready: the requests
                # waiting for the model go on before the hits the step held.
                asyncio.get_running_loop().call_soon(last.close)
            self._give_back(loader_loop)


def _lower_calling_thread(steps: int) -> None:
    """Raise the calling thread's ``nice`` by ``steps`` (Linux only: elsewhere
    the call would change the whole process); a refusal is logged, not raised."""
    if steps <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps))
    except OSError as exc:
        _log.warning("Could not lower the serving thread's priority below the loads': %s", exc)


async def _wait_out(waiter: asyncio.Future[Any]) -> None:
    """Wait for ``waiter`` to finish whatever its outcome, through further cancellations
    (the caller re-raises the first one)."""
    while not waiter.done():
        try:
            await asyncio.wait([waiter])
        except asyncio.CancelledError:
            continue


_LOOPS = LoaderThread()


def loader_thread() -> LoaderThread:
    """The process's loader thread."""
    return _LOOPS


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_LOOPS.reset_after_fork)


def is_async_callable(target: Callable[..., Any]) -> bool:
    """An ``async def`` function or method, or an object whose ``__call__`` is one."""
    if inspect.iscoroutinefunction(target):
        return True
    call = getattr(target, "__call__", None)  # noqa: B004 - callable objects
    return call is not None and inspect.iscoroutinefunction(call)
