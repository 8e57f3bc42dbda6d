"""Deployments of real torch models of different sizes, for preload, pinned
models, the admin load/unload and the byte budget.

``write_sized(root, {id: width})`` writes ``<root>/<id>/model.pt``: the state
dict of a ``Linear(width, width)`` (``width * (width + 1) * 4`` bytes).
``Sized`` rebuilds each from its file (the width from the tensor's shape)
and answers ``{"model", "bytes"}``.

``Gated`` (two call slots) holds each call (``hold(name)``) and each model
load until a ``release(name)`` call (``load-<id>`` for a load) lets it go,
so a test can fill the replica's slots and keep a warming load running.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import torch

from muxgate.replicas._context import get_multiplexed_model_id
from muxgate.replicas._deployment import deployment
from muxgate.replicas._http import Request
from muxgate.replicas._multiplex import multiplexed


def linear_bytes(width: int) -> int:
    return width * (width + 1) * 4


def write_sized(root: str | Path, widths: Mapping[str, int]) -> None:
    for model_id, width in widths.items():
        folder = Path(root) / model_id
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(width)
        torch.save(torch.nn.Linear(width, width).state_dict(), folder / "model.pt")


@deployment(max_ongoing_requests=4)
class Sized:
    def __init__(self, model_root: str) -> None:
        self.model_root = model_root

    @multiplexed(max_num_models_per_replica=-1)
    def get_model(self, model_id: str) -> torch.nn.Module:
        state = torch.load(f"{self.model_root}/{model_id}/model.pt", weights_only=True)
        width = state["weight"].shape[0]
        with torch.device("meta"):
            net = torch.nn.Linear(width, width)
        net.load_state_dict(state, assign=True)
        return net.eval()

    async def __call__(self, request: Request) -> dict[str, Any]:
        model_id = get_multiplexed_model_id()
        model = await self.get_model(model_id)
        return {"model": model_id, "bytes": sum(p.nbytes for p in model.parameters())}


@deployment(max_ongoing_requests=2)
class Gated:
    def __init__(self) -> None:
        self._gates: dict[str, anyio.Event] = {}

    def _gate(self, name: str) -> anyio.Event:
        return self._gates.setdefault(name, anyio.Event())

    # On the replica's loop: the load waits on an event that a call sets there.
    @multiplexed(max_num_models_per_replica=8, load_on_loop=True)
    async def get_model(self, model_id: str) -> str:
        await self._gate(f"load-{model_id}").wait()
        return model_id

    async def hold(self, name: str) -> str:
        await self._gate(name).wait()
        return name

    async def release(self, name: str) -> str:
        self._gate(name).set()
        return name
