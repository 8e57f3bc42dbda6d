"""Serving inside a replica process: the ``Replica`` (calls, state, stop)
and its gateway connections.

Each ``Call`` runs in its own task inside a request scope and (when tracing
is on) a ``muxgate.replica.handle`` span continued from the caller's
``traceparent``, bounded by its ``timeout_s`` (run by
:mod:`muxgate.replicas._call_runner`). User exceptions become
``ErrorCode.USER_ERROR`` (``MODEL_NOT_FOUND``, 404, for the storage
backends' not-found error) and the replica keeps serving.

Stopping (one path, three triggers, see ``Replica.request_stop``):

* ``Drain`` message: reason ``drain``; in-flight calls finish, models are
  unloaded, ``Drained`` is sent;
* SIGTERM/SIGINT: the same with reason ``shutdown`` (a second signal stops
  waiting for in-flight calls);
* the gateway's connection closes, or the parent dies: nobody can receive
  replies any more, so in-flight calls are cancelled and models unloaded
  with reason ``shutdown``. A standalone replica (``muxgate replica``,
  ``spec.standalone``) has no parent gateway: it serves on, models loaded,
  when its last gateway disconnects, for the next one. Whichever kind, the
  calls of a connection that closed are cancelled at once (their replies
  have nowhere to go), so a gateway that dies frees its slots for the others.

While stopping, calls are answered with ``ErrorCode.DRAINING`` (503);
whether a call is refused is decided in frame order, so a ``Call`` that
arrived before the ``Drain`` still runs.

Cancellation: ``Cancel(id)`` from the gateway cancels that call's task and
no reply is sent. Async user code sees the cancellation at its next await;
its request scope ends (pins released) as the task unwinds. Sync user code
runs in a worker thread, which cannot be interrupted: the call is
*abandoned* (it leaves ``in_flight`` and its slot at once, no reply), the
thread runs to its end, still holding a worker-thread token (so at most
``max_ongoing_requests`` threads ever run), and the model pins it took are
released when it returns, not before (a model is never unloaded under a
running thread). The same holds for a sync call cut off by its deadline.

The replica's own guard (``max_ongoing_requests``): the gateway's router
never sends more than that many calls, but several gateways may share a
replica, and a call the gateway cancelled may still be unwinding here when
the gateway reuses its slot. So the replica runs at most
``max_ongoing_requests`` calls; up to as many again wait in a local FIFO
(within their deadline), and beyond that a call is refused at once with
``ErrorCode.OVERLOADED`` (503), which the gateway reroutes. Waiting
briefly is preferred over refusing: the call was routed here because its
model lives here, and a reroute means a model load elsewhere (hundreds of
ms) where a slot frees in milliseconds; refusing past a bound keeps the wait
short and lets the gateways' own queues (cache-affine, visible to the
autoscaler) do the queueing.

State pushes: a gateway whose ``Hello`` said ``push_state`` gets a
``StatePush`` (the replica's ``ReplicaState``) whenever a model cache's
loaded or loading ids change (``watch_residency``): a load starts, ends or
fails, a model is evicted or unloaded. The changes of one turn of the event
loop (a load's end and the eviction it causes) go out as one push. Replies
carry the state too, but only to the gateway that sent the call; the push
is how the other gateways sharing this replica learn of a load before they
place the same model somewhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import msgspec

from muxgate.replicas._busy import BusyClock
from muxgate.replicas._cache_stats import watch_residency
from muxgate.replicas._call_errors import error_for
from muxgate.replicas._call_runner import CallRunner, Outcome
from muxgate.replicas._codes import ErrorCode
from muxgate.replicas._deployment import get_deployment_options
from muxgate.replicas._handshake import HandshakeGate
from muxgate.replicas._logging import logged
from muxgate.replicas._memory import rss_bytes
from muxgate.replicas._model_control import (
    ControlRefusedError,
    WarmTurns,
    control_when_due,
    process_model_report,
)
from muxgate.replicas._multiplex import (
    counters,
    events_since,
    model_caches,
    replica_state_snapshot,
)
from muxgate.replicas._protocol import (
    PROTOCOL_VERSION,
    Call,
    Cancel,
    Drain,
    Drained,
    ErrorInfo,
    Message,
    ModelControl,
    Ping,
    Pong,
    ProtocolError,
    Refused,
    ReplicaState,
    Reply,
    StatePush,
    Welcome,
)
from muxgate.replicas._replica_io import GatewayConnection, Slots
from muxgate.replicas._request_counts import RequestCounts
from muxgate.replicas._spec import ReplicaSpec

__all__ = ["Replica"]

_log = logging.getLogger("muxgate.replica")

_READ_SIZE = 1 << 16
#: Seconds the gateway gets to close its end after the replica stopped.
_CLOSE_GRACE_S = 5.0


# -- calls ---------------------------------------------------------------------


def _counters(busy: BusyClock) -> dict[str, float]:
    """The model caches' counters, the server's call counters (``busy``) and
    muxgate.backends' (when it was imported)."""
    result = counters()
    result.update(busy.counters())
    # Looked up, not imported: a deployment need not touch storage, and a
    # process that never imported it has counted nothing there.
    fetch_module = sys.modules.get("muxgate.backends._fetch")
    if fetch_module is not None:
        result.update(fetch_module.storage_counters())
    return result


