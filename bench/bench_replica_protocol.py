"""Round-trip latency and throughput of trivial calls over one replica connection.

Starts an ``Echo`` replica (tests/apps/echo.py) on a Unix socket, connects
with ``ReplicaConnection`` and measures, at concurrency 1 and 32:

* ``handle``: a handle call (``method="add"``, msgpack args), the bare protocol;
* ``http``: an HTTP call (``Request.from_wire``, ``__call__``, ``encode_result``).

for each replica event loop (uvloop, asyncio). The client loop is asyncio
unless ``--client-uvloop``. Bounded: ``--calls`` per cell and ``--max-seconds``.

    .venv/bin/python bench/bench_replica_protocol.py [--calls 3000] [--client-uvloop]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import anyio
import msgspec
from _common import percentile, print_machine

from muxgate.gateway._connection import ReplicaConnection
from muxgate.gateway._launcher import LocalLauncher
from muxgate.replicas._protocol import HttpRequest
from muxgate.replicas.contract import ReplicaSpec

APP_DIR = str(Path(__file__).resolve().parents[1] / "tests" / "apps")


async def run_cell(
    conn: ReplicaConnection, kind: str, concurrency: int, calls: int, max_seconds: float
) -> tuple[list[float], float]:
    args = msgspec.msgpack.encode([1, 2])
    http = HttpRequest(method="GET", path="/", query="", headers=[], body=b"")
    latencies: list[float] = []
    remaining = calls
    deadline = time.perf_counter() + max_seconds

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            start = time.perf_counter()
            if kind == "handle":
                reply = await conn.call(request_id="b", method="add", args=args)
            else:
                reply = await conn.call(request_id="b", http=http)
            latencies.append(time.perf_counter() - start)
            assert reply.error is None, reply.error

    # Warm-up, not measured.
    for _ in range(200):
        await conn.call(request_id="w", method="add", args=args)
    began = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    return latencies, time.perf_counter() - began


async def main(args: argparse.Namespace) -> None:
    launcher = LocalLauncher()
    rows: list[tuple[str, str, int, int, float, float, float, float]] = []
    try:
        for loop in ("uvloop", "asyncio"):
            process = await launcher.start(
                ReplicaSpec(
                    deployment="Echo",
                    import_path="echo:Echo",
                    replica_id=f"bench-{loop}",
                    app_dir=APP_DIR,
                    listen="unix:",
                    max_ongoing_requests=64,
                    log_level="WARNING",
                    event_loop=loop,  # type: ignore[arg-type]
                )
            )
            async with await ReplicaConnection.connect(process.address) as conn:
                for kind in ("handle", "http"):
                    for concurrency in (1, 32):
                        lat, elapsed = await run_cell(
                            conn, kind, concurrency, args.calls, args.max_seconds
                        )
                        rows.append(
                            (
                                loop,
                                kind,
                                concurrency,
                                len(lat),
                                percentile(lat, 0.5) * 1e6,
                                percentile(lat, 0.99) * 1e6,
                                statistics.fmean(lat) * 1e6,
                                len(lat) / elapsed,
                            )
                        )
            with anyio.fail_after(15):
                await process.wait()
    finally:
        await launcher.aclose()

    print_machine()
    print(f"client loop: {'uvloop' if args.client_uvloop else 'asyncio'}; Unix socket")
    header = (
        f"{'replica loop':<12} {'call':<6} {'conc':>4} {'calls':>6} "
        f"{'p50 us':>8} {'p99 us':>8} {'mean us':>8} {'calls/s':>9}"
    )
    print(header)
    print("-" * len(header))
    for loop, kind, conc, n, p50, p99, mean, rate in rows:
        print(
            f"{loop:<12} {kind:<6} {conc:>4} {n:>6} {p50:>8.0f} {p99:>8.0f} "
            f"{mean:>8.0f} {rate:>9.0f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per cell")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="time bound per cell")
    parser.add_argument("--client-uvloop", action="store_true", help="run this client on uvloop")
    ns = parser.parse_args()
    anyio.run(main, ns, backend="asyncio", backend_options={"use_uvloop": ns.client_uvloop})
