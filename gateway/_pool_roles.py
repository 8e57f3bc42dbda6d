"""Who decides which replicas the pool runs: the launcher, a leader, or the pool.

* A launcher that only reports replicas (``ReplicaReporter``): the pool
  serves what it reports, re-read every ``PING_INTERVAL_S``, and its target
  is their number.
* A launcher that creates replicas and has a leader lease (``leadership``,
  gateways sharing the replicas): the pool reconciles and autoscales only
  while this gateway holds the lease, and adopts what the launcher reports
  always (a follower serves the leader's replicas; a new leader also finds
  those its predecessor started).
* Any other launcher: the pool reconciles on its own.

In every case the replicas the launcher reports ready when the pool starts
are adopted, not started.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from muxgate.gateway._autoscaler import Autoscaler
from muxgate.gateway._config import AutoscalingConfig
from muxgate.gateway._leadership import Leadership
from muxgate.gateway._metrics import GatewayMetrics
from muxgate.gateway._pool_health import PING_INTERVAL_S
from muxgate.gateway._pool_processes import ReplicaProcesses
from muxgate.gateway._replica_set import Replica, ReplicaSet

__all__ = ["Roles"]

_log = logging.getLogger("muxgate.gateway.pool")


class Roles:
    """Runs the pool's part by its launcher (see the module docstring).

    Args:
        name: the deployment.
        procs: the pool's launcher side.
        replicas: the pool's replica set (adopted replicas are added to it).
        spawn: ``(coroutine, what) -> task``, the pool's task spawner.
        serve: ``(replica) -> coroutine``: start or adopt, serve, replace one.
        reconcile: the pool's reconcile loop (runs while this pool may act).
        set_target: sets the pool's target.
        running: how many replicas run now.
        load: this gateway's ``(in_flight, queued)``, for the lease holder.
        autoscaling, autoscaler: the deployment's, if autoscaled.
        kick: set to make the reconciler look again.
        report: the pool's replica set changed (waiters, metrics).
        metrics: optional, for the leader gauge.
    """

    def __init__(
        self,
        name: str,
        procs: ReplicaProcesses,
        replicas: ReplicaSet,
        *,
        spawn: Callable[[Awaitable[Any], str], asyncio.Task[Any]],
        serve: Callable[[Replica], Awaitable[None]],
        reconcile: Callable[[], Awaitable[None]],
        set_target: Callable[[int], None],
        running: Callable[[], int],
        load: Callable[[], tuple[int, int]],
        autoscaling: AutoscalingConfig | None,
        autoscaler: Autoscaler | None,
        kick: asyncio.Event,
        report: Callable[[], None],
        metrics: GatewayMetrics | None,
    ) -> None:
        self.name = name
        self._procs = procs
        self._replicas = replicas
        self._spawn = spawn
        self._serve = serve
        self._reconcile = reconcile
        self._set_target = set_target
        self._running = running
        self._load = load
        self._autoscaling = autoscaling
        self._autoscaler = autoscaler
        self._kick = kick
        self._report = report
        self._metrics = metrics

    async def run(self) -> None:
        """Adopt what runs, then follow, reconcile or lead-or-follow."""
        await self.adopt_reported()
        leadership = self._procs.leadership
        if self._procs.creator is None:
            await self._follow()  # the launcher decides which replicas exist
        elif leadership is None:
            await self._reconcile()
        else:
            await self._lead_or_follow(leadership)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            await self.adopt_reported()

    async def _lead_or_follow(self, leadership: Leadership) -> None:
        """Reconcile and autoscale while this gateway holds the lease; adopt
        what the launcher reports always."""
        leadership.load = self._load
        self._spawn(leadership.run(), "lease")
        self._spawn(self._follow(), "follow")
        while True:
            self._on_role(False)
            await leadership.wait_role(True)
            scaling = self._autoscaling
            if scaling is not None:  # the autoscaler goes on from what runs
                self._set_target(
                    max(scaling.min_replicas, min(scaling.max_replicas, self._running()))
                )
            self._on_role(True)
            acting = [self._spawn(self._reconcile(), "reconcile-leader")]
            if self._autoscaler is not None:
                acting.append(self._spawn(self._autoscaler.run(), "autoscaler"))
            await leadership.wait_role(False)
            for task in acting:
                task.cancel()

    def _on_role(self, leading: bool) -> None:
        if self._metrics is not None:
            self._metrics.set_leader(self.name, leading)
        self._report()

    async def adopt_reported(self) -> None:
        """Serve the replicas the launcher reports ready that the pool does
        not know yet (by name: one restarted under its name is the same
        replica to the ring)."""
        try:
            reported = await self._procs.launcher.ready_replicas(self.name)
        except Exception:
            _log.exception("%s: the launcher could not report its replicas", self.name)
            return
        for replica in reported:
            if replica.name not in self._replicas:
                rep = self._replicas.add(replica.name, replica)
                rep.task = self._spawn(self._serve(rep), rep.id)
                self._kick.set()  # a leader may have one too many now
        if self._procs.creator is None:
            self._set_target(len(self._replicas))
        self._report()
