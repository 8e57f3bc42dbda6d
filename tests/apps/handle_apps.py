"""Deployments for the handle and composition tests (tests/integration/test_handles*.py).

``Down`` is multiplexed and reports the model id it sees; ``Up`` holds a
handle to ``Down`` (made in ``__init__``, inside its replica, with no URL:
the gateway passed its own) and calls it with a different model id.
``SyncUp`` does the same from plain ``def`` methods, with ``result()``.

``Down.hold`` connects to a TCP port the test listens on, sends its name and
returns once the test answers, so the test (another process) sees the call
arrive, decides when it ends, and sees the connection close if the call is
cancelled.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import anyio

from muxgate.replicas._context import current_replica, get_multiplexed_model_id
from muxgate.replicas._deployment import deployment
from muxgate.replicas._handle import HandleError, get_deployment_handle, remaining_time
from muxgate.replicas._http import Request
from muxgate.replicas._multiplex import multiplexed


class ModelNotFoundError(LookupError):
    """Matched by name by the replica: 404 model_not_found."""


@deployment
class Down:
    @multiplexed(max_num_models_per_replica=4)
    async def get_model(self, model_id: str) -> str:
        if model_id.startswith("missing"):
            raise ModelNotFoundError(f"no model {model_id!r}")
        return f"model-{model_id}"

    async def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        model_id = get_multiplexed_model_id()
        model = await self.get_model(model_id) if model_id else None
        return {
            "model_id": model_id,
            "model": model,
            # HTTP traffic passes a Request: report its path instead.
            "args": [a.path if isinstance(a, Request) else a for a in args],
            "kwargs": kwargs,
            "replica": current_replica().replica_id,
            "pid": os.getpid(),
        }

    async def add(self, a: int, b: int = 0) -> int:
        return a + b

    async def fail(self, message: str) -> None:
        raise ValueError(message)

    async def budget(self) -> float | None:
        """Seconds this call has left (its deadline, as the replica got it)."""
        return remaining_time()

    async def sleep(self, seconds: float) -> float:
        await anyio.sleep(seconds)
        return seconds

    def unencodable(self) -> object:
        return object()

    async def unawaited(self) -> object:
        """Returns a coroutine: an ``await`` is missing (a plain ``def``
        returning one is awaited: that is the sync way to delegate)."""
        return self.add(1, 2)

    async def hold(self, port: int, name: str, value: Any = None) -> Any:
        # Announces itself on the test's TCP listener and returns when the
        # test answers; cancelled, it closes the connection, which the test sees.
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(f"{name}\n".encode())
            await stream.receive()
        return value

    async def method_name(self, x: str) -> str:
        """Named like a handle attribute once was: handle.method_name reaches it."""
        return f"method_name({x})"


@deployment
class Up:
    def __init__(self) -> None:
        # Made in __init__ (a worker thread, before serving): no event loop needed.
        self.down = get_deployment_handle("Down")

    async def __call__(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        return await self.compose(body.get("down_model", "bar"))

    async def compose(self, down_model: str) -> dict[str, Any]:
        before = get_multiplexed_model_id()
        handle = self.down.options(multiplexed_model_id=down_model)
        downstream = await handle.remote("from-up", k=1)
        plain = await self.down.add.remote(2, b=3)
        return {
            "upstream_before": before,
            "downstream": downstream,
            "upstream_after": get_multiplexed_model_id(),
            "original_handle": repr(self.down),
            "add": plain,
        }

    async def chain(self, a: int) -> int:
        """Responses started here and passed on, without awaiting the first."""
        first = self.down.add.remote(a, b=1)
        return await self.down.add.remote(first, b=first)  # type: ignore[no-any-return]

    async def relay_budget(self) -> float | None:
        return await self.down.budget.remote()  # type: ignore[no-any-return]

    async def slow_down(self, seconds: float) -> float:
        return await self.down.sleep.remote(seconds)  # type: ignore[no-any-return]

    async def call_failing(self) -> dict[str, Any]:
        try:
            await self.down.fail.remote("downstream broke")
        except HandleError as exc:
            return {
                "type": type(exc).__name__,
                "status": exc.status,
                "code": exc.code,
                "message": exc.message,
            }
        return {}


@deployment
class SyncUp:
    """Plain ``def`` methods (worker threads of the replica) calling Down."""

    def __init__(self) -> None:
        self.down = get_deployment_handle("Down")

    def compose(self, down_model: str) -> dict[str, Any]:
        downstream = self.down.options(multiplexed_model_id=down_model).remote("from-sync", k=1)
        return {
            "downstream": downstream.result(),
            "upstream": get_multiplexed_model_id(),
            "worker_thread": threading.current_thread() is not threading.main_thread(),
        }

    def chain(self, a: int) -> int:
        """Responses started here and passed on, without waiting for the first."""
        first = self.down.add.remote(a, b=1)
        return self.down.add.remote(first, b=first).result()  # type: ignore[no-any-return]

    def relay_budget(self) -> float | None:
        return self.down.budget.remote().result()  # type: ignore[no-any-return]

    def call_failing(self, method: str, *args: Any) -> dict[str, Any]:
        try:
            self.down.options(method_name=method).remote(*args).result()
        except HandleError as exc:
            return {"type": type(exc).__name__, "status": exc.status, "code": exc.code}
        return {}

    def hold(self, port: int, name: str) -> Any:
        """Waits for a held Down call (cancelled if this request is abandoned)."""
        return self.down.hold.remote(port, name).result()

    async def result_in_async(self) -> Any:
        """``result()`` where ``await`` belongs: the RuntimeError, not a deadlock."""
        return self.down.add.remote(1).result()


class MethodsOnly:
    """No ``__call__``: reachable by method name through handles only."""

    async def add(self, a: int, b: int = 0) -> int:
        return a + b
