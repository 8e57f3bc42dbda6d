"""Handle calls that stay in flight until the test says so.

``Down.hold`` (tests/apps/handle_apps.py) connects to the test's TCP
listener (:func:`held_calls`), sends its name and returns when the test
answers, so the test sees the call arrive, decides when it ends, and sees the
connection close when the call is cancelled.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

__all__ = ["HeldCall", "HeldCalls", "held_calls"]


class HeldCall:
    """One ``Down.hold`` call as the test sees it: its connection to the test."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self._stream = stream

    async def release(self) -> None:
        """Let the call return."""
        await self._stream.send(b"go")
        await self._stream.aclose()

    async def wait_closed(self) -> None:
        """Until the replica drops the call (it was cancelled), 10 s at most."""
        with anyio.fail_after(10), contextlib.suppress(anyio.EndOfStream):
            await self._stream.receive()
            raise AssertionError("the held call sent more than its name")
        await self._stream.aclose()


class HeldCalls:
    """The listener ``Down.hold`` calls connect to (``port``)."""

    def __init__(self, port: int, arrivals: Any) -> None:
        self.port = port
        self._arrivals = arrivals

    async def arrived(self, name: str) -> HeldCall:
        """The next held call to reach its replica, which must be ``name``."""
        with anyio.fail_after(10):
            arrived, stream = await self._arrivals.receive()
        assert arrived == name
        return HeldCall(stream)


@contextlib.asynccontextmanager
async def held_calls() -> AsyncIterator[HeldCalls]:
    send, receive = anyio.create_memory_object_stream[tuple[str, anyio.abc.SocketStream]](16)

    async def accept(stream: anyio.abc.SocketStream) -> None:
        name = await BufferedByteReceiveStream(stream).receive_until(b"\n", 200)
        await send.send((name.decode(), stream))

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, send, receive, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, accept)
        yield HeldCalls(port, receive)
        tg.cancel_scope.cancel()
