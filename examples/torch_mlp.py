"""The seed example: Torch models in a bucket, one folder per model id.

Layout (local folder by default, S3 or GCS with one setting)::

    <root>/1/model.pt
    <root>/2/model.pt
    ...

Each ``model.pt`` is a ``state_dict`` of :func:`make_net`, loaded with
``torch.load(weights_only=True)``: a pickle is code, a state dict is data.

The loader builds the network on the ``meta`` device (shapes only: no
memory, no random initialisation) and then adopts the loaded tensors with
``load_state_dict(state, assign=True)``. Building it the usual way would
fill every weight with random numbers only to overwrite them; for a 4 MB
MLP that is over half the CPU of a load (``bench/bench_loader.py``).
``strict`` loading (the default) still refuses a file that misses a weight.

Where the models are: the ``model_root`` init argument (``init_kwargs`` in
the app config), else the ``MODEL_ROOT`` environment variable, else the
``models/`` folder next to this file (what ``make_models.py`` writes by
default). ``MODEL_ROOT=s3://my-bucket/models`` is the one setting that moves
the example to S3 (endpoint and credentials: the config's ``storage.s3``
section or the usual ``AWS_*`` variables).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from muxgate.backends import load_state_dict
from muxgate.replicas import Request, deployment, get_multiplexed_model_id, multiplexed

IN_FEATURES = 4
OUT_FEATURES = 2
#: where make_models.py writes by default, and where Model looks last
DEFAULT_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")


def make_net() -> torch.nn.Module:
    """The shared architecture; every model id is a different set of weights."""
    return torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, OUT_FEATURES),
    )


@deployment(max_ongoing_requests=8)
class Model:
    def __init__(self, model_root: str | None = None) -> None:
        self.model_root = model_root or os.environ.get("MODEL_ROOT") or DEFAULT_ROOT
        local = self.model_root.removeprefix("file://")
        if "://" not in local and not os.path.isdir(local):
            # Every request would get 404 model_not_found: say why once, at start.
            logging.getLogger(__name__).warning(
                "Model root %s does not exist: every model will be 404 model_not_found"
                " (python examples/make_models.py %s writes models there).",
                local,
                local,
            )

    @multiplexed(max_num_models_per_replica=3)
    async def get_model(self, model_id: str) -> torch.nn.Module:
        state = await load_state_dict(self.model_root, model_id, "model.pt")
        with torch.device("meta"):  # shapes only: no memory, no random init
            net = make_net()
        net.load_state_dict(state, assign=True)  # the loaded tensors become the weights
        return net.eval()

    async def __call__(self, request: Request | dict[str, Any]) -> dict[str, Any]:
        """HTTP: ``request`` is a ``Request`` with a JSON body ``{"x": [...]}``;
        handle: ``await handle.options(multiplexed_model_id="2").remote({"x": [...]})``."""
        model_id = get_multiplexed_model_id()
        model = await self.get_model(model_id)
        payload = await request.json() if isinstance(request, Request) else request
        x = torch.tensor(payload["x"], dtype=torch.float32)
        with torch.inference_mode():
            y = model(x)
        return {"model_id": model_id, "y": y.tolist()}

    async def predict(self, x: list[float]) -> list[float]:
        """Through a handle: ``handle.options(multiplexed_model_id="2").predict.remote(x)``."""
        model = await self.get_model(get_multiplexed_model_id())
        with torch.inference_mode():
            result: list[float] = model(torch.tensor(x, dtype=torch.float32)).tolist()
        return result
