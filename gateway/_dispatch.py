"""Per-deployment dispatch: model id check, routing, queueing, the call.

``Dispatcher.dispatch`` is the hot path of every ingress request::

    choose (Router, pure) -> acquire -> Target.call -> observe -> release -> wake

When the router has no replica under capacity the request waits in the
deployment's queue. Free slots are handed out synchronously inside
``wake()`` (decided and acquired without awaiting), so a woken waiter never
finds its slot taken, and new arrivals go straight to a replica only while
nobody waits.

The queue is cache-affine, FIFO per model id (``AffinityQueue``,
``muxgate.gateway._affinity_queue``, which says why).

Each routing decision runs in a ``muxgate.route`` span (when tracing is on)
and the traceparent sent to the replica is that span's, so the replica's
span is its child.

A request whose model's holders are all full waits for one of them unless
the router's priced spill rule says a load elsewhere pays
(``muxgate.gateway._spill``); the dispatcher tells the router how many
requests wait for the model and how long this one has waited, and learns
the service time from the cache hits it sends.

The dispatcher never sees processes or sockets: replicas are ``Target``
objects looked up by id in a mapping the pool keeps current. Tests inject
fakes there.

Time comes from an injected ``clock`` (monotonic seconds, the pool's): the
deadlines, how long a waiter has waited, when the head's affinity wait ends
and when a waiter gives up are all computed from it, so tests drive them on a
fake clock. The event loop's timers only make sure someone looks again when
the clock says something is due: a timer that fires early (or a clock that
stands still) changes nothing but when the next look is.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from opentelemetry import trace

from muxgate.gateway._affinity_queue import AffinityQueue
from muxgate.gateway._connection import ReplicaDiedError, ReplicaUnavailableError
from muxgate.gateway._errors import (
    DEADLINE_SOURCE,
    BadModelIdError,
    DeadlineExceededError,
    GatewayError,
    OverCapacityError,
    ReplicaFailedError,
    error_from_info,
)
from muxgate.gateway._load_failures import FailedLoads
from muxgate.gateway._router import RouteDecision, Router
from muxgate.gateway._spill import ServiceTimeEstimate
from muxgate.replicas.contract import (
    ErrorCode,
    ErrorInfo,
    HttpRequest,
    Reply,
    extract_context,
    inject_traceparent,
    tracing_active,
)

__all__ = [
    "DispatchMetrics",
    "Dispatcher",
    "Target",
    "validate_model_id",
]

MAX_MODEL_ID = 256
# Printable ASCII without space: 0x21..0x7e.
_MODEL_ID = re.compile(rb"[!-~]{1,256}")
#: how many times a request that never reached a replica is routed again
MAX_REROUTES = 3

_tracer = trace.get_tracer("muxgate")


def validate_model_id(raw: bytes) -> str:
    """Return the model id from a raw header value, or raise ``BadModelIdError``.

    A model id is 1 to 256 printable ASCII characters without whitespace or
    control characters; storage keys and log lines rely on it.
    """
    if _MODEL_ID.fullmatch(raw) is None:
        raise BadModelIdError(
            "model id must be 1 to 256 printable ASCII characters without whitespace"
        )
    return raw.decode("ascii")


class Target(Protocol):
    """One replica as the dispatcher sees it (the pool adapts connections)."""

    async def call(
        self,
        *,
        request_id: str,
        model_id: str,
        timeout_s: float | None,
        traceparent: str | None,
        tracestate: str | None,
        http: HttpRequest | None,
        method: str = "__call__",
        args: bytes = b"",
        kwargs: bytes = b"",
    ) -> Reply:
        """Send one call (HTTP when ``http`` is set, else a method call).

        Raises:
            ReplicaUnavailableError: not sent; the dispatcher reroutes.
            ReplicaDiedError: sent, and the replica went away (502).
        """
        ...


class DispatchMetrics(Protocol):
    """The part of ``GatewayMetrics`` the dispatcher feeds."""

    def set_queue_length(self, deployment: str, n: int) -> None: ...

    def count_spillover(self, deployment: str, model_id: str = "") -> None: ...


class Dispatcher:
    """Routes, queues and sends the requests of one deployment.

    Args:
        name: the deployment's name (metrics label, error messages).
        router: the deployment's ``Router``; the pool adds and removes replicas.
        targets: replica id -> ``Target``, kept current by the pool.
        max_queued_requests: queue bound; ``-1`` for unbounded.
        starting: returns whether a replica is starting (so a request with no
            replica to go to waits instead of failing at once); a query only.
        activate: called when requests wait and no replica runs, before
            ``starting`` is asked (the pool raises a target of zero to one).
        unavailable_reason: why no replica runs (e.g. the last start
            failure), added to the 503's message; None when unknown.
        metrics: where queue length and spillovers are reported.
        per_model_labels: pass model ids to the spillover metric.
        affinity_wait_s: how long the queue head lets cache hits go first
            (the pool updates it with its model load time estimate).
        admit: called with each request's model id before it is routed and
            again once it has a slot (it may have waited in the queue);
            raises a ``GatewayError`` to refuse it (the pool's quarantine).
        clock: monotonic seconds (the pool's); deadlines are in its units.
        failed_loads: where the calls that failed to load their model and
            those that succeeded are recorded (the pool's warming leaves
            the failed ones out); None: nowhere.
    """

    def __init__(
        self,
        name: str,
        router: Router,
        targets: Mapping[str, Target],
        *,
        max_queued_requests: int = 1000,
        starting: Callable[[], bool] = lambda: False,
        activate: Callable[[], None] = lambda: None,
        metrics: DispatchMetrics | None = None,
        per_model_labels: bool = False,
        retry_after_s: int = 1,
        unavailable_reason: Callable[[], str | None] = lambda: None,
        affinity_wait_s: float = 0.5,
        admit: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        failed_loads: FailedLoads | None = None,
    ) -> None:
        self.name = name
        self._failed_loads = failed_loads
        self.router = router
        self._targets = targets
        self._metrics = metrics
        self._per_model = per_model_labels
        self._retry_after = retry_after_s
        #: interval between slots freeing on a busy replica, from the hits sent
        self.service_time = ServiceTimeEstimate(router.service_s)
        self.in_flight = 0
        self._admit = admit
        #: monotonic seconds; the front end computes deadlines from it
        self.clock = clock
        #: the requests waiting for a slot
        self._waiters = AffinityQueue(
            name,
            router,
            acquire=self._acquire,
            max_queued_requests=max_queued_requests,
            starting=starting,
            activate=activate,
            unavailable_reason=unavailable_reason,
            metrics=metrics,
            retry_after_s=retry_after_s,
            affinity_wait_s=affinity_wait_s,
            clock=clock,
        )

    def __repr__(self) -> str:
        return (
            f"<Dispatcher {self.name} in_flight={self.in_flight} queued={self._waiters.waiting}"
            f" replicas={len(self.router)} affinity_wait_s={self.affinity_wait_s:.3f}>"
        )

    @property
    def queued(self) -> int:
        """Requests waiting for a replica slot."""
        return self._waiters.waiting

    @property
    def max_queued_requests(self) -> int:
        """Queue bound; the pool may change it once it knows the class's options."""
        return self._waiters.max_queued_requests

    @max_queued_requests.setter
    def max_queued_requests(self, n: int) -> None:
        self._waiters.max_queued_requests = n

    @property
    def affinity_wait_s(self) -> float:
        """How long the queue head lets cache hits go first (the pool sets it)."""
        return self._waiters.affinity_wait_s

    @affinity_wait_s.setter
    def affinity_wait_s(self, s: float) -> None:
        self._waiters.affinity_wait_s = s

    def wake(self) -> None:
        """Hand free slots to queued requests (``AffinityQueue.wake``)."""
        self._waiters.wake()

    async def dispatch(
        self,
        *,
        request_id: str,
        model_id: str,
        http: HttpRequest | None,
        deadline: float,
        traceparent: str | None = None,
        tracestate: str | None = None,
        method: str = "__call__",
        args: bytes = b"",
        kwargs: bytes = b"",
    ) -> tuple[Reply, str]:
        """Send one request to a replica; return ``(reply, replica_id)``.

        ``http=None`` makes it a handle call of ``method`` (``args`` a list
        and ``kwargs`` a map, MessagePack). ``deadline``: ``clock`` seconds.

        Raises:
            GatewayError: 503 queue full / no replica, 502 replica died,
                504 deadline, or the error the replica replied with.
        """
        if self._admit is not None:
            self._admit(model_id)
        reroutes = 0
        while True:
            # Hot path (nobody queued, tracing off): no span, no extra coroutine.
            decision = (
                None if self._waiters.waiting or tracing_active() else self._take_slot(model_id)
            )
            sent_parent, sent_state = traceparent, tracestate
            if decision is None:
                # A rerouted request had its turn: it keeps its place in line.
                decision, sent_parent, sent_state = await self._route_slowly(
                    model_id, deadline, traceparent, tracestate, first=reroutes > 0
                )
            replica_id = decision.replica_id
            self._readmit(replica_id, model_id)
            self.in_flight += 1
            try:
                target, sent_at, sharing = self._ready_to_send(replica_id, deadline)
                # A loop timer must stop the call; the time left is the clock's.
                async with asyncio.timeout(deadline - sent_at):
                    reply = await target.call(
                        request_id=request_id,
                        model_id=model_id,
                        timeout_s=deadline - sent_at,
                        traceparent=sent_parent,
                        tracestate=sent_state,
                        http=http,
                        method=method,
                        args=args,
                        kwargs=kwargs,
                    )
            except ReplicaUnavailableError:
                reroutes = self._unreachable(replica_id, reroutes)
                continue
            except (TimeoutError, ReplicaDiedError) as exc:  # only the call raises these
                raise self._call_failed(exc, replica_id) from None
            except GatewayError as exc:
                exc.replica_id = replica_id
                raise
            finally:
                self._call_ended(replica_id, model_id)
            if reply.error is None:
                self._answered(decision, model_id, sent_at, sharing)
                return reply, replica_id
            if self._failed_loads is not None:
                self._failed_loads.replied(model_id, reply.error, reply.state)
            reroutes = self._refused(reply.error, replica_id, reroutes)

    # -- the steps of ``dispatch`` (synchronous: no await between them) ----------

    def _ready_to_send(self, replica_id: str, deadline: float) -> tuple[Target, float, int]:
        """The chosen replica's ``Target``, the send time and the calls the
        replica already runs; raises if the request may not go there now."""
        target = self._targets.get(replica_id)
        if target is None:
            raise ReplicaUnavailableError(replica_id)
        sent_at = self.clock()
        if deadline <= sent_at:
            raise DeadlineExceededError("the request's deadline passed" + DEADLINE_SOURCE)
        return target, sent_at, self.router.in_flight(replica_id)

    def _readmit(self, replica_id: str, model_id: str) -> None:
        """Admit the request again once it has its slot: it may have been
        refused (quarantined) while it waited. A refusal gives the slot back."""
        if self._admit is None:
            return
        try:
            self._admit(model_id)
        except GatewayError:
            self.router.release(replica_id, model_id)
            if self._waiters.waiting:
                self._waiters.wake()
            raise

    def _call_ended(self, replica_id: str, model_id: str) -> None:
        """Give the slot back (the call ended, however) and pass it on."""
        self.in_flight -= 1
        self.router.release(replica_id, model_id)
        if self._waiters.waiting:
            self._waiters.wake()

    def _answered(
        self, decision: RouteDecision, model_id: str, sent_at: float, sharing: int
    ) -> None:
        # The router's model view is refreshed by the connection's on_state
        # callback (wired by the pool), for replies and pongs; a cache hit
        # also tells how long a slot stays busy.
        if decision.hit:
            took = self.clock() - sent_at
            self.router.service_s = self.service_time.observe(took, sharing)
        failed = self._failed_loads
        if failed:  # nothing to clear, the usual case: no lookup
            failed.loaded(model_id)

    def _unreachable(self, replica_id: str, reroutes: int) -> int:
        """A replica that cannot take the call (closed or draining): out of
        routing now (the pool's watcher may not have run yet), so the next
        choice is another one. Returns the reroute count, or raises 503."""
        self.router.remove_replica(replica_id)
        if reroutes >= MAX_REROUTES:
            raise OverCapacityError(
                f"no replica of {self.name} could be reached", retry_after=self._retry_after
            ) from None
        return reroutes + 1

    @staticmethod
    def _call_failed(exc: TimeoutError | ReplicaDiedError, replica_id: str) -> GatewayError:
        """504 for a call past the request's deadline, 502 for a replica
        that went away with the call."""
        err: GatewayError
        if isinstance(exc, TimeoutError):
            err = DeadlineExceededError("the request's deadline passed" + DEADLINE_SOURCE)
        else:
            err = ReplicaFailedError("the replica serving the request died")
        err.replica_id = replica_id
        return err

    def _refused(self, error: ErrorInfo, replica_id: str, reroutes: int) -> int:
        """The reply's error as a ``GatewayError``, raised; except that a
        replica's own overload guard (other gateways fill it) refused a call
        that never ran: route it again (returns the reroute count).

        A refusal is neither a failure of the replica nor of the model. It
        carried the replica's count of its calls, which the router took in
        before this runs (``muxgate.gateway._shared_load``), so the router
        sees that replica full until a newer report says otherwise, and the
        request goes to a replica with room or waits in the queue for one,
        within its deadline: such a refusal does not count against
        ``MAX_REROUTES``, and the request is not answered 503 while a
        replica has room. Only a refusal the router cannot explain (the
        replica still looks to have room) counts, so a replica that keeps
        refusing without saying why cannot keep a request bouncing."""
        if error.code == ErrorCode.OVERLOADED:
            router = self.router
            if router.in_flight(replica_id) >= router.max_ongoing_requests:
                return reroutes
            if reroutes < MAX_REROUTES:
                return reroutes + 1
            raise OverCapacityError(
                f"the replicas of {self.name} are overloaded", retry_after=self._retry_after
            )
        err = error_from_info(error)
        err.replica_id = replica_id
        raise err

    async def _route(
        self, model_id: str, deadline: float, *, first: bool = False
    ) -> tuple[RouteDecision, bool]:
        """A replica slot for the request (acquired); and whether it queued."""
        if not self._waiters.waiting:
            decision = self._take_slot(model_id)
            if decision is not None:
                return decision, False
        return await self._waiters.wait_for_slot(model_id, deadline, first=first), True

    async def _route_slowly(
        self,
        model_id: str,
        deadline: float,
        traceparent: str | None,
        tracestate: str | None,
        *,
        first: bool = False,
    ) -> tuple[RouteDecision, str | None, str | None]:
        """A slot when the hot path took none, with the trace context to
        send: queued (tracing off), or ``_route`` inside a ``muxgate.route``
        span, whose traceparent and tracestate the replica then gets.
        ``first``: queue at the head (see ``AffinityQueue.wait_for_slot``)."""
        if not tracing_active():
            decision = await self._waiters.wait_for_slot(model_id, deadline, first=first)
            return decision, traceparent, tracestate
        # Parent: the gateway's server span when there is one, else the
        # client's traceparent (continued), else a new trace.
        parent = (
            None
            if trace.get_current_span().get_span_context().is_valid
            else extract_context(traceparent, tracestate)
        )
        with _tracer.start_as_current_span(
            "muxgate.route", context=parent, kind=trace.SpanKind.INTERNAL
        ) as span:
            recording = span.is_recording()
            if recording:
                span.set_attribute("muxgate.deployment", self.name)
                span.set_attribute("muxgate.model_id", model_id)
            decision, queued = await self._route(model_id, deadline, first=first)
            if recording:
                span.set_attribute("muxgate.replica_id", decision.replica_id)
                span.set_attribute("muxgate.spillover", decision.spillover)
                span.set_attribute("muxgate.route.reason", decision.reason)
                span.set_attribute("muxgate.queued", queued)
            sent_parent, sent_state = inject_traceparent()
        return decision, sent_parent, sent_state

    def _take_slot(self, model_id: str) -> RouteDecision | None:
        # Decide and acquire without awaiting, so the slot cannot be lost.
        decision = self.router.choose(model_id)
        if decision is not None:
            self._acquire(decision, model_id)
        return decision

    def _acquire(self, decision: RouteDecision, model_id: str) -> None:
        self.router.acquire(decision.replica_id, model_id)
        if decision.spillover and self._metrics is not None:
            self._metrics.count_spillover(self.name, model_id if self._per_model else "")
