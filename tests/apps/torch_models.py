"""A multiplexed deployment with small real torch models, for replica tests.

Each load and each unload hook appends a line to ``events_path`` so a test
can check, after the replica exited, which hooks ran.
"""

from __future__ import annotations

from typing import Any

import anyio
import torch

from muxgate.replicas._context import get_multiplexed_model_id
from muxgate.replicas._multiplex import multiplexed


def _append(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


class TinyNet(torch.nn.Module):
    def __init__(self, model_id: str, events_path: str) -> None:
        super().__init__()
        self.model_id = model_id
        self.events_path = events_path
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        _append(self.events_path, f"unload {self.model_id}")


class TorchModels:
    def __init__(self, events_path: str, state_dir: str) -> None:
        self.events_path = events_path
        self.state_dir = state_dir

    @multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> TinyNet:
        # A real torch round trip: make weights, save them, load them back.
        path = f"{self.state_dir}/{model_id}.pt"
        torch.manual_seed(sum(model_id.encode()))
        torch.save(TinyNet(model_id, self.events_path).state_dict(), path)
        net = TinyNet(model_id, self.events_path)
        net.load_state_dict(torch.load(path, weights_only=True))
        _append(self.events_path, f"load {model_id}")
        return net.eval()

    async def __call__(self, request: Any) -> dict[str, Any]:
        model = await self.get_model(get_multiplexed_model_id())
        x = torch.tensor((await request.json())["x"], dtype=torch.float32)
        with torch.no_grad():
            return {"model_id": model.model_id, "y": model(x).tolist()}

    async def predict(self, x: list[float]) -> list[float]:
        model = await self.get_model(get_multiplexed_model_id())
        with torch.no_grad():
            result: list[float] = model(torch.tensor(x, dtype=torch.float32)).tolist()
        return result

    async def hold(self, fifo_path: str) -> str:
        """Use the request's model, then block until the FIFO is written to
        and closed (the model stays pinned meanwhile)."""
        model = await self.get_model(get_multiplexed_model_id())

        def read() -> str:
            with open(fifo_path) as fifo:
                return fifo.read()

        text = await anyio.to_thread.run_sync(read, abandon_on_cancel=True)
        return f"{model.model_id}:{text}"
