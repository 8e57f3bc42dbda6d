"""Models loaded, warmed and unloaded outside any request: the deployment's
``preload`` and ``pinned`` ids at start, and the gateway's ``ModelControl``
messages (the admin API, warming after a scale from zero).

Each applies to every ``@multiplexed`` loader of the deployment object, or
to the one ``multiplexed_loader`` names (see
:func:`muxgate.replicas._multiplex.instance_caches`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec

from muxgate.replicas._cache import ModelCache
from muxgate.replicas._context import request_scope
from muxgate.replicas._logging import logged
from muxgate.replicas._multiplex import instance_caches, model_caches
from muxgate.replicas._protocol import ModelControl

__all__ = [
    "MAX_WARMING_LOADS",
    "ControlRefusedError",
    "WarmTurns",
    "control_models",
    "control_when_due",
    "preload_models",
    "process_model_report",
    "warm_may_start",
]

_log = logging.getLogger("muxgate.replica")

#: warming loads (``ModelControl.after_slot``) one replica runs at once
MAX_WARMING_LOADS = 1


def warm_may_start(
    in_flight: int, max_ongoing: int, warming: int, max_warming: int = MAX_WARMING_LOADS
) -> bool:
    """Whether a warming load (``ModelControl.after_slot``) may start now.

    Only while a call slot is free (``in_flight`` calls, counting those
    waiting for a slot, below ``max_ongoing``) and fewer than ``max_warming``
    warming loads run on the replica. Once started it holds no call slot
    (nor one of the cache's load slots): a call that arrives meanwhile gets
    the slot it would have had without the warm, and runs beside the load.
    A warm thus only takes room the gateways left free, never a place in
    line; what it may cost a call is the CPU it shares with one load.
    """
    return in_flight < max_ongoing and warming < max_warming


class ControlRefusedError(ValueError):
    """The control cannot apply to the deployment (no ``@multiplexed``
    loader, or none of that name): the caller's mistake, unlike an error the
    load itself raises, which answers as a request for the model would."""


def _caches(instance: object, loader: str | None) -> list[ModelCache[Any]]:
    try:
        caches = instance_caches(instance, loader or None)
    except ValueError as exc:
        raise ControlRefusedError(str(exc)) from exc
    if not caches:
        raise ControlRefusedError(f"{type(instance).__qualname__} has no @multiplexed loader.")
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
            except Exception as exc:
                # The failed load logged its detail (or traceback) already.
                _log.warning(
                    "Preloading model '%s' (%s) failed; the replica starts without it.",
                    model_id,
                    cache.name,
                    exc_info=not logged(exc),
                )


async def control_models(instance: object, message: ModelControl) -> dict[str, Any]:
    """Carry out one ``ModelControl``; what was done, for the ``Reply`` body.

    ``load`` and ``warm`` raise what the load raised (a load that fails is
    not cached); ``warm`` reports whether each cache holds the model now
    (False: it does not fit); ``unload`` whether it was loaded.

    Raises:
        ControlRefusedError: an unknown loader name, or none.
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
            result["loaded"] = all(
                [await cache.warm(model_id, message.may_evict) for cache in caches]
            )
        else:
            for cache in caches:
                await cache.preload(model_id, pin=message.pin)
            result["loaded"] = True
    result["pinned"] = any(model_id in cache.kept_ids() for cache in caches)
    return result


async def control_when_due(
    instance: object,
    message: ModelControl,
    *,
    warms: WarmTurns,
    in_flight: Callable[[], int],
    max_ongoing: int,
    idle: Callable[[float | None], Awaitable[bool]],
) -> dict[str, Any]:
    """:func:`control_models` once the message's turn comes: at once; with
    ``after_slot`` once :func:`warm_may_start` (the wait counts against
    ``timeout_s``); else with ``after_calls`` once ``idle`` (no call in
    flight). ``{"loaded": False, "busy": True}`` when the turn never came.

    Raises:
        What :func:`control_models` raises.
    """
    busy = {"model_id": message.model_id, "loaded": False, "busy": True}
    scope = f"model-control-{message.id}"
    if message.after_slot:
        started = time.monotonic()
        if not await warms.acquire(in_flight, max_ongoing, message.timeout_s):
            return busy
        if message.timeout_s is not None:
            left = message.timeout_s - (time.monotonic() - started)
            message = msgspec.structs.replace(message, timeout_s=max(left, 0.0))
        try:
            # A request scope of its own: the loader's get_multiplexed_model_id() works.
            with request_scope(scope, message.model_id):
                return await control_models(instance, message)
        finally:
            warms.release()
    if message.after_calls and not await idle(message.timeout_s):
        return busy
    with request_scope(scope, message.model_id):
        return await control_models(instance, message)


def process_model_report() -> tuple[int, list[str]]:
    """(bytes of the loaded models, pinned ids) over every model cache of the process."""
    total = 0
    pinned: dict[str, None] = {}
    for cache in model_caches():
        total += cache.model_bytes()
        pinned.update(dict.fromkeys(cache.kept_ids()))
    return total, list(pinned)


class WarmTurns:
    """The warming loads of one replica (``ModelControl.after_slot``): how
    many run, and the turn those waiting for :func:`warm_may_start` wait on.

    The replica calls :meth:`wake` whenever a call ends; :meth:`release`
    wakes the waiters too. The rule itself is the pure function.
    """

    __slots__ = ("_turn", "max_running", "running", "waiting")

    def __init__(self, max_running: int = MAX_WARMING_LOADS) -> None:
        self.max_running = max_running
        self.running = 0
        self.waiting = 0
        self._turn = anyio.Event()

    def __repr__(self) -> str:
        return f"<WarmTurns running={self.running}/{self.max_running} waiting={self.waiting}>"

    def wake(self) -> None:
        """Let the waiters check the rule again (cheap when none waits)."""
        if self.waiting:
            self._turn.set()
            self._turn = anyio.Event()

    async def acquire(
        self, in_flight: Callable[[], int], max_ongoing: int, timeout_s: float | None
    ) -> bool:
        """Wait for a turn and take it (True), or give up after ``timeout_s`` (False)."""
        self.waiting += 1
        try:
            with anyio.move_on_after(math.inf if timeout_s is None else timeout_s):
                while not warm_may_start(in_flight(), max_ongoing, self.running, self.max_running):
                    await self._turn.wait()
                self.running += 1
                return True
            return False
        finally:
            self.waiting -= 1

    def release(self) -> None:
        self.running -= 1
        self.wake()
