"""A multiplexed deployment of ~4 MB torch MLPs, the size of the peer
benchmark's models: a load (~5-10 ms) costs several times a call (~1 ms),
which is what the routing tests that price spills need.

``write_mlps(root, ids)`` writes ``<root>/<id>/model.pt`` state dicts;
``Mlps`` keeps two models per replica (``@multiplexed``) and answers
``{"model", "y"}`` for a fixed input.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from muxgate.replicas._context import get_multiplexed_model_id
from muxgate.replicas._deployment import deployment
from muxgate.replicas._http import Request
from muxgate.replicas._multiplex import multiplexed

WIDTH = 512


def make_mlp() -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(WIDTH, 2 * WIDTH), torch.nn.ReLU(), torch.nn.Linear(2 * WIDTH, WIDTH)
    )


def write_mlps(root: str | Path, model_ids: Iterable[str]) -> None:
    for model_id in model_ids:
        folder = Path(root) / model_id
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(sum(model_id.encode()))
        torch.save(make_mlp().state_dict(), folder / "model.pt")


@deployment(max_ongoing_requests=5)
class Mlps:
    def __init__(self, model_root: str) -> None:
        self.model_root = model_root
        self.x = torch.linspace(-1, 1, WIDTH).reshape(1, WIDTH)

    @multiplexed(max_num_models_per_replica=2)
    def get_model(self, model_id: str) -> torch.nn.Module:
        state = torch.load(f"{self.model_root}/{model_id}/model.pt", weights_only=True, mmap=True)
        with torch.device("meta"):
            net = make_mlp()
        net.load_state_dict(state, assign=True)
        return net.eval()

    async def __call__(self, request: Request) -> dict[str, Any]:
        model_id = get_multiplexed_model_id()
        model = await self.get_model(model_id)
        with torch.no_grad():
            y = float(model(self.x).sum())
        return {"model": model_id, "y": y}
