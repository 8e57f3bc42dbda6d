"""Deployments used by the gateway's integration tests (tests/integration/test_gateway_*).

``Echo1``/``Echo2``/``Echo3`` differ only in ``max_num_models_per_replica``;
``Decorated`` sets ``max_ongoing_requests`` and ``num_replicas`` with
``@deployment`` instead of the config.
What ``__call__`` does depends on the path below the route prefix:

* ``/slow?s=SECONDS``: sleep, then answer (requests that stay in flight);
* ``/raise``: raise ``ValueError`` (the gateway must answer 500 and the
  replica keep serving);
* ``/body``: answer the request's body as it arrived;
* anything else: answer at once.

Every other answer is ``{"model", "method", "replica", "pid", "path", "body_len", "greeting"}``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from muxgate.replicas._context import current_replica, get_multiplexed_model_id
from muxgate.replicas._deployment import deployment
from muxgate.replicas._http import Request, Response
from muxgate.replicas._multiplex import multiplexed


class _Loaded:
    """A stand-in model: no weights, loading is instant."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id


def _make(limit: int, name: str = "", **options: Any) -> type:
    class Echo:
        def __init__(self, greeting: str = "hello") -> None:
            self.greeting = greeting

        @multiplexed(max_num_models_per_replica=limit)
        async def get_model(self, model_id: str) -> _Loaded:
            return _Loaded(model_id)

        async def __call__(self, request: Request) -> dict[str, Any] | Response:
            model_id = get_multiplexed_model_id()
            if model_id:
                await self.get_model(model_id)
            if request.path == "/status":
                return Response(b"", status_code=int(request.query_params.get("s", "200")))
            if request.path == "/own-ids":  # headers only the gateway may set
                return Response(b"", headers={"x-request-id": "mine", "x-muxgate-replica": "me"})
            if request.path == "/body":  # the body as it arrived
                return Response(await request.body(), media_type="application/octet-stream")
            if request.path == "/slow":
                await asyncio.sleep(float(request.query_params.get("s", "1")))
            elif request.path == "/raise":
                raise ValueError("the deployment failed on purpose")
            return {
                "model": model_id,
                "method": request.method,
                "replica": current_replica().replica_id,
                "pid": os.getpid(),
                "path": request.path,
                "body_len": len(await request.body()),
                "greeting": self.greeting,
            }

    Echo.__name__ = Echo.__qualname__ = name or f"Echo{limit}"
    return deployment(Echo, **options)


Echo1 = _make(1)
Echo2 = _make(2)
Echo3 = _make(3)
#: options from the decorator only: the config names neither of them
Decorated = _make(3, "Decorated", max_ongoing_requests=1, num_replicas=2)
