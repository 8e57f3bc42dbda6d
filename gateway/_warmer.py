"""Carrying out a warming plan on one replica (the I/O around
:mod:`muxgate.gateway._warming`).

One model at a time, each a ``ModelControl`` with ``after_slot``: the
replica starts it once one of its call slots is free and no other warming
load runs there, and the load holds no slot, so a request never waits for a
warm (it shares the CPU with at most one load). A replica of a release
before ``after_slot`` falls back to ``after_calls`` (only once it has no
request in flight), which the message also sets. It stops at the first
model that does not fit (the replica's cache is full), when the replica
stops running, or when the connection drops.

The pool warms in three moments, each a function here: the first replica
after zero (``warm_after_zero``), a replica that joined and is the new home
of some models (``warm_moved_home``), and a replica leaving on scale-down,
whose models warm on their next homes first (``hand_over``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Mapping, Sequence

import msgspec

from muxgate.gateway._connection import ReplicaConnection, ReplicaConnectionError
from muxgate.gateway._load_failures import FailedLoads
from muxgate.gateway._popularity import PopularitySketch
from muxgate.gateway._router import Router
from muxgate.gateway._warming import (
    DEFAULT_WARM_LIMIT,
    after_zero,
    handed_over,
    handover_bound_s,
    moved_home,
    spare_copies,
    warm_counts,
)

__all__ = ["hand_over", "warm_after_zero", "warm_moved_home", "warm_replica"]

_log = logging.getLogger("muxgate.gateway")


async def warm_replica(
    conn: ReplicaConnection,
    plan: Sequence[str],
    *,
    pinned: Collection[str] = (),
    loader: str | None = None,
    timeout_s: float = 60.0,
    running: Callable[[], bool] = lambda: True,
    may_evict: Sequence[str] = (),
    failed_loads: FailedLoads | None = None,
) -> list[str]:
    """Warm ``plan`` on the replica of ``conn`` in order; the ids it holds now.

    Ids in ``pinned`` are loaded and pinned (evicting if need be, as the
    config's ``pinned`` at start), the others warmed (kept only if they fit
    without evicting anything but, as needed, the ``may_evict`` ids).
    A model that fails to load is logged and skipped, and recorded in
    ``failed_loads`` (no later warming volunteers it).
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
                after_calls=True,  # for a replica without after_slot
                after_slot=True,
                may_evict=() if pin else may_evict,
            )
        except ReplicaConnectionError:
            break
        if reply.error is not None:
            if failed_loads is not None:
                failed_loads.replied(model_id, reply.error, reply.state)
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


async def warm_after_zero(
    conn: ReplicaConnection,
    router: Router,
    *,
    pinned: Sequence[str],
    preload: Sequence[str],
    refused: Callable[[str], bool],
    loader: str | None,
    timeout_s: float,
    running: Callable[[], bool],
    waking: int = 0,
    reported: PopularitySketch | None = None,
    failed_loads: FailedLoads | None = None,
) -> None:
    """The first replica after zero: the config's deferred ``pinned`` and
    ``preload`` ids, then the hottest models of the deployment's warm set
    (docs/routing.md, "Warm models"); ids ``refused`` (quarantined, or whose
    last load failed) are left out.

    Nothing is sent before ``waking`` calls ended on ``conn`` (within
    ``timeout_s``): the requests that woke the deployment, sent before
    this runs, are served first, with no warming load beside them.
    ``reported``: the replicas' request counts (see ``warm_counts``)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await conn.calls_end(waking)
    ranked = warm_counts(router.popularity, reported).top(2 * DEFAULT_WARM_LIMIT)
    plan = after_zero(
        ranked,
        {*conn.state.models, *conn.state.loading},
        deferred=[*pinned, *preload],
        refused=[m for m, _ in ranked if refused(m)],
    )
    await warm_replica(
        conn,
        plan,
        pinned=pinned,
        loader=loader,
        timeout_s=timeout_s,
        running=running,
        failed_loads=failed_loads,
    )


async def warm_moved_home(
    conn: ReplicaConnection,
    replica_id: str,
    router: Router,
    *,
    loader: str | None,
    timeout_s: float,
    running: Callable[[], bool],
    reported: PopularitySketch | None = None,
    refused: Callable[[str], bool] = lambda model_id: False,
    failed_loads: FailedLoads | None = None,
) -> None:
    """Replica ``replica_id`` joined: it warms the recently requested models
    whose home it is now (``reported``: see ``warm_counts``), none ``refused``."""
    plan = moved_home(
        warm_counts(router.popularity, reported).top(4 * DEFAULT_WARM_LIMIT),
        replica_id,
        router.preference_list,
        lambda home, model_id: home in router.holders(model_id),
        refused=refused,
    )
    await warm_replica(
        conn,
        plan,
        loader=loader,
        timeout_s=timeout_s,
        running=running,
        failed_loads=failed_loads,
    )


async def hand_over(
    conn: ReplicaConnection,
    replica_id: str,
    router: Router,
    targets: Mapping[str, ReplicaConnection],
    *,
    load_time_s: float,
    loader: str | None,
    reported: PopularitySketch | None = None,
    pinned: Collection[str] = (),
    draining: Collection[str] = (),
    refused: Callable[[str], bool] = lambda model_id: False,
    failed_loads: FailedLoads | None = None,
) -> None:
    """Replica ``replica_id`` leaving on scale-down, still serving: its recently requested
    models warm on their next homes among ``targets``, all at once, bounded
    by ``handover_bound_s`` (``reported``: see ``warm_counts``). A full next
    home may give up spare copies for them, coldest first (``spare_copies``;
    ``pinned``: the deployment's, never given up; ``draining``: other replicas
    leaving too, which keep no copy)."""
    score = warm_counts(router.popularity, reported).score

    def holds(home: str, model_id: str) -> bool:
        return home in router.holders(model_id)

    plan = handed_over(
        conn.state.models, replica_id, score, router.preference_list, holds, refused=refused
    )
    staying = [r for r in targets if r != replica_id and r not in draining]
    spares = spare_copies(
        plan,
        staying,
        lambda home: targets[home].state.models,
        score,
        router.preference_list,
        holds,
        pinned=pinned,
    )
    bound = handover_bound_s(load_time_s, plan)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(bound):
            await asyncio.gather(
                *(
                    warm_replica(
                        targets[home],
                        models,
                        loader=loader,
                        timeout_s=bound,
                        may_evict=spares.get(home, ()),
                        failed_loads=failed_loads,
                    )
                    for home, models in plan.items()
                    if home in targets
                )
            )
