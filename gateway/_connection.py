"""The gateway's end of one replica connection.

One persistent stream per replica carries every call to it (see
``muxgate.replicas._protocol``). A ``ReplicaConnection`` multiplexes many
concurrent calls over that stream: each call gets an id, and one reader task
resolves the pending call named by each reply.

Writing never awaits in the caller (``gateway._frame_writer``): a frame is
written at once, or queued behind an awaiting write under way; so a
cancelled caller's frame is either still queued (it is taken back) or
written whole (a ``Cancel`` follows).

Cancellation: a caller that gives up on a call (cancelled by a client
disconnect, a gateway-side deadline, its own caller) removes its frame if it
was still queued; if the frame was already written, a ``Cancel(id)`` frame
follows (written without awaiting, from the cancelled task), so the replica
stops the call and frees its slot instead of running it to its deadline.

Every ``Reply`` and ``Pong`` carries the replica's ``ReplicaState``; the
connection keeps the latest in ``state`` (and the latest counters in
``counters``) and hands it to the ``on_state`` callback, which the pool wires
to the router. The connection asks the replica (``Hello.push_state``) to
push its state the moment its residency changes: a ``StatePush`` answers no
call and resolves nothing, and its state goes the same way as a reply's, so
gateways sharing a replica see each other's loads a round trip after they
start, not at their own next reply. A replica of an earlier release does not
push; the connection works as before.

The connection and its handshake (and the channel's proofs) are
``gateway._handshake``.

Failure semantics (what the caller may retry):

* ``ReplicaUnavailableError``: the call was never written to the socket
  (connection already closed or draining). Safe to send elsewhere.
* ``ReplicaDiedError``: the call was written, and the connection dropped
  before its reply arrived. The replica may have run it; the gateway answers
  502.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

import anyio
import anyio.abc

from muxgate.gateway._frame_writer import FrameWriter
from muxgate.gateway._handshake import (
    HandshakeError,
    ReplicaConnectionError,
    connect_stream,
    handshake,
)
from muxgate.replicas.contract import (
    Call,
    Cancel,
    ChannelAuth,
    Drain,
    Drained,
    FrameDecoder,
    HttpRequest,
    Message,
    ModelControl,
    Ping,
    Pong,
    ProtocolError,
    ReplicaState,
    Reply,
    StatePush,
    Welcome,
    encode_frame,
)

__all__ = [
    "HandshakeError",
    "ReplicaConnection",
    "ReplicaConnectionError",
    "ReplicaDiedError",
    "ReplicaUnavailableError",
    "connect_stream",
]

_log = logging.getLogger("muxgate.gateway.connection")

_READ_SIZE = 1 << 16


class ReplicaUnavailableError(ReplicaConnectionError):
    """The call was not sent: the connection is closed, closing or draining.

    The replica never saw the call, so it is safe to route it elsewhere.
    """


class ReplicaDiedError(ReplicaConnectionError):
    """The connection dropped after the call was sent and before its reply.

    The replica may or may not have run the call; the gateway answers 502.
    """


class ReplicaConnection:
    """A handshaken connection to one replica; create it with :meth:`connect`.

    Attributes:
        address: where the replica listens.
        deployment, replica_id, pid: what the replica said in ``Welcome``.
        options: the class's ``@deployment`` options, from ``Welcome``.
        state: the latest ``ReplicaState`` the replica reported (in a
            reply, a pong or a push).
        pushes: ``StatePush`` frames received.
        counters: the latest cumulative counters (from ``Pong``).
        closed: set once the connection is gone, for whatever reason.
        close_reason: why it closed (``None`` while open).
        lost_models: model ids of the calls that were sent and unanswered
            when the connection dropped (what the replica was running when
            it died; one entry per call).
    """

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        welcome: Welcome,
        *,
        address: str,
        decoder: FrameDecoder,
        on_state: Callable[[ReplicaState], None] | None = None,
    ) -> None:
        # Use connect(); the constructor only wires an already handshaken stream.
        self.address = address
        self.deployment = welcome.deployment
        self.replica_id = welcome.replica_id
        self.pid = welcome.pid
        self.version = welcome.version
        self.options = welcome.options
        self.state: ReplicaState = welcome.state
        self.pushes = 0
        self.counters: dict[str, float] = {}
        self.on_state = on_state
        self.closed = anyio.Event()
        self.close_reason: str | None = None
        self._stream = stream
        self._decoder = decoder
        self._ids = itertools.count(1)
        # id -> future of the reply; an entry exists from just before the
        # frame is written until the reply arrives or the caller gives up.
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        # id -> model id of each pending call (for ``lost_models``)
        self._models: dict[int, str] = {}
        self.lost_models: list[str] = []
        self._pongs: deque[asyncio.Future[Pong]] = deque()
        self._drained: asyncio.Future[Drained] | None = None
        self._draining = False
        self._writer = FrameWriter(stream, self._shutdown)
        self._reader: asyncio.Task[None] | None = None
        self.cancels_sent = 0
        #: calls (not model controls) that left the connection: answered,
        #: abandoned or failed; ``calls_end`` waits on it
        self.calls_ended = 0
        self._call_ended: asyncio.Event | None = None

    # -- life cycle ---------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        address: str,
        *,
        on_state: Callable[[ReplicaState], None] | None = None,
        connect_timeout: float = 10.0,
        auth: ChannelAuth | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        push_state: bool = True,
    ) -> ReplicaConnection:
        """Connect to the replica at ``address`` and do the handshake.

        Args:
            address: ``unix:/path`` or ``tcp:host:port``, as the launcher reports.
            on_state: called (synchronously, on the event loop) with every
                ``ReplicaState`` the replica reports; must not raise or block.
            connect_timeout: seconds allowed for connecting plus the handshake.
            auth: the cluster secret: prove it to the replica, and require
                the replica's proof (see ``muxgate.replicas._channel``).
            ssl_context: connect over TLS with this context.
            server_hostname: the name the replica's certificate must hold
                (default: the address's host).
            push_state: ask the replica to push its state whenever its
                residency changes (``StatePush``); False: only replies and
                pongs carry it, as with a replica of an earlier release.

        Raises:
            HandshakeError: refused, wrong version, a failed proof either
                way, or no proper answer.
            OSError: nothing listens at ``address``.
            ssl.SSLError: the TLS handshake failed (e.g. an untrusted certificate).
        """
        stream, decoder, welcome, rest = await handshake(
            address,
            connect_timeout=connect_timeout,
            auth=auth,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
            push_state=push_state,
        )
        conn = cls(stream, welcome, address=address, decoder=decoder, on_state=on_state)
        for message in rest:  # a push right behind Welcome
            conn._dispatch(message)
        # The reader outlives the caller's scope (the pool keeps the
        # connection for the replica's lifetime), so it is a plain task
        # owned by the connection and cancelled by aclose().
        conn._reader = asyncio.get_running_loop().create_task(
            conn._read_loop(), name=f"muxgate-replica-reader-{welcome.replica_id}"
        )
        return conn

    async def aclose(self) -> None:
        """Close the connection; pending calls raise ``ReplicaDiedError``.

        The replica treats the close as its gateway going away and exits.
        """
        self._shutdown("closed by gateway")
        await anyio.aclose_forcefully(self._stream)
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def __aenter__(self) -> ReplicaConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- calls --------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Calls sent on this connection and not yet answered."""
        return len(self._pending)

    @property
    def unanswered_calls(self) -> int:
        """``Call``s (not model controls) sent and not yet answered, nor given
        up on; exact at the moment a reply or pong is handed to ``on_state``
        (the replica's own count of its calls includes them, less those still
        on their way)."""
        return len(self._models)

    async def call(
        self,
        *,
        request_id: str,
        model_id: str = "",
        timeout_s: float | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
        http: HttpRequest | None = None,
        method: str = "__call__",
        args: bytes = b"",
        kwargs: bytes = b"",
    ) -> Reply:
        """Run one call on the replica and return its ``Reply``.

        The arguments are the fields of ``Call`` (the id is chosen here). A
        failure of the user's code is a ``Reply`` with ``error`` set, not an
        exception. Cancelling the caller abandons the call: its reply, if it
        comes, is dropped, and the replica is told to cancel it (``Cancel``).

        Raises:
            ReplicaUnavailableError: not sent (closed or draining); reroute.
            ReplicaDiedError: sent, and the connection dropped before the reply.
        """
        call = Call(
            id=self._next_call_id(),
            request_id=request_id,
            model_id=model_id,
            timeout_s=timeout_s,
            traceparent=traceparent,
            tracestate=tracestate,
            http=http,
            method=method,
            args=args,
            kwargs=kwargs,
        )
        return await self._round_trip(call, model_id)

    async def control(
        self,
        action: Literal["load", "warm", "unload"],
        model_id: str,
        *,
        pin: bool = False,
        loader: str | None = None,
        timeout_s: float | None = None,
        after_calls: bool = False,
        after_slot: bool = False,
        may_evict: Sequence[str] = (),
    ) -> Reply:
        """Load, warm or unload one model outside any call (``ModelControl``).

        The ``Reply`` has the replica's JSON account in ``body``, or ``error``.
        Not counted among the calls of ``lost_models`` (the quarantine's
        evidence): nobody asked for the model.

        Raises:
            ReplicaUnavailableError, ReplicaDiedError: as ``call`` does.
        """
        control = ModelControl(
            id=self._next_call_id(),
            action=action,
            model_id=model_id,
            pin=pin,
            loader=loader or "",
            timeout_s=timeout_s,
            after_calls=after_calls,
            after_slot=after_slot,
            may_evict=list(may_evict),
        )
        return await self._round_trip(control, None)

    def _next_call_id(self) -> int:
        """A new call's id; raises unless the connection may take a call."""
        if self.close_reason is not None:
            raise ReplicaUnavailableError(
                f"replica {self.replica_id} connection closed: {self.close_reason}"
            )
        if self._draining:
            raise ReplicaUnavailableError(f"replica {self.replica_id} is draining")
        return next(self._ids)

    async def _round_trip(self, message: Call | ModelControl, model_id: str | None) -> Reply:
        """Send a call or a model control and wait for its ``Reply``
        (``model_id``: the model a call asks for, None for a control)."""
        call_id = message.id
        frame = encode_frame(message)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        if model_id is not None:
            self._models[call_id] = model_id
        try:
            await self._write(frame, call_id)
            return await future
        finally:
            self._pending.pop(call_id, None)
            self._models.pop(call_id, None)
            # No reply and no connection failure: the caller gave up (a
            # cancelled await cancels the future itself).
            if future.cancelled() or not future.done():
                future.cancel()
                self._abandon(call_id)
            if model_id is not None:
                self._count_call_end()

    def _count_call_end(self) -> None:
        self.calls_ended += 1
        ended, self._call_ended = self._call_ended, None
        if ended is not None:
            ended.set()

    async def calls_end(self, n: int) -> None:
        """Wait until ``n`` calls have ended on this connection (or it closed)."""
        while self.calls_ended < n and self.close_reason is None:
            if self._call_ended is None:
                self._call_ended = asyncio.Event()
            await self._call_ended.wait()

    def _abandon(self, call_id: int) -> None:
        """Forget a call the caller gave up on: unsend it if still queued,
        else tell the replica. Synchronous: it runs in a cancelled task."""
        if self.close_reason is not None:
            return  # the replica treats a closed connection as a cancel of everything
        if self._writer.take_back(call_id):
            return  # never reached the socket
        self.cancels_sent += 1
        self._writer.queue(encode_frame(Cancel(id=call_id)), 0)

    async def ping(self, *, events_after: int | None = None) -> Pong:
        """Ask for the replica's state and counters (also refreshes ``state``).

        With ``events_after``, the ``Pong`` also carries the replica's model
        events numbered above it (0: all it kept).

        Raises:
            ReplicaUnavailableError: the connection is closed.
            ReplicaDiedError: it dropped while waiting for the answer.

        Bound the wait with ``anyio.fail_after`` around the call.
        """
        if self.close_reason is not None:
            raise ReplicaUnavailableError(
                f"replica {self.replica_id} connection closed: {self.close_reason}"
            )
        future: asyncio.Future[Pong] = asyncio.get_running_loop().create_future()
        # Pongs come back in the order of the pings: a FIFO matches them.
        self._pongs.append(future)
        await self._write(encode_frame(Ping(events_after=events_after)))
        return await future

    async def drain(self, *, events_after: int | None = None, token: str | None = None) -> Drained:
        """Ask the replica to drain and wait until it reports ``Drained``.

        New calls on this connection raise ``ReplicaUnavailableError`` from
        now on; calls already sent finish normally. The replica unloads its
        models (reason ``drain``) and exits after answering. ``events_after``
        as in :meth:`ping` (for ``Drained.events``; the first call's counts).
        ``token``: the drain token of a fenced replica (``Drain.token``).

        Raises:
            ReplicaDiedError: the connection dropped before ``Drained``.

        Bound the wait with ``anyio.fail_after`` around the call; a cancelled
        wait can be resumed by calling ``drain()`` again.
        """
        if self._drained is None:
            self._draining = True
            self._drained = asyncio.get_running_loop().create_future()
            if self.close_reason is not None:
                raise ReplicaDiedError(
                    f"replica {self.replica_id} connection closed: {self.close_reason}"
                )
            await self._write(encode_frame(Drain(events_after=events_after, token=token)))
        return await asyncio.shield(self._drained)

    async def _write(self, frame: bytes, call_id: int = 0) -> None:
        """Queue one frame for writing (``FrameWriter.queue``); the caller
        learns of a failure through its pending future."""
        if self.close_reason is not None:
            raise ReplicaUnavailableError(
                f"replica {self.replica_id} connection closed: {self.close_reason}"
            )
        self._writer.queue(frame, call_id)

    # -- reading ------------------------------------------------------------

    async def _read_loop(self) -> None:
        reason = "replica closed the connection"
        try:
            while True:
                data = await self._stream.receive(_READ_SIZE)
                for message in self._decoder.feed(data):
                    self._dispatch(message)
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass
        except OSError as exc:
            reason = f"connection error: {exc!r}"
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
            _log.error("replica %s sent a bad frame, closing: %s", self.replica_id, exc)
        except Exception as exc:
            # Whatever the replica sends, only this connection may fail.
            reason = f"internal error: {exc!r}"
            _log.exception("closing the connection to replica %s", self.replica_id)
        except asyncio.CancelledError:
            reason = "closed by gateway"
            raise
        finally:
            self._shutdown(reason)
            with contextlib.suppress(Exception):
                await anyio.aclose_forcefully(self._stream)

    def _dispatch(self, message: Message) -> None:
        if isinstance(message, Reply):
            future = self._pending.get(message.id)
            # Answered: no longer among the calls the replica holds for us
            # (``unanswered_calls``), before the state is handed on.
            self._models.pop(message.id, None)
            self._set_state(message.state)
            if future is not None and not future.done():
                future.set_result(message)
        elif isinstance(message, StatePush):
            # Unasked: it answers no call and no ping, only the state moves.
            self.pushes += 1
            self._set_state(message.state)
        elif isinstance(message, Pong):
            self.counters = message.counters
            self._set_state(message.state)
            while self._pongs:
                pong = self._pongs.popleft()
                if not pong.done():
                    pong.set_result(message)
                    break
        elif isinstance(message, Drained):
            if message.counters:
                self.counters = message.counters
            if self._drained is not None and not self._drained.done():
                self._drained.set_result(message)
        else:
            _log.warning("replica %s sent unexpected %s", self.replica_id, type(message).__name__)

    def _set_state(self, state: ReplicaState) -> None:
        self.state = state
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:
                _log.exception("on_state callback failed for replica %s", self.replica_id)

    def _shutdown(self, reason: str) -> None:
        """Mark closed and fail everything waiting; idempotent."""
        if self.close_reason is not None:
            return
        self.close_reason = reason
        if self._call_ended is not None:
            self._call_ended.set()  # calls_end stops waiting
        died = f"replica {self.replica_id} ({self.address}) connection lost: {reason}"
        # Calls still queued behind the active write never reached the replica.
        unsent = self._writer.close()
        failed: list[asyncio.Future[Any]] = []
        for call_id, future in self._pending.items():
            if not future.done():
                if call_id in unsent:
                    future.set_exception(ReplicaUnavailableError(died))
                else:
                    future.set_exception(ReplicaDiedError(died))
                    self.lost_models.append(self._models.get(call_id, ""))
                failed.append(future)
        while self._pongs:
            pong = self._pongs.popleft()
            if not pong.done():
                pong.set_exception(ReplicaDiedError(died))
                failed.append(pong)
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ReplicaDiedError(died))
            failed.append(self._drained)
        for future in failed:
            # Marks the exception as seen: a waiter that gave up (or whose
            # own write raised first) must not leave an "exception was never
            # retrieved" log behind. Awaiting the future still raises.
            future.exception()
        self.closed.set()

    def __repr__(self) -> str:
        status = "open" if self.close_reason is None else f"closed ({self.close_reason})"
        if self._draining and self.close_reason is None:
            status = "draining"
        return (
            f"<ReplicaConnection {self.replica_id} {self.address} pid={self.pid} {status} "
            f"pending={len(self._pending)} cancels_sent={self.cancels_sent} "
            f"pushes={self.pushes} "
            f"in_flight={self.state.in_flight} "
            f"models={self.state.models} loading={self.state.loading}>"
        )
