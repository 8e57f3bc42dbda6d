"""Deployments for the autoscaling tests (tests/integration/test_autoscale*.py).

* ``Hooked``: models are stand-ins whose ``close()`` hook appends
  ``"<model id> <pid>"`` to the file ``hook_log`` names, so a test can see
  that a drained replica unloaded its models through the hooks. Paths:
  ``/slow?s=SECONDS`` sleeps, anything else answers at once; every answer is
  ``{"model", "replica", "pid"}``.
* ``Broken``: ``__init__`` raises, so every start fails.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from muxgate.replicas._context import current_replica, get_multiplexed_model_id
from muxgate.replicas._deployment import deployment
from muxgate.replicas._http import Request
from muxgate.replicas._multiplex import multiplexed


class _Model:
    def __init__(self, model_id: str, hook_log: str) -> None:
        self.model_id = model_id
        self.hook_log = hook_log

    def close(self) -> None:
        if self.hook_log:
            with open(self.hook_log, "a") as f:
                f.write(f"{self.model_id} {os.getpid()}\n")


@deployment(max_ongoing_requests=4)
class Hooked:
    def __init__(self, hook_log: str = "") -> None:
        self.hook_log = hook_log

    @multiplexed(max_num_models_per_replica=4)
    async def get_model(self, model_id: str) -> _Model:
        return _Model(model_id, self.hook_log)

    async def __call__(self, request: Request) -> dict[str, Any]:
        model_id = get_multiplexed_model_id()
        if model_id:
            await self.get_model(model_id)
        if request.path == "/slow":
            await asyncio.sleep(float(request.query_params.get("s", "1")))
        return {"model": model_id, "replica": current_replica().replica_id, "pid": os.getpid()}


@deployment
class Broken:
    def __init__(self) -> None:
        raise RuntimeError("model registry unreachable (raised on purpose)")

    async def __call__(self, request: Request) -> str:
        return "never"


@deployment(max_ongoing_requests=4)
class SlowLoad:
    """Loads take ``load_s`` (sleep), requests ``serve_s``; two models per
    replica, so an overloaded pool with many models thrashes unless the
    gateway queue prefers cache hits."""

    def __init__(self, load_s: float = 0.2, serve_s: float = 0.01) -> None:
        self.load_s = load_s
        self.serve_s = serve_s

    @multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> _Model:
        await asyncio.sleep(self.load_s)
        return _Model(model_id, "")

    async def __call__(self, request: Request) -> dict[str, Any]:
        model_id = get_multiplexed_model_id()
        await self.get_model(model_id)
        await asyncio.sleep(self.serve_s)
        return {"model": model_id, "replica": current_replica().replica_id}
