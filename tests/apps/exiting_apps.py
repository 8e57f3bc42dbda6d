"""Deployments whose code raises what is not an ``Exception`` (tests/integration/
test_contained_failures.py): each must fail its own request, 500 ``user_error``,
and leave the replica serving.

``Exiting`` (async ``__call__``) by path below the route prefix:

* ``/exit``: ``sys.exit(2)``; ``/interrupt``: ``KeyboardInterrupt``;
  ``/cancelled``: a ``CancelledError`` nobody asked for; ``/base``: a bare
  ``BaseException``; ``/huge``: bytes one over the channel's frame limit;
* ``/sync-load``: load the request's model with the sync loader (a worker
  thread), anything else with the async one. Either loader raises
  ``SystemExit(3)`` for model ``exit`` and ``KeyboardInterrupt`` for
  ``interrupt``; models ``exits-on-close...`` and ``interrupts-on-aclose...``
  load, and their unload hooks raise those.

``SyncExiting`` (sync ``__call__``, run in a worker thread): ``/exit`` and
``/interrupt`` as above. Every answer is ``{"pid", "model"}``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from muxgate.replicas import Request, get_multiplexed_model_id, multiplexed
from muxgate.replicas.contract import MAX_FRAME_BYTES


class ExitsOnClose:
    """A model whose unload hook ``close()`` calls ``sys.exit(4)``."""

    def close(self) -> None:
        sys.exit(4)


class InterruptsOnAclose:
    """A model whose unload hook ``aclose()`` raises ``KeyboardInterrupt``."""

    async def aclose(self) -> None:
        raise KeyboardInterrupt


def _load(model_id: str) -> object:
    if model_id == "exit":
        sys.exit(3)
    if model_id == "interrupt":
        raise KeyboardInterrupt
    if model_id.startswith("exits-on-close"):
        return ExitsOnClose()
    if model_id.startswith("interrupts-on-aclose"):
        return InterruptsOnAclose()
    return model_id


class Exiting:
    @multiplexed(max_num_models_per_replica=4)
    async def get_model(self, model_id: str) -> object:
        return _load(model_id)

    @multiplexed(max_num_models_per_replica=4)
    def get_sync_model(self, model_id: str) -> object:
        return _load(model_id)

    async def __call__(self, request: Request) -> dict[str, Any]:
        model_id = get_multiplexed_model_id()
        if model_id and request.path == "/sync-load":
            await self.get_sync_model(model_id)
        elif model_id:
            await self.get_model(model_id)
        if request.path == "/exit":
            sys.exit(2)
        if request.path == "/interrupt":
            raise KeyboardInterrupt
        if request.path == "/cancelled":
            raise asyncio.CancelledError
        if request.path == "/base":
            raise BaseException("not an Exception")
        if request.path == "/huge":  # zero pages: no memory is touched
            return bytes(MAX_FRAME_BYTES + 1)
        return {"pid": os.getpid(), "model": model_id}


class SyncExiting:
    def __call__(self, request: Request) -> dict[str, Any]:
        if request.path == "/exit":
            sys.exit(2)
        if request.path == "/interrupt":
            raise KeyboardInterrupt
        return {"pid": os.getpid(), "model": get_multiplexed_model_id()}
