"""A guard for anyio's Unix socket streams on asyncio, used at both ends of a
local replica connection.

anyio (4.x, still in 4.16) reads and writes a Unix socket stream directly on
the raw socket: a ``receive()`` that finds nothing to read waits on a future,
and registers ``future.set_result`` as the socket's reader callback; the
future's done-callback removes the reader again. When the waiting task is
cancelled, or the stream closed, in the same turn of the event loop in which
the socket turns readable, the reader callback is already queued: it runs
after the future is done, and ``set_result`` raises ``InvalidStateError``
inside the event loop. Nothing is lost (nobody waits for that result any
more), but asyncio logs "Exception in callback" as an error, and anyio's
pytest plugin fails the test that was running. It happens when a pool stops
a replica (the gateway cancels its connection's reader) just as the replica's
last frames or its end of stream arrive.

:func:`guard_unix_streams` replaces anyio's two waiting helpers with ones
whose callback completes the future only while it is pending; everything
else about the streams is anyio's. It is applied before a connection is
opened or a listener created (``gateway._handshake``, ``replicas._server``)
and is idempotent. If anyio's class no longer has those helpers (a version
that reads differently), nothing is replaced: the guard is only ever for the
anyio it recognises.

Written as a guard rather than by avoiding anyio's Unix streams: the rest of
the connection code is anyio's byte-stream interface, shared with TCP and
TLS, where the transports complete their waits safely.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

__all__ = ["guard_unix_streams", "unix_streams_guarded"]

_log = logging.getLogger("muxgate.replica")

_guarded = False


def _complete_unless_done(future: asyncio.Future[None]) -> None:
    """The socket turned ready: wake the waiter, unless it stopped waiting."""
    if not future.done():
        future.set_result(None)


def _wait_until(
    stream: Any,
    attribute: str,
    watch: Callable[..., None],
    unwatch: Callable[[socket.socket], object],
) -> asyncio.Future[None]:
    """A future completed when ``stream``'s socket is ready (``watch``:
    the loop's ``add_reader`` or ``add_writer``), kept on ``attribute``
    while pending, as anyio keeps it."""
    raw: socket.socket = stream._raw_socket

    def forget(_: object) -> None:
        delattr(stream, attribute)
        unwatch(raw)

    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    setattr(stream, attribute, future)
    watch(raw, _complete_unless_done, future)
    future.add_done_callback(forget)
    return future


def _wait_until_readable(self: Any, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    return _wait_until(self, "_receive_future", loop.add_reader, loop.remove_reader)


def _wait_until_writable(self: Any, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    return _wait_until(self, "_send_future", loop.add_writer, loop.remove_writer)


def guard_unix_streams() -> bool:
    """Install the guard (once); True when anyio's streams are guarded."""
    global _guarded
    if _guarded:
        return True
    try:
        from anyio._backends import _asyncio as backend
    except ImportError:  # pragma: no cover - anyio without its asyncio backend
        return False
    mixin = getattr(backend, "_RawSocketMixin", None)
    wanted = ("_wait_until_readable", "_wait_until_writable", "_raw_socket")
    if mixin is None or not all(hasattr(mixin, name) for name in wanted):
        _log.debug("anyio's raw socket streams changed; Unix streams are not guarded")
        return False
    mixin._wait_until_readable = _wait_until_readable
    mixin._wait_until_writable = _wait_until_writable
    _guarded = True
    return True


def unix_streams_guarded() -> bool:
    """Whether :func:`guard_unix_streams` has replaced anyio's helpers."""
    return _guarded
