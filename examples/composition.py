"""Model composition: an upstream deployment calls the multiplexed one through a handle.

``Ensemble`` (at ``/ensemble``) asks several models for a prediction, in
parallel, and averages them. Each call picks its model with
``options(multiplexed_model_id=...)``; the id is *not* inherited from the
request ``Ensemble`` is serving (as in Ray Serve), and setting it on a handle
does not change what ``get_multiplexed_model_id()`` returns here.

    python examples/make_models.py
    muxgate serve examples/composition.yaml
    curl -d '{"x": [1, 2, 3, 4], "models": ["1", "2", "3"]}' http://127.0.0.1:8000/ensemble
"""

from __future__ import annotations

import asyncio
from typing import Any

from muxgate.replicas import Request, deployment, get_deployment_handle, get_multiplexed_model_id


@deployment(max_ongoing_requests=16)
class Ensemble:
    def __init__(self, downstream: str = "Model") -> None:
        # Inside a replica the gateway that started it is the default target.
        self.model = get_deployment_handle(downstream)

    async def __call__(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        x: list[float] = body["x"]
        model_ids: list[str] = body.get("models", ["1", "2"])
        outputs = await asyncio.gather(
            *(self.model.options(multiplexed_model_id=m).predict.remote(x) for m in model_ids)
        )
        mean = [sum(col) / len(col) for col in zip(*outputs, strict=True)]
        return {
            "models": model_ids,
            "outputs": outputs,
            "mean": mean,
            # Still this request's own model id ("" when it had none).
            "own_model_id": get_multiplexed_model_id(),
        }
