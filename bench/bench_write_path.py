"""Cost of writing one frame on a replica connection.

The round-trip benches (bench_replica_protocol.py, bench_gateway.py) are
dominated by the two processes and the loop; this isolates the write path
the gateway takes for every call. Paths:

* ``stream.send (before)``: what every write did before the fast path, an
  anyio stream send under a shielded cancel scope;
* ``_write, awaiting``: ``ReplicaConnection._write`` with a ``DirectWriter``
  that never writes, so frames go to the awaiting writer task;
* ``_write (now)``: ``ReplicaConnection._write`` as it is: queued, written
  synchronously at the end of the loop iteration.

The peer is a socket drained by a task in the same loop; each run writes
``--frames`` Call frames (an HTTP call's size), yielding to the loop after
each (as a caller awaiting its reply does). The table shows the loop's time
per frame (the write, the yield and the peer's read), median of
``--repeat`` runs.

    .venv/bin/python bench/bench_write_path.py [--frames 20000] [--repeat 7] [--uvloop] [--tcp]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

import anyio
import anyio.abc
from _common import print_machine

from muxgate.gateway._connection import ReplicaConnection
from muxgate.replicas._fastwrite import DirectWriter
from muxgate.replicas._protocol import (
    Call,
    FrameDecoder,
    HttpRequest,
    ReplicaState,
    Welcome,
    encode_frame,
)


async def connected_pair(tcp: bool) -> tuple[anyio.abc.SocketStream, anyio.abc.SocketStream]:
    if tcp:
        multi = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        listener = multi.listeners[0]
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        stream: anyio.abc.SocketStream = await anyio.connect_tcp("127.0.0.1", port)
        peer = await listener.accept()
        await listener.aclose()
        return stream, peer
    path = os.path.join(tempfile.mkdtemp(prefix="muxgate-bench-"), "s.sock")
    unix = await anyio.create_unix_listener(path)
    stream = await anyio.connect_unix(path)
    peer = await unix.accept()
    await unix.aclose()
    os.unlink(path)
    return stream, peer


PATHS = ("stream.send (before)", "_write, awaiting", "_write (now)")


async def one_run(path: str, frames: int, tcp: bool) -> float:
    stream, peer = await connected_pair(tcp)
    welcome = Welcome(version=0, deployment="D", replica_id="r", pid=0, state=ReplicaState())
    conn = ReplicaConnection(stream, welcome, address="bench", decoder=FrameDecoder())
    if path == "_write, awaiting":
        conn._writer._direct = DirectWriter(object())  # type: ignore[arg-type]
    http = HttpRequest(method="GET", path="/x", query="", headers=[("host", "h")], body=b"")
    frame = encode_frame(
        Call(id=1, request_id="0123456789abcdef01234567", model_id="m1", http=http)
    )
    before = path == "stream.send (before)"
    async with anyio.create_task_group() as tg:

        async def drain() -> None:
            try:
                while True:
                    await peer.receive(1 << 20)
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass

        tg.start_soon(drain)
        clock = time.perf_counter
        begin = clock()
        for _ in range(frames):
            if before:
                with anyio.CancelScope(shield=True):
                    await stream.send(frame)
            else:
                await conn._write(frame)
            # A caller then waits for its reply: the peer reads meanwhile.
            await asyncio.sleep(0)
        total = clock() - begin
        await stream.aclose()
        await peer.aclose()
    return total / frames * 1e6


async def main(frames: int, repeat: int, tcp: bool) -> None:
    per_frame: dict[str, list[float]] = {path: [] for path in PATHS}
    for _ in range(repeat):
        for path in PATHS:
            per_frame[path].append(await one_run(path, frames, tcp))
    print(f"{'path':<24}{'us/frame (median)':>18}{'min':>8}{'max':>8}")
    for path, values in per_frame.items():
        print(f"{path:<24}{statistics.median(values):>18.2f}{min(values):>8.2f}{max(values):>8.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--tcp", action="store_true", help="TCP (asyncio transport), not Unix")
    ns = parser.parse_args()
    print_machine()
    socket_kind = "tcp" if ns.tcp else "unix"
    loop_kind = "uvloop" if ns.uvloop else "asyncio"
    print(f"loop: {loop_kind}; {socket_kind} socket; {ns.frames} frames x {ns.repeat} runs")
    anyio.run(
        main,
        ns.frames,
        ns.repeat,
        ns.tcp,
        backend="asyncio",
        backend_options={"use_uvloop": ns.uvloop},
    )
