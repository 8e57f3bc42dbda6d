"""The replicas of one deployment as the pool sees them: states, start
backoff, liveness. Synchronous: no I/O, no tasks, time from an injected clock.

``ReplicaPool`` wraps a ``ReplicaSet``: the set decides (which replica is in
which state, whether a start may be tried now, whether a replica has been
silent too long, which replicas a scale-down takes), the pool does the
starting, connecting and polling. Tests drive the set on a fake clock.

States::

    STARTING --ready--> RUNNING --death--> (removed, replaced)
                           |
                           +--scale down--> DRAINING --Drained--> STOPPING --exit--> (removed)

* Repeated start failures back off exponentially (``BACKOFF_INITIAL_S``
  doubling, capped at ``BACKOFF_MAX_S``); a replica that reaches RUNNING
  resets the count. The last failure reason is kept for ``/-/replicas``.
* A RUNNING replica whose last answered ping is older than
  ``PING_TIMEOUT_S`` is silent: the pool kills it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

    from muxgate.gateway._connection import ReplicaConnection
    from muxgate.gateway.launchers import LaunchedReplica

__all__ = [
    "BACKOFF_INITIAL_S",
    "BACKOFF_MAX_S",
    "DRAINING",
    "PING_TIMEOUT_S",
    "RUNNING",
    "STARTING",
    "STOPPING",
    "Replica",
    "ReplicaSet",
]

STARTING = "starting"
RUNNING = "running"
DRAINING = "draining"
STOPPING = "stopping"

#: a replica that has not answered a ping for this long is treated as dead
PING_TIMEOUT_S = 10.0
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0


@dataclass(eq=False)
class Replica:
    id: str
    state: str = STARTING
    #: what the launcher reported (None until a start returned)
    process: LaunchedReplica | None = None
    conn: ReplicaConnection | None = None
    #: clock time of the last answered ping (or of joining)
    last_pong: float = 0.0
    task: asyncio.Task[None] | None = None
    #: last cumulative (model_loads, model_load_seconds_sum) from a pong
    loads_seen: tuple[float, float] = (0.0, 0.0)
    #: last cumulative (calls_finished, busy_seconds) from a pong
    calls_seen: tuple[float, float] = (0.0, 0.0)
    #: sequence number of the last model event taken from this replica
    events_seq: int = 0
    #: the cumulative calls per model id it last reported (``Pong.model_requests``)
    requests_seen: dict[str, int] = field(default_factory=dict)
    #: resident memory the replica last reported (None: unknown)
    rss_bytes: int | None = None
    #: bytes of its loaded models and its pinned ids, as it last reported
    model_bytes: int = 0
    pinned: list[str] = field(default_factory=list)
    #: started while no replica ran and requests waited: it serves them before
    #: its ``preload``/``pinned`` ids, then warms the deployment's hottest models
    wakes: bool = False


class ReplicaSet:
    """The replicas of deployment ``name`` by id, their states, the start
    backoff and liveness, with time from ``clock`` (monotonic seconds)."""

    def __init__(self, name: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self._replicas: dict[str, Replica] = {}
        #: consecutive start failures (0 once a replica reached RUNNING)
        self.failures = 0
        #: no start is tried before this clock time
        self.backoff_until = 0.0
        self.last_failure: str | None = None

    def __repr__(self) -> str:
        counts = " ".join(f"{state}={n}" for state, n in self.counts().items())
        backoff = self.backoff_left()
        tail = f" backoff={backoff:.1f}s" if backoff > 0 else ""
        return f"<ReplicaSet {self.name} {counts} failures={self.failures}{tail}>"

    # -- membership -----------------------------------------------------------

    def __len__(self) -> int:
        return len(self._replicas)

    def __iter__(self) -> Iterator[Replica]:
        return iter(list(self._replicas.values()))

    def __contains__(self, replica_id: object) -> bool:
        return replica_id in self._replicas

    def add(self, replica_id: str | None = None, process: LaunchedReplica | None = None) -> Replica:
        """A new STARTING replica (a fresh id unless given)."""
        rep = Replica(id=replica_id or f"{self.name}#{secrets.token_hex(3)}", process=process)
        self._replicas[rep.id] = rep
        return rep

    def remove(self, rep: Replica) -> None:
        self._replicas.pop(rep.id, None)

    def clear(self) -> None:
        self._replicas.clear()

    def in_state(self, *states: str) -> list[Replica]:
        return [r for r in self._replicas.values() if r.state in states]

    def counts(self) -> dict[str, int]:
        """Replicas by state."""
        out = {STARTING: 0, RUNNING: 0, DRAINING: 0, STOPPING: 0}
        for rep in self._replicas.values():
            out[rep.state] += 1
        return out

    # -- transitions ----------------------------------------------------------

    def running(self, rep: Replica) -> None:
        """A start succeeded: RUNNING, alive as of now, the failure count reset."""
        rep.state = RUNNING
        rep.last_pong = self._clock()
        self.failures = 0

    def start_failed(self, rep: Replica, reason: str) -> float:
        """A start failed: the replica is forgotten and starts back off.
        Returns the delay before the next try."""
        self.remove(rep)
        self.last_failure = reason
        self.failures += 1
        delay = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2.0 ** (self.failures - 1))
        self.backoff_until = self._clock() + delay
        return delay

    def scale_down(self, n: int, removal_order: Iterable[str]) -> list[tuple[Replica, bool]]:
        """Mark ``n`` replicas DRAINING and return them with whether each was
        running: starts first, then the running replicas in ``removal_order``
        (cheapest to lose first)."""
        order = {rid: i for i, rid in enumerate(removal_order)}
        running = sorted(self.in_state(RUNNING), key=lambda r: order.get(r.id, 0))
        chosen = [(rep, rep.state == RUNNING) for rep in (self.in_state(STARTING) + running)[:n]]
        for rep, _ in chosen:
            rep.state = DRAINING
        return chosen

    # -- backoff ----------------------------------------------------------------

    def backoff_left(self) -> float:
        """Seconds until a start may be tried (0: now)."""
        left: float = self.backoff_until - self._clock()
        return max(0.0, left)

    def missing(self, target: int) -> int:
        """How many replicas to start now for ``target`` (0 while backing off),
        or minus how many to drain."""
        missing = target - len(self.in_state(STARTING, RUNNING))
        if missing > 0 and self.backoff_left() > 0:
            return 0
        return missing

    def is_starting(self, target: int, running: int) -> bool:
        """Whether a replica is starting or about to be: ``running`` (those
        serving) is below ``target`` and starts are not backing off."""
        if self.in_state(STARTING):
            return True
        return running < target and self.backoff_left() == 0

    def unavailable_reason(self) -> str | None:
        if self.last_failure is None or self.failures == 0:
            return None
        return f"last start failure: {self.last_failure}"

    # -- liveness ---------------------------------------------------------------

    def answered(self, rep: Replica) -> None:
        """The replica answered a ping now."""
        rep.last_pong = self._clock()

    def silent(self, rep: Replica) -> bool:
        """A RUNNING replica that has answered no ping for ``PING_TIMEOUT_S``."""
        return rep.state == RUNNING and self._clock() - rep.last_pong > PING_TIMEOUT_S
