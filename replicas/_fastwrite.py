"""Writing a frame without awaiting, when the socket takes it at once.

anyio's ``send`` costs two checkpoints per frame (one a yield to the event
loop) plus the cancel scope the callers put around it. When nothing else is
being written, a frame can usually go out synchronously instead:

* over a Unix socket (anyio drives the raw non-blocking socket): one
  ``socket.send``, which takes all of a small frame, part of it, or nothing
  (buffer full);
* over TCP (anyio wraps an asyncio transport): ``transport.write``, which
  takes the whole frame and buffers what the kernel does not accept, as
  long as its buffer is below a high-water mark (back-pressure: above it the
  caller takes the awaiting path, which waits for the buffer to drain).

No await means no cancellation point: a frame is written whole, in part (the
caller must write the rest next, before any other frame) or not at all, and
the caller knows which. The caller guarantees that no ``send`` on the stream
is under way. Streams of another kind get ``0`` (always the awaiting path).
"""

from __future__ import annotations

import asyncio
import socket

import anyio.abc

__all__ = ["DirectWriter"]

#: Bytes buffered in a transport above which nothing is written directly.
TRANSPORT_HIGH_WATER = 1 << 16


class DirectWriter:
    """Synchronous writes to ``stream`` (see the module docstring)."""

    __slots__ = ("_sock", "_transport")

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        # anyio keeps the asyncio transport of a TCP stream in a private
        # attribute; Unix streams expose their raw socket (and have no
        # transport). Checked once here; a stream of another kind gets None.
        transport = getattr(stream, "_transport", None)
        self._transport = transport if isinstance(transport, asyncio.WriteTransport) else None
        self._sock: socket.socket | None = None
        if self._transport is None and isinstance(stream, anyio.abc.SocketStream):
            try:
                sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
            except anyio.TypedAttributeLookupError:
                sock = None
            if sock is not None and sock.family == socket.AF_UNIX and not sock.getblocking():
                self._sock = sock

    def __repr__(self) -> str:
        kind = "transport" if self._transport else "socket" if self._sock else "none"
        return f"<DirectWriter {kind}>"

    def write(self, data: bytes) -> int:
        """Write what the socket takes now; the number of bytes written.

        ``0``: nothing (full, closing, failed, or not possible on this
        stream): the caller sends it the awaiting way, which also reports a
        broken connection properly.
        """
        transport = self._transport
        if transport is not None:
            if transport.is_closing() or transport.get_write_buffer_size() > TRANSPORT_HIGH_WATER:
                return 0
            transport.write(data)
            return len(data)
        sock = self._sock
        if sock is None:
            return 0
        try:
            return sock.send(data)
        except OSError:  # BlockingIOError included: the awaiting path waits or reports
            return 0
