"""Gateway overhead: throughput and p50/p99 at concurrency 1 and 32.

Targets, all answering the same small JSON for ``GET /x`` with a model id:

* ``gateway``: HTTP -> muxgate gateway (uvicorn + httptools, raw ASGI
  ingress beside Litestar) -> one replica over the wire protocol;
* ``gateway-litestar-mount``: the same, with the ingress mounted inside
  Litestar (``create_app``) instead of beside it;
* ``replica-direct``: the same call sent to the replica over the protocol
  from this process (``ReplicaConnection.call``), no HTTP at all;
* ``gateway-granian``: the gateway under granian's embedded server
  (in-process, same loop) instead of uvicorn;
* ``bare-litestar``: a plain Litestar handler returning the same JSON under
  the same uvicorn settings (the HTTP baseline);
* ``bare-litestar-granian``: that app under granian instead (server choice).

HTTP load comes from ``wrk`` (one thread, so it leaves the 2 cores to the
servers as far as possible): ``apt-get install wrk``. Without wrk the script
falls back to a small asyncio load generator in a separate process.

Run:  .venv/bin/python bench/bench_gateway.py [--seconds 5] [--concurrency 1,32]
Bounded: each measurement runs ``--seconds``; the whole run takes about
``10 * seconds`` plus a few process starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from _common import print_machine

HERE = os.path.dirname(os.path.abspath(__file__))
APPS = os.path.join(HERE, "..", "tests", "apps")
MODEL_HEADER = "serve_multiplexed_model_id"
MODEL = "m1"

APP_YAML = """
http: {{host: 127.0.0.1, port: 0, request_timeout_s: 30}}
app_dir: {apps}
deployments:
  - name: Echo
    import_path: gateway_apps:Echo3
    route_prefix: /
    num_replicas: 1
    max_ongoing_requests: 64
    max_queued_requests: 100000
