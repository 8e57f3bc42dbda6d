"""Deployments whose models hurt their replica (quarantine and memory tests).

``Hostile`` loads a stand-in model for every id, except:

* ``poison``: loading it kills the replica process (``os._exit``), as a
  segfault in native code would;
* ``leak``: loads fine, and each ``/leak?mb=N`` request keeps ``N`` MiB more
  for good (a model with a leak).

``/slow?s=SECONDS`` sleeps before answering (a request that stays in
flight). Every answer is ``{"model", "replica", "pid", "leaked_mb"}``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from muxgate.replicas._context import current_replica, get_multiplexed_model_id
from muxgate.replicas._http import Request
from muxgate.replicas._multiplex import multiplexed

#: what ``poison`` exits with
POISON_EXIT = 13


class _Model:
    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.kept: list[bytes] = []


class Hostile:
    @multiplexed(max_num_models_per_replica=4)
    async def get_model(self, model_id: str) -> _Model:
        if model_id == "poison":
            os._exit(POISON_EXIT)
        return _Model(model_id)

    async def __call__(self, request: Request) -> dict[str, Any]:
        model_id = get_multiplexed_model_id()
        model = await self.get_model(model_id)
        if request.path == "/slow":
            await asyncio.sleep(float(request.query_params.get("s", "1")))
        elif request.path == "/leak" and model_id == "leak":
            # Written, not calloc'ed: the pages are resident at once.
            model.kept.append(b"x" * (int(request.query_params.get("mb", "1")) << 20))
        return {
            "model": model_id,
            "replica": current_replica().replica_id,
            "pid": os.getpid(),
            "leaked_mb": sum(len(b) for b in model.kept) >> 20,
        }
