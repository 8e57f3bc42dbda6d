"""The HTTP edge under hostile clients: gateway memory under a header flood,
and log bytes of expected errors.

* ``flood``: a gateway (one ``gateway_apps:Echo1`` replica) in a child
  process; ``--clients`` raw connections each send ``--header-mib`` MiB of a
  header that never ends and keep the connection open. Reported: the
  gateway's RSS before and while they are held, the latency of a normal
  request meanwhile, and what the flooding clients were answered. With
  ``--no-limits`` the gateway runs uvicorn's plain httptools protocol instead
  of ``EdgeProtocol`` (how the gateway behaved before ``http.limits``).
* ``logs``: ``muxgate serve`` (one ``observability_apps:Observed`` replica,
  torch models on local disk, an admin token), its stderr in a file;
  reported: log bytes for ``--unknown`` requests of unknown model ids (404)
  and for ``--unauthorized`` admin requests without the token (401).

Run:  .venv/bin/python bench/bench_edge.py [flood|logs|all] [--no-limits]
Bounded: a few seconds per part plus the gateway's start.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
from _common import print_machine

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TESTS = os.path.join(ROOT, "tests")
MODEL = "serve_multiplexed_model_id"

_GATEWAY = """
import asyncio, sys
sys.path.insert(0, {tests!r})
if {no_limits!r}:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    import muxgate.gateway._edge as edge
    edge.edge_protocol = lambda _: HttpToolsProtocol  # uvicorn as it is
from gateway_harness import running_gateway

async def main():
    config = {{"http": {{"port": 0}},
              "deployments": [{{"name": "E", "import_path": "gateway_apps:Echo1"}}]}}
    async with running_gateway(config) as gw:
        print("URL", gw.url, flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        match = re.search(r"VmRSS:\s+(\d+)", f.read())
    assert match is not None
    return int(match.group(1)) / 1024


def flood(clients: int, header_mib: float, no_limits: bool) -> None:
    code = _GATEWAY.format(tests=TESTS, no_limits=no_limits)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().decode().split()[1]
        host, port = url.split("//")[1].rsplit(":", 1)
        httpx.get(f"{url}/x", headers={MODEL: "1"}, timeout=30)
        idle = _rss_mb(proc.pid)
        payload = b"GET /x HTTP/1.1\r\nhost: a\r\nx-big: " + b"a" * int(header_mib * 2**20)
        socks = [socket.create_connection((host, int(port))) for _ in range(clients)]

        def send(sock: socket.socket) -> None:
            # refused and closed before all of it was sent: fine
            with contextlib.suppress(OSError):
                sock.sendall(payload)

        threads = [threading.Thread(target=send, args=(s,)) for s in socks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        time.sleep(1)  # let the gateway take in what was sent (bounded)
        held = _rss_mb(proc.pid)
        started = time.perf_counter()
        status = httpx.get(f"{url}/x", headers={MODEL: "1"}, timeout=30).status_code
        latency_ms = (time.perf_counter() - started) * 1e3
        answers: dict[str, int] = {}
        for sock in socks:
            sock.settimeout(2)
            try:
                line = sock.recv(200).split(b"\r\n")[0].decode() or "closed"
            except OSError as exc:
                line = type(exc).__name__
            answers[line] = answers.get(line, 0) + 1
            sock.close()
        limits = "uvicorn as it is" if no_limits else "http.limits defaults"
        print(
            f"flood ({limits}): {clients} x {header_mib:g} MiB of unfinished header; "
            f"gateway RSS {idle:.0f} MB idle -> {held:.0f} MB while held; "
            f"normal request {status} in {latency_ms:.1f} ms; flooders got {answers}"
        )
    finally:
        proc.terminate()
        proc.wait(60)


def logs(unknown: int, unauthorized: int) -> None:
    sys.path.insert(0, TESTS)
    from apps.observability_apps import write_models

    tmp = tempfile.mkdtemp()
    root = os.path.join(tmp, "models")
    write_models(root, ["1"])
    config = os.path.join(tmp, "app.yaml")
    with open(config, "w") as f:
        f.write(
            "http: {host: 127.0.0.1, port: 0, admin_token: s3cret}\n"
            f"app_dir: {os.path.join(TESTS, 'apps')}\n"
            "deployments:\n"
            "  - name: Observed\n"
            "    import_path: observability_apps:Observed\n"
            f"    init_kwargs: {{model_root: 'file://{root}'}}\n"
            "    num_replicas: 1\n"
        )
    log_path = os.path.join(tmp, "stderr.log")
    with open(log_path, "wb") as log:
        command = [sys.executable, "-m", "muxgate.gateway._cli", "serve", config]
        proc = subprocess.Popen(command, stderr=log, stdout=log)
    try:
        url = ""
        deadline = time.monotonic() + 120
        while not url and time.monotonic() < deadline:
            time.sleep(0.2)
            with open(log_path, "rb") as f:
                found = re.search(rb"serving on (http://\S+)", f.read())
            url = found.group(1).decode() if found else ""
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/", headers={MODEL: "1"}).status_code == 200
            time.sleep(1)  # the start's log lines are written
            before = os.path.getsize(log_path)
            for i in range(unknown):
                assert client.get("/", headers={MODEL: f"nope{i}"}).status_code == 404
            time.sleep(1)  # the replica's log lines are written
            middle = os.path.getsize(log_path)
            for _ in range(unauthorized):
                assert client.get("/-/replicas").status_code == 401
            time.sleep(1)
            after = os.path.getsize(log_path)
        print(
            f"logs: {unknown} unknown-model 404s {middle - before} bytes "
            f"({(middle - before) / max(unknown, 1):.0f} per request); "
            f"{unauthorized} unauthorized requests {after - middle} bytes"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", nargs="?", default="all", choices=["flood", "logs", "all"])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--header-mib", type=float, default=4.0)
    parser.add_argument("--no-limits", action="store_true")
    parser.add_argument("--unknown", type=int, default=1000)
    parser.add_argument("--unauthorized", type=int, default=5000)
    args = parser.parse_args()
    print_machine()
    if args.part in ("flood", "all"):
        flood(args.clients, args.header_mib, args.no_limits)
    if args.part in ("logs", "all"):
        logs(args.unknown, args.unauthorized)


if __name__ == "__main__":
    main()
