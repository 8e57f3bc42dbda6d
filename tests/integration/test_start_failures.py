"""A deployment that served, then cannot start its replacement: the pool
keeps retrying with back-off, and the reason is in ``/-/healthz`` (for admin
callers only), ``/-/replicas`` and ``muxgate status``."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_harness import running_gateway
from waiting import wait_until

from muxgate.gateway._status_view import render

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_a_failing_restart_is_explained_and_retried(tmp_path: Path) -> None:
    flag = tmp_path / "fail"
    config = {
        "http": {"port": 0, "admin_token": "s3cret"},
        "deployments": [
            {
                "name": "Flaky",
                "import_path": "broken_apps:FailsWhenFlagged",
                "init_kwargs": {"flag": str(flag)},
                "num_replicas": 1,
            }
        ],
    }
    async with (
        running_gateway(config) as gw,
        httpx.AsyncClient(
            base_url=gw.url, timeout=30, headers={"authorization": "Bearer s3cret"}
        ) as client,
    ):
        assert (await client.get("/")).text == "up"
        assert (await client.get("/-/healthz")).json() == {"status": "ok"}
        pid = (await client.get("/-/replicas")).json()["deployments"]["Flaky"]["replicas"][0]["pid"]
        flag.touch()
        os.kill(pid, signal.SIGKILL)

        async def starting() -> dict[str, Any] | None:
            r = await client.get("/-/healthz")
            body: dict[str, Any] = r.json()
            failure = body.get("deployments", {}).get("Flaky", {}).get("last_failure")
            return body if r.status_code == 503 and failure else None

        body = await wait_until(starting, within_s=60.0, what="healthz to report the start failure")
        reason = body["deployments"]["Flaky"]["last_failure"]
        assert reason.startswith(f"RuntimeError: {flag} exists: refusing to start (on purpose)")
        assert "broken_apps.py:" in reason  # where it was raised
        assert body == {
            "status": "starting",
            "deployments": {"Flaky": {"running": 0, "min_replicas": 1, "last_failure": reason}},
        }
        # Without the token: the public answer, no reasons.
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as anonymous:
            public = await anonymous.get("/-/healthz")
        assert public.status_code == 503 and public.json() == {"status": "starting"}
        snapshot = (await client.get("/-/replicas")).json()
        assert snapshot["deployments"]["Flaky"]["last_failure"] == reason
        assert f"  last start failure: {reason}" in render(snapshot).splitlines()

        # Back-off, not give-up: once the cause is gone the next try starts it.
        flag.unlink()

        async def healthy() -> bool:
            return (await client.get("/-/healthz")).status_code == 200

        await wait_until(healthy, within_s=60.0, what="the deployment to recover")
        assert (await client.get("/")).text == "up"
