"""A deployment for tests/integration/test_bad_requests.py: malformed requests.

``Strict.__call__`` by path below the route prefix:

* ``/model``: ``await self.get_model(get_multiplexed_model_id())``;
* ``/json``: ``await request.json()``;
* ``/own-decode``: the deployment's own ``msgspec.json.decode`` of the body;
* ``/plain``: needs no model id and no body.

``predict`` (handle calls) loads the call's model too.
"""

from __future__ import annotations

from typing import Any

import msgspec

from muxgate.replicas import Request, get_multiplexed_model_id, multiplexed


class Strict:
    @multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> str:
        return f"model {model_id}"

    async def __call__(self, request: Request) -> Any:
        if request.path == "/model":
            return await self.get_model(get_multiplexed_model_id())
        if request.path == "/json":
            return await request.json()
        if request.path == "/own-decode":
            return msgspec.json.decode(await request.body())
        return "plain"

    async def predict(self) -> str:
        return await self.get_model(get_multiplexed_model_id())
