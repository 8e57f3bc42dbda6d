"""A realistic torch deployment for bench/bench_cold_start.py and the
autoscaling tests: an MLP whose weights are loaded per model id from
``model_root/<id>/model.pt`` through ``muxgate.backends``.

``make_models(root, ids, hidden)`` writes the weight files.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import torch

from muxgate.backends import load_state_dict
from muxgate.replicas._context import get_multiplexed_model_id
from muxgate.replicas._deployment import deployment
from muxgate.replicas._http import Request
from muxgate.replicas._multiplex import multiplexed

IN_FEATURES = 16


def make_net(hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 1),
    )


def make_models(root: str, ids: list[str], hidden: int) -> None:
    """Write ``root/<id>/model.pt`` for every id (random weights)."""
    for i, model_id in enumerate(ids):
        torch.manual_seed(i)
        os.makedirs(os.path.join(root, model_id), exist_ok=True)
        torch.save(make_net(hidden).state_dict(), os.path.join(root, model_id, "model.pt"))


@deployment(max_ongoing_requests=4)
class Mlp:
    def __init__(self, model_root: str, hidden: int = 1024) -> None:
        self.model_root = model_root
        self.hidden = hidden

    @multiplexed(max_num_models_per_replica=4)
    async def get_model(self, model_id: str) -> torch.nn.Module:
        net = make_net(self.hidden)
        net.load_state_dict(await load_state_dict(self.model_root, model_id, "model.pt"))
        return net.eval()

    async def __call__(self, request: Request) -> dict[str, Any]:
        model = await self.get_model(get_multiplexed_model_id())
        hold = float(request.query_params.get("sleep", "0"))
        if hold > 0:  # keeps the request in flight (load for the autoscaler)
            await asyncio.sleep(hold)
        x = torch.ones(1, IN_FEATURES)
        with torch.no_grad():
            y = model(x)
        return {"y": float(y[0, 0]), "model": get_multiplexed_model_id()}
