"""The replica's side of a gateway connection (writing frames) and its
``max_ongoing_requests`` guard; used by ``muxgate.replicas._replica``."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import anyio
import anyio.abc

from muxgate.replicas._fastwrite import DirectWriter
from muxgate.replicas._protocol import Message, encode_frame

__all__ = ["GatewayConnection", "Slots"]

#: Seconds ``flush`` waits for queued frames to be written.
_FLUSH_TIMEOUT_S = 5.0


class Slots:
    """The replica's ``max_ongoing_requests`` guard (see ``_replica``).

    ``try_acquire`` is the synchronous fast path; ``acquire`` waits in FIFO
    order. A released slot passes straight to the oldest waiter, so a waiter
    that was woken cannot lose its slot to a newcomer.
    """

    __slots__ = ("_waiters", "limit", "max_waiting", "running")

    def __init__(self, limit: int, max_waiting: int) -> None:
        self.limit = limit
        self.max_waiting = max_waiting
        self.running = 0
        self._waiters: deque[anyio.Event] = deque()

    def __repr__(self) -> str:
        return f"<Slots running={self.running}/{self.limit} waiting={len(self._waiters)}>"

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        if self.running < self.limit and not self._waiters:
            self.running += 1
            return True
        return False

    async def acquire(self) -> None:
        event = anyio.Event()
        self._waiters.append(event)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():
                self.release()  # handed a slot as we gave up: pass it on
            else:
                self._waiters.remove(event)
            raise

    def release(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()  # the slot changes hands; running stays
        else:
            self.running -= 1


class GatewayConnection:
    """One accepted gateway connection: its stream, the calls it sent (for
    ``Cancel``), and the frames going back.

    Sending never awaits the socket: a frame is written at once by one
    synchronous call (``DirectWriter``). What the socket does not take goes
    to one writer task that awaits the stream (shielded, so no half frame is
    left); frames sent meanwhile queue behind it and go out together.
    """

    __slots__ = (
        "_direct",
        "_out",
        "_sending",
        "_writer",
        "_written",
        "broken",
        "calls",
        "peer",
        "push_state",
        "stream",
        "welcomed",
    )

    def __init__(self, stream: anyio.abc.ByteStream, *, push_state: bool = False) -> None:
        self.stream = stream
        self.welcomed = False
        #: the gateway asked for ``StatePush`` frames in its ``Hello``
        self.push_state = push_state
        self.broken = False
        # call id -> its cancel scope, for Cancel(id); ids are per connection.
        self.calls: dict[int, anyio.CancelScope] = {}
        self._out: list[bytes] = []
        self._sending = False  # the writer task is awaiting the stream
        self._writer: asyncio.Task[None] | None = None
        self._written = anyio.Event()  # set while nothing waits to be written
        self._written.set()
        self._direct = DirectWriter(stream)
        try:
            self.peer = str(stream.extra(anyio.abc.SocketAttribute.remote_address))
        except Exception:
            self.peer = "?"

    def __repr__(self) -> str:
        return (
            f"<GatewayConnection {self.peer} calls={len(self.calls)} queued={len(self._out)} "
            f"broken={self.broken}>"
        )

    async def send(self, message: Message) -> bool:
        """Write one frame (or queue it behind a write under way); False
        when the peer is known to be gone (the caller moves on)."""
        return self.send_nowait(message)

    def send_nowait(self, message: Message) -> bool:
        """``send`` from synchronous code (it never awaits): the same frame,
        the same order."""
        if self.broken:
            return False
        frame = encode_frame(message)
        if self._sending:
            self._out.append(frame)  # the writer task takes it
            return True
        sent = self._direct.write(frame)
        if sent < len(frame):
            self._out.append(frame[sent:])  # the rest goes first, the awaiting way
            self._sending = True
            self._written = anyio.Event()
            self._writer = asyncio.get_running_loop().create_task(self._write_awaiting())
        return True

    async def _write_awaiting(self) -> None:
        try:
            with anyio.CancelScope(shield=True):
                while self._out:
                    data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
                    self._out.clear()
                    await self.stream.send(data)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.broken = True
            self._out.clear()
        finally:
            self._sending = False
            self._written.set()

    async def flush(self) -> None:
        """Wait (bounded) until everything queued has been written."""
        with anyio.move_on_after(_FLUSH_TIMEOUT_S):
            await self._written.wait()

    async def finish(self) -> None:
        """Write what is queued, then half-close: the gateway reads every
        reply, sees end-of-stream, and closes its end."""
        await self._written.wait()
        with contextlib.suppress(Exception):
            await self.stream.send_eof()
