"""A request whose code raises what is not an ``Exception`` (``sys.exit()``,
``KeyboardInterrupt``, a ``CancelledError`` nobody asked for, a bare
``BaseException``) in ``__call__``, sync or async, or in a ``@multiplexed``
loader, fails alone: 500 ``user_error``, and the same replica process (its
loader thread too) serves the next request (real processes). An unload
hook raising one is logged, as any failing hook is."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest
from gateway_harness import MODEL, running_gateway

from muxgate.gateway._serve import Gateway

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture(scope="module")
async def gateway() -> AsyncIterator[Gateway]:
    config = {
        "http": {"port": 0, "request_timeout_s": 20},
        "deployments": [
            {"name": "Exiting", "import_path": "exiting_apps:Exiting", "num_replicas": 1},
            {
                "name": "SyncExiting",
                "import_path": "exiting_apps:SyncExiting",
                "route_prefix": "/sync",
                "num_replicas": 1,
            },
        ],
    }
    async with running_gateway(config) as gw:
        yield gw


async def pid_of(client: httpx.AsyncClient, path: str, model: str = "") -> int:
    r = await client.get(path, headers={MODEL: model} if model else {})
    assert r.status_code == 200, r.text
    pid: int = r.json()["pid"]
    return pid


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/exit", "SystemExit: 2"),
        ("/interrupt", "KeyboardInterrupt"),
        ("/cancelled", "CancelledError"),
        ("/base", "BaseException: not an Exception"),
        ("/sync/exit", "SystemExit: 2"),
        ("/sync/interrupt", "KeyboardInterrupt"),
    ],
)
async def test_call_that_raises_a_base_exception_fails_alone(
    client: httpx.AsyncClient, path: str, message: str
) -> None:
    home = "/sync/ok" if path.startswith("/sync/") else "/ok"
    pid = await pid_of(client, home)
    r = await client.get(path)
    assert r.status_code == 500, r.text
    assert r.json()["error"]["code"] == "user_error"
    assert r.json()["error"]["message"] == message
    assert await pid_of(client, home) == pid


@pytest.mark.parametrize("path", ["/ok", "/sync-load"])
@pytest.mark.parametrize(
    ("model", "raised"), [("exit", "SystemExit: 3"), ("interrupt", "KeyboardInterrupt")]
)
async def test_loader_that_raises_a_base_exception_fails_its_load(
    client: httpx.AsyncClient, path: str, model: str, raised: str
) -> None:
    pid = await pid_of(client, "/ok")
    for _ in range(2):  # not cached: the second request tries again
        r = await client.get(path, headers={MODEL: model})
        assert r.status_code == 500, r.text
        assert r.json()["error"] == {
            "code": "user_error",
            "message": f"LoaderExitError: The loader of model '{model}' raised {raised}.",
            "request_id": r.headers["x-request-id"],
        }
    # The same process loads other models, with the same loader.
    assert await pid_of(client, path, f"fine-{model}") == pid


@pytest.mark.parametrize("model", ["exits-on-close", "interrupts-on-aclose"])
async def test_unload_hook_that_raises_a_base_exception_is_contained(
    client: httpx.AsyncClient, model: str
) -> None:
    pid = await pid_of(client, "/ok", model)
    r = await client.post(f"/-/models/Exiting/{model}/unload")
    assert r.status_code == 200, r.text
    assert list(r.json()["unloaded"].values()) == [True]
    # Logged, and the replica serves on (the model is gone, so this loads it again).
    assert await pid_of(client, "/ok", model) == pid
    assert await pid_of(client, "/ok") == pid


async def test_a_response_too_large_for_the_channel_fails_alone(client: httpx.AsyncClient) -> None:
    # Sent, it broke the replica's connection at the gateway's frame limit
    # (502 replica_died, for every call on it); the replica answers an error.
    pid = await pid_of(client, "/ok")
    r = await client.get("/huge")
    assert r.status_code == 500, r.text
    assert re.fullmatch(
        r"ValueError: The response is 10737418\d\d bytes; a reply carries at most 1072693248\.",
        r.json()["error"]["message"],
    )
    assert await pid_of(client, "/ok") == pid
