"""A pool's request side, built from its deployment config: the router (ring,
per-replica limit, spill rule), the quarantine (reporting to the metrics)
and the dispatcher (queue limit, affinity wait, admission by the quarantine).

The config's unset limits take the defaults until the class's
``@deployment`` options arrive with the first replica's handshake.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

from muxgate.gateway._config import DeploymentConfig
from muxgate.gateway._connection import ReplicaConnection
from muxgate.gateway._dispatch import Dispatcher
from muxgate.gateway._load_failures import FailedLoads
from muxgate.gateway._metrics import GatewayMetrics
from muxgate.gateway._pool_reports import INITIAL_LOAD_TIME_S
from muxgate.gateway._quarantine import Quarantine
from muxgate.gateway._router import Router
from muxgate.replicas.contract import DEFAULT_MAX_ONGOING_REQUESTS, DEFAULT_MAX_QUEUED_REQUESTS

__all__ = ["routing_side"]


def routing_side(
    config: DeploymentConfig,
    targets: Mapping[str, ReplicaConnection],
    *,
    starting: Callable[[], bool],
    activate: Callable[[], None],
    unavailable_reason: Callable[[], str | None],
    metrics: GatewayMetrics | None,
    per_model_labels: bool,
    clock: Callable[[], float],
    failed_loads: FailedLoads | None = None,
) -> tuple[Router, Quarantine, Dispatcher]:
    """The router, quarantine and dispatcher of the deployment ``config``
    sending over ``targets`` (replica id -> connection); the callables and
    ``failed_loads`` are the pool's (see ``Dispatcher``)."""
    router = Router(
        balance_factor=config.routing.balance_factor,
        virtual_nodes=config.routing.virtual_nodes,
        max_ongoing_requests=(config.max_ongoing_requests or DEFAULT_MAX_ONGOING_REQUESTS),
        min_capacity=config.routing.min_capacity,
        spill_rule=config.routing.spill,
    )
    quarantine = Quarantine(
        config.quarantine,
        name=config.name,
        clock=clock,
        on_refusal=(
            functools.partial(metrics.count_quarantine_refusal, config.name)
            if metrics is not None
            else None
        ),
    )
    if metrics is not None:
        metrics.watch_quarantine(config.name, quarantine.active)
    dispatcher = Dispatcher(
        config.name,
        router,
        targets,
        max_queued_requests=(
            config.max_queued_requests
            if config.max_queued_requests is not None
            else DEFAULT_MAX_QUEUED_REQUESTS
        ),
        starting=starting,
        activate=activate,
        unavailable_reason=unavailable_reason,
        metrics=metrics,
        per_model_labels=per_model_labels,
        affinity_wait_s=(
            config.routing.queue_affinity_wait_s
            if config.routing.queue_affinity_wait_s is not None
            else INITIAL_LOAD_TIME_S
        ),
        admit=quarantine.check,
        clock=clock,
        failed_loads=failed_loads,
    )
    return router, quarantine, dispatcher
