"""``GET /-/history``: the charts' samples and the per-model view, as JSON.

Behind the admin guard like ``/-/replicas``; ``create_app`` adds it when the
gateway keeps a :class:`~muxgate.gateway._history.History`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from typing import Any

import msgspec
from litestar import Response, get

from muxgate.gateway._history import History, model_view
from muxgate.gateway._pool import ReplicaPool

__all__ = ["MODEL_WINDOW_S", "history_body", "history_handler"]

#: the window of the per-model view's loads, requests and hit ratio
MODEL_WINDOW_S = 300.0


def history_body(history: History, pools: Mapping[str, ReplicaPool]) -> dict[str, Any]:
    """The document ``GET /-/history`` answers."""
    now = time.time()
    body = history.snapshot(pools)
    deployments: dict[str, Any] = body["deployments"]
    for name, pool in pools.items():
        entry = deployments.setdefault(name, {})
        entry["models"] = model_view(
            pool.snapshot(),
            pool.router.popularity.score,
            functools.partial(history.requests_since, name),
            now,
            MODEL_WINDOW_S,
        )
    body["model_window_s"] = MODEL_WINDOW_S
    return body


def history_handler(history: History, pools: Mapping[str, ReplicaPool]) -> Any:
    """The Litestar route handler for ``GET /-/history``."""

    @get("/-/history", sync_to_thread=False)
    def history_endpoint() -> Response[bytes]:
        return Response(
            content=msgspec.json.encode(history_body(history, pools)),
            status_code=200,
            media_type="application/json",
        )

    return history_endpoint
