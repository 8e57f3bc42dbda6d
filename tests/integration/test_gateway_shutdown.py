"""Graceful shutdown of an in-process gateway: it stops accepting, lets
requests in flight finish within ``http.shutdown_grace_s``, answers those
still running 503 ``shutting_down`` (JSON, ``Retry-After``, then the
connection closes), and stops its replicas. The ``muxgate serve`` side
(SIGTERM, no orphans) is in test_gateway_cli.py."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import httpx
import pytest
from gateway_harness import MODEL, running_gateway
from waiting import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

GRACE_S = 2.0


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def test_shutdown_finishes_short_requests_and_answers_the_rest_503() -> None:
    config = {
        "http": {"port": 0, "request_timeout_s": 30, "shutdown_grace_s": GRACE_S},
        "deployments": [
            {
                "name": "Down",
                "import_path": "gateway_apps:Echo1",
                "num_replicas": 2,
                "max_ongoing_requests": 8,
            }
        ],
    }
    running = running_gateway(config)
    gw = await running.__aenter__()
    exiting: asyncio.Task[object] | None = None
    try:
        pids = [r["pid"] for r in gw.pools["Down"].snapshot()["replicas"]]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        url = urlsplit(gw.url)
        client = httpx.AsyncClient(base_url=gw.url, timeout=30)
        short = asyncio.create_task(client.get("/slow", params={"s": "0.5"}, headers={MODEL: "a"}))
        long = asyncio.create_task(client.get("/slow", params={"s": "60"}, headers={MODEL: "b"}))
        # A raw keep-alive client with a long request in flight.
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        writer.write(f"GET /slow?s=60 HTTP/1.1\r\nhost: a\r\n{MODEL}: c\r\n\r\n".encode())

        async def three_in_flight() -> bool:
            return len(gw.shutdown.in_flight) == 3

        await wait_until(three_in_flight, within_s=10)
        started = time.monotonic()
        exiting = asyncio.create_task(running.__aexit__(None, None, None))

        async def draining() -> bool:
            return gw.shutdown.draining

        await wait_until(draining, within_s=5)
        assert repr(gw.shutdown).startswith("<Shutdown draining in_flight=")
        # Stopped accepting: a new connection is refused.
        with pytest.raises(OSError):
            await asyncio.open_connection(url.hostname, url.port)
        r = await short
        assert r.status_code == 200  # finished within the grace
        r = await long
        took = time.monotonic() - started
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "shutting_down"
        assert r.headers["retry-after"] == "1"
        assert r.headers["connection"] == "close"
        assert GRACE_S - 0.2 < took < GRACE_S + 3
        # The keep-alive client gets a whole response, then the close.
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 503")
        assert b"connection: close" in head.lower()
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = await asyncio.wait_for(reader.readexactly(length), 10)
        assert b'"shutting_down"' in body
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        await client.aclose()
        await exiting

        # Then the replicas were stopped: none is left behind.
        async def replicas_gone() -> bool:
            return not any(alive(p) for p in pids)

        await wait_until(replicas_gone, within_s=15)
    finally:
        if exiting is None:
            await running.__aexit__(None, None, None)
        else:
            await exiting
