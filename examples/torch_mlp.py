"""The seed example: Torch models in a bucket, one folder per model id.

Layout (local folder by default, S3 or GCS with one setting)::

    <root>/1/model.pt
    <root>/2/model.pt
    ...

Each ``model.pt`` is a ``state_dict`` of :func:`make_net`, loaded with
``torch.load(weights_only=True)``: a pickle is code, a state dict is data.
"""

from __future__ import annotations

from typing import Any

import torch

from muxgate.backends import load_state_dict
from muxgate.replicas import Request, deployment, get_multiplexed_model_id, multiplexed

IN_FEATURES = 4
OUT_FEATURES = 2


def make_net() -> torch.nn.Module:
    """The shared architecture; every model id is a different set of weights."""
    return torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, OUT_FEATURES),
    )


@deployment(max_ongoing_requests=8)
class Model:
    def __init__(self, model_root: str) -> None:
        self.model_root = model_root

    @multiplexed(max_num_models_per_replica=3)
    async def get_model(self, model_id: str) -> torch.nn.Module:
        net = make_net()
        net.load_state_dict(await load_state_dict(self.model_root, model_id, "model.pt"))
        return net.eval()

    async def __call__(self, request: Request) -> dict[str, Any]:
        model_id = get_multiplexed_model_id()
        model = await self.get_model(model_id)
        x = torch.tensor((await request.json())["x"], dtype=torch.float32)
        with torch.inference_mode():
            y = model(x)
        return {"model_id": model_id, "y": y.tolist()}

    async def predict(self, x: list[float]) -> list[float]:
        """Called through a handle: ``handle.options(multiplexed_model_id="2").predict.remote(x)``."""
        model = await self.get_model(get_multiplexed_model_id())
        with torch.inference_mode():
            result: list[float] = model(torch.tensor(x, dtype=torch.float32)).tolist()
        return result
