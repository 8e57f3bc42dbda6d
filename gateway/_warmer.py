"""Carrying out a warming plan on one replica (the I/O around
:mod:`muxgate.gateway._warming`).

One model at a time, each a ``ModelControl`` with ``after_calls``: the
replica starts it only once it has no request in flight, so warming never
delays a request there beyond the load already under way when one arrives.
It stops at the first model that does not fit (the replica's cache is full),
when the replica stops running, or when the connection drops.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence

import msgspec

from muxgate.gateway._connection import ReplicaConnection, ReplicaConnectionError

__all__ = ["warm_replica"]

_log = logging.getLogger("muxgate.gateway")


async def warm_replica(
    conn: ReplicaConnection,
    plan: Sequence[str],
    *,
    pinned: Collection[str] = (),
    loader: str | None = None,
    timeout_s: float = 60.0,
    running: Callable[[], bool] = lambda: True,
) -> list[str]:
    """Warm ``plan`` on the replica of ``conn`` in order; the ids it holds now.

    Ids in ``pinned`` are loaded and pinned (evicting if need be, as the
    config's ``pinned`` at start), the others warmed (kept only if they fit
    without evicting). A model that fails to load is logged and skipped.
    """
    warmed: list[str] = []
    for model_id in plan:
        if not running():
            break
        pin = model_id in pinned
        try:
            reply = await conn.control(
                "load" if pin else "warm",
                model_id,
                pin=pin,
                loader=loader,
                timeout_s=timeout_s,
                after_calls=True,
            )
        except ReplicaConnectionError:
            break
        if reply.error is not None:
            _log.warning(
                "warming model '%s' on %s failed: %s",
                model_id,
                conn.replica_id,
                reply.error.message,
            )
            continue
        if not msgspec.json.decode(reply.body).get("loaded"):
            break  # full (or busy all along): the colder ones would not fit either
        warmed.append(model_id)
    if warmed:
        _log.info("warmed %d model(s) on %s: %s", len(warmed), conn.replica_id, warmed)
    return warmed
