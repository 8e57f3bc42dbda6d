"""Models loaded, warmed and unloaded outside any request: the deployment's
``preload`` and ``pinned`` ids at start, and the gateway's ``ModelControl``
messages (the admin API, warming after a scale from zero).

Each applies to every ``@multiplexed`` loader of the deployment object, or
to the one ``multiplexed_loader`` names (see
:func:`muxgate.replicas._multiplex.instance_caches`).
"""

from __future__ import annotations

import logging
from typing import Any

import anyio

from muxgate.replicas._cache import ModelCache
from muxgate.replicas._multiplex import instance_caches, model_caches
from muxgate.replicas._protocol import ModelControl

__all__ = ["control_models", "preload_models", "process_model_report"]

_log = logging.getLogger("muxgate.replica")


def _caches(instance: object, loader: str | None) -> list[ModelCache[Any]]:
    caches = instance_caches(instance, loader or None)
    if not caches:
        raise ValueError(f"{type(instance).__qualname__} has no @multiplexed loader.")
    return caches


async def preload_models(
    instance: object, preload: list[str], pinned: list[str], loader: str | None
) -> None:
    """Load the ``pinned`` ids (kept forever), then the ``preload`` ids, in order.

    A model that fails to load is logged and skipped: the replica serves
    the others (its next request tries again).

    Raises:
        ValueError: ``loader`` names no ``@multiplexed`` loader, or there is none.
    """
    if not preload and not pinned:
        return
    caches = _caches(instance, loader)
    for model_id, pin in [(m, True) for m in pinned] + [(m, False) for m in preload]:
        for cache in caches:
            try:
                await cache.preload(model_id, pin=pin)
            except Exception:
                _log.warning(
                    "Preloading model '%s' (%s) failed; the replica starts without it.",
                    model_id,
                    cache.name,
                    exc_info=True,
                )


async def control_models(instance: object, message: ModelControl) -> dict[str, Any]:
    """Carry out one ``ModelControl``; what was done, for the ``Reply`` body.

    ``load`` raises what the load raised (a load that fails is not cached);
    ``warm`` reports whether each cache holds the model now; ``unload``
    whether it was loaded.

    Raises:
        ValueError: an unknown loader name.
        TimeoutError: ``timeout_s`` passed (the load goes on in the cache).
    """
    caches = _caches(instance, message.loader)
    model_id = message.model_id
    result: dict[str, Any] = {"model_id": model_id, "action": message.action}
    if message.action == "unload":
        result["unloaded"] = any([cache.unload(model_id) for cache in caches])
        return result
    with anyio.fail_after(message.timeout_s):
        if message.action == "warm":
            result["loaded"] = all([await cache.warm(model_id) for cache in caches])
        else:
            for cache in caches:
                await cache.preload(model_id, pin=message.pin)
            result["loaded"] = True
    result["pinned"] = any(model_id in cache.kept_ids() for cache in caches)
    return result


def process_model_report() -> tuple[int, list[str]]:
    """(bytes of the loaded models, pinned ids) over every model cache of the process."""
    total = 0
    pinned: dict[str, None] = {}
    for cache in model_caches():
        total += cache.model_bytes()
        pinned.update(dict.fromkeys(cache.kept_ids()))
    return total, list(pinned)
