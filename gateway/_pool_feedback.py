"""What the replicas' replies and pongs change in routing.

* Every reply and pong carries a ``ReplicaState``: the router's view of that
  replica (models held and loading, calls in flight from every gateway) is
  refreshed from it, and a report that frees a slot wakes the queue.
* Every pong (about once a second): liveness, the replica's counters and
  model events (``ReplicaReports``), the spill price's two costs (one load,
  the interval between slots freeing) and the queue's affinity wait, and the
  memory limit (``MemoryLimit``): a replica over it goes to ``replace``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from muxgate.gateway._config import DeploymentConfig
from muxgate.gateway._connection import ReplicaConnection
from muxgate.gateway._dispatch import Dispatcher
from muxgate.gateway._memory_limit import MemoryLimit
from muxgate.gateway._pool_reports import ReplicaReports
from muxgate.gateway._replica_set import RUNNING, Replica, ReplicaSet
from muxgate.gateway._router import Router
from muxgate.replicas.contract import Pong, ReplicaState

__all__ = ["ReplicaFeedback"]


class ReplicaFeedback:
    """Applies one pool's replica reports to its router and dispatcher.

    Args:
        config: the deployment (``routing.queue_affinity_wait_s``).
        router, dispatcher, targets, replicas: the pool's.
        reports: where the pongs' counters and events go.
        memory: the deployment's memory limit.
        may_replace: whether the pool may replace a replica now (not
            closing; this gateway may act).
        replace: drains a replica over the memory limit (the pool replaces it).
    """

    def __init__(
        self,
        config: DeploymentConfig,
        router: Router,
        dispatcher: Dispatcher,
        targets: Mapping[str, ReplicaConnection],
        replicas: ReplicaSet,
        reports: ReplicaReports,
        memory: MemoryLimit,
        *,
        may_replace: Callable[[], bool],
        replace: Callable[[Replica], None],
    ) -> None:
        self._config = config
        self._router = router
        self._dispatcher = dispatcher
        self._targets = targets
        self._replicas = replicas
        self._reports = reports
        self._memory = memory
        self._may_replace = may_replace
        self._replace = replace

    def on_state(self, replica_id: str, state: ReplicaState) -> None:
        """A reply or pong of ``replica_id`` reported ``state``."""
        conn = self._targets.get(replica_id)
        router = self._router
        before = router.in_flight(replica_id)
        router.observe(
            replica_id,
            models=state.models,
            loading=state.loading,
            cache_limit=state.cache_limit,
            in_flight=state.in_flight,
            own=conn.unanswered_calls if conn is not None else None,
        )
        if router.in_flight(replica_id) < before and self._dispatcher.queued:
            # Other gateways' calls there finished: a slot may be free for
            # a waiter (this gateway's own replies wake it anyway).
            self._dispatcher.wake()

    def on_pong(self, rep: Replica, pong: Pong) -> None:
        """A replica answered a ping (the poller's or a scrape's): liveness,
        load time estimate, model events, counters for the metrics."""
        self._replicas.answered(rep)
        interval = self._reports.pong(rep, pong)
        # The price of a spill, from what the replicas report.
        self._router.load_s = self._reports.load_time.value
        self._router.service_s = self._dispatcher.service_time.report(interval)
        if self._config.routing.queue_affinity_wait_s is None:
            # Cache hits overtake the queue head for about one load time.
            self._dispatcher.affinity_wait_s = self._reports.load_time.affinity_wait_s()
        if (
            rep.state == RUNNING
            and rep.conn is not None
            and self._may_replace()
            and self._memory.should_replace(rep.id, pong.rss_bytes, rep.conn.state)
        ):
            self._replace(rep)
