"""The guard for anyio's Unix socket streams (``muxgate.replicas._unix_streams``):
a ``receive()`` cancelled in the same turn of the event loop in which its
socket turns readable leaves no error in the loop, and the streams still
read, write and end as anyio's do.

The race is made deterministic: the peer writes first, then the task's
cancellation is queued; in the loop's next turn the cancellation runs, and
then the socket's reader callback, which anyio registered as the waiting
future's ``set_result``. Without the guard that callback raises
``InvalidStateError`` in the loop (anyio 4.16).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from muxgate.replicas._unix_streams import guard_unix_streams, unix_streams_guarded

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the race is the asyncio backend's


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What the running loop reports to its exception handler meanwhile."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        yield errors
    finally:
        loop.set_exception_handler(previous)


async def _pair() -> tuple[anyio.abc.UNIXSocketStream, socket.socket]:
    ours, peer = socket.socketpair(socket.AF_UNIX)
    return await anyio.abc.UNIXSocketStream.from_socket(ours), peer


async def _until_waiting(stream: anyio.abc.UNIXSocketStream, attribute: str) -> None:
    """Let the loop turn until the stream's task waits for its socket."""
    for _ in range(1000):
        if getattr(stream, attribute, None) is not None:
            return
        await asyncio.sleep(0)  # one turn of the loop, not a wait for time
    raise AssertionError(f"the stream never waited ({attribute})")


async def test_a_receive_cancelled_as_its_data_arrives_leaves_no_loop_error(
    loop_errors: list[dict[str, Any]],
) -> None:
    assert guard_unix_streams() and unix_streams_guarded()
    stream, peer = await _pair()
    with peer:
        task = asyncio.create_task(stream.receive())
        await _until_waiting(stream, "_receive_future")
        peer.send(b"frame")  # readable in the loop's next turn ...
        asyncio.get_running_loop().call_soon(task.cancel)  # ... where this runs first
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(3):  # the reader callback's turn, and the done-callbacks'
            await asyncio.sleep(0)
        await stream.aclose()
    assert not loop_errors, loop_errors
    assert stream._receive_future is None  # the done-callback forgot it


async def test_guarded_streams_read_write_and_end_as_before(
    loop_errors: list[dict[str, Any]],
) -> None:
    guard_unix_streams()
    stream, peer = await _pair()
    with peer:
        peer.setblocking(False)
        reader = asyncio.create_task(stream.receive())
        await _until_waiting(stream, "_receive_future")
        await asyncio.get_running_loop().sock_sendall(peer, b"hello")
        assert await reader == b"hello"
        # a send that fills the socket's buffer waits until the peer reads
        stream._raw_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        payload = b"x" * (1 << 20)
        sender = asyncio.create_task(stream.send(payload))
        await _until_waiting(stream, "_send_future")
        received = bytearray()
        while len(received) < len(payload):
            received += await asyncio.get_running_loop().sock_recv(peer, 65536)
        await sender
        assert bytes(received) == payload
        peer.shutdown(socket.SHUT_WR)
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()
    await stream.aclose()
    assert not loop_errors, loop_errors


async def test_the_gateway_guards_before_it_connects(tmp_path: Path) -> None:
    from muxgate.gateway._handshake import connect_stream

    path = tmp_path / "replica.sock"
    listener = await anyio.create_unix_listener(path)
    async with listener:
        stream = await connect_stream(f"unix:{path}")
        with contextlib.suppress(Exception):
            await stream.aclose()
    assert unix_streams_guarded()
