"""Which of the pool's warming moments applies when a replica joins or leaves
(the warming itself is :mod:`muxgate.gateway._warmer`).

* The first replica after zero, started for waiting requests: the config's
  deferred pinned and preload ids, then the warm set (``warm_after_zero``).
* Any other replica joining beside others: the models whose home it is now
  (``warm_moved_home``).
* A running replica leaving on scale-down beside others: its models warm on
  their next homes while it keeps serving (``hand_over``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from muxgate.gateway._config import DeploymentConfig
from muxgate.gateway._connection import ReplicaConnection
from muxgate.gateway._load_failures import FailedLoads
from muxgate.gateway._pool_reports import ReplicaReports
from muxgate.gateway._replica_set import RUNNING, Replica
from muxgate.gateway._router import Router
from muxgate.gateway._warmer import hand_over, warm_after_zero, warm_moved_home

__all__ = ["PoolWarming"]


class PoolWarming:
    """The warming of one pool's replicas as they join and leave.

    Args:
        config: the deployment (pinned, preload, loader).
        router: the pool's router (popularity, homes, in-flight calls).
        targets: the pool's running replicas (id -> connection).
        reports: what the replicas report (request counts, load time).
        refused: whether a model id must not be warmed (suspected of
            killing replicas: blamed for a recent death, or quarantined).
        failed_loads: the model ids whose last load failed (the
            dispatcher's, which a failed warm adds to): warming leaves them
            out too, except the config's deferred ``pinned`` and
            ``preload`` ids, which a waking replica loads as one that
            starts does.
        spawn: ``(coroutine, what) -> task``, the pool's task spawner.
        timeout_s: the bound of one warming load.
        draining: the ids of the replicas leaving now (none of them keeps a
            copy for a hand-over's ``spare_copies``).
    """

    def __init__(
        self,
        config: DeploymentConfig,
        router: Router,
        targets: Mapping[str, ReplicaConnection],
        reports: ReplicaReports,
        *,
        refused: Callable[[str], bool],
        failed_loads: FailedLoads | None = None,
        spawn: Callable[[Awaitable[Any], str], asyncio.Task[Any]],
        timeout_s: float,
        draining: Callable[[], Collection[str]] = frozenset,
    ) -> None:
        self._config = config
        self._router = router
        self._targets = targets
        self._reports = reports
        self._quarantined = refused
        self._failed_loads = failed_loads
        self._spawn = spawn
        self._timeout_s = timeout_s
        self._draining = draining

    def _refused(self, model_id: str) -> bool:
        failed = self._failed_loads
        return (failed is not None and model_id in failed) or self._quarantined(model_id)

    def joined(self, rep: Replica, conn: ReplicaConnection) -> None:
        """``rep`` runs now (and serves already): start its warming, if any."""
        config, router = self._config, self._router

        def running() -> bool:
            return rep.state == RUNNING

        if rep.wakes and len(self._targets) == 1:
            # The config's deferred pinned and preload ids, then the warm set.
            deferred = {*config.pinned, *config.preload}

            def refused(model_id: str) -> bool:
                if model_id in deferred:
                    return self._quarantined(model_id)
                return self._refused(model_id)

            warming = warm_after_zero(
                conn,
                router,
                pinned=config.pinned,
                preload=config.preload,
                refused=refused,
                loader=config.multiplexed_loader,
                timeout_s=self._timeout_s,
                running=running,
                waking=router.in_flight(rep.id),
                reported=self._reports.requested,
                failed_loads=self._failed_loads,
            )
            self._spawn(warming, f"warm-{rep.id}")
        elif len(self._targets) > 1:
            warming = warm_moved_home(
                conn,
                rep.id,
                router,
                loader=config.multiplexed_loader,
                timeout_s=self._timeout_s,
                running=running,
                reported=self._reports.requested,
                refused=self._refused,
                failed_loads=self._failed_loads,
            )
            self._spawn(warming, f"warm-{rep.id}")

    async def hand_over(self, rep: Replica) -> None:
        """``rep`` leaves on scale-down: warm its recently requested models on
        their next homes while it keeps serving."""
        if rep.conn is not None:
            await hand_over(
                rep.conn,
                rep.id,
                self._router,
                self._targets,
                load_time_s=self._reports.load_time.value,
                loader=self._config.multiplexed_loader,
                reported=self._reports.requested,
                pinned=self._config.pinned,
                draining=self._draining(),
                refused=self._refused,
                failed_loads=self._failed_loads,
            )
