"""A multiplexed deployment that loads real torch files through muxgate.backends,
for the observability tests (tests/integration/test_observability_*,
tests/e2e/test_status_page*).

``Observed`` keeps at most two models per replica and loads
``<model_root>/<model_id>/model.pt`` with ``load_state_dict``, so a load
emits ``muxgate.model.load`` with ``muxgate.storage.fetch`` below it. What
``__call__`` does depends on the path below the route prefix:

* ``/raise``: use the request's model, then raise ``ValueError`` (500);
* ``/hold?fifo=PATH``: use the request's model, then stay in flight until
  the test writes to the FIFO at ``PATH`` and closes it;
* anything else: run the model on a fixed input and answer
  ``{"model", "y"}``.

``write_models(root, ids)`` writes the files a test serves.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anyio
import torch

from muxgate.backends import load_state_dict
from muxgate.replicas._context import get_multiplexed_model_id
from muxgate.replicas._deployment import deployment
from muxgate.replicas._http import Request
from muxgate.replicas._multiplex import multiplexed


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)  # type: ignore[no-any-return]


def write_models(root: str | Path, model_ids: Iterable[str]) -> None:
    """Save a ``TinyNet`` state dict at ``root/<id>/model.pt`` for each id."""
    for model_id in model_ids:
        folder = Path(root) / model_id
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(sum(model_id.encode()))
        torch.save(TinyNet().state_dict(), folder / "model.pt")


@deployment(max_ongoing_requests=8)
class Observed:
    def __init__(self, model_root: str) -> None:
        self.model_root = model_root

    @multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> TinyNet:
        net = TinyNet()
        net.load_state_dict(await load_state_dict(self.model_root, model_id, "model.pt"))
        return net.eval()

    async def __call__(self, request: Request) -> dict[str, Any]:
        model_id = get_multiplexed_model_id()
        model = await self.get_model(model_id) if model_id else None
        if request.path == "/raise":
            raise ValueError("the deployment failed on purpose")
        if request.path == "/hold":
            fifo = request.query_params["fifo"]

            def wait() -> str:
                with open(fifo) as f:
                    return f.read()

            await anyio.to_thread.run_sync(wait, abandon_on_cancel=True)
        y: list[float] = []
        if model is not None:
            with torch.no_grad():
                y = model(torch.ones(4)).tolist()
        return {"model": model_id, "y": y}
