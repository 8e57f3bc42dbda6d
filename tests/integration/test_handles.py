"""Deployment handles, from outside and from inside a deployment (composition).

One gateway (module fixture) serves ``Down`` (multiplexed, 2 replicas) and
``Up`` (holds a handle to ``Down``, made in its ``__init__`` with no URL).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from gateway_harness import running_gateway

from muxgate.gateway._serve import Gateway
from muxgate.replicas._handle import (
    DeploymentHandle,
    HandleBadRequestError,
    HandleDeadlineError,
    HandleError,
    HandleNotFoundError,
    HandleUnavailableError,
    HandleUserError,
    aclose_handle_clients,
    get_deployment_handle,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
async def gateway() -> AsyncIterator[Gateway]:
    config = {
        "http": {"port": 0},
        "deployments": [
            {
                "name": "Down",
                "import_path": "handle_apps:Down",
                "route_prefix": "/down",
                "num_replicas": 2,
            },
            {"name": "Up", "import_path": "handle_apps:Up", "route_prefix": "/up"},
        ],
    }
    async with running_gateway(config) as gw:
        yield gw
        await aclose_handle_clients()


async def test_handle_from_outside_calls_call_with_arguments(gateway: Gateway) -> None:
    handle = get_deployment_handle("Down", gateway.url)
    result = await handle.options(multiplexed_model_id="2").remote(1, [2, 3], x={"y": None})
    assert result["model_id"] == "2"
    assert result["model"] == "model-2"
    assert result["args"] == [1, [2, 3]]
    assert result["kwargs"] == {"x": {"y": None}}


async def test_handle_method_by_attribute(gateway: Gateway) -> None:
    handle = get_deployment_handle("Down", gateway.url)
    assert await handle.add.remote(2, b=40) == 42
    assert await handle.options(method_name="add").remote(1) == 1


async def test_handle_routes_by_model_like_http(gateway: Gateway) -> None:
    """Calls for one model id stay on one replica, as HTTP requests do."""
    handle = get_deployment_handle("Down", gateway.url)
    replicas = set()
    for _ in range(10):
        result = await handle.options(multiplexed_model_id="sticky").remote()
        replicas.add(result["replica"])
    assert len(replicas) == 1
    async with httpx.AsyncClient() as client:
        # HTTP with the same model id lands on the same replica.
        response = await client.post(
            f"{gateway.url}/down", headers={"serve_multiplexed_model_id": "sticky"}
        )
    assert response.headers["x-muxgate-replica"] in replicas


async def test_many_concurrent_calls_share_the_pooled_client(gateway: Gateway) -> None:
    import anyio

    handle = get_deployment_handle("Down", gateway.url)
    results: dict[int, int] = {}

    async def one(i: int) -> None:
        results[i] = await handle.options(multiplexed_model_id=str(i % 5)).add.remote(i, b=1)

    async with anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(one, i)
    assert results == {i: i + 1 for i in range(200)}


async def test_options_returns_a_new_handle(gateway: Gateway) -> None:
    handle = get_deployment_handle("Down", gateway.url)
    two = handle.options(multiplexed_model_id="2")
    assert isinstance(two, DeploymentHandle)
    assert two is not handle
    assert handle.multiplexed_model_id == ""
    assert two.multiplexed_model_id == "2"
    method = two.add
    assert (method.method_name, method.multiplexed_model_id) == ("add", "2")
    assert handle.method_name == "__call__"
    assert (await handle.remote())["model_id"] == ""
    assert (await two.remote())["model_id"] == "2"
    assert repr(two) == "<DeploymentHandle Down.__call__ model_id='2'>"


async def test_composition_model_id_is_not_inherited(gateway: Gateway) -> None:
    """Upstream serving "foo" calls downstream with "bar": each sees its own."""
    up = get_deployment_handle("Up", gateway.url).options(multiplexed_model_id="foo")
    result = await up.compose.remote("bar")
    assert result["upstream_before"] == "foo"
    assert result["upstream_after"] == "foo"
    assert result["downstream"]["model_id"] == "bar"
    assert result["downstream"]["args"] == ["from-up"]
    assert result["original_handle_model"] == ""
    assert result["add"] == 5


async def test_composition_over_http(gateway: Gateway) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{gateway.url}/up",
            json={"down_model": "bar"},
            headers={"serve_multiplexed_model_id": "foo"},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["upstream_before"], body["upstream_after"]) == ("foo", "foo")
    assert body["downstream"]["model_id"] == "bar"


async def test_downstream_error_reaches_upstream_as_exception(gateway: Gateway) -> None:
    up = get_deployment_handle("Up", gateway.url)
    result = await up.call_failing.remote()
    assert result == {
        "type": "HandleUserError",
        "status": 500,
        "code": "user_error",
        "message": "ValueError: downstream broke",
    }


async def _raises(handle: DeploymentHandle, *args: Any) -> HandleError:
    with pytest.raises(HandleError) as info:
        await handle.remote(*args)
    return info.value


async def test_handle_errors(gateway: Gateway) -> None:
    down = get_deployment_handle("Down", gateway.url)

    err = await _raises(get_deployment_handle("Nope", gateway.url))
    assert isinstance(err, HandleNotFoundError)
    assert (err.status, err.code) == (404, "not_found")
    assert err.request_id

    err = await _raises(down.fail, "broken on purpose")
    assert isinstance(err, HandleUserError)
    assert (err.status, err.code) == (500, "user_error")
    assert err.message == "ValueError: broken on purpose"
    assert err.replica_id.startswith("Down#")

    err = await _raises(down.options(multiplexed_model_id="has space"))
    assert isinstance(err, HandleBadRequestError)
    assert (err.status, err.code) == (400, "bad_model_id")

    err = await _raises(down.options(multiplexed_model_id="missing-7"))
    assert isinstance(err, HandleNotFoundError)
    assert (err.status, err.code) == (404, "model_not_found")

    err = await _raises(down.no_such_method)
    assert (err.status, err.code) == (400, "bad_request")

    err = await _raises(down.options(method_name="_private"))
    assert (err.status, err.code) == (400, "bad_request")

    err = await _raises(down.unencodable)  # a result that is not MessagePack
    assert (err.status, err.code) == (500, "user_error")

    with pytest.raises(TypeError):  # an argument that is not MessagePack
        await down.remote(object())

    # The deployment keeps serving after all of that.
    assert await down.add.remote(1, 1) == 2


async def test_deadlines_bound_calls_and_propagate_downstream(gateway: Gateway) -> None:
    import time

    down = get_deployment_handle("Down", gateway.url)
    up = get_deployment_handle("Up", gateway.url)
    # No timeout given: the gateway's request_timeout_s (60 s by default).
    budget = await down.budget.remote()
    assert 50 < budget <= 60
    # An explicit timeout reaches the replica as the call's deadline...
    assert 0 < await down.options(timeout_s=2).budget.remote() <= 2
    # ... and a call made inside that call gets no more than what is left.
    relayed = await up.options(timeout_s=2).relay_budget.remote()
    assert 0 < relayed < 2
    # Past it, 504, without waiting for the slow call.
    started = time.monotonic()
    with pytest.raises(HandleDeadlineError) as info:
        await down.options(timeout_s=0.3).sleep.remote(30)
    assert (info.value.status, info.value.code) == (504, "deadline")
    with pytest.raises(HandleDeadlineError):
        await up.options(timeout_s=0.3).slow_down.remote(30)
    assert time.monotonic() - started < 10
    with pytest.raises(ValueError):
        down.options(timeout_s=0)


async def test_handle_endpoint_wire_format(gateway: Gateway) -> None:
    """What a non-Python client sends: msgpack {args, kwargs} and the header."""
    import msgspec

    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{gateway.url}/-/handles/Down/add",
            content=msgspec.msgpack.encode({"args": [20], "kwargs": {"b": 1}}),
            headers={"serve-multiplexed-model-id": "7"},
        )
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/msgpack"
        assert response.headers["x-muxgate-replica"].startswith("Down#")
        assert msgspec.msgpack.decode(response.content) == 21
        bad = await client.post(f"{gateway.url}/-/handles/Down/add", content=b"\xc1")
        assert bad.status_code == 400
        assert bad.json()["error"]["code"] == "bad_request"
        get = await client.get(f"{gateway.url}/-/handles/Down/add")
        assert get.status_code == 405


async def test_unreachable_gateway_is_unavailable() -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    handle = get_deployment_handle("Down", f"http://127.0.0.1:{port}")
    with pytest.raises(HandleUnavailableError) as info:
        await handle.remote()
    assert (info.value.status, info.value.code) == (503, "gateway_unreachable")
    await aclose_handle_clients()


def test_no_gateway_url_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MUXGATE_GATEWAY_URL", raising=False)
    with pytest.raises(ValueError, match="MUXGATE_GATEWAY_URL"):
        get_deployment_handle("Down")
    monkeypatch.setenv("MUXGATE_GATEWAY_URL", "http://127.0.0.1:1/")
    assert get_deployment_handle("Down").gateway_url == "http://127.0.0.1:1"


async def test_admin_token_guards_handles_and_reaches_replicas() -> None:
    """With a token, outside callers need it, and replicas get it from the
    gateway (Up's handle to Down works with no token given in code)."""
    config = {
        "http": {"port": 0, "admin_token": "s3cret"},
        "deployments": [
            {"name": "Down", "import_path": "handle_apps:Down", "route_prefix": "/down"},
            {"name": "Up", "import_path": "handle_apps:Up", "route_prefix": "/up"},
        ],
    }
    async with running_gateway(config) as gw:
        err = await _raises(get_deployment_handle("Down", gw.url))
        assert (err.status, err.code) == (401, "unauthorized")
        up = get_deployment_handle("Up", gw.url, token="s3cret")
        result = await up.options(multiplexed_model_id="foo").compose.remote("bar")
        assert result["downstream"]["model_id"] == "bar"
        await aclose_handle_clients()


async def test_handles_through_the_litestar_app() -> None:
    """``create_app`` (ingress mounted in Litestar) serves handle calls too."""
    config = {
        "http": {"port": 0},
        "deployments": [
            {"name": "Down", "import_path": "handle_apps:Down", "route_prefix": "/down"}
        ],
    }
    async with running_gateway(config, litestar_ingress=True) as gw:
        handle = get_deployment_handle("Down", gw.url).options(multiplexed_model_id="3")
        assert (await handle.remote("a"))["args"] == ["a"]
        assert await handle.add.remote(1, b=2) == 3
        err = await _raises(get_deployment_handle("Nope", gw.url))
        assert (err.status, err.code) == (404, "not_found")
        await aclose_handle_clients()
