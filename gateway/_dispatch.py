"""Per-deployment dispatch: model id check, routing, queueing, the call.

``Dispatcher.dispatch`` is the hot path of every ingress request::

    choose (Router, pure) -> acquire -> Target.call -> observe -> release -> wake

When the router has no replica under capacity the request waits in the
deployment's queue. Free slots are handed out synchronously inside
``wake()`` (decided and acquired without awaiting), so a woken waiter never
finds its slot taken, and new arrivals go straight to a replica only while
nobody waits.

The queue is cache-affine, FIFO per model id. A strict global FIFO collapses
a busy deployment (bench/bench_routing_sim.py ``--queue fifo``): the slot that
frees on replica r goes to the head request, usually a cache miss on r, so
r loads a model, holds the slot for the load, and every replica stays full of
loads. Instead a free slot goes to the oldest waiter whose model the chosen
replica already holds (loaded or loading); the head gets a slot that would
be a miss once it has waited ``affinity_wait_s`` (about one model load,
estimated by the pool) and no hit wants the slot, when nothing is in flight,
or when the chosen replica is idle (a load there delays nobody). So that a
cold model's requests cannot starve behind a stream of hits, a head that has
waited ``affinity_wait_s`` also takes a slot over younger hits, but at most
once per ``affinity_wait_s``: those forced loads occupy about one slot, not
all of them. Waiters of one model id are served oldest first, since they all
see the same routing choice.

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
import heapq
import itertools
import math
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from opentelemetry import trace

from muxgate.gateway._connection import ReplicaDiedError, ReplicaUnavailableError
from muxgate.gateway._errors import (
    BadModelIdError,
    DeadlineExceededError,
    GatewayError,
    NoReplicaError,
    OverCapacityError,
    ReplicaFailedError,
    error_from_info,
)
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
#: waiters a ``wake()`` pass looks at for a cache hit (bounds its cost)
AFFINITY_SCAN = 64

#: a waiter held back by the spill price is looked at again this long after
#: its wait reaches the price (the rule needs the wait to exceed it)
_PRICE_SLACK_S = 0.001

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


@dataclass(slots=True, eq=False)
class _Waiter:
    # ``queued`` is True until the waiter is handed a slot or gives up; the
    # queue drops entries lazily (a served waiter may sit behind the head
    # for a while), so ``Dispatcher.queued`` counts, it does not take len().
    model_id: str
    future: asyncio.Future[RouteDecision]
    #: clock time it queued, and its request's deadline
    since: float
    deadline: float
    queued: bool = True
    #: the event loop's timer that looks at the deadline (once it waits)
    timer: asyncio.TimerHandle | None = None


class _Scan:
    """What one ``Dispatcher._serve_one`` pass over the queue has learnt."""

    __slots__ = ("free", "head", "head_decision", "models_full", "priced_due", "refused")

    def __init__(self, free: set[str]) -> None:
        #: replicas with a free slot
        self.free = free
        #: models whose oldest waiter would miss (or is held back by the price)
        self.refused: set[str] = set()
        #: no model request can get a slot (only id-less ones might)
        self.models_full = not free
        #: the oldest waiter that would take a miss, and where it would go
        self.head: _Waiter | None = None
        self.head_decision: RouteDecision | None = None
        #: when a waiter held back by the spill price is due again
        self.priced_due = math.inf


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
    ) -> None:
        self.name = name
        self.router = router
        self._targets = targets
        #: queue bound; the pool may change it once it knows the class's options
        self.max_queued_requests = max_queued_requests
        self._starting = starting
        self._activate = activate
        self._unavailable_reason = unavailable_reason
        self._metrics = metrics
        self._per_model = per_model_labels
        self._retry_after = retry_after_s
        self._queue: deque[_Waiter] = deque()
        #: (deadline, arrival, waiter) of the queued waiters, a heap (tuples:
        #: compared in C); served ones leave lazily
        self._deadlines: list[tuple[float, int, _Waiter]] = []
        self._arrivals = itertools.count()
        self._waiting = 0
        self._waiting_for: dict[str, int] = {}  # model id -> waiters queued
        #: interval between slots freeing on a busy replica, from the hits sent
        self.service_time = ServiceTimeEstimate(router.service_s)
        self._timer: asyncio.TimerHandle | None = None
        self._forced_after = 0.0  # clock time before which no head may jump hits
        self.affinity_wait_s = affinity_wait_s
        self.in_flight = 0
        self._admit = admit
        #: monotonic seconds; the front end computes deadlines from it
        self.clock = clock

    def __repr__(self) -> str:
        return (
            f"<Dispatcher {self.name} in_flight={self.in_flight} queued={self._waiting}"
            f" replicas={len(self.router)} affinity_wait_s={self.affinity_wait_s:.3f}>"
        )

    @property
    def queued(self) -> int:
        """Requests waiting for a replica slot."""
        return self._waiting

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
            decision = None if self._waiting or tracing_active() else self._take_slot(model_id)
            sent_parent, sent_state = traceparent, tracestate
            if decision is None:
                decision, sent_parent, sent_state = await self._route_slowly(
                    model_id, deadline, traceparent, tracestate
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
                self._answered(decision, sent_at, sharing)
                return reply, replica_id
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
            raise DeadlineExceededError("the request's deadline passed")
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
            if self._waiting:
                self.wake()
            raise

    def _call_ended(self, replica_id: str, model_id: str) -> None:
        """Give the slot back (the call ended, however) and pass it on."""
        self.in_flight -= 1
        self.router.release(replica_id, model_id)
        if self._waiting:
            self.wake()

    def _answered(self, decision: RouteDecision, sent_at: float, sharing: int) -> None:
        # The router's model view is refreshed by the connection's on_state
        # callback (wired by the pool), for replies and pongs; a cache hit
        # also tells how long a slot stays busy.
        if decision.hit:
            took = self.clock() - sent_at
            self.router.service_s = self.service_time.observe(took, sharing)

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
            err = DeadlineExceededError("the request's deadline passed")
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

    async def _route(self, model_id: str, deadline: float) -> tuple[RouteDecision, bool]:
        """A replica slot for the request (acquired); and whether it queued."""
        if not self._waiting:
            decision = self._take_slot(model_id)
            if decision is not None:
                return decision, False
        return await self._wait_for_slot(model_id, deadline), True

    async def _route_slowly(
        self,
        model_id: str,
        deadline: float,
        traceparent: str | None,
        tracestate: str | None,
    ) -> tuple[RouteDecision, str | None, str | None]:
        """A slot when the hot path took none, with the trace context to
        send: queued (tracing off), or ``_route`` inside a ``muxgate.route``
        span, whose traceparent and tracestate the replica then gets."""
        if not tracing_active():
            return await self._wait_for_slot(model_id, deadline), traceparent, tracestate
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
            decision, queued = await self._route(model_id, deadline)
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

    def _no_replica(self, message: str) -> NoReplicaError:
        reason = self._unavailable_reason()
        if reason:
            message = f"{message} ({reason})"
        return NoReplicaError(message, retry_after=self._retry_after)

    async def _wait_for_slot(self, model_id: str, deadline: float) -> RouteDecision:
        if not len(self.router):
            self._activate()  # the first request at zero replicas
            if not self._starting():
                raise self._no_replica(f"no replica of {self.name} is running")
        if 0 <= self.max_queued_requests <= self._waiting:
            raise OverCapacityError(
                f"{self.name} is over capacity ({self._waiting} requests queued)",
                retry_after=self._retry_after,
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RouteDecision] = loop.create_future()
        waiter = _Waiter(model_id, future, self.clock(), deadline)
        self._queue.append(waiter)
        heapq.heappush(self._deadlines, (deadline, next(self._arrivals), waiter))
        self._waiting += 1
        self._waiting_for[model_id] = self._waiting_for.get(model_id, 0) + 1
        # A cache hit may go at once even behind older waiters.
        self.wake()
        if future.done():
            return future.result()
        self._report_queue()
        waiter.timer = loop.call_later(deadline - waiter.since, self._deadline_timer, waiter)
        try:
            return await future  # a slot, or the reason to give up (``_expire``)
        except BaseException:
            if future.done() and not future.cancelled() and future.exception() is None:
                # Handed a slot at the moment the task was cancelled: give
                # it back to the next waiter.
                self.router.release(future.result().replica_id, model_id)
                self.wake()
            else:
                future.cancel()
            raise
        finally:
            waiter.timer.cancel()
            if waiter.queued:
                self._unqueue(waiter)
            self._compact()
            self._report_queue()

    def _deadline_timer(self, waiter: _Waiter) -> None:
        # The event loop's timer for one waiter's deadline: whether it has
        # passed is the clock's to say; a loop timer ahead of the clock
        # looks again when the clock says it is due.
        if not waiter.queued:
            return
        left = waiter.deadline - self.clock()
        if left > 0:
            loop = asyncio.get_running_loop()
            waiter.timer = loop.call_later(left, self._deadline_timer, waiter)
        else:
            self._expire()

    def _expire(self) -> None:
        """Fail the queued requests whose deadline has passed by the clock:
        504, or 503 while no replica runs (a cold start slower than the
        deadline: the client may retry, it did not time out on a replica)."""
        deadlines = self._deadlines
        now = self.clock()
        while deadlines and deadlines[0][0] <= now:
            waiter = heapq.heappop(deadlines)[2]
            if not waiter.queued or waiter.future.done():
                continue  # served, or cancelled and its task not yet resumed
            self._unqueue(waiter)
            if len(self.router):
                error: GatewayError = DeadlineExceededError(
                    "the request's deadline passed while it was queued"
                )
            else:
                error = self._no_replica(
                    f"no replica of {self.name} became ready before the request's deadline"
                )
            waiter.future.set_exception(error)

    def _compact(self) -> None:
        # Served and abandoned waiters leave lazily; drop them from the
        # head, and rebuild when they make up most of the deque (or heap).
        queue = self._queue
        while queue and not queue[0].queued:
            queue.popleft()
        if len(queue) > 2 * self._waiting + 64:
            self._queue = deque(w for w in queue if w.queued)
        if len(self._deadlines) > 2 * self._waiting + 64:
            self._deadlines = [entry for entry in self._deadlines if entry[2].queued]
            heapq.heapify(self._deadlines)

    def wake(self) -> None:
        """Hand free slots to queued requests (cache hits first, see the
        module docstring), after failing those past their deadline.

        Called when a request finishes or queues, when the pool adds a
        replica or gives up starting one, and by a timer when the head's
        affinity wait ends while a slot is free.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting_before = self._waiting
        if self._deadlines and self._deadlines[0][0] <= self.clock():
            self._expire()
        while self._waiting and self._serve_one():
            pass
        if self._waiting and not len(self.router):
            self._activate()
        if self._waiting and not len(self.router) and not self._starting():
            # Nothing will ever free a slot: fail the waiters now, not at their deadline.
            error = self._no_replica(f"no replica of {self.name} is running")
            for waiter in self._queue:
                if waiter.queued:
                    self._unqueue(waiter)
                    if not waiter.future.done():
                        waiter.future.set_exception(error)
            self._queue.clear()
            self._deadlines.clear()
        if self._waiting != waiting_before:
            self._compact()
            self._report_queue()

    def _serve_one(self) -> bool:
        """Hand one free slot to a waiter; False when none should get one now."""
        router = self.router
        cap = router.capacity()
        # Replicas with a free slot for a model request: a waiter whose model
        # none of them holds cannot be a cache hit, so it costs no choose().
        scan = _Scan({r for r in router.replica_ids if router.in_flight(r) < cap})
        free, refused = scan.free, scan.refused
        scanned = 0
        for waiter in itertools.islice(self._queue, AFFINITY_SCAN * 2):
            if not waiter.queued:
                continue
            if waiter.future.done():  # cancelled, its task not yet resumed
                self._unqueue(waiter)
                continue
            scanned += 1
            if scanned > AFFINITY_SCAN:
                break
            model_id = waiter.model_id
            if model_id in refused or (model_id and scan.models_full):
                continue
            if scan.head is not None and model_id and free.isdisjoint(router.holders(model_id)):
                refused.add(model_id)  # a miss, and not the head: skip it cheaply
                continue
            handed = self._consider(waiter, scan)
            if handed is not None:
                return handed
        return self._serve_head(scan)

    def _consider(self, waiter: _Waiter, scan: _Scan) -> bool | None:
        """Route one waiter of a ``_serve_one`` pass that could get a slot:
        True when it got one, False when no waiter can now, None to go on."""
        router = self.router
        model_id = waiter.model_id
        waited = self.clock() - waiter.since
        decision = router.choose(model_id, self._waiting_for.get(model_id, 1), waited)
        if decision is None:
            if model_id and scan.free:
                # Its holders are full and a spill does not pay yet: it waits
                # for a holder; look again once waiting costs as much as a load.
                scan.refused.add(model_id)
                due = waiter.since + router.refused_spill_price_s + _PRICE_SLACK_S
                scan.priced_due = min(scan.priced_due, due)
                return None
            if scan.head is None:
                scan.head = waiter
            if not model_id:
                return False  # every replica at max_ongoing_requests
            scan.models_full = True
            return None
        if not model_id or decision.replica_id in router.holders(model_id):
            self._hand(waiter, decision)
            return True
        if scan.head is None:
            scan.head, scan.head_decision = waiter, decision
            # No starvation: a head that has waited its affinity time
            # takes this slot over younger cache hits, at most once per
            # affinity wait, so these forced loads hold about one slot
            # and a busy deployment cannot fall into the FIFO collapse.
            now = self.clock()
            if now >= waiter.since + self.affinity_wait_s and now >= self._forced_after:
                self._forced_after = now + self.affinity_wait_s
                self._hand(waiter, decision)
                return True
        scan.refused.add(model_id)
        return None

    def _serve_head(self, scan: _Scan) -> bool:
        """After a pass found no cache hit: hand the head the miss slot once it
        has waited its affinity time, or when the load there delays nobody;
        else set the timer that looks again."""
        now = self.clock()
        head, decision = scan.head, scan.head_decision
        if head is None or decision is None:
            if scan.priced_due < math.inf and self._timer is None:
                self._look_again(scan.priced_due - now)
            return False
        router = self.router
        due = head.since + self.affinity_wait_s
        if now >= due or router.total_in_flight == 0 or router.in_flight(decision.replica_id) == 0:
            self._hand(head, decision)
            return True
        # A slot is free but only a miss could use it: try again when the
        # head has waited long enough (or earlier, if a request finishes, or
        # when a request held back by the spill price is due).
        self._look_again(min(due, scan.priced_due) - now)
        return False

    def _look_again(self, after_s: float) -> None:
        # The event loop's timer only calls ``wake()``; the pass it runs
        # decides from the clock (a wake before it is due sets a new timer).
        self._timer = asyncio.get_running_loop().call_later(after_s, self.wake)

    def _hand(self, waiter: _Waiter, decision: RouteDecision) -> None:
        self._acquire(decision, waiter.model_id)
        self._unqueue(waiter)
        waiter.future.set_result(decision)

    def _unqueue(self, waiter: _Waiter) -> None:
        waiter.queued = False
        self._waiting -= 1
        left = self._waiting_for[waiter.model_id] - 1
        if left:
            self._waiting_for[waiter.model_id] = left
        else:
            del self._waiting_for[waiter.model_id]

    def _report_queue(self) -> None:
        if self._metrics is not None:
            self._metrics.set_queue_length(self.name, self._waiting)
