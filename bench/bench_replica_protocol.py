"""Round-trip latency and throughput of trivial calls over one replica connection.

Starts an ``Echo`` replica (tests/apps/echo.py) on a Unix socket, connects
with ``ReplicaConnection`` and measures, at concurrency 1 and 32:

* ``handle``: a handle call (``method="add"``, msgpack args), the bare protocol;
* ``http``: an HTTP call (``Request.from_wire``, ``__call__``, ``encode_result``).

for each replica event loop (uvloop, asyncio). The client loop is asyncio
unless ``--client-uvloop``. Bounded: ``--calls`` per cell and ``--max-seconds``.

``--transports`` compares the channel a remote replica uses with the local
Unix socket: ``tcp`` (loopback TCP, no secret), ``secret`` (loopback TCP,
the cluster secret proven at the handshake: the data plane is the same
frames) and ``tls`` (the secret over mutual TLS, certificates made for the
run with ``cryptography``).

    .venv/bin/python bench/bench_replica_protocol.py [--calls 3000] [--client-uvloop]
    .venv/bin/python bench/bench_replica_protocol.py --loops uvloop \
        --transports unix,tcp,secret,tls
    .venv/bin/python bench/bench_replica_protocol.py --transports unix,tcp,secret,tls \
        --paired 10 --calls 6000
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
from _common import percentile, print_machine

from muxgate.gateway._connection import ReplicaConnection
from muxgate.gateway.launchers.local import LocalLauncher
from muxgate.replicas._protocol import HttpRequest
from muxgate.replicas.contract import (
    ChannelAuth,
    ChannelSettings,
    ReplicaSpec,
    TlsSettings,
    client_ssl_context,
)

TESTS = Path(__file__).resolve().parents[1] / "tests"
APP_DIR = str(TESTS / "apps")
SECRET = "bench-cluster-secret-0123456789abcdef"
TRANSPORTS = ("unix", "tcp", "secret", "tls")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_cell(
    conn: ReplicaConnection, kind: str, concurrency: int, calls: int, max_seconds: float
) -> tuple[list[float], float, float]:
    """(latencies, wall seconds, CPU seconds of this process and the replica):
    CPU per call is the figure that holds on a machine other work shares."""
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
    cpu_began = time.process_time() + cpu_seconds(conn.pid)
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    elapsed = time.perf_counter() - began
    return latencies, elapsed, time.process_time() + cpu_seconds(conn.pid) - cpu_began


def channel(transport: str, certs: Path) -> tuple[str, ChannelSettings | None, dict[str, Any]]:
    """(listen address, the replica's channel settings, connect() options)."""
    if transport == "unix":
        return "unix:", None, {}
    if transport == "tcp":
        return "tcp:127.0.0.1:0", ChannelSettings(), {}
    auth = {"auth": ChannelAuth(SECRET.encode())}
    if transport == "secret":
        return "tcp:127.0.0.1:0", ChannelSettings(), auth
    sys.path.insert(0, str(TESTS))  # the tests' certificate helper
    from tls_certs import CertificateAuthority

    ca = CertificateAuthority(certs)
    server, client = ca.issue("replica"), ca.issue("gateway")
    tls = TlsSettings(ca=ca.ca, cert=server.cert, key=server.key, mutual=True)
    ours = TlsSettings(ca=ca.ca, cert=client.cert, key=client.key, mutual=True)
    return (
        "tcp:127.0.0.1:0",
        ChannelSettings(tls=tls),
        {**auth, "ssl_context": client_ssl_context(ours)},
    )


def echo_spec(
    replica_id: str, listen: str, settings: ChannelSettings | None, loop: str
) -> ReplicaSpec:
    return ReplicaSpec(
        deployment="Echo",
        import_path="echo:Echo",
        replica_id=replica_id,
        app_dir=APP_DIR,
        listen=listen,
        max_ongoing_requests=64,
        log_level="WARNING",
        event_loop=loop,  # type: ignore[arg-type]
        channel=settings,
    )


async def paired(args: argparse.Namespace) -> None:
    """``--paired ROUNDS``: one replica per transport, all running at once;
    each (call, concurrency) cell runs every transport in turn, ROUNDS times
    (the order rotating), so load from other jobs falls on all of them
    alike. Prints each transport's calls/s and CPU per call as a ratio to
    the first transport's in the same round (median over the rounds)."""
    transports = args.transports.split(",")
    certs = Path(tempfile.mkdtemp(prefix="bench-certs-"))
    launchers: list[LocalLauncher] = []
    conns: dict[str, ReplicaConnection] = {}
    try:
        for transport in transports:
            listen, settings, options = channel(transport, certs)
            # The secret reaches the replicas the way it reaches `muxgate replica`.
            secret = {} if transport in ("unix", "tcp") else {"MUXGATE_CLUSTER_SECRET": SECRET}
            launcher = LocalLauncher(env=secret)
            launchers.append(launcher)
            process = await launcher.start(
                echo_spec(f"bench-{transport}", listen, settings, "uvloop")
            )
            conns[transport] = await ReplicaConnection.connect(process.address, **options)
        print_machine()
        print(f"paired rounds: {args.paired}; ratios to {transports[0]} in the same round")
        header = (
            f"{'transport':<9} {'call':<6} {'conc':>4} {'calls/s ratio':>13} {'cpu/call ratio':>14}"
        )
        print(header)
        print("-" * len(header))
        for kind in ("handle", "http"):
            for concurrency in (1, 32):
                rates: dict[str, list[float]] = {t: [] for t in transports}
                cpus: dict[str, list[float]] = {t: [] for t in transports}
                for r in range(args.paired):
                    order = transports[r % len(transports) :] + transports[: r % len(transports)]
                    for transport in order:
                        lat, elapsed, cpu = await run_cell(
                            conns[transport],
                            kind,
                            concurrency,
                            args.calls // args.paired,
                            args.max_seconds,
                        )
                        rates[transport].append(len(lat) / elapsed)
                        cpus[transport].append(cpu / len(lat))
                base = transports[0]
                for transport in transports[1:]:
                    rate = statistics.median(
                        a / b for a, b in zip(rates[transport], rates[base], strict=True)
                    )
                    cpu_ratio = statistics.median(
                        a / b for a, b in zip(cpus[transport], cpus[base], strict=True) if b
                    )
                    cell = f"{transport:<9} {kind:<6} {concurrency:>4}"
                    print(f"{cell} {rate:>13.2f} {cpu_ratio:>14.2f}")
    finally:
        for conn in conns.values():
            await conn.aclose()
        for launcher in launchers:
            await launcher.aclose()


async def main(args: argparse.Namespace) -> None:
    if args.paired:
        await paired(args)
        return
    rows: list[tuple[str, str, str, int, int, float, float, float, float, float]] = []
    certs = Path(tempfile.mkdtemp(prefix="bench-certs-"))
    for transport in args.transports.split(","):
        # The secret reaches the replicas the way it reaches `muxgate replica`.
        secret = {} if transport in ("unix", "tcp") else {"MUXGATE_CLUSTER_SECRET": SECRET}
        launcher = LocalLauncher(env=secret)
        listen, settings, options = channel(transport, certs)
        try:
            for loop in args.loops.split(","):
                process = await launcher.start(echo_spec(f"bench-{loop}", listen, settings, loop))
                async with await ReplicaConnection.connect(process.address, **options) as conn:
                    for kind in ("handle", "http"):
                        for concurrency in (1, 32):
                            lat, elapsed, cpu = await run_cell(
                                conn, kind, concurrency, args.calls, args.max_seconds
                            )
                            rows.append(
                                (
                                    transport,
                                    loop,
                                    kind,
                                    concurrency,
                                    len(lat),
                                    percentile(lat, 0.5) * 1e6,
                                    percentile(lat, 0.99) * 1e6,
                                    statistics.fmean(lat) * 1e6,
                                    len(lat) / elapsed,
                                    cpu / len(lat) * 1e6,
                                )
                            )
                with anyio.fail_after(15):
                    await process.wait()
        finally:
            await launcher.aclose()

    print_machine()
    print(f"client loop: {'uvloop' if args.client_uvloop else 'asyncio'}")
    header = (
        f"{'transport':<9} {'replica loop':<12} {'call':<6} {'conc':>4} {'calls':>6} "
        f"{'p50 us':>8} {'p99 us':>8} {'mean us':>8} {'calls/s':>9} {'cpu us/call':>11}"
    )
    print(header)
    print("-" * len(header))
    for transport, loop, kind, conc, n, p50, p99, mean, rate, cpu in rows:
        print(
            f"{transport:<9} {loop:<12} {kind:<6} {conc:>4} {n:>6} {p50:>8.0f} {p99:>8.0f} "
            f"{mean:>8.0f} {rate:>9.0f} {cpu:>11.0f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per cell")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="time bound per cell")
    parser.add_argument("--client-uvloop", action="store_true", help="run this client on uvloop")
    parser.add_argument(
        "--transports", default="unix", help=f"comma-separated, of {', '.join(TRANSPORTS)}"
    )
    parser.add_argument("--loops", default="uvloop,asyncio", help="replica event loops")
    parser.add_argument(
        "--paired",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="interleave the transports (uvloop replicas) ROUNDS times; print ratios",
    )
    ns = parser.parse_args()
    anyio.run(main, ns, backend="asyncio", backend_options={"use_uvloop": ns.client_uvloop})
