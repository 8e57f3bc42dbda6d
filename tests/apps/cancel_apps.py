"""Deployments for the cancellation tests (tests/integration/test_cancel*.py).

``Holder`` calls hold until cancelled and record what happened to them as
empty files in ``marker_dir`` (``NAME.started``, ``NAME.cancelled``,
``NAME.returned``), so a test in another process can observe the replica's
side of a cancellation; a sync call returns once the test creates
``NAME.release``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import anyio
import anyio.from_thread

from muxgate.replicas._context import get_multiplexed_model_id
from muxgate.replicas._deployment import deployment
from muxgate.replicas._multiplex import model_caches, multiplexed


def _mark(marker_dir: str, name: str, what: str) -> None:
    with open(os.path.join(marker_dir, f"{name}.{what}"), "w"):
        pass


@deployment(max_ongoing_requests=1)
class Holder:
    def __init__(self, marker_dir: str) -> None:
        self.marker_dir = marker_dir

    @multiplexed(max_num_models_per_replica=4)
    async def get_model(self, model_id: str) -> str:
        return f"model-{model_id}"

    async def _hold(self, name: str) -> str:
        model_id = get_multiplexed_model_id()
        if model_id:
            await self.get_model(model_id)  # pinned until the request ends
        _mark(self.marker_dir, name, "started")
        try:
            await anyio.sleep(60)
        except anyio.get_cancelled_exc_class():
            _mark(self.marker_dir, name, "cancelled")
            raise
        return name

    async def __call__(self, request: Any) -> str:
        if request.path == "/quick":
            return "quick"
        return await self._hold(request.query_params["name"])

    async def hold(self, name: str) -> str:
        return await self._hold(name)

    def sync_hold(self, name: str, within_s: float) -> str:
        # A worker thread cannot be interrupted: it runs to its end, which
        # the test sets by creating NAME.release (or ``within_s`` passes).
        _mark(self.marker_dir, name, "started")
        release = os.path.join(self.marker_dir, f"{name}.release")
        deadline = time.monotonic() + within_s
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.01)  # polling a file another process creates
        _mark(self.marker_dir, name, "returned")
        return name

    def sync_hold_model(self, name: str, within_s: float) -> str:
        # Pins the request's model from the thread (the loader runs on the loop).
        anyio.from_thread.run(self.get_model, get_multiplexed_model_id())
        return self.sync_hold(name, within_s)

    async def quick(self) -> str:
        return "quick"

    async def pins(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for cache in model_caches():
            out.update(cache.pins())
        return out
