"""The health checks shipped in deploy/ pass against a real gateway.

``/-/healthz`` is public (it says only ok or starting; the details sit
behind the admin guard at ``/-/replicas``), so the Kubernetes probes
(deploy/k8s/deployment.yaml) are plain httpGet probes and the compose health
check (deploy/compose.yaml) sends no token. This runs them against a gateway
without and with a token: the probe's path over HTTP, and the compose
command itself (only the port and the Python interpreter are swapped).
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml
from gateway_harness import running_gateway

from muxgate.gateway._config import load_config
from muxgate.gateway._serve import Gateway

ROOT = Path(__file__).resolve().parents[2]
#: the token deploy/app.yaml sets and deploy/compose.yaml's check sends
DEV_TOKEN = "muxgate-dev-token"

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def k8s_probe_path() -> str:
    """The path of the gateway's startup and readiness probes (httpGet)."""
    with (ROOT / "deploy" / "k8s" / "deployment.yaml").open() as f:
        manifest = yaml.safe_load(f)
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    probe = container["startupProbe"]["httpGet"]
    assert container["readinessProbe"]["httpGet"] == probe
    assert probe["port"] in {p["name"] for p in container["ports"]}
    path: str = probe["path"]
    return path


async def k8s_probe(gateway: Gateway) -> int:
    """What the kubelet does: a GET without credentials."""
    async with httpx.AsyncClient() as client:
        response = await client.get(gateway.url + k8s_probe_path(), timeout=10)
    return response.status_code


def compose_check() -> list[str]:
    with (ROOT / "deploy" / "compose.yaml").open() as f:
        compose = yaml.safe_load(f)
    test: list[str] = compose["services"]["gateway"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    return test[1:]


def localise(command: list[str], gateway: Gateway) -> list[str]:
    """Run the probe here: this interpreter, the gateway's real port."""
    port = gateway.url.rsplit(":", 1)[1]
    assert command[0] == "python"
    return [sys.executable, *(arg.replace(":8000/", f":{port}/") for arg in command[1:])]


async def run_probe(command: list[str], env: Mapping[str, str]) -> int:
    clean = {k: v for k, v in os.environ.items() if k != "MUXGATE_ADMIN_TOKEN"}
    with anyio.fail_after(30):
        result = await anyio.run_process(command, env={**clean, **env}, check=False)
    return result.returncode


def config(admin_token: str | None) -> dict[str, Any]:
    return {
        "http": {"port": 0, "admin_token": admin_token},
        "deployments": [{"name": "Echo", "import_path": "gateway_apps:Echo1"}],
    }


@pytest.fixture
async def open_gateway() -> AsyncIterator[Gateway]:
    async with running_gateway(config(None)) as gw:
        yield gw


@pytest.fixture
async def dev_token_gateway() -> AsyncIterator[Gateway]:
    async with running_gateway(config(DEV_TOKEN)) as gw:
        yield gw


async def test_probes_pass_without_a_token(open_gateway: Gateway) -> None:
    assert await k8s_probe(open_gateway) == 200
    assert await run_probe(localise(compose_check(), open_gateway), {}) == 0


async def test_probes_pass_when_a_token_is_configured(dev_token_gateway: Gateway) -> None:
    # /-/healthz is public: probes cannot always send a token, and the
    # endpoint reveals nothing.
    assert await k8s_probe(dev_token_gateway) == 200
    assert load_config(ROOT / "deploy" / "app.yaml").http.admin_token == DEV_TOKEN
    assert await run_probe(localise(compose_check(), dev_token_gateway), {}) == 0
    # The details stay behind the token.
    async with httpx.AsyncClient() as client:
        denied = await client.get(dev_token_gateway.url + "/-/replicas", timeout=10)
    assert denied.status_code == 401
