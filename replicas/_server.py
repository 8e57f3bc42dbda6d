"""The replica process: runs one deployment instance and serves the gateway.

Started as ``python -m muxgate.replicas._server`` with a ``ReplicaSpec`` as
JSON, either ``--spec JSON`` or (what the launcher does) one line on stdin.
When the spec comes on stdin the pipe stays open: end-of-file on it means the
parent died, and the replica exits so no orphan is left behind.

Start-up: set the replica context, install logging, import the class
(``app_dir`` first on ``sys.path``), instantiate it in a worker thread (so a
slow ``__init__`` does not block signal handling), listen, then print exactly
one line on the original stdout: ``READY <address>`` or ``FAILED <reason>``
(exit 1). Everything user code prints goes to stderr, so the launcher never
has to tell a readiness line from noise.

Serving: see ``muxgate.replicas._protocol``. Each ``Call`` runs in its own
task inside a request scope and a ``muxgate.replica.handle`` span continued
from the caller's ``traceparent``, bounded by its ``timeout_s``.

Stopping (one path, three triggers):

* ``Drain`` message: reason ``drain``; in-flight calls finish, models are
  unloaded, ``Drained`` is sent, exit 0;
* SIGTERM/SIGINT: the same with reason ``shutdown`` (a second signal stops
  waiting for in-flight calls);
* the gateway's connection closes, or the parent dies: nobody can receive
  replies any more, so in-flight calls are cancelled, models unloaded with
  reason ``shutdown``, exit 0.

While stopping, new calls are answered with ``ErrorInfo("draining", 503)``.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import functools
import importlib
import inspect
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import anyio
import anyio.abc
import msgspec
from opentelemetry import trace

from muxgate.replicas._context import request_scope, set_replica_context
from muxgate.replicas._http import Request, encode_result
from muxgate.replicas._logging import install_replica_logging
from muxgate.replicas._multiplex import counters, model_caches, replica_state_snapshot
from muxgate.replicas._protocol import (
    PROTOCOL_VERSION,
    Call,
    Drain,
    Drained,
    ErrorInfo,
    FrameDecoder,
    Hello,
    Message,
    Ping,
    Pong,
    ProtocolError,
    Refused,
    ReplicaState,
    Reply,
    Welcome,
    encode_frame,
)
from muxgate.replicas._tracing import (
    configure_tracing,
    extract_context,
    shutdown_tracing,
    tracing_active,
)

__all__ = ["Replica", "ReplicaSpec", "TracingSettings", "main"]

_log = logging.getLogger("muxgate.replica")
_tracer = trace.get_tracer("muxgate")

_READ_SIZE = 1 << 16
#: Seconds a new connection has to send ``Hello``.
_HANDSHAKE_TIMEOUT = 10.0
#: Seconds the gateway gets to close its end after the replica stopped.
_CLOSE_GRACE_S = 5.0
#: Seconds between checks that the parent process is still alive (fallback
#: for when the spec did not come on a stdin pipe).
_PARENT_POLL_S = 1.0


class TracingSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Span export of a replica; None fields fall back to the ``OTEL_*``
    environment (see ``muxgate.replicas._tracing.configure_tracing``)."""

    exporter: str | None = None  # "otlp" | "console" | "none"
    endpoint: str | None = None
    service_name: str | None = None


class ReplicaSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything a replica process needs to start; built by the gateway.

    Attributes:
        deployment: deployment name (logs, spans, ``Welcome``).
        import_path: ``"module:Class"`` of the deployment class.
        replica_id: unique id of this replica within its deployment.
        init_kwargs: keyword arguments for the class's ``__init__``.
        app_dir: folder put first on ``sys.path`` before importing.
        listen: ``"unix:/path"`` or ``"tcp:127.0.0.1:0"`` (port 0: any free port).
        max_ongoing_requests: concurrency bound for sync ``__call__`` worker threads.
        log_level: level of the root logger in the replica.
        graceful_shutdown_timeout_s: how long a drain or SIGTERM waits for
            in-flight calls before cancelling them.
        event_loop: ``"auto"`` (uvloop when installed), ``"uvloop"`` or ``"asyncio"``.
        tracing: span export settings; None: the ``OTEL_*`` environment only.
        storage: fsspec storage options per protocol (the config's
            ``storage:`` section), handed to ``configure_storage``.
    """

    deployment: str
    import_path: str
    replica_id: str
    init_kwargs: dict[str, Any] = {}
    app_dir: str | None = None
    listen: str = "tcp:127.0.0.1:0"
    max_ongoing_requests: int = 8
    log_level: str = "INFO"
    graceful_shutdown_timeout_s: float = 20.0
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    tracing: TracingSettings | None = None
    storage: dict[str, dict[str, Any]] = {}


# -- calls -----------------------------------------------------------------


class _CallFailed(Exception):
    """Internal: a call ends with this ``ErrorInfo`` instead of a result."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


