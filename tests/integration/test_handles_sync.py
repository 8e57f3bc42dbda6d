"""Deployment handles from sync code: ``remote()`` with no running event loop,
and ``DeploymentResponse.result()``.

One gateway (module fixture) serves ``Down`` and ``SyncUp``, whose plain
``def`` methods call ``Down`` with ``result()`` from the replica's worker
threads. Callers outside a replica are sync functions in a thread of their
own (``anyio.to_thread``, so that the test's event loop, which runs the
gateway, keeps running) and a plain script in a subprocess.
"""

from __future__ import annotations

import functools
import os
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.to_thread
import pytest
from gateway_harness import running_gateway
from held_calls import held_calls

from muxgate.gateway._serve import Gateway
from muxgate.replicas._handle import (
    HandleBadRequestError,
    HandleCancelledError,
    HandleDeadlineError,
    HandleError,
    HandleNotFoundError,
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
            {"name": "Down", "import_path": "handle_apps:Down", "route_prefix": "/down"},
            {"name": "SyncUp", "import_path": "handle_apps:SyncUp", "route_prefix": "/sync-up"},
        ],
    }
    async with running_gateway(config) as gw:
        yield gw
        await aclose_handle_clients()


async def in_thread(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``func`` in a worker thread, where no event loop runs."""
    return await anyio.to_thread.run_sync(functools.partial(func, *args, **kwargs))


async def test_sync_deployment_composes_with_result(gateway: Gateway) -> None:
    up = get_deployment_handle("SyncUp", gateway.url)
    result = await up.options(multiplexed_model_id="foo").compose.remote("bar")
    assert result["worker_thread"] is True  # a plain def runs in a worker thread
    assert result["upstream"] == "foo"  # the model id is not inherited
    assert result["downstream"]["model_id"] == "bar"
    assert result["downstream"]["args"] == ["from-sync"]
    assert result["downstream"]["kwargs"] == {"k": 1}
    # A response passed on as an argument, with no wait in between.
    assert await up.chain.remote(3) == 8
    # The sync method's deadline goes with its calls: the downstream call
    # gets what is left of 2 s, not the gateway's 60 s.
    assert 0 < await up.options(timeout_s=2).relay_budget.remote() < 2


async def test_downstream_errors_reach_a_sync_deployment(gateway: Gateway) -> None:
    up = get_deployment_handle("SyncUp", gateway.url)
    assert await up.call_failing.remote("fail", "broken") == {
        "type": "HandleUserError",
        "status": 500,
        "code": "user_error",
    }
    assert await up.call_failing.remote("no_such_method") == {
        "type": "HandleBadRequestError",
        "status": 400,
        "code": "bad_request",
    }


async def test_plain_thread_caller(gateway: Gateway) -> None:
    down = get_deployment_handle("Down", gateway.url)

    def calls() -> list[Any]:
        first = down.add.remote(1, b=2)
        total = down.add.remote(first, b=down.add.remote(10))  # responses as arguments
        other = down.options(multiplexed_model_id="2").remote("x")
        return [first.result(), total.result(timeout_s=30), other.result()["model_id"]]

    assert await in_thread(calls) == [3, 13, "2"]
    # Twice more: the background loop is reused.
    assert await in_thread(calls) == [3, 13, "2"]


async def test_plain_thread_errors_are_handle_errors(gateway: Gateway) -> None:
    down = get_deployment_handle("Down", gateway.url)

    def failures() -> dict[str, tuple[type[HandleError], int, str]]:
        responses = {
            "user": down.fail.remote("boom"),
            "no deployment": get_deployment_handle("Nope", gateway.url).remote(),
            "bad model id": down.options(multiplexed_model_id="has space").remote(),
            "deadline": down.options(timeout_s=0.3).sleep.remote(30),
        }
        raised = {}
        for name, response in responses.items():
            with pytest.raises(HandleError) as info:
                response.result()
            raised[name] = (type(info.value), info.value.status, info.value.code)
        with pytest.raises(TypeError):  # not a MessagePack value: nothing is sent
            down.remote(object()).result()
        return raised

    assert await in_thread(failures) == {
        "user": (HandleUserError, 500, "user_error"),
        "no deployment": (HandleNotFoundError, 404, "not_found"),
        "bad model id": (HandleBadRequestError, 400, "bad_model_id"),
        "deadline": (HandleDeadlineError, 504, "deadline"),
    }


async def test_result_twice_is_the_same_and_calls_once(gateway: Gateway) -> None:
    down = get_deployment_handle("Down", gateway.url)
    async with held_calls() as calls:
        response = await in_thread(down.hold.remote, calls.port, "once", value={"v": [1]})
        call = await calls.arrived("once")
        await call.release()
        first, second = await in_thread(lambda: (response.result(), response.result()))
    assert first == {"v": [1]}
    assert second is first  # the same decoded object: no second call

    failed = await in_thread(down.fail.remote, "twice")

    def errors() -> list[HandleError]:
        raised = []
        for _ in range(2):
            with pytest.raises(HandleUserError, match="twice") as info:
                failed.result()
            raised.append(info.value)
        return raised

    one, two = await in_thread(errors)
    assert one is two


async def test_result_timeout(gateway: Gateway) -> None:
    down = get_deployment_handle("Down", gateway.url)
    async with held_calls() as calls:
        response = await in_thread(down.hold.remote, calls.port, "slow", value=7)
        call = await calls.arrived("slow")
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"Down\.hold within 0\.2 s"):
            await in_thread(response.result, timeout_s=0.2)
        assert time.monotonic() - started >= 0.2
        # Giving up waiting does not cancel the call.
        assert repr(response) == "<DeploymentResponse Down.hold pending>"
        await call.release()
        assert await in_thread(response.result, timeout_s=30) == 7
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError, match="timeout_s must be >= 0"):
            await in_thread(response.result, timeout_s=bad)


async def test_result_where_a_loop_runs_raises(gateway: Gateway) -> None:
    down = get_deployment_handle("Down", gateway.url)
    response = down.add.remote(1, b=1)
    with pytest.raises(RuntimeError, match="use `await response`"):
        response.result()
    assert await response == 2  # the call was not disturbed
    # A response made in sync code, in a thread running a loop: the same
    # error; awaiting it there works.
    made_in_sync = await in_thread(down.add.remote, 5)
    with pytest.raises(RuntimeError, match="use `await response`"):
        made_in_sync.result()
    assert await made_in_sync == 5
    # In an async deployment method: the call fails with the error, no deadlock.
    with pytest.raises(HandleUserError, match=r"RuntimeError: .*use `await response`"):
        await get_deployment_handle("SyncUp", gateway.url).result_in_async.remote()


async def test_cancel_from_sync_code(gateway: Gateway) -> None:
    down = get_deployment_handle("Down", gateway.url)
    async with held_calls() as calls:
        response = await in_thread(down.hold.remote, calls.port, "cancel-me")
        call = await calls.arrived("cancel-me")
        await in_thread(response.cancel)
        with pytest.raises(HandleCancelledError):
            await in_thread(response.result)
        await call.wait_closed()  # the replica cancelled the call


async def test_abandoned_sync_method_cancels_the_call_it_waits_for(gateway: Gateway) -> None:
    """SyncUp.hold waits in result() for Down.hold; when SyncUp's request is
    cancelled, its thread runs on but the call it waits for is cancelled."""
    up = get_deployment_handle("SyncUp", gateway.url)
    async with held_calls() as calls:
        upstream = up.hold.remote(calls.port, "abandoned")
        call = await calls.arrived("abandoned")
        upstream.cancel()
        await call.wait_closed()  # else Down's call would wait for its 60 s deadline
    with pytest.raises(HandleCancelledError):
        await upstream
    # SyncUp serves on (its thread ended with the cancelled call).
    assert await up.chain.remote(1) == 4


async def test_plain_script(gateway: Gateway) -> None:
    """A script with no event loop of its own: result() works, and it exits."""
    script = textwrap.dedent(
        """
        from muxgate.replicas import get_deployment_handle

        down = get_deployment_handle("Down")
        first = down.add.remote(20, b=1)
        print(down.add.remote(first, b=first).result(timeout_s=30))
        """
    )
    env = {**os.environ, "MUXGATE_GATEWAY_URL": gateway.url}
    with anyio.fail_after(60):
        proc = await anyio.run_process(
            [sys.executable, "-W", "error", "-c", script], env=env, check=False
        )
    assert (proc.returncode, proc.stderr.decode()) == (0, "")
    assert proc.stdout.decode().strip() == "42"


async def test_forked_script_gets_its_own_background_loop(gateway: Gateway) -> None:
    """A child forked after a call inherits the loop but not its thread: its
    calls start a loop of their own instead of waiting forever."""
    script = textwrap.dedent(
        """
        import os
        from muxgate.replicas import get_deployment_handle

        down = get_deployment_handle("Down")
        print(down.add.remote(1).result(timeout_s=10), flush=True)
        pid = os.fork()
        if pid == 0:
            print(down.add.remote(2).result(timeout_s=10), flush=True)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(down.add.remote(3).result(timeout_s=10), os.waitstatus_to_exitcode(status))
        """
    )
    env = {**os.environ, "MUXGATE_GATEWAY_URL": gateway.url}
    with anyio.fail_after(60):
        proc = await anyio.run_process([sys.executable, "-c", script], env=env, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().split("\n") == ["1", "2", "3 0", ""]
