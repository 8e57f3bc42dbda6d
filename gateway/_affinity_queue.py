"""The requests of one deployment waiting for a replica slot.

The queue is cache-affine, FIFO per model id. A strict global FIFO collapses
a busy deployment (bench/bench_routing_sim.py ``--queue fifo``): the slot that
frees on replica r goes to the head request, usually a cache miss on r, so
r loads a model, holds the slot for the load, and every replica stays full of
loads. Instead a free slot goes to the oldest waiter whose model the chosen
replica already holds (loaded or loading); the head gets a slot that would
be a miss once it has waited ``affinity_wait_s`` (about one model load,
estimated by the pool) and no hit wants the slot, or at once when the load
takes no slot a hit could want: the chosen replica is idle, or keeps a free
slot after this one (a hit that comes next still finds room there). The
collapse needs replicas full of loads; a miss that leaves a slot free cannot
cause it, and holding it back only adds the affinity wait to its latency (on
the peer benchmark, most of a miss's time: docs/benchmarks.md). So that a
cold model's requests cannot starve behind a stream of hits, a head that has
waited ``affinity_wait_s`` also takes a slot over younger hits, but at most
once per ``affinity_wait_s``: those forced loads occupy about one slot, not
all of them. Waiters of one model id are served oldest first, since they all
see the same routing choice.

Free slots are handed out synchronously inside ``wake()`` (decided and
acquired without awaiting), so a woken waiter never finds its slot taken.
Deadlines are the injected clock's; a heap of them fails the expired
waiters, and the event loop's timers only prompt a look.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from muxgate.gateway._errors import (
    DEADLINE_SOURCE,
    DeadlineExceededError,
    GatewayError,
    NoReplicaError,
    OverCapacityError,
    client_safe,
)
from muxgate.gateway._router import RouteDecision, Router

__all__ = ["AFFINITY_SCAN", "AffinityQueue", "QueueMetrics"]

#: waiters a ``wake()`` pass looks at for a cache hit (bounds its cost)
AFFINITY_SCAN = 64

#: a waiter held back by the spill price is looked at again this long after
#: its wait reaches the price (the rule needs the wait to exceed it)
_PRICE_SLACK_S = 0.001


class QueueMetrics(Protocol):
    """The part of ``GatewayMetrics`` the queue feeds."""

    def set_queue_length(self, deployment: str, n: int) -> None: ...


@dataclass(slots=True, eq=False)
class _Waiter:
    # ``queued`` is True until the waiter is handed a slot or gives up; the
    # queue drops entries lazily (a served waiter may sit behind the head
    # for a while), so ``AffinityQueue.waiting`` counts, it does not take len().
    model_id: str
    future: asyncio.Future[RouteDecision]
    #: clock time it queued, and its request's deadline
    since: float
    deadline: float
    queued: bool = True
    #: the event loop's timer that looks at the deadline (once it waits)
    timer: asyncio.TimerHandle | None = None


class _Scan:
    """What one ``AffinityQueue._serve_one`` pass over the queue has learnt."""

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


class AffinityQueue:
    """The waiting requests of one deployment (see the module docstring).

    Args:
        name: the deployment's name (metrics label, error messages).
        router: the deployment's ``Router``.
        acquire: ``(decision, model_id)``: takes the slot a waiter is handed.
        max_queued_requests, starting, activate, unavailable_reason,
            affinity_wait_s, clock: as ``Dispatcher`` takes them.
        metrics: where the queue length is reported.
        retry_after_s: the 503s' ``Retry-After``.
    """

    def __init__(
        self,
        name: str,
        router: Router,
        *,
        acquire: Callable[[RouteDecision, str], None],
        max_queued_requests: int,
        starting: Callable[[], bool],
        activate: Callable[[], None],
        unavailable_reason: Callable[[], str | None],
        metrics: QueueMetrics | None,
        retry_after_s: int,
        affinity_wait_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.name = name
        self.router = router
        self._acquire = acquire
        #: queue bound (``-1``: unbounded)
        self.max_queued_requests = max_queued_requests
        self._starting = starting
        self._activate = activate
        self._unavailable_reason = unavailable_reason
        self._metrics = metrics
        self._retry_after = retry_after_s
        self._queue: deque[_Waiter] = deque()
        #: (deadline, arrival, waiter) of the queued waiters, a heap (tuples:
        #: compared in C); served ones leave lazily
        self._deadlines: list[tuple[float, int, _Waiter]] = []
        self._arrivals = itertools.count()
        #: requests waiting (not ``len()`` of the lazily pruned deque)
        self.waiting = 0
        self._waiting_for: dict[str, int] = {}  # model id -> waiters queued
        self._timer: asyncio.TimerHandle | None = None
        self._forced_after = 0.0  # clock time before which no head may jump hits
        self.affinity_wait_s = affinity_wait_s
        self.clock = clock

    def __repr__(self) -> str:
        return f"<AffinityQueue {self.name} waiting={self.waiting}>"

    def _no_replica(self, message: str) -> NoReplicaError:
        reason = self._unavailable_reason()
        if reason:
            # The start failure names where it was raised: no server paths
            # for clients (the log and the admin views have them).
            message = f"{message} ({client_safe(reason)})"
        return NoReplicaError(message, retry_after=self._retry_after)

    async def wait_for_slot(
        self, model_id: str, deadline: float, *, first: bool = False
    ) -> RouteDecision:
        """Queue a request for ``model_id`` until it is handed a slot
        (acquired), or raise: 503 queue full or no replica, 504 deadline.

        ``first``: a request that had its turn already (its replica went
        away before it could take the call) queues at the head, ahead of
        those that came after it, and is not refused by the queue's bound.
        """
        if not len(self.router):
            self._activate()  # the first request at zero replicas
            if not self._starting():
                raise self._no_replica(f"no replica of {self.name} is running")
        if not first and 0 <= self.max_queued_requests <= self.waiting:
            raise OverCapacityError(
                f"{self.name} is over capacity ({self.waiting} requests queued)",
                retry_after=self._retry_after,
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RouteDecision] = loop.create_future()
        waiter = _Waiter(model_id, future, self.clock(), deadline)
        if first:
            self._queue.appendleft(waiter)
        else:
            self._queue.append(waiter)
        heapq.heappush(self._deadlines, (deadline, next(self._arrivals), waiter))
        self.waiting += 1
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
                    "the request's deadline passed while it was queued" + DEADLINE_SOURCE
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
        if len(queue) > 2 * self.waiting + 64:
            self._queue = deque(w for w in queue if w.queued)
        if len(self._deadlines) > 2 * self.waiting + 64:
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
        waiting_before = self.waiting
        if self._deadlines and self._deadlines[0][0] <= self.clock():
            self._expire()
        while self.waiting and self._serve_one():
            pass
        if self.waiting and not len(self.router):
            self._activate()
        if self.waiting and not len(self.router) and not self._starting():
            # Nothing will ever free a slot: fail the waiters now, not at their deadline.
            error = self._no_replica(f"no replica of {self.name} is running")
            for waiter in self._queue:
                if waiter.queued:
                    self._unqueue(waiter)
                    if not waiter.future.done():
                        waiter.future.set_exception(error)
            self._queue.clear()
            self._deadlines.clear()
        if self.waiting != waiting_before:
            self._compact()
            self._report_queue()

    def _serve_one(self) -> bool:
        """Hand one free slot to a waiter; False when none should get one now."""
        router = self.router
        cap = router.holder_capacity()
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
                # for a holder; look again once waiting costs as much as a load
                # (``spill: never``: an infinite price, only a freed slot wakes it).
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
        due = head.since + self.affinity_wait_s
        if now >= due or self._load_takes_no_hit_slot(decision.replica_id):
            self._hand(head, decision)
            return True
        # A slot is free but only a miss could use it: try again when the
        # head has waited long enough (or earlier, if a request finishes, or
        # when a request held back by the spill price is due).
        self._look_again(min(due, scan.priced_due) - now)
        return False

    def _load_takes_no_hit_slot(self, replica_id: str) -> bool:
        """Whether a miss sent to ``replica_id`` now leaves hits their room:
        nothing runs there, or a slot stays free after this one."""
        router = self.router
        in_flight = router.in_flight(replica_id)
        return in_flight == 0 or in_flight + 2 <= router.holder_capacity()

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
        self.waiting -= 1
        left = self._waiting_for[waiter.model_id] - 1
        if left:
            self._waiting_for[waiter.model_id] = left
        else:
            del self._waiting_for[waiter.model_id]

    def _report_queue(self) -> None:
        if self._metrics is not None:
            self._metrics.set_queue_length(self.name, self.waiting)