def _error_for(exc: BaseException) -> ErrorInfo:
    """Map an exception raised by user code to what the gateway gets."""
    message = f"{type(exc).__name__}: {exc}"
    # muxgate.backends is optional here (and must not be imported eagerly):
    # match its not-found error by name anywhere in the class hierarchy.
    if any(cls.__name__ == "ModelNotFoundError" for cls in type(exc).__mro__):
        return ErrorInfo(code="model_not_found", message=message, status=404)
    return ErrorInfo(code="user_error", message=message, status=500)


def _one_line(text: str, limit: int = 2000) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class _Connection:
    """One accepted gateway connection.

    Frames are coalesced: a sender that finds another send under way only
    queues its frame, and the active sender writes everything queued in one
    go. Under load this turns many small writes into a few large ones; alone,
    a frame is written at once.
    """

    __slots__ = ("_out", "_sending", "_written", "broken", "peer", "stream", "welcomed")

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.welcomed = False
        self.broken = False
        self._out: list[bytes] = []
        self._sending = False
        self._written = anyio.Event()  # set while nothing waits to be written
        self._written.set()
        try:
            self.peer = str(stream.extra(anyio.abc.SocketAttribute.remote_address))
        except Exception:
            self.peer = "?"

    async def send(self, message: Message) -> bool:
        """Queue one frame and write it (with any others queued meanwhile);
        False when the peer is gone (the caller moves on)."""
        if self.broken:
            return False
        self._out.append(encode_frame(message))
        if self._sending:
            return True  # the active sender writes it
        self._sending = True
        self._written = anyio.Event()
        try:
            # Shielded so a cancelled call task never leaves half a frame.
            with anyio.CancelScope(shield=True):
                while self._out:
                    data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
                    self._out.clear()
                    await self.stream.send(data)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.broken = True
            self._out.clear()
            return False
        finally:
            self._sending = False
            self._written.set()
        return True

    async def finish(self) -> None:
        """Write what is queued, then half-close: the gateway reads every
        reply, sees end-of-stream, and closes its end."""
        await self._written.wait()
        with contextlib.suppress(Exception):
            await self.stream.send_eof()


