"""The event loops handle calls run on, and their HTTP clients.

One pooled ``httpx.AsyncClient`` per event loop and process, created on
first use: a client's connections belong to the loop that opened them.

``handle.remote()`` starts its call as a task on an event loop. Async code
has one, the caller's. Sync code has none, and gets:

- in a sync deployment method, which the replica runs in a worker thread,
  the replica's own event loop, through the :class:`SyncCalls` the replica
  binds for that call: the call goes out on the replica's pooled client, and
  when the replica abandons the request (its deadline passed, its client
  went away), the calls the thread waits for in ``result()`` are cancelled,
  as the calls an async method awaits are when its task is cancelled;
- anywhere else (a script, a thread of one's own, a sync model loader or
  ``__init__`` in a replica), a private event loop in a daemon thread,
  started on first use and shared by every such caller in the process
  (started again in a forked child, which inherits the loop but not its
  thread); at interpreter exit its connections are closed and it stops.

Either way the task runs in a copy of the caller's context, taken at
``remote()``: the deadline and trace context of the request being served go
with the call.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import os
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import httpx

__all__ = [
    "SyncCalls",
    "aclose_handle_clients",
    "client",
    "loop_for_sync_caller",
    "running_loop",
    "sync_calls",
]

# Weak keys, so a closed and dropped loop takes its client along.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
    weakref.WeakKeyDictionary()
)


def client() -> httpx.AsyncClient:
    """The running event loop's handle client."""
    loop = asyncio.get_running_loop()
    found = _clients.get(loop)
    if found is None or found.is_closed:
        import httpx  # imported on first use: replicas that never call out skip it

        found = httpx.AsyncClient(
            # No overall timeout: the gateway enforces each call's deadline
            # and answers 504; only connecting is bounded here.
            timeout=httpx.Timeout(None, connect=10.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            trust_env=False,
        )
        _clients[loop] = found
    return found


async def aclose_handle_clients() -> None:
    """Close this event loop's handle connections (harmless when there are none).

    Handles keep working afterwards: the next call opens a new client.
    """
    loop = asyncio.get_running_loop()
    found = _clients.pop(loop, None)
    if found is not None:
        await found.aclose()


class _Cancellable(Protocol):
    def cancel(self) -> None: ...


class SyncCalls:
    """The handle calls of one sync deployment call, which a worker thread runs.

    The calls run on ``loop`` (the replica's). ``abandon()``, on that loop,
    cancels the calls the thread waits for in ``result()``, and any it waits
    for afterwards: the thread cannot be interrupted, but the request it
    serves is gone, and so is the point of its downstream calls.
    """

    __slots__ = ("abandoned", "loop", "waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.abandoned = False
        #: responses the thread waits for in result() (touched on ``loop`` only)
        self.waiting: set[_Cancellable] = set()

    def __repr__(self) -> str:
        state = " abandoned" if self.abandoned else ""
        return f"<SyncCalls waiting={len(self.waiting)}{state}>"

    @contextlib.contextmanager
    def bound(self) -> Iterator[None]:
        """Within the block (in the worker thread), handle calls use these."""
        token = _sync_calls.set(self)
        try:
            yield
        finally:
            _sync_calls.reset(token)

    def abandon(self) -> None:
        """The request was abandoned: cancel what the thread waits for."""
        self.abandoned = True
        for response in list(self.waiting):
            response.cancel()


_sync_calls: contextvars.ContextVar[SyncCalls | None] = contextvars.ContextVar(
    "muxgate_sync_calls", default=None
)


def sync_calls() -> SyncCalls | None:
    """The calls of the sync deployment call this thread runs, if any."""
    return _sync_calls.get()


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, if any (without raising)."""
    return asyncio._get_running_loop()


class _Background:
    lock = threading.Lock()
    loop: asyncio.AbstractEventLoop | None = None
    thread: threading.Thread | None = None
    pid = 0


def _background_loop() -> asyncio.AbstractEventLoop:
    with _Background.lock:
        loop = _Background.loop
        if loop is None or _Background.pid != os.getpid():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="muxgate-handles", daemon=True)
            thread.start()
            if _Background.pid == 0:
                atexit.register(_stop_background)
            _Background.loop, _Background.thread, _Background.pid = loop, thread, os.getpid()
        return loop


def _stop_background() -> None:
    # At exit, while daemon threads still run: close the loop's connections
    # (else each is a ResourceWarning) and the loop. Calls still running fail.
    loop, thread = _Background.loop, _Background.thread
    if loop is None or thread is None or _Background.pid != os.getpid():
        return
    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(aclose_handle_clients(), loop).result(timeout=5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    if not thread.is_alive():
        loop.close()


def loop_for_sync_caller() -> asyncio.AbstractEventLoop:
    """Where a call made with no running loop runs (see the module docstring)."""
    calls = _sync_calls.get()
    return calls.loop if calls is not None else _background_loop()
