"""What a deployment's replicas report in their pongs, kept by its pool.

Plain synchronous objects (no I/O, no clock): the pool feeds them each
``Pong`` (and a drain's ``Drained``) and reads them for ``/-/replicas`` and
the dispatcher.

* ``ModelEventLog``: the model load/unload events of every replica of the
  deployment, the newest ``EVENTS_KEPT``.
* ``LoadTimeEstimate``: a moving estimate of one model load, from the
  replicas' cumulative load counters; the dispatcher's cache-affine queue
  lets hits go first for about that long.
* ``ReplicaReports``: both of those for one deployment, fed each pong and
  drain, which also passes the counters on to the metrics and gives the
  replica rows of ``/-/replicas``; each pong also gives a sample of the
  replica's service interval (``muxgate.gateway._spill.service_interval_s``)
  for the spill price, and the calls per model id the replica received from
  every gateway (``requested``: the deployment's warm set where several
  gateways share its replicas, see ``request_growth``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from muxgate.gateway._metrics import GatewayMetrics
from muxgate.gateway._popularity import PopularitySketch
from muxgate.gateway._replica_set import RUNNING, Replica
from muxgate.gateway._spill import service_interval_s
from muxgate.replicas.contract import Drained, ModelEvent, Pong, ReplicaState

__all__ = [
    "AFFINITY_WAIT_BOUNDS_S",
    "EVENTS_KEPT",
    "INITIAL_LOAD_TIME_S",
    "LOAD_TIME_ALPHA",
    "LoadTimeEstimate",
    "ModelEventLog",
    "ReplicaReports",
    "request_growth",
]

#: model load/unload events a deployment keeps for ``/-/replicas``
EVENTS_KEPT = 200
#: first guess of a model load (s), until replicas report real loads
INITIAL_LOAD_TIME_S = 0.5
#: weight of a new observation in the moving load-time estimate
LOAD_TIME_ALPHA = 0.3
#: bounds of the queue's affinity wait taken from the estimate: the head of
#: the queue never waits longer than this behind cache hits
AFFINITY_WAIT_BOUNDS_S = (0.01, 10.0)


class ModelEventLog:
    """The replicas' model events, each tagged with its replica's id.

    Each replica numbers its events; the caller keeps the last number taken
    from each replica and passes it to ``add``. A poll and a scrape may ask
    with the same number and both bring the same events: the numbers tell
    them apart.
    """

    def __init__(self, maxlen: int = EVENTS_KEPT) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=maxlen)

    def add(self, replica_id: str, taken: int, events: Iterable[ModelEvent]) -> int:
        """Keep the events numbered above ``taken``; return the new last number."""
        for event in events:
            if event.seq <= taken:
                continue
            taken = event.seq
            self._events.append(
                {
                    "time": event.time,
                    "replica": replica_id,
                    "kind": event.kind,
                    "model": event.model,
                    "duration_ms": event.duration_ms,
                    "reason": event.reason,
                }
            )
        return taken

    def snapshot(self) -> list[dict[str, Any]]:
        """The events, oldest first: by time, not arrival (replicas report a
        second apart)."""
        return [dict(e) for e in sorted(self._events, key=lambda e: e["time"])]

    def __len__(self) -> int:
        return len(self._events)

    def __repr__(self) -> str:
        return f"<ModelEventLog kept={len(self._events)}/{self._events.maxlen}>"


class LoadTimeEstimate:
    """Exponential moving average of one model load (s).

    Each observation is the mean of the loads one replica finished since its
    previous report: ``(model_loads, model_load_seconds_sum)`` differences of
    its cumulative counters.
    """

    def __init__(self, initial_s: float = INITIAL_LOAD_TIME_S, alpha: float = LOAD_TIME_ALPHA):
        self.value = initial_s
        self._alpha = alpha

    def observe(
        self, seen: tuple[float, float], counters: Mapping[str, float]
    ) -> tuple[float, float]:
        """Fold in the loads counted since ``seen``; return the new ``seen``."""
        loads = counters.get("model_loads", 0.0)
        seconds = counters.get("model_load_seconds_sum", 0.0)
        seen_loads, seen_seconds = seen
        if loads > seen_loads and seconds >= seen_seconds:
            mean = (seconds - seen_seconds) / (loads - seen_loads)
            self.value += self._alpha * (mean - self.value)
        return (loads, seconds)

    def affinity_wait_s(self) -> float:
        """The estimate within ``AFFINITY_WAIT_BOUNDS_S``."""
        low, high = AFFINITY_WAIT_BOUNDS_S
        return min(high, max(low, self.value))

    def __repr__(self) -> str:
        return f"<LoadTimeEstimate {self.value:.4f} s>"


def request_growth(seen: dict[str, int], reported: Mapping[str, int]) -> dict[str, int]:
    """The calls per model id a replica received since ``seen`` (its counts
    at the previous pong), from its cumulative ``reported`` counts; updates
    ``seen``. A count below the one seen (the replica forgot the id and
    counts again from 0) is all new. Ids the replica no longer reports keep
    their last count in ``seen``.
    """
    grown: dict[str, int] = {}
    for model_id, count in reported.items():
        before = seen.get(model_id, 0)
        new = count - before if count >= before else count
        if new > 0:
            grown[model_id] = new
        seen[model_id] = count
    return grown


class ReplicaReports:
    """What the replicas of deployment ``name`` report: model events, the
    load time estimate, their counters (passed on to ``metrics``), and the
    decayed calls per model id over every gateway's traffic (``requested``,
    which survives a scale to zero as the router's own counts do)."""

    def __init__(
        self, name: str, metrics: GatewayMetrics | None = None, *, half_life: float = 1000.0
    ) -> None:
        self.name = name
        self._metrics = metrics
        self.load_time = LoadTimeEstimate()
        self.events = ModelEventLog()
        self.requested = PopularitySketch(half_life=half_life)

    def __repr__(self) -> str:
        return f"<ReplicaReports {self.name} load_time={self.load_time.value:.3f}s {self.events!r}>"

    def pong(self, rep: Replica, pong: Pong) -> float | None:
        """Take a replica's pong: its load counters, events, memory, counters.

        Returns the replica's service interval since its previous pong (None:
        it finished no call without a load, or reports no call counters).
        """
        interval = self.service_interval(rep, pong.counters)
        rep.loads_seen = self.load_time.observe(rep.loads_seen, pong.counters)
        rep.events_seq = self.events.add(rep.id, rep.events_seq, pong.events)
        rep.rss_bytes = pong.rss_bytes
        rep.model_bytes, rep.pinned = pong.model_bytes, pong.pinned
        # In count order (coldest first), so a batch leaves the hotter ids newer.
        grown = request_growth(rep.requests_seen, pong.model_requests)
        for model_id, n in sorted(grown.items(), key=lambda kv: (kv[1], kv[0])):
            self.requested.record(model_id, n)
        metrics = self._metrics
        if metrics is not None and rep.state == RUNNING:
            metrics.set_replica_counters(self.name, rep.id, pong.counters)
            metrics.set_replica_model_bytes(self.name, rep.id, pong.model_bytes)
            if pong.rss_bytes is not None:
                metrics.set_replica_rss(self.name, rep.id, pong.rss_bytes)
        return interval

    @staticmethod
    def service_interval(rep: Replica, counters: Mapping[str, float]) -> float | None:
        """The service interval from the call and load counters' growth since
        ``rep``'s last pong; moves ``rep.calls_seen`` on (a replica whose
        counters went back, restarted under the same id, starts afresh)."""
        calls = counters.get("calls_finished", 0.0)
        busy = counters.get("busy_seconds", 0.0)
        seen_calls, seen_busy = rep.calls_seen
        seen_loads, seen_load_s = rep.loads_seen
        loads = counters.get("model_loads", 0.0)
        load_s = counters.get("model_load_seconds_sum", 0.0)
        rep.calls_seen = (calls, busy)
        if calls < seen_calls or busy < seen_busy or loads < seen_loads:
            return None
        return service_interval_s(
            busy - seen_busy, calls - seen_calls, load_s - seen_load_s, loads - seen_loads
        )

    def drained(self, rep: Replica, drained: Drained, counters: Mapping[str, float]) -> None:
        """Take a replica's ``Drained``: the drain's unloads (after its last
        pong) and its final ``counters``."""
        rep.events_seq = self.events.add(rep.id, rep.events_seq, drained.events)
        if self._metrics is not None:
            self._metrics.final_replica_counters(self.name, rep.id, counters)

    def forget(self, replica_id: str) -> None:
        """The replica left routing: its per-replica series go."""
        if self._metrics is not None:
            self._metrics.forget_replica(self.name, replica_id)

    @staticmethod
    def rows(replicas: Iterable[Replica]) -> list[dict[str, Any]]:
        """The replicas' rows of ``/-/replicas``, by id."""
        rows = []
        for rep in sorted(replicas, key=lambda r: r.id):
            conn, proc = rep.conn, rep.process
            state = conn.state if conn is not None else ReplicaState()
            rows.append(
                {
                    "id": rep.id,
                    "state": rep.state,
                    "pid": proc.pid if proc is not None else None,
                    "address": proc.address if proc is not None else None,
                    "in_flight": conn.in_flight if conn is not None else 0,
                    "in_flight_total": state.in_flight,
                    "models": list(state.models),
                    "loading": list(state.loading),
                    "rss_bytes": rep.rss_bytes,
                    "model_bytes": rep.model_bytes,
                    "pinned": list(rep.pinned),
                }
            )
        return rows