class Replica:
    """The serving state of this process: the instance, calls in flight,
    connections, and the stop request."""

    def __init__(
        self,
        spec: ReplicaSpec,
        instance: Any,
        gate: HandshakeGate | None = None,
        drain_fence: Callable[[str | None], bool] | None = None,
    ) -> None:
        self.spec = spec
        self.instance = instance
        #: ``token -> admitted`` for a ``Drain`` (``DrainFence.admits``); None: any Drain
        self.drain_fence = drain_fence
        #: admits connections (TLS, the cluster secret); default: no secret, no TLS
        self.gate = gate if gate is not None else HandshakeGate()
        self.in_flight = 0
        #: calls finished and busy seconds, reported in every Pong
        self.busy = BusyClock()
        self.stopping = False
        self.stop_requested = anyio.Event()
        self.stop_reason = "shutdown"
        self.stop_graceful = True
        self._idle = anyio.Event()
        self._idle.set()
        #: warming loads (``ModelControl.after_slot``): running, and waiting for a free slot
        self.warms = WarmTurns()
        #: calls per model id, reported with each Pong (the gateways' warm sets)
        self.requests = RequestCounts()
        self._call_scopes: set[anyio.CancelScope] = set()
        self._connections: set[GatewayConnection] = set()
        self._all_closed = anyio.Event()
        self._drain_requester: GatewayConnection | None = None
        #: the requester's ``Drain.events_after``: Drained carries the events after it
        self._drain_events_after: int | None = None
        #: the class's @deployment options, told to the gateway in Welcome
        self.options = get_deployment_options(type(instance))
        configured = spec.max_ongoing_requests
        limit = max(1, configured if configured is not None else self.options.max_ongoing_requests)
        self._runner = CallRunner(spec, instance, limit)
        self._slots = Slots(limit, max_waiting=limit)
        self.cancelled = 0  # calls cancelled by a gateway's Cancel
        #: ``StatePush`` frames sent (one per push-asking gateway per push)
        self.pushes = 0
        self._push_due = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    def __repr__(self) -> str:
        return (
            f"<Replica {self.spec.deployment}#{self.spec.replica_id} in_flight={self.in_flight} "
            f"running={self._slots.running} waiting={self._slots.waiting} "
            f"warming={self.warms.running} cancelled={self.cancelled} "
            f"connections={len(self._connections)} pushes={self.pushes} "
            f"stopping={self.stopping}>"
        )

    # -- state ---------------------------------------------------------------

    def state(self) -> ReplicaState:
        models, loading, cache_limit = replica_state_snapshot()
        return ReplicaState(
            in_flight=self.in_flight, models=models, loading=loading, cache_limit=cache_limit
        )

    def _residency_changed(self) -> None:
        """A cache's loaded or loading ids changed: push the state to the
        gateways that asked, once per turn of the event loop however many
        changes that turn made (a load's start and its evictions)."""
        if self._push_due or self._loop is None:
            return
        self._push_due = True
        # Thread-safe: the caches change their ids on the loop, but a
        # watcher must never be the reason a worker thread's call breaks.
        self._loop.call_soon_threadsafe(self._push_state)

    def _push_state(self) -> None:
        self._push_due = False
        targets = [conn for conn in self._connections if conn.push_state]
        if not targets:
            return
        push = StatePush(state=self.state())
        for conn in targets:
            if conn.send_nowait(push):
                self.pushes += 1

    @property
    def drain_grace_s(self) -> float:
        """How long a graceful stop waits for the calls in flight: the
        gateway's (its request timeout), or the class's
        ``@deployment(graceful_shutdown_timeout_s=...)`` if shorter."""
        return min(self.spec.graceful_shutdown_timeout_s, self.options.graceful_shutdown_timeout_s)

    def request_stop(self, reason: str, *, graceful: bool) -> None:
        """Ask the main task to stop; a later, less graceful request wins."""
        if self.stop_requested.is_set():
            if not graceful and self.stop_graceful:
                self.stop_graceful = False
                self._cancel_calls()
            return
        self.stop_reason = reason
        self.stop_graceful = graceful
        self.stopping = True
        self.stop_requested.set()

    def _cancel_calls(self) -> None:
        for scope in list(self._call_scopes):
            scope.cancel()

    # -- serving -------------------------------------------------------------

    async def serve(self, listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
        """Serve until a stop is requested, then stop as the reason says."""
        self._loop = asyncio.get_running_loop()
        stop_watching = watch_residency(self._residency_changed)
        try:
            await self._serve(listener)
        finally:
            stop_watching()

    async def _serve(self, listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = self._runner.task_group = tg
            accepting = anyio.CancelScope()
            tg.start_soon(self._accept_loop, listener, accepting)
            await self.stop_requested.wait()
            # No new connections while stopping.
            accepting.cancel()
            _log.info("Stopping (%s), %d call(s) in flight.", self.stop_reason, self.in_flight)
            if self.stop_graceful:
                with anyio.move_on_after(self.drain_grace_s):
                    await self._idle.wait()
            self._cancel_calls()
            with anyio.move_on_after(_CLOSE_GRACE_S):
                # Bounded: a reply stuck writing to a gateway that stopped
                # reading must not keep the process alive.
                await self._idle.wait()
            await self._unload_models()
            if self._drain_requester is not None:
                after = self._drain_events_after
                events = events_since(after) if after is not None else []
                await self._drain_requester.send(
                    Drained(counters=_counters(self.busy), events=events)
                )
            # Closing a socket may drop data still buffered for it, so
            # half-close and let each gateway close its end once it has read
            # everything (bounded: a gateway that never closes is cut off).
            with anyio.move_on_after(_CLOSE_GRACE_S):
                for conn in list(self._connections):
                    await conn.finish()
                if self._connections:
                    await self._all_closed.wait()
            tg.cancel_scope.cancel()
        for conn in list(self._connections):
            await anyio.aclose_forcefully(conn.stream)

    async def _accept_loop(
        self, listener: anyio.abc.Listener[anyio.abc.SocketStream], scope: anyio.CancelScope
    ) -> None:
        assert self._tg is not None
        try:
            with scope:
                await listener.serve(self._serve_connection, task_group=self._tg)
        finally:
            # Closed only once serve() has stopped: closing it under a pending
            # accept() would raise instead of ending quietly.
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await listener.aclose()

    async def _unload_models(self) -> None:
        reason = "drain" if self.stop_reason == "drain" else "shutdown"
        for cache in model_caches():
            try:
                with anyio.move_on_after(self.spec.graceful_shutdown_timeout_s):
                    await cache.aclose(reason)
            except Exception:
                _log.exception("Unloading models of %r failed.", cache)

    async def _serve_connection(self, raw: anyio.abc.SocketStream) -> None:
        accepted = await self.gate.accept(raw, self._welcome)
        if accepted is None:
            await anyio.aclose_forcefully(raw)
            return
        conn = GatewayConnection(accepted.stream, push_state=accepted.push_state)
        conn.welcomed = True
        decoder = accepted.decoder
        self._connections.add(conn)
        if self._all_closed.is_set():
            # A standalone replica outlives its gateways: the stop waits for
            # the connections open then, not for an earlier moment with none.
            self._all_closed = anyio.Event()
        try:
            async with accepted.stream:
                for message in accepted.rest:
                    self._dispatch(conn, message)
                while True:
                    try:
                        data = await accepted.stream.receive(_READ_SIZE)
                    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        return
                    for message in decoder.feed(data):
                        self._dispatch(conn, message)
        except ProtocolError as exc:
            _log.error("Closing the connection from %s: %s", conn.peer, exc)
        except Exception:
            # Whatever a peer sends, only its connection may fail.
            _log.exception("Closing the connection from %s after an internal error.", conn.peer)
        finally:
            self._connections.discard(conn)
            # Its gateway is gone (closed, or killed): nobody can receive
            # these calls' replies, so they stop now and free their slots
            # for the other gateways' calls.
            for scope in list(conn.calls.values()):
                self.cancelled += 1
                scope.cancel()
            if not self._connections:
                self._all_closed.set()
                if not self.spec.standalone:
                    # The gateway is gone: nobody can receive replies any more.
                    self.request_stop("gateway disconnected", graceful=False)

    def _welcome(self) -> Welcome | Refused:
        """The answer to a handshake that passed the gate."""
        if self.stopping:
            return Refused(reason=f"replica is stopping ({self.stop_reason})")
        return Welcome(
            version=PROTOCOL_VERSION,
            deployment=self.spec.deployment,
            replica_id=self.spec.replica_id,
            pid=os.getpid(),
            state=self.state(),
            options=self.options,
        )

    def _dispatch(self, conn: GatewayConnection, message: Message) -> None:
        assert self._tg is not None
        if isinstance(message, Call):
            self.in_flight += 1
            self.requests.count(message.model_id)
            self.busy.started()
            self._idle = anyio.Event() if self._idle.is_set() else self._idle
            # Registered now, not when the task starts: a Cancel in the same
            # read must find it (a scope cancelled before it is entered
            # cancels its body at once).
            scope = anyio.CancelScope()
            conn.calls[message.id] = scope
            # Decided here, in frame order: a Call that arrived before a Drain
            # runs even if its task starts after the Drain was handled.
            self._tg.start_soon(self._run_call, conn, message, self.stopping, scope)
        elif isinstance(message, Cancel):
            target = conn.calls.get(message.id)
            if target is not None:  # else finished already: the reply crossed it
                self.cancelled += 1
                target.cancel()
        elif isinstance(message, Ping):
            self._tg.start_soon(self._pong, conn, message.events_after)
        elif isinstance(message, ModelControl):
            self._tg.start_soon(self._control, conn, message, self.stopping)
        elif isinstance(message, Drain):
            if self.drain_fence is not None and not self.drain_fence(message.token):
                _log.warning(
                    "Refused a Drain without a token from this replica's supervisor"
                    " (a gateway that does not hold the lease); serving on."
                )
                return
            if self._drain_requester is None:
                self._drain_requester = conn
                self._drain_events_after = message.events_after
            self.request_stop("drain", graceful=True)
        else:
            _log.warning("Ignoring unexpected %s from the gateway.", type(message).__name__)

    async def _pong(self, conn: GatewayConnection, events_after: int | None) -> None:
        events = events_since(events_after) if events_after is not None else []
        model_bytes, pinned = process_model_report()
        await conn.send(
            Pong(
                state=self.state(),
                counters=_counters(self.busy),
                events=events,
                rss_bytes=rss_bytes(),
                model_bytes=model_bytes,
                pinned=pinned,
                model_requests=self.requests.top(),
            )
        )

    async def _wait_idle(self, timeout_s: float | None) -> bool:
        """Wait until no call is in flight (False: not within ``timeout_s``)."""
        with anyio.move_on_after(math.inf if timeout_s is None else timeout_s):
            while self.in_flight:
                await self._idle.wait()
            return True
        return False

    async def _control(self, conn: GatewayConnection, message: ModelControl, refuse: bool) -> None:
        """A ``ModelControl``: load, warm or unload outside any call; a ``Reply`` says how."""
        error: ErrorInfo | None = None
        body = b""
        if refuse:
            error = ErrorInfo.of(ErrorCode.DRAINING, "replica is shutting down")
        else:
            try:
                result = await control_when_due(
                    self.instance,
                    message,
                    warms=self.warms,
                    in_flight=lambda: self.in_flight,
                    max_ongoing=self._slots.limit,
                    idle=self._wait_idle,
                )
                body = msgspec.json.encode(result)
            except TimeoutError:
                error = ErrorInfo.of(ErrorCode.DEADLINE, "the load is still running")
            except ControlRefusedError as exc:
                error = ErrorInfo.of(ErrorCode.BAD_REQUEST, str(exc))
            except Exception as exc:
                error = error_for(exc)
                if not logged(exc):  # a failed load wrote its own line
                    _log.warning(
                        "%s of model '%s' failed: %s", message.action, message.model_id, exc
                    )
        state = self.state()
        if error is not None:
            await conn.send(Reply(id=message.id, state=state, status=error.status, error=error))
        else:
            await conn.send(Reply(id=message.id, state=state, body=body))

    async def _run_call(
        self, conn: GatewayConnection, call: Call, refuse: bool, scope: anyio.CancelScope
    ) -> None:
        self._call_scopes.add(scope)
        reply: Reply | None = None
        finished = False
        outcome: Outcome
        try:
            with scope:
                if refuse:
                    outcome = ErrorInfo.of(ErrorCode.DRAINING, "replica is shutting down")
                elif self._slots.try_acquire():
                    try:
                        outcome = await self._runner.execute(call, call.timeout_s)
                    finally:
                        self._slots.release()
                elif self._slots.waiting >= self._slots.max_waiting:
                    outcome = ErrorInfo.of(
                        ErrorCode.OVERLOADED,
                        f"replica {self.spec.replica_id} is at max_ongoing_requests "
                        f"({self._slots.limit}) with {self._slots.waiting} calls waiting",
                    )
                else:
                    outcome = await self._execute_when_free(call)
            if not scope.cancelled_caught:
                # Count the call out before taking the state, so the state in
                # its reply matches the router's view once it releases it.
                finished = True
                self._finish()
                state = self.state()
                if isinstance(outcome, ErrorInfo):
                    reply = Reply(id=call.id, state=state, status=outcome.status, error=outcome)
                else:
                    status, headers, body = outcome
                    reply = Reply(
                        id=call.id, state=state, status=status, headers=headers, body=body
                    )
        finally:
            self._call_scopes.discard(scope)
            if conn.calls.get(call.id) is scope:
                del conn.calls[call.id]
            if not finished:
                self._finish()
        if reply is not None:
            await conn.send(reply)

    async def _execute_when_free(self, call: Call) -> Outcome:
        """Wait (within the call's deadline) for a slot, then run the call."""
        timeout = call.timeout_s
        started = time.monotonic()
        with anyio.move_on_after(math.inf if timeout is None else timeout):
            await self._slots.acquire()
            try:
                left = None if timeout is None else timeout - (time.monotonic() - started)
                return await self._runner.execute(call, left)
            finally:
                self._slots.release()
        return ErrorInfo.of(
            ErrorCode.DEADLINE,
            f"deadline of {timeout:.3f}s passed while waiting for a slot in the replica",
        )

    def _finish(self) -> None:
        self.in_flight -= 1
        self.busy.finished()
        if self.in_flight == 0:
            self._idle.set()
        self.warms.wake()
