"""Per-deployment dispatch: model id check, routing, queueing, the call.

``Dispatcher.dispatch`` is the hot path of every ingress request::

    choose (Router, pure) -> acquire -> Target.call -> observe -> release -> wake

When the router has no replica under ``max_ongoing_requests`` the request
waits in the deployment's queue. The queue is one FIFO per deployment (hence
FIFO per model id too): a free slot is handed to the head waiter
synchronously inside ``wake()`` (decided and acquired without awaiting), so a
new arrival can never overtake a waiter and a woken waiter never finds its
slot taken. New arrivals go straight to a replica only while nobody waits.

The dispatcher never sees processes or sockets: replicas are ``Target``
objects looked up by id in a mapping the pool keeps current. Tests inject
fakes there.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Callable, Mapping
from typing import Protocol

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
from muxgate.replicas._protocol import HttpRequest, Reply

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


class _Waiter:
    __slots__ = ("future", "model_id")

    def __init__(self, model_id: str, future: asyncio.Future[RouteDecision]) -> None:
        self.model_id = model_id
        self.future = future


class Dispatcher:
    """Routes, queues and sends the requests of one deployment.

    Args:
        name: the deployment's name (metrics label, error messages).
        router: the deployment's ``Router``; the pool adds and removes replicas.
        targets: replica id -> ``Target``, kept current by the pool.
        max_queued_requests: queue bound; ``-1`` for unbounded.
        starting: returns whether a replica is starting (so a request with no
            replica to go to waits instead of failing at once).
        metrics: where queue length and spillovers are reported.
        per_model_labels: pass model ids to the spillover metric.
    """

    def __init__(
        self,
        name: str,
        router: Router,
        targets: Mapping[str, Target],
        *,
        max_queued_requests: int = 1000,
        starting: Callable[[], bool] = lambda: False,
        metrics: DispatchMetrics | None = None,
        per_model_labels: bool = False,
        retry_after_s: int = 1,
    ) -> None:
        self.name = name
        self.router = router
        self._targets = targets
        self._max_queued = max_queued_requests
        self._starting = starting
        self._metrics = metrics
        self._per_model = per_model_labels
        self._retry_after = retry_after_s
        self._queue: deque[_Waiter] = deque()
        self.in_flight = 0

    def __repr__(self) -> str:
        return (
            f"<Dispatcher {self.name} in_flight={self.in_flight} queued={len(self._queue)}"
            f" replicas={len(self.router)}>"
        )

    @property
    def queued(self) -> int:
        """Requests waiting for a replica slot."""
        return len(self._queue)

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
        """Send one request to a replica and return ``(reply, replica_id)``.

        With ``http=None`` it is a handle call: ``method`` is called with the
        MessagePack-encoded ``args`` (a list) and ``kwargs`` (a map), routed
        exactly like HTTP traffic.

        ``deadline`` is in ``loop.time()`` units. A reply that carries an
        ``error`` is turned into the matching ``GatewayError`` here.

        Raises:
            GatewayError: 503 queue full / no replica, 502 replica died,
                504 deadline, or the replica's reported error.
        """
        loop = asyncio.get_running_loop()
        router = self.router
        reroutes = 0
        while True:
            decision = self._take_slot(model_id) if not self._queue else None
            if decision is None:
                decision = await self._wait_for_slot(model_id, deadline)
            replica_id = decision.replica_id
            self.in_flight += 1
            try:
                target = self._targets.get(replica_id)
                if target is None:
                    raise ReplicaUnavailableError(replica_id)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise DeadlineExceededError("the request's deadline passed")
                try:
                    async with asyncio.timeout_at(deadline):
                        reply = await target.call(
                            request_id=request_id,
                            model_id=model_id,
                            timeout_s=remaining,
                            traceparent=traceparent,
                            tracestate=tracestate,
                            http=http,
                            method=method,
                            args=args,
                            kwargs=kwargs,
                        )
                except TimeoutError:
                    raise DeadlineExceededError("the request's deadline passed") from None
            except ReplicaUnavailableError:
                # Closed or draining: it can take no call again. Take it out
                # of routing now (the pool's watcher may not have run yet),
                # so the next choice is another replica.
                router.remove_replica(replica_id)
                reroutes += 1
                if reroutes > MAX_REROUTES:
                    raise OverCapacityError(
                        f"no replica of {self.name} could be reached",
                        retry_after=self._retry_after,
                    ) from None
                continue
            except ReplicaDiedError:
                err = ReplicaFailedError("the replica serving the request died")
                err.replica_id = replica_id
                raise err from None
            except GatewayError as exc:
                exc.replica_id = replica_id
                raise
            finally:
                self.in_flight -= 1
                router.release(replica_id)
                if self._queue:
                    self.wake()
            # The router's model view is refreshed by the connection's
            # on_state callback (wired by the pool), for replies and pongs.
            if reply.error is not None:
                err = error_from_info(reply.error)
                err.replica_id = replica_id
                raise err
            return reply, replica_id

    def _take_slot(self, model_id: str) -> RouteDecision | None:
        # Decide and acquire without awaiting, so the slot cannot be lost.
        decision = self.router.choose(model_id)
        if decision is not None:
            self.router.acquire(decision.replica_id, model_id)
            if decision.spillover and self._metrics is not None:
                self._metrics.count_spillover(self.name, model_id if self._per_model else "")
        return decision

    async def _wait_for_slot(self, model_id: str, deadline: float) -> RouteDecision:
        if not len(self.router) and not self._starting():
            raise NoReplicaError(
                f"no replica of {self.name} is running", retry_after=self._retry_after
            )
        if 0 <= self._max_queued <= len(self._queue):
            raise OverCapacityError(
                f"{self.name} is over capacity ({len(self._queue)} requests queued)",
                retry_after=self._retry_after,
            )
        future: asyncio.Future[RouteDecision] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(model_id, future)
        self._queue.append(waiter)
        self._report_queue()
        try:
            async with asyncio.timeout_at(deadline):
                return await future
        except BaseException as exc:
            if future.done() and not future.cancelled() and future.exception() is None:
                # Handed a slot at the moment we gave up (deadline or
                # cancellation): give it back to the next waiter.
                self.router.release(future.result().replica_id)
                self.wake()
            else:
                future.cancel()
            if isinstance(exc, TimeoutError):
                raise DeadlineExceededError(
                    "the request's deadline passed while it was queued"
                ) from None
            raise
        finally:
            if waiter in self._queue:
                self._queue.remove(waiter)
            self._report_queue()

    def wake(self) -> None:
        """Hand free slots to queued requests, oldest first.

        Called when a request finishes and when the pool adds a replica or
        gives up starting one.
        """
        queue = self._queue
        changed = False
        while queue:
            waiter = queue[0]
            if waiter.future.done():
                queue.popleft()
                changed = True
                continue
            decision = self._take_slot(waiter.model_id)
            if decision is None:
                break
            queue.popleft()
            changed = True
            waiter.future.set_result(decision)
        if queue and not len(self.router) and not self._starting():
            # Nothing will ever free a slot: fail the waiters now, not at their deadline.
            while queue:
                waiter = queue.popleft()
                if not waiter.future.done():
                    waiter.future.set_exception(
                        NoReplicaError(
                            f"no replica of {self.name} is running",
                            retry_after=self._retry_after,
                        )
                    )
            changed = True
        if changed:
            self._report_queue()

    def _report_queue(self) -> None:
        if self._metrics is not None:
            self._metrics.set_queue_length(self.name, len(self._queue))