"""


# -- server processes (re-entered through this script) ----------------------


def serve_gateway(config_path: str, litestar_ingress: bool, server: Any) -> None:
    import uvloop

    from muxgate.gateway._config import load_config
    from muxgate.gateway._serve import start_gateway

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        config = load_config(config_path)
        async with start_gateway(config, litestar_ingress=litestar_ingress, server=server) as gw:
            print(f"URL {gw.url}", flush=True)
            await stop.wait()

    uvloop.run(main())


def _bare_app() -> Any:
    from litestar import Litestar, Request, get

    @get("/{path:path}", sync_to_thread=False)
    def echo(request: Request[Any, Any, Any], path: str) -> dict[str, Any]:
        return {
            "model": request.headers.get(MODEL_HEADER, ""),
            "replica": "bare",
            "pid": os.getpid(),
            "path": path,
            "body_len": 0,
            "greeting": "hello",
        }

    return Litestar([echo], openapi_config=None, logging_config=None)


def serve_bare(server: str) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    if server == "granian":
        sock.close()
        print(f"URL http://127.0.0.1:{port}", flush=True)
        os.execv(
            sys.executable,
            [
                sys.executable,
                "-m",
                "granian",
                "--interface",
                "asgi",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--loop",
                "uvloop",
                "--no-ws",
                "--log-level",
                "warning",
                "--factory",
                "bench_gateway:_bare_app",
            ],
        )
    import uvicorn

    config = uvicorn.Config(
        _bare_app(),
        http="httptools",
        loop="uvloop",
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
    )
    print(f"URL http://127.0.0.1:{port}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


@contextlib.contextmanager
def server_process(args: list[str]) -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=HERE,
        env={**os.environ, "PYTHONPATH": HERE},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.startswith("URL "):
            raise RuntimeError(f"server did not start: {line!r}")
        url = line[4:]
        _wait_http(url)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_http(url: str, within_s: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + within_s
    while True:
        try:
            r = httpx.get(f"{url}/x", headers={MODEL_HEADER: MODEL}, timeout=5)
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not answering")
        time.sleep(0.1)


# -- load ---------------------------------------------------------------------


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", value)
    assert m, value
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
    return float(m.group(1)) * scale


def wrk(url: str, concurrency: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{seconds:g}s",
            "--latency",
            "-H",
            f"{MODEL_HEADER}: {MODEL}",
            f"{url}/x",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": p50,
        "p99_ms": p99,
        "errors": int(errors.group(1)) if errors else 0,
    }


async def _py_load(url: str, concurrency: int, seconds: float) -> dict[str, float]:
    """Fallback load generator: raw HTTP/1.1 keep-alive over asyncio streams."""
    host, port = url.removeprefix("http://").split(":")
    request = (f"GET /x HTTP/1.1\r\nhost: {host}\r\n{MODEL_HEADER}: {MODEL}\r\n\r\n").encode()
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            if not head.startswith(b"HTTP/1.1 200"):
                errors += 1
        writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return _summary(latencies, seconds, errors)


def py_load(url: str, concurrency: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--load", url, str(concurrency), str(seconds)],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    ).stdout
    result: dict[str, float] = json.loads(out)
    return result


def _summary(latencies: list[float], seconds: float, errors: int) -> dict[str, float]:
    latencies.sort()
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "rps": len(latencies) / seconds,
        "p50_ms": q[49] * 1e3,
        "p99_ms": q[98] * 1e3,
        "errors": errors,
    }


@contextlib.asynccontextmanager
async def replica_connection() -> AsyncIterator[Any]:
    from muxgate.gateway._connection import ReplicaConnection
    from muxgate.gateway.launchers.local import LocalLauncher
    from muxgate.replicas.contract import ReplicaSpec

    launcher = LocalLauncher()
    spec = ReplicaSpec(
        deployment="Echo",
        import_path="gateway_apps:Echo3",
        replica_id="Echo#direct",
        app_dir=APPS,
        listen="unix:",
        max_ongoing_requests=64,
    )
    process = await launcher.start(spec)
    conn = await ReplicaConnection.connect(process.address)
    try:
        yield conn
    finally:
        await conn.aclose()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(process.wait(), 10)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await launcher.aclose()


async def direct_load(conn: Any, concurrency: int, seconds: float) -> dict[str, float]:
    from muxgate.replicas._protocol import HttpRequest

    http = HttpRequest(method="GET", path="/x", query="", headers=[(MODEL_HEADER, MODEL)], body=b"")
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker(n: int) -> None:
        nonlocal errors
        i = 0
        while time.perf_counter() < stop_at:
            i += 1
            t0 = time.perf_counter()
            reply = await conn.call(
                request_id=f"{n}-{i}", model_id=MODEL, timeout_s=30.0, http=http
            )
            latencies.append(time.perf_counter() - t0)
            if reply.error is not None or reply.status != 200:
                errors += 1

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return _summary(latencies, seconds, errors)


# -- main ---------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--only", default="", help="comma-separated target names")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    only = set(filter(None, args.only.split(",")))
    have_wrk = shutil.which("wrk") is not None
    load = wrk if have_wrk else py_load
    rows: list[tuple[str, int, dict[str, float]]] = []

    def want(name: str) -> bool:
        return not only or name in only

    with tempfile.TemporaryDirectory(prefix="muxgate-bench-") as tmp:
        config = os.path.join(tmp, "app.yaml")
        with open(config, "w") as f:
            f.write(APP_YAML.format(apps=os.path.abspath(APPS)))
        http_targets = [
            ("gateway", ["--serve-gateway", config]),
            ("gateway-litestar-mount", ["--serve-gateway", config, "--litestar-ingress"]),
            ("gateway-granian", ["--serve-gateway", config, "--granian"]),
            ("bare-litestar", ["--serve-bare", "uvicorn"]),
            ("bare-litestar-granian", ["--serve-bare", "granian"]),
        ]
        for name, server_args in http_targets:
            if not want(name):
                continue
            with server_process(server_args) as url:
                load(url, 4, 1.0)  # warm-up
                for c in levels:
                    rows.append((name, c, load(url, c, args.seconds)))
                    print(f"  {name:<24} c={c:<3} {rows[-1][2]}", file=sys.stderr)
        if want("replica-direct"):
            import uvloop

            async def direct() -> None:
                async with replica_connection() as conn:
                    await direct_load(conn, 4, 1.0)
                    for c in levels:
                        rows.append(("replica-direct", c, await direct_load(conn, c, args.seconds)))
                        print(f"  replica-direct c={c} {rows[-1][2]}", file=sys.stderr)

            uvloop.run(direct())

    print()
    print_machine()
    print(
        f"load: {'wrk -t1 (HTTP/1.1 keep-alive)' if have_wrk else 'asyncio raw-socket client'};"
        f" {args.seconds:g} s per row\n"
    )
    print(f"{'target':<24} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for name, c, r in rows:
        print(
            f"{name:<24} {c:>4} {r['rps']:>9.0f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f}"
            f" {int(r['errors']):>6}"
        )
    by = {(n, c): r for n, c, r in rows}
    for c in levels:
        g, d, b = (
            by.get(("gateway", c)),
            by.get(("replica-direct", c)),
            by.get(("bare-litestar", c)),
        )
        if g and d:
            print(f"c={c}: gateway adds {g['p50_ms'] - d['p50_ms']:.3f} ms p50 over replica-direct")
        if g and b:
            print(f"c={c}: gateway throughput = {g['rps'] / b['rps']:.2f} x bare Litestar")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-gateway":
        serve_gateway(
            sys.argv[2],
            "--litestar-ingress" in sys.argv[3:],
            "granian" if "--granian" in sys.argv[3:] else "uvicorn",
        )
    elif len(sys.argv) > 1 and sys.argv[1] == "--serve-bare":
        serve_bare(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "--load":
        import uvloop

        result = uvloop.run(_py_load(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
        print(json.dumps(result))
    else:
        main()