class Replica:
    """The serving state of this process: the instance, calls in flight,
    connections, and the stop request."""

    def __init__(self, spec: ReplicaSpec, instance: Any) -> None:
        self.spec = spec
        self.instance = instance
        self.in_flight = 0
        self.stopping = False
        self.stop_requested = anyio.Event()
        self.stop_reason = "shutdown"
        self.stop_graceful = True
        self._idle = anyio.Event()
        self._idle.set()
        self._call_scopes: set[anyio.CancelScope] = set()
        self._connections: set[_Connection] = set()
        self._all_closed = anyio.Event()
        self._drain_requester: _Connection | None = None
        self._limiter = anyio.CapacityLimiter(max(1, spec.max_ongoing_requests))
        self._tg: anyio.abc.TaskGroup | None = None
        # method name -> coroutine function? (inspect is slow on the hot path)
        self._async_methods: dict[str, bool] = {}

    def __repr__(self) -> str:
        return (
            f"<Replica {self.spec.deployment}#{self.spec.replica_id} in_flight={self.in_flight} "
            f"connections={len(self._connections)} stopping={self.stopping}>"
        )

    # -- state ---------------------------------------------------------------

    def state(self) -> ReplicaState:
        models, loading = replica_state_snapshot()
        return ReplicaState(in_flight=self.in_flight, models=models, loading=loading)

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
        async with anyio.create_task_group() as tg:
            self._tg = tg
            accepting = anyio.CancelScope()
            tg.start_soon(self._accept_loop, listener, accepting)
            await self.stop_requested.wait()
            # No new connections while stopping.
            accepting.cancel()
            _log.info("Stopping (%s), %d call(s) in flight.", self.stop_reason, self.in_flight)
            if self.stop_graceful:
                with anyio.move_on_after(self.spec.graceful_shutdown_timeout_s):
                    await self._idle.wait()
            self._cancel_calls()
            with anyio.move_on_after(_CLOSE_GRACE_S):
                # Bounded: a reply stuck writing to a gateway that stopped
                # reading must not keep the process alive.
                await self._idle.wait()
            await self._unload_models()
            if self._drain_requester is not None:
                await self._drain_requester.send(Drained())
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

    async def _serve_connection(self, stream: anyio.abc.SocketStream) -> None:
        conn = _Connection(stream)
        decoder = FrameDecoder()
        try:
            async with stream:
                if not await self._handshake(conn, decoder):
                    return
                self._connections.add(conn)
                while True:
                    try:
                        data = await stream.receive(_READ_SIZE)
                    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        return
                    for message in decoder.feed(data):
                        self._dispatch(conn, message)
        except ProtocolError as exc:
            _log.error("Closing connection from the gateway: %s", exc)
        finally:
            self._connections.discard(conn)
            if conn.welcomed and not self._connections:
                self._all_closed.set()
                # The gateway is gone: nobody can receive replies any more.
                self.request_stop("gateway disconnected", graceful=False)

    async def _handshake(self, conn: _Connection, decoder: FrameDecoder) -> bool:
        messages: list[Message] = []
        with anyio.move_on_after(_HANDSHAKE_TIMEOUT):
            while not messages:
                try:
                    data = await conn.stream.receive(_READ_SIZE)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    return False
                messages = decoder.feed(data)
        if not messages:
            await conn.send(Refused(reason="no Hello within the handshake timeout"))
            return False
        hello, rest = messages[0], messages[1:]
        if not isinstance(hello, Hello):
            await conn.send(Refused(reason=f"expected Hello, got {type(hello).__name__}"))
            return False
        if hello.version != PROTOCOL_VERSION:
            await conn.send(
                Refused(
                    reason=f"protocol version {hello.version} not supported; "
                    f"this replica speaks {PROTOCOL_VERSION}"
                )
            )
            return False
        if self.stopping:
            await conn.send(Refused(reason=f"replica is stopping ({self.stop_reason})"))
            return False
        conn.welcomed = await conn.send(
            Welcome(
                version=PROTOCOL_VERSION,
                deployment=self.spec.deployment,
                replica_id=self.spec.replica_id,
                pid=os.getpid(),
                state=self.state(),
            )
        )
        for message in rest:
            self._dispatch(conn, message)
        return conn.welcomed

    def _dispatch(self, conn: _Connection, message: Message) -> None:
        assert self._tg is not None
        if isinstance(message, Call):
            self.in_flight += 1
            self._idle = anyio.Event() if self._idle.is_set() else self._idle
            # Decided here, in frame order: a Call that arrived before a Drain
            # runs even if its task starts after the Drain was handled.
            self._tg.start_soon(self._run_call, conn, message, self.stopping)
        elif isinstance(message, Ping):
            self._tg.start_soon(self._pong, conn)
        elif isinstance(message, Drain):
            if self._drain_requester is None:
                self._drain_requester = conn
            self.request_stop("drain", graceful=True)
        else:
            _log.warning("Ignoring unexpected %s from the gateway.", type(message).__name__)

    async def _pong(self, conn: _Connection) -> None:
        await conn.send(Pong(state=self.state(), counters=counters()))

    async def _run_call(self, conn: _Connection, call: Call, refuse: bool) -> None:
        scope = anyio.CancelScope()
        self._call_scopes.add(scope)
        reply: Reply | None = None
        finished = False
        try:
            with scope:
                if refuse:
                    error = ErrorInfo(
                        code="draining", message="replica is shutting down", status=503
                    )
                    outcome: tuple[int, list[tuple[str, str]], bytes] | ErrorInfo = error
                else:
                    outcome = await self._execute(call)
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
            if not finished:
                self._finish()
        if reply is not None:
            await conn.send(reply)

    def _finish(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def _execute(self, call: Call) -> tuple[int, list[tuple[str, str]], bytes] | ErrorInfo:
        with request_scope(call.request_id, call.model_id):
            if not tracing_active():
                # No exporter: skip the span machinery (a fifth of the
                # per-call cost) since nothing would record it.
                return await self._run_with_deadline(call, None)
            parent = (
                extract_context(call.traceparent, call.tracestate) if call.traceparent else None
            )
            with _tracer.start_as_current_span(
                "muxgate.replica.handle",
                context=parent,
                kind=trace.SpanKind.SERVER,
                attributes={
                    "muxgate.deployment": self.spec.deployment,
                    "muxgate.replica_id": self.spec.replica_id,
                    "muxgate.request_id": call.request_id,
                    "muxgate.model_id": call.model_id,
                    "muxgate.method": call.method if call.http is None else "__call__",
                },
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                outcome = await self._run_with_deadline(call, span)
                if isinstance(outcome, ErrorInfo):
                    span.set_attribute("muxgate.error_code", outcome.code)
                    span.set_status(trace.Status(trace.StatusCode.ERROR, outcome.code))
                else:
                    span.set_attribute("http.response.status_code", outcome[0])
                return outcome

    async def _run_with_deadline(
        self, call: Call, span: trace.Span | None
    ) -> tuple[int, list[tuple[str, str]], bytes] | ErrorInfo:
        timeout = call.timeout_s
        if timeout is None:
            return await self._run_guarded(call, span)
        if timeout <= 0:
            return ErrorInfo(code="deadline", message="deadline passed", status=504)
        with anyio.move_on_after(timeout):
            return await self._run_guarded(call, span)
        # Only reached when the deadline cancelled the call.
        return ErrorInfo(
            code="deadline",
            message=f"deadline of {timeout:.3f}s passed in the replica",
            status=504,
        )

    async def _run_guarded(
        self, call: Call, span: trace.Span | None
    ) -> tuple[int, list[tuple[str, str]], bytes] | ErrorInfo:
        try:
            return await self._invoke_call(call)
        except _CallFailed as failed:
            return failed.error
        except (Exception, SystemExit) as exc:
            # SystemExit too: a handler calling sys.exit() fails its
            # request, not the replica.
            error = _error_for(exc)
            if error.code == "model_not_found":
                _log.warning("%s", error.message)
            else:
                _log.exception("Request %s failed.", call.request_id)
            if span is not None:
                span.record_exception(exc)
            return error

    async def _invoke_call(self, call: Call) -> tuple[int, list[tuple[str, str]], bytes]:
        if call.http is not None:
            target = self._target("__call__")
            result = await self._invoke("__call__", target, (Request.from_wire(call.http),), {})
            encoded: tuple[int, list[tuple[str, str]], bytes] = encode_result(result)
            return encoded
        target = self._target(call.method)
        try:
            args = msgspec.msgpack.decode(call.args) if call.args else []
            kwargs = msgspec.msgpack.decode(call.kwargs) if call.kwargs else {}
        except msgspec.DecodeError as exc:
            raise _CallFailed(
                ErrorInfo("bad_request", f"undecodable arguments: {exc}", 400)
            ) from exc
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise _CallFailed(ErrorInfo("bad_request", "args must be a list, kwargs a map", 400))
        result = await self._invoke(call.method, target, tuple(args), kwargs)
        return 200, [], msgspec.msgpack.encode(result)

    def _target(self, name: str) -> Callable[..., Any]:
        # Only public methods and __call__ are reachable from the wire.
        if name != "__call__" and (not name or name.startswith("_")):
            raise _CallFailed(ErrorInfo("bad_request", f"method {name!r} is not callable", 400))
        target = getattr(self.instance, name, None)
        if not callable(target):
            raise _CallFailed(
                ErrorInfo("bad_request", f"{self.spec.deployment} has no method {name!r}", 400)
            )
        return target  # type: ignore[no-any-return]

    async def _invoke(
        self, name: str, target: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        is_async = self._async_methods.get(name)
        if is_async is None:
            is_async = self._async_methods[name] = _is_async(target)
        if is_async:
            return await target(*args, **kwargs)
        # Sync user code runs in a worker thread with this request's context
        # (request scope, span) so get_multiplexed_model_id() and logging work.
        ctx = contextvars.copy_context()
        result = await anyio.to_thread.run_sync(
            ctx.run,
            functools.partial(target, *args, **kwargs),
            abandon_on_cancel=True,
            limiter=self._limiter,
        )
        if inspect.isawaitable(result):
            result = await result
        return result


def _is_async(target: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(target):
        return True
    call = getattr(target, "__call__", None)  # noqa: B004 - callable objects
    return call is not None and inspect.iscoroutinefunction(call)


# -- start-up ----------------------------------------------------------------


def _import_class(spec: ReplicaSpec) -> Any:
    if spec.app_dir and spec.app_dir not in sys.path:
        sys.path.insert(0, spec.app_dir)
    module_name, sep, attr = spec.import_path.partition(":")
    if not sep:
        module_name, _, attr = spec.import_path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"import_path {spec.import_path!r} is not 'module:Class'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise TypeError(f"{spec.import_path} is not a class")
    return obj


async def _race_stop(
    replica_stop: anyio.Event, fn: Callable[[], Awaitable[Any]]
) -> tuple[bool, Any]:
    """Run ``fn`` unless a stop is requested first; (finished, result).

    An exception of ``fn`` is re-raised as itself (not in a group)."""
    result: list[Any] = []
    failure: list[Exception] = []

    async with anyio.create_task_group() as tg:

        async def run() -> None:
            try:
                result.append(await fn())
            except Exception as exc:
                failure.append(exc)
            tg.cancel_scope.cancel()

        async def wait_stop() -> None:
            await replica_stop.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(run)
        tg.start_soon(wait_stop)
    if failure:
        raise failure[0]
    return (True, result[0]) if result else (False, None)


async def _listen(address: str) -> tuple[anyio.abc.Listener[anyio.abc.SocketStream], str]:
    scheme, _, rest = address.partition(":")
    if scheme == "unix" and rest:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(rest)
        unix = await anyio.create_unix_listener(rest)
        return unix, f"unix:{rest}"
    if scheme == "tcp" and rest:
        host, _, port = rest.rpartition(":")
        tcp = await anyio.create_tcp_listener(local_host=host or "127.0.0.1", local_port=int(port))
        sockname = tcp.extra(anyio.abc.SocketAttribute.local_address)
        return tcp, f"tcp:{sockname[0]}:{sockname[1]}"
    raise ValueError(f"listen address {address!r} is not 'unix:/path' or 'tcp:host:port'")


async def _watch_signals(replica_stop: Callable[[str, bool], None]) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        count = 0
        async for signum in signals:
            count += 1
            _log.info("Received %s.", signal.Signals(signum).name)
            replica_stop("shutdown", count == 1)


async def _watch_stdin(replica_stop: Callable[[str, bool], None]) -> None:
    """End-of-file on the stdin pipe means the parent (gateway) died."""
    fd = sys.stdin.fileno()
    os.set_blocking(fd, False)
    while True:
        await anyio.wait_readable(fd)
        try:
            if not os.read(fd, 4096):
                break
        except BlockingIOError:
            continue
        except OSError:
            break
    _log.warning("Parent process went away (stdin closed); shutting down.")
    replica_stop("parent died", False)


async def _watch_parent(replica_stop: Callable[[str, bool], None]) -> None:
    parent = os.getppid()
    # Polling is the fallback when there is no stdin pipe: the OS offers no
    # portable event for "my parent exited".
    while os.getppid() == parent:  # noqa: ASYNC110
        await anyio.sleep(_PARENT_POLL_S)
    _log.warning("Parent process %d went away; shutting down.", parent)
    replica_stop("parent died", False)


class _Starter:
    """Holds what ``_amain`` needs before a ``Replica`` exists."""

    def __init__(self) -> None:
        self.stop = anyio.Event()
        self.replica: Replica | None = None
        self.reason = "shutdown"
        self.graceful = True

    def request_stop(self, reason: str, graceful: bool) -> None:
        if self.replica is not None:
            self.replica.request_stop(reason, graceful=graceful)
        else:
            self.reason, self.graceful = reason, graceful
        self.stop.set()


async def _amain(spec: ReplicaSpec, ready_fd: int, watch_stdin: bool) -> int:
    starter = _Starter()

    def announce(line: str) -> None:
        os.write(ready_fd, (line + "\n").encode())
        os.close(ready_fd)

    async with anyio.create_task_group() as watchers:
        watchers.start_soon(_watch_signals, starter.request_stop)
        watchers.start_soon(_watch_parent, starter.request_stop)
        if watch_stdin:
            watchers.start_soon(_watch_stdin, starter.request_stop)

        def instantiate() -> Any:
            cls = _import_class(spec)
            return cls(**spec.init_kwargs)

        try:
            done, instance = await _race_stop(
                starter.stop,
                lambda: anyio.to_thread.run_sync(instantiate, abandon_on_cancel=True),
            )
        except Exception as exc:
            _log.exception("Starting %s failed.", spec.import_path)
            announce(f"FAILED {_one_line(f'{type(exc).__name__}: {exc}')}")
            watchers.cancel_scope.cancel()
            return 1
        if not done:
            announce(f"FAILED stopped during start-up ({starter.reason})")
            watchers.cancel_scope.cancel()
            return 1
        try:
            listener, address = await _listen(spec.listen)
        except (OSError, ValueError) as exc:
            announce(f"FAILED cannot listen on {spec.listen}: {_one_line(str(exc))}")
            watchers.cancel_scope.cancel()
            return 1
        replica = Replica(spec, instance)
        starter.replica = replica
        announce(f"READY {address}")
        _log.info("Replica ready at %s.", address)
        try:
            await replica.serve(listener)
        finally:
            if address.startswith("unix:"):
                with contextlib.suppress(OSError):
                    os.unlink(address[len("unix:") :])
        watchers.cancel_scope.cancel()
    _log.info("Replica stopped (%s).", replica.stop_reason)
    return 0


def _parse_args(argv: list[str] | None) -> tuple[ReplicaSpec, bool]:
    parser = argparse.ArgumentParser(prog="python -m muxgate.replicas._server")
    parser.add_argument(
        "--spec", default="-", help="ReplicaSpec as JSON, or '-' to read one line from stdin"
    )
    ns = parser.parse_args(argv)
    from_stdin = ns.spec == "-"
    raw = sys.stdin.buffer.readline() if from_stdin else ns.spec.encode()
    return msgspec.json.decode(raw, type=ReplicaSpec), from_stdin


def _use_uvloop(choice: str) -> bool:
    if choice == "asyncio":
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            raise
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m muxgate.replicas._server``."""
    # The readiness line goes to the original stdout; everything else that
    # writes to fd 1 (user prints, libraries) is sent to stderr instead.
    ready_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        spec, from_stdin = _parse_args(argv)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        os.write(ready_fd, f"FAILED invalid spec: {_one_line(str(exc))}\n".encode())
        return 2
    set_replica_context(spec.deployment, spec.replica_id)
    install_replica_logging(spec.log_level)
    if spec.storage:
        # Imported only when used: a deployment need not touch storage.
        from muxgate.backends._config import configure_storage

        configure_storage(spec.storage)
    tracing = spec.tracing or TracingSettings()
    try:
        configure_tracing(
            tracing.exporter,
            tracing.endpoint,
            tracing.service_name or "muxgate-replica",
            resource_attributes={
                "muxgate.deployment": spec.deployment,
                "muxgate.replica_id": spec.replica_id,
            },
        )
    except ValueError as exc:
        os.write(ready_fd, f"FAILED invalid tracing settings: {_one_line(str(exc))}\n".encode())
        return 2
    try:
        code: int = anyio.run(
            _amain,
            spec,
            ready_fd,
            from_stdin,
            backend="asyncio",
            backend_options={"use_uvloop": _use_uvloop(spec.event_loop)},
        )
    finally:
        # Flush batched spans (model unloads happen last) before exiting.
        shutdown_tracing()
    return code


if __name__ == "__main__":
    exit_code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Hard exit: a user thread still running (an abandoned sync call) must
    # not keep the process alive after it has stopped serving.
    os._exit(exit_code)
