"""Writing frames to one replica connection without awaiting in the caller.

A frame is written at once by one synchronous call
(``muxgate.replicas._fastwrite.DirectWriter``). What the socket does not
take at once goes to one writer task that awaits the stream (shielded, so no
half frame is left on the wire); frames written meanwhile queue behind it and
go out together in its next write. Since writing is synchronous, a cancelled
caller's frame is either still queued (``take_back`` removes it) or written
whole. bench/bench_write_path.py measures the write path against the
stream's own send. (Deferring writes to the end of the loop iteration to
coalesce them was measured too: slower at concurrency 1 and 32, see
bench_replica_protocol.py.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import anyio
import anyio.abc

from muxgate.replicas.contract import DirectWriter

__all__ = ["FrameWriter"]


class FrameWriter:
    """The write side of one stream; each frame tagged with its call id (0:
    not a call, or no longer one that can be taken back).

    Args:
        stream: the connection's stream.
        on_failed: called with the reason when an awaiting write fails (the
            connection shuts down, which calls ``close``).
    """

    def __init__(self, stream: anyio.abc.ByteStream, on_failed: Callable[[str], None]) -> None:
        self._stream = stream
        self._on_failed = on_failed
        self._direct = DirectWriter(stream)
        # (call id or 0, frame) waiting for the active writer
        self._out: list[tuple[int, bytes]] = []
        self._sending = False
        self._closed = False
        self._flushers: set[asyncio.Task[None]] = set()

    def queue(self, frame: bytes, call_id: int) -> None:
        """Write a frame now, or queue it behind an awaiting write under
        way; synchronous (callable from a cancelled task)."""
        self._out.append((call_id, frame))
        if not self._sending:
            self._write_now()

    def take_back(self, call_id: int) -> bool:
        """Remove the queued frame of ``call_id``; false if it was written
        (or is being written)."""
        for i, (queued_id, _) in enumerate(self._out):
            if queued_id == call_id:
                del self._out[i]  # never reached the socket
                return True
        return False

    def close(self) -> set[int]:
        """Write nothing more; the ids of the calls still queued (unsent)."""
        unsent = {call_id for call_id, _ in self._out}
        self._out = []
        self._closed = True
        return unsent

    def _write_now(self) -> None:
        """Write everything queued without awaiting (``DirectWriter``);
        what the socket does not take goes to an awaiting writer task."""
        if not self._out or self._closed:
            return
        batch = self._out
        data = batch[0][1] if len(batch) == 1 else b"".join(f for _, f in batch)
        sent = self._direct.write(data)
        if sent == len(data):
            self._out = []
            return
        if sent:
            # The rest must go next, whole. Part of it is on the wire: its
            # calls are no longer unsent (id 0), nor can they be taken back.
            self._out = [(0, data[sent:])]
        self._sending = True
        task = asyncio.get_running_loop().create_task(self._flush_in_background())
        self._flushers.add(task)
        task.add_done_callback(self._flushers.discard)

    async def _flush_in_background(self) -> None:
        """The awaiting writer (the caller set ``_sending``)."""
        try:
            # Shielded: closing the connection must not leave half a frame
            # that a later write would continue.
            with anyio.CancelScope(shield=True):
                while self._out and not self._closed:
                    batch, self._out = self._out, []
                    await self._stream.send(
                        batch[0][1] if len(batch) == 1 else b"".join(f for _, f in batch)
                    )
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            # Part of the data may have reached the replica: those calls died.
            self._on_failed(f"write failed: {exc!r}")
        finally:
            self._sending = False
