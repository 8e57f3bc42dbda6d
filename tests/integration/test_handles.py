"""Deployment handles, from outside and from inside a deployment (composition).

One gateway (module fixture) serves ``Down`` (multiplexed, 2 replicas) and
``Up`` (holds a handle to ``Down``, made in its ``__init__`` with no URL).
Calls that must stay in flight use ``Down.hold``, which reports to a TCP
listener of the test (:func:`held_calls`) and returns when the test says so.
"""

from __future__ import annotations

import enum
import gc
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import httpx
import pytest
from gateway_harness import running_gateway
from held_calls import held_calls

from muxgate.gateway._serve import Gateway
from muxgate.replicas._handle import (
    DeploymentHandle,
    DeploymentResponse,
    HandleBadRequestError,
    HandleCancelledError,
    HandleDeadlineError,
    HandleError,
    HandleNotFoundError,
    HandleUnavailableError,
    HandleUserError,
    aclose_handle_clients,
    call_deadline,
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
    assert repr(handle) == "<DeploymentHandle Down.__call__>"
    assert repr(two) == "<DeploymentHandle Down.__call__ model_id='2'>"
    assert repr(two.add) == "<DeploymentHandle Down.add model_id='2'>"
    assert (two.deployment_name, two.add.deployment_name) == ("Down", "Down")
    assert (await handle.remote())["model_id"] == ""
    assert (await two.remote())["model_id"] == "2"


async def test_handle_attributes_do_not_shadow_methods(gateway: Gateway) -> None:
    """Only ``options``, ``remote``, ``deployment_name`` and ``_*`` are the handle's."""
    handle = get_deployment_handle("Down", gateway.url).options(multiplexed_model_id="2")
    assert await handle.method_name.remote("x") == "method_name(x)"
    for name in ("method_name", "multiplexed_model_id", "timeout_s", "gateway_url"):
        assert repr(getattr(handle, name)) == f"<DeploymentHandle Down.{name} model_id='2'>"
    # Reserved names still reach a method through options().
    assert await handle.options(method_name="method_name").remote("y") == "method_name(y)"
    with pytest.raises(AttributeError):
        _ = handle._private  # private names are never methods


async def test_remote_returns_a_response_with_the_call_under_way(gateway: Gateway) -> None:
    down = get_deployment_handle("Down", gateway.url)
    async with held_calls() as calls:
        response = down.hold.remote(calls.port, "under-way", value=7)
        assert isinstance(response, DeploymentResponse)
        # The replica has the call, and nobody has awaited the response.
        call = await calls.arrived("under-way")
        assert repr(response) == "<DeploymentResponse Down.hold pending>"
        await call.release()
        assert await response == 7
    assert repr(response) == "<DeploymentResponse Down.hold done>"


async def test_awaiting_a_response_twice_calls_once(gateway: Gateway) -> None:
    down = get_deployment_handle("Down", gateway.url)
    response = down.options(multiplexed_model_id="2").remote("once")
    first = await response
    assert (await response) is first  # the same decoded object: no second call
    failed = down.fail.remote("twice")
    for _ in range(2):
        with pytest.raises(HandleUserError, match="twice"):
            await failed
    assert repr(failed) == "<DeploymentResponse Down.fail failed: HandleUserError>"


async def test_response_passed_to_another_call(gateway: Gateway) -> None:
    down = get_deployment_handle("Down", gateway.url)
    async with held_calls() as calls:
        held = down.hold.remote(calls.port, "argument", value=40)
        total = down.add.remote(held, b=down.add.remote(1, b=1))
        call = await calls.arrived("argument")
        await call.release()
        assert await total == 42
    assert await held == 40  # still the caller's to await
    # A failed argument fails the call with the same error, unsent.
    with pytest.raises(HandleUserError, match="bad argument"):
        await down.add.remote(down.fail.remote("bad argument"))
    # Inside a replica: Up starts a call and passes it on without awaiting it.
    assert await get_deployment_handle("Up", gateway.url).chain.remote(3) == 8
    # Nested deeper than the top level, a response is not a MessagePack value.
    with pytest.raises(TypeError) as raised:
        await down.remote([down.add.remote(1)])
    assert str(raised.value).endswith(
        "(a response is resolved as a top-level argument only: pass it as one, or await it)."
    )


async def test_cancel_a_response(gateway: Gateway) -> None:
    down = get_deployment_handle("Down", gateway.url)
    async with held_calls() as calls:
        response = down.hold.remote(calls.port, "cancel-me")
        call = await calls.arrived("cancel-me")
        response.cancel()
        for _ in range(2):
            with pytest.raises(HandleCancelledError) as info:
                await response
        assert (info.value.status, info.value.code) == (499, "cancelled")
        await call.wait_closed()  # the replica cancelled the call
        assert repr(response) == "<DeploymentResponse Down.hold cancelled>"

        # A call that waited for a cancelled response is cancelled with it.
        held = down.hold.remote(calls.port, "cancelled-argument")
        dependent = down.add.remote(held)
        call = await calls.arrived("cancelled-argument")
        held.cancel()
        with pytest.raises(HandleCancelledError):
            await dependent
        await call.wait_closed()

        # Cancelling the dependent call leaves the response passed to it running.
        held = down.hold.remote(calls.port, "survivor", value=1)
        dependent = down.add.remote(held)
        call = await calls.arrived("survivor")
        dependent.cancel()
        with pytest.raises(HandleCancelledError):
            await dependent
        await call.release()
        assert await held == 1

    # Cancelled before it started: nothing is sent.
    early = down.add.remote(1)
    early.cancel()
    with pytest.raises(HandleCancelledError):
        await early
    assert await down.add.remote(2) == 2


async def test_cancelling_the_awaiting_task_cancels_the_call(gateway: Gateway) -> None:
    down = get_deployment_handle("Down", gateway.url)
    async with held_calls() as calls:
        response = down.hold.remote(calls.port, "awaiter")
        async with anyio.create_task_group() as tg:

            async def wait() -> None:
                await response

            tg.start_soon(wait)
            call = await calls.arrived("awaiter")
            tg.cancel_scope.cancel()  # a CancelledError for the awaiter, not our error
        await call.wait_closed()
        with pytest.raises(HandleCancelledError):
            await response


async def test_unawaited_failed_response_is_not_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A dropped response that failed logs nothing when it is collected."""
    down = DeploymentHandle("Down", gateway_url="http://127.0.0.1:1")
    with call_deadline(0):  # copied at remote(): the call fails before sending
        down.remote()
    # Three loop iterations: the call's first step fails it, then its done
    # callbacks run. (Checking it is done would retrieve the error.)
    for _ in range(3):
        await anyio.lowlevel.checkpoint()
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_composition_model_id_is_not_inherited(gateway: Gateway) -> None:
    """Upstream serving "foo" calls downstream with "bar": each sees its own."""
    up = get_deployment_handle("Up", gateway.url).options(multiplexed_model_id="foo")
    result = await up.compose.remote("bar")
    assert result["upstream_before"] == "foo"
    assert result["upstream_after"] == "foo"
    assert result["downstream"]["model_id"] == "bar"
    assert result["downstream"]["args"] == ["from-up"]
    assert result["original_handle"] == "<DeploymentHandle Down.__call__>"
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
    err = await _raises(down.ad)  # a slip: the method named closest
    assert err.message == "Down has no method 'ad'; did you mean 'add'?"
    err = await _raises(get_deployment_handle("Dwn", gateway.url))
    assert (err.status, err.code) == (404, "not_found")
    assert err.message == "no deployment named 'Dwn'; did you mean 'Down'?"
    err = await _raises(get_deployment_handle("Nope", gateway.url))
    assert err.message == "no deployment named 'Nope' (deployments: Down, Up)"

    err = await _raises(down.options(method_name="_private"))
    assert (err.status, err.code) == (400, "bad_request")

    err = await _raises(down.unencodable)  # a result that is not MessagePack
    assert (err.status, err.code) == (500, "user_error")
    assert err.message == (
        "TypeError: Cannot send the object that unencodable() returned: Encoding objects of"
        " type object is unsupported; handle arguments and results are MessagePack values"
        " (None, bool, int, float, str, bytes, list, dict, msgspec Struct)."
    )
    err = await _raises(down.unawaited)
    assert (err.status, err.code) == (500, "user_error")
    assert err.message.startswith("TypeError: Cannot send the coroutine that unawaited()")
    assert err.message.endswith(": an `await` is missing.")

    with pytest.raises(TypeError) as raised:  # an argument that is not MessagePack
        await down.remote(object())
    assert str(raised.value).startswith(
        "Cannot send the arguments of a handle call: Encoding objects of type object"
    )
    import torch

    with pytest.raises(TypeError) as raised:  # the usual one: a tensor
        await down.add.remote(torch.ones(2))
    assert str(raised.value).endswith(" (call .tolist() on tensors and arrays).")

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
    # The deadline in force when remote() is called goes with the call,
    # wherever the response is awaited.
    with call_deadline(2):
        response = down.budget.remote()
    assert 0 < await response <= 2


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
        # arguments nested past msgspec's depth limit: the caller's mistake
        # too (it was 500 internal, a gateway traceback per call)
        deep = b"\x91" * 100_000 + b"\xc0"  # [[[...[nil]...]]]
        for body in (b"\x81\xa4args\x91" + deep, b"\x81\xa6kwargs\x81\xa1b" + deep):
            bad = await client.post(f"{gateway.url}/-/handles/Down/add", content=body)
            assert bad.status_code == 400, bad.text
            assert bad.json()["error"]["code"] == "bad_request"
            assert "nested too deeply" in bad.json()["error"]["message"]
        get = await client.get(f"{gateway.url}/-/handles/Down/add")
        assert get.status_code == 405
        assert get.headers["allow"] == "POST"


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


async def test_a_bare_host_and_port_is_an_http_url(gateway: Gateway) -> None:
    """As `muxgate status` takes it: `127.0.0.1:8000` means http://."""
    bare = gateway.url.removeprefix("http://")
    assert await get_deployment_handle("Down", bare).add.remote(1, 1) == 2
    assert get_deployment_handle("Down", "127.0.0.1:1/")._gateway_url == "http://127.0.0.1:1"


def test_a_model_id_that_is_not_a_str_is_refused_at_once(gateway: Gateway) -> None:
    down = get_deployment_handle("Down", gateway.url)
    with pytest.raises(TypeError) as raised:
        down.options(multiplexed_model_id=2)  # type: ignore[arg-type]
    assert str(raised.value) == (
        "multiplexed_model_id must be a str (model ids are strings, as in the header:"
        ' multiplexed_model_id="2"), got int'
    )


async def test_a_model_id_of_a_str_subclass_is_its_text(gateway: Gateway) -> None:
    # a StrEnum member or numpy's str_ is a str: the check for ids that are
    # not strings refused them, where the header took them as their text
    class Ids(enum.StrEnum):
        TWO = "2"

    down = get_deployment_handle("Down", gateway.url).options(multiplexed_model_id=Ids.TWO)
    result = await down.remote()
    assert (result["model_id"], result["model"]) == ("2", "model-2")
    assert type(down._model_id) is str


def test_no_gateway_url_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MUXGATE_GATEWAY_URL", raising=False)
    with pytest.raises(ValueError, match="MUXGATE_GATEWAY_URL"):
        get_deployment_handle("Down")
    monkeypatch.setenv("MUXGATE_GATEWAY_URL", "http://127.0.0.1:1/")
    assert get_deployment_handle("Down")._gateway_url == "http://127.0.0.1:1"


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
        assert err.message == (
            "handle calls need the admin bearer token (give it with"
            " get_deployment_handle(..., token=...) or MUXGATE_ADMIN_TOKEN)"
        )
        err = await _raises(get_deployment_handle("Down", gw.url, token="wrong"))
        assert (err.status, err.code) == (401, "unauthorized")
        assert err.message.endswith(
            " (the token given was refused: check"
            " get_deployment_handle(..., token=...) or MUXGATE_ADMIN_TOKEN)"
        )
        up = get_deployment_handle("Up", gw.url, token="s3cret")
        result = await up.options(multiplexed_model_id="foo").compose.remote("bar")
        assert result["downstream"]["model_id"] == "bar"
        await aclose_handle_clients()


async def test_a_deployment_without_call_says_so() -> None:
    """HTTP and ``handle.remote()`` reach ``__call__``; a class without one
    says that its methods are reached by name."""
    config = {
        "http": {"port": 0},
        "deployments": [{"name": "M", "import_path": "handle_apps:MethodsOnly"}],
    }
    async with running_gateway(config) as gw:
        handle = get_deployment_handle("M", gw.url)
        assert await handle.add.remote(1, 2) == 3
        err = await _raises(handle)
        assert (err.status, err.code) == (400, "bad_request")
        assert err.message == (
            "M has no __call__ method, so it answers no HTTP request and no handle.remote();"
            " call its methods by name through a handle (handle.method.remote())"
        )
        async with httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/", json={})
        assert r.status_code == 400
        assert r.json()["error"]["message"] == err.message
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
