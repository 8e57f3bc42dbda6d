"""Gateway limits end to end: queue bound (503), body size (413), deadline (504),
no replica (503), config errors at start (real processes)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from gateway_harness import APPS, MODEL, running_gateway
from waiting import wait_until

from muxgate.gateway._config import parse_config
from muxgate.gateway._serve import Gateway

TIMEOUT_S = 4.0

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture(scope="module")
async def gateway() -> AsyncIterator[Gateway]:
    config = {
        "http": {"port": 0, "request_timeout_s": TIMEOUT_S, "max_body_bytes": 1000},
        "deployments": [
            {
                "name": "One",
                "import_path": "gateway_apps:Echo1",
                "route_prefix": "/one",
                "num_replicas": 1,
                "max_ongoing_requests": 1,
                "max_queued_requests": 1,
            },
            {
                "name": "Zero",
                "import_path": "gateway_apps:Echo1",
                "route_prefix": "/zero",
                "autoscaling": {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0},
            },
            {
                "name": "Empty",
                "import_path": "gateway_apps:Echo1",
                "route_prefix": "/empty",
                "num_replicas": 0,
            },
        ],
    }
    async with running_gateway(config) as gw:
        yield gw


async def view(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    out: dict[str, Any] = (await client.get("/-/replicas")).json()["deployments"][name]
    return out


async def test_queue_full_is_503_with_retry_after(client: httpx.AsyncClient) -> None:
    busy = asyncio.ensure_future(client.get("/one/slow", params={"s": "1.5"}))

    async def in_flight() -> bool:
        return sum(r["in_flight"] for r in (await view(client, "One"))["replicas"]) == 1

    await wait_until(in_flight, what="first request in flight")
    queued = asyncio.ensure_future(client.get("/one/after", headers={MODEL: "q"}))

    async def one_queued() -> bool:
        return (await view(client, "One"))["queued"] == 1

    await wait_until(one_queued, what="second request queued")
    r = await client.get("/one/overflow")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "over_capacity"
    assert int(r.headers["retry-after"]) >= 1
    first, second = await asyncio.gather(busy, queued)
    assert first.status_code == 200
    assert second.status_code == 200
    assert second.json()["model"] == "q"
    metrics = (await client.get("/-/metrics")).text
    assert 'muxgate_requests_total{deployment="One",status="503"}' in metrics
    assert 'muxgate_queue_length{deployment="One"} 0.0' in metrics


async def test_body_over_limit_is_413(client: httpx.AsyncClient) -> None:
    r = await client.post("/one/x", content=b"x" * 1001)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"
    # names the setting to raise
    assert r.json()["error"]["message"] == "request body is over 1000 bytes (http.max_body_bytes)"

    async def chunks() -> AsyncIterator[bytes]:  # no content-length: counted while read
        for _ in range(5):
            yield b"y" * 300

    r = await client.post("/one/x", content=chunks())
    assert r.status_code == 413
    r = await client.post("/one/x", content=b"z" * 1000)
    assert r.status_code == 200
    assert r.json()["body_len"] == 1000


async def test_deadline_is_504(client: httpx.AsyncClient) -> None:
    started = time.monotonic()
    r = await client.get("/one/slow", params={"s": "30"}, headers={MODEL: "d"})
    took = time.monotonic() - started
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "deadline"
    # names the settings that made the deadline
    assert r.json()["error"]["message"] == (
        "the request's deadline passed (http.request_timeout_s, or a handle call's shorter timeout)"
    )
    assert TIMEOUT_S - 0.5 < took < TIMEOUT_S + 3
    assert r.headers["x-muxgate-replica"].startswith("One#")


async def test_no_replica_and_none_starting_is_503(client: httpx.AsyncClient) -> None:
    r = await client.get("/empty/x")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "no_replica"
    assert "retry-after" in r.headers
    assert (await client.get("/-/healthz")).status_code == 200  # min 0 is healthy


async def test_admin_token_and_remote_clients(gateway: Gateway) -> None:
    from muxgate.gateway._app import GatewayASGI

    config = parse_config(
        {
            "deployments": [{"name": "T", "import_path": "gateway_apps:Echo1"}],
            "http": {"admin_token": "s3cret"},
        },
        base_dir=APPS,
    )
    app = GatewayASGI(config, {"T": gateway.pools["One"]}, gateway.metrics)
    transport = httpx.ASGITransport(app=app, client=("10.0.0.5", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        r = await c.get("/-/replicas")
        assert r.status_code == 401
        # RFC 9110: a 401 names the scheme that would be accepted.
        assert r.headers["www-authenticate"] == 'Bearer realm="muxgate"'
        r = await c.post("/-/handles/T/__call__", content=b"")
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == 'Bearer realm="muxgate"'
        r = await c.get("/-/replicas", headers={"authorization": "Bearer s3cret"})
        assert r.status_code == 200
        # the scheme is case-insensitive (RFC 9110 11.1; "bearer" was refused)
        for scheme in ("bearer", "BEARER"):
            r = await c.get("/-/replicas", headers={"authorization": f"{scheme} s3cret"})
            assert r.status_code == 200
        r = await c.post(
            "/-/handles/T/__call__", content=b"", headers={"authorization": "bearer s3cret"}
        )
        assert r.status_code != 401
        for wrong in ("Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret", "Bearer"):
            r = await c.get("/-/replicas", headers={"authorization": wrong})
            assert r.status_code == 401, wrong
        assert (await c.get("/-/")).status_code == 200  # the page itself is public
        # Probes cannot send a token: healthz is public, and says no more than ok.
        r = await c.get("/-/healthz")
        assert (r.status_code, r.json()) == (200, {"status": "ok"})
    # Without a token, only local clients may use the admin API.
    app = GatewayASGI(gateway.config, gateway.pools, gateway.metrics)
    transport = httpx.ASGITransport(app=app, client=("10.0.0.5", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        r = await c.get("/-/replicas")
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthorized"
        assert (await c.get("/-/metrics")).status_code == 401
        assert (await c.get("/-/healthz")).status_code == 200


def test_cli_refuses_an_invalid_config(tmp_path: Any) -> None:
    path = tmp_path / "app.yaml"
    path.write_text(
        "deployments:\n  - name: M\n    import_path: gateway_apps:Echo1\n"
        "    max_ongoing_requests: 0\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "muxgate.gateway._cli", "serve", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "$.deployments[0].max_ongoing_requests" in proc.stderr
    assert str(path) in proc.stderr


async def test_scaled_to_zero_deployment_holds_the_first_request(
    client: httpx.AsyncClient,
) -> None:
    assert (await view(client, "Zero"))["replicas"] == []
    r = await client.get("/zero/first", headers={MODEL: "z"})
    assert r.status_code == 200
    assert r.json()["model"] == "z"
    zero = await view(client, "Zero")
    assert zero["target_replicas"] == 1
    assert [rep["state"] for rep in zero["replicas"]] == ["running"]


async def test_healthz_is_public_and_terse_while_starting(gateway: Gateway) -> None:
    from muxgate.gateway._app import GatewayASGI

    class Starting:
        """Stands in for a pool below its minimum replicas."""

        healthy = False
        dispatcher = gateway.pools["One"].dispatcher

    config = parse_config(
        {
            "deployments": [{"name": "T", "import_path": "gateway_apps:Echo1"}],
            "http": {"admin_token": "s3cret"},
        },
        base_dir=APPS,
    )
    app = GatewayASGI(config, {"T": Starting()}, gateway.metrics)  # type: ignore[dict-item]
    transport = httpx.ASGITransport(app=app, client=("10.0.0.5", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        r = await c.get("/-/healthz")
        # No token needed, and nothing about the deployments leaks.
        assert (r.status_code, r.json()) == (503, {"status": "starting"})
