"""The deployment ``muxgate demo`` serves: the seed example's small torch MLP.

Replicas import it as ``muxgate.gateway._demo_app:DemoModel``. It is the
architecture of ``examples/torch_mlp.py`` (examples/ is not installed, so the
demo carries its own copy): every model id is a different set of weights,
stored as ``<root>/<id>/model.pt``.
"""

from __future__ import annotations

import asyncio
import io
import os
from typing import Any

import torch

from muxgate.replicas import Request, get_multiplexed_model_id, multiplexed

__all__ = ["DemoModel", "make_net", "write_models"]

IN_FEATURES = 4
OUT_FEATURES = 2


def make_net() -> torch.nn.Module:
    """The shared architecture (as in examples/torch_mlp.py)."""
    return torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, OUT_FEATURES),
    )


def write_models(root: str, count: int, *, seed: int = 0) -> list[str]:
    """Write models ``1..count`` as ``<root>/<id>/model.pt`` (a local folder)."""
    ids = [str(i) for i in range(1, count + 1)]
    for model_id in ids:
        torch.manual_seed(seed + int(model_id))
        buffer = io.BytesIO()
        torch.save(make_net().state_dict(), buffer)
        folder = os.path.join(root, model_id)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "model.pt"), "wb") as f:
            f.write(buffer.getvalue())
    return ids


class DemoModel:
    """Multiplexed torch MLPs; the cache size is an init argument so the demo
    can set it from the command line.

    Args:
        model_root: folder or URL holding ``<id>/model.pt``.
        max_models: ``max_num_models_per_replica``.
        load_delay_s: extra seconds per load, standing in for the download
            and deserialisation of real-sized weights (the demo's models are
            a few hundred bytes).
    """

    def __init__(self, model_root: str, max_models: int = 4, load_delay_s: float = 0.0) -> None:
        self.model_root = model_root
        self.load_delay_s = load_delay_s
        # Decorated per instance: the limit comes from the config, not the class.
        self.get_model = multiplexed(max_num_models_per_replica=max_models)(self._load)

    async def _load(self, model_id: str) -> torch.nn.Module:
        from muxgate.backends import load_state_dict

        net = make_net()
        net.load_state_dict(await load_state_dict(self.model_root, model_id, "model.pt"))
        if self.load_delay_s > 0:
            await asyncio.sleep(self.load_delay_s)
        return net.eval()

    async def __call__(self, request: Request) -> dict[str, Any]:
        model_id = get_multiplexed_model_id()
        model = await self.get_model(model_id)
        x = torch.tensor((await request.json())["x"], dtype=torch.float32)
        with torch.inference_mode():
            y = model(x)
        return {"model_id": model_id, "y": y.tolist()}
