"""The gateway's one HTTP front end, shared by the model ingress and the handle endpoint.

Both ``Ingress`` (``_app``: any path under a deployment's route prefix) and
``HandleIngress`` (``_handles``: ``POST /-/handles/{deployment}/{method}``)
are raw ASGI handlers built on ``FrontEnd``, which does per request, once:

* one pass over the raw headers (``read_head``): the model id, request id,
  trace context, content length and the few headers an endpoint needs;
* the SERVER span (``server_span``), current while the request is dispatched;
* the model id check, the body read under ``max_body_bytes``;
* the dispatch, cancelled when the client disconnects (``_disconnect``);
* errors of any kind as the JSON error document (``_errors.error_response``),
  metrics and the span's end.

A subclass says only what differs: which deployment a request goes to and
whether it may (``_resolve``), what the replica is asked to do
(``_call_args``) and how the reply is sent back (``_reply``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar, TypedDict, Unpack

from opentelemetry import context as otel_context
from opentelemetry import trace

from muxgate.gateway._disconnect import (
    CLIENT_CLOSED_REQUEST,
    ClientDisconnected,
    until_disconnect,
)
from muxgate.gateway._dispatch import Dispatcher, validate_model_id
from muxgate.gateway._errors import (
    BadModelIdError,
    GatewayError,
    OverCapacityError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ShuttingDownError,
    error_response,
)
from muxgate.gateway._metrics import GatewayMetrics
from muxgate.replicas.contract import Reply, extract_context, inject_traceparent, tracing_active

__all__ = [
    "LOCAL_CLIENTS",
    "REQUEST_ID",
    "BodyBudget",
    "FrontEnd",
    "FrontEndOptions",
    "Message",
    "Receive",
    "RequestHead",
    "Scope",
    "Send",
    "ServerSpan",
    "Shutdown",
    "Target",
    "bearer_matches",
    "is_local_client",
    "model_id_of",
    "new_request_id",
    "read_head",
    "send_error",
    "server_span",
]

# Plain ASGI types: Litestar's TypedDicts are stricter than a raw handler needs.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Header = tuple[bytes, bytes]

_log = logging.getLogger("muxgate.gateway.app")
_tracer = trace.get_tracer("muxgate")

MODEL_HEADERS = (b"serve_multiplexed_model_id", b"serve-multiplexed-model-id")
#: an incoming ``x-request-id`` is kept only when it matches this
REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_TRACEPARENT = re.compile(rb"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
#: client addresses the admin endpoints answer without a token (the common
#: ones; ``is_local_client`` also knows the rest of 127.0.0.0/8 and
#: IPv4-mapped loopback addresses)
LOCAL_CLIENTS = frozenset({"127.0.0.1", "::1", "localhost"})


def bearer_matches(given: bytes, expected: bytes) -> bool:
    """Whether the ``Authorization`` value ``given`` is ``expected``
    (``Bearer <token>``), the scheme's case aside: RFC 9110 (11.1) makes
    schemes case-insensitive, and ``bearer <token>`` was refused. The
    token is compared in constant time."""
    scheme, _, token = given.partition(b" ")
    want_scheme, _, want = expected.partition(b" ")
    same_scheme = scheme.lower() == want_scheme.lower()
    return hmac.compare_digest(token.lstrip(b" "), want) and same_scheme


def is_local_client(host: str | None) -> bool:
    """Whether a client at ``host`` is on this machine (a loopback address).

    A gateway bound to ``0.0.0.0`` sees loopback clients as any 127.x.y.z
    address, and one bound to ``::`` sees them as ``::ffff:127.0.0.1``.
    """
    if host is None:
        return False
    if host in LOCAL_CLIENTS:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def new_request_id() -> str:
    """A fresh request id (24 hex digits)."""
    return os.urandom(12).hex()


# -- the request head ---------------------------------------------------------------


class RequestHead:
    """What the front end reads from a request's headers, in one pass."""

    __slots__ = (
        "auth",
        "chunked",
        "content_length",
        "headers",
        "model_conflict",
        "model_name",
        "model_raw",
        "request_id",
        "timeout_s",
        "traceparent",
        "tracestate",
    )

    def __init__(self) -> None:
        self.request_id = ""
        self.model_raw: bytes | None = None
        self.model_name = b""
        #: the first two model-id headers that disagree: ((name, value), (name, value))
        self.model_conflict: tuple[Header, Header] | None = None
        self.traceparent: str | None = None
        self.tracestate: str | None = None
        self.auth = b""
        #: ``x-muxgate-timeout-s``: how long the caller waits (handle calls)
        self.timeout_s: float | None = None
        self.content_length = -1
        #: a transfer-encoding header: a body of unknown length follows
        self.chunked = False
        #: every header, names lower-cased (only when asked to keep them)
        self.headers: list[tuple[str, str]] = []


def read_head(raw_headers: list[Header], *, keep: bool) -> RequestHead:
    """Parse ``scope["headers"]`` once; ``keep``: also collect them as strings."""
    head = RequestHead()
    headers = head.headers
    for name, value in raw_headers:
        lname = name.lower()
        if lname in MODEL_HEADERS:
            if head.model_raw is not None and value != head.model_raw:
                if head.model_conflict is None:
                    head.model_conflict = ((head.model_name, head.model_raw), (lname, value))
            else:
                head.model_raw = value
                head.model_name = lname
        elif lname == b"x-request-id":
            if REQUEST_ID.fullmatch(value) is not None:
                head.request_id = value.decode()
        elif lname == b"traceparent":
            if _TRACEPARENT.fullmatch(value) is not None:
                head.traceparent = value.decode()
        elif lname == b"tracestate":
            head.tracestate = value.decode("latin-1")
        elif lname == b"content-length":
            try:
                head.content_length = int(value)
            except ValueError:
                head.content_length = -1
        elif lname == b"transfer-encoding":
            head.chunked = True
        elif lname == b"authorization":
            head.auth = value
        elif lname == b"x-muxgate-timeout-s":
            with contextlib.suppress(ValueError):
                head.timeout_s = float(value)
        if keep:
            headers.append((lname.decode("latin-1"), value.decode("latin-1")))
    return head


def model_id_of(head: RequestHead) -> str:
    """The request's model id ("" without the header).

    Raises:
        BadModelIdError: the id is malformed, or two model-id headers (the
            two spellings, or one repeated) disagree: a proxy that checks one
            of them must not be bypassed by the other.
    """
    if head.model_conflict is not None:
        (name1, value1), (name2, value2) = head.model_conflict
        raise BadModelIdError(
            "conflicting model id headers: "
            f"{_shown(name1)}: {_shown(value1)!r} and {_shown(name2)}: {_shown(value2)!r}"
        )
    if head.model_raw is None:
        return ""
    return validate_model_id(head.model_raw)


def _shown(raw: bytes, limit: int = 64) -> str:
    text = raw.decode("latin-1")
    return text if len(text) <= limit else text[:limit] + "..."


# -- the server span -----------------------------------------------------------------


class ServerSpan:
    """The SERVER span of one request, current while the request is dispatched.

    Created only when tracing is active (see ``server_span``); ``attach``
    makes it the current span so the dispatcher's ``muxgate.route`` span
    becomes its child, and ``traceparent()`` is what the call carries to the
    replica.
    """

    __slots__ = ("_token", "span")

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self._token: object | None = None

    def attach(self) -> None:
        self._token = otel_context.attach(trace.set_span_in_context(self.span))

    def traceparent(self) -> tuple[str | None, str | None]:
        return inject_traceparent(trace.set_span_in_context(self.span))

    def finish(self, status: int, replica_id: str, model_id: str) -> None:
        span = self.span
        if span.is_recording():
            span.set_attribute("http.response.status_code", status)
            if model_id:
                span.set_attribute("muxgate.model_id", model_id)
            if replica_id:
                span.set_attribute("muxgate.replica_id", replica_id)
            if status >= 500:
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(status)))
        span.end()
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._token = None


def server_span(
    name: str,
    *,
    method: str,
    path: str,
    deployment: str,
    traceparent: str | None,
    tracestate: str | None,
) -> ServerSpan | None:
    """Start the SERVER span ``name`` (e.g. ``"POST /api"``) continuing the
    incoming ``traceparent``; None when tracing is off (nothing to record)."""
    if not tracing_active():
        return None
    parent = extract_context(traceparent, tracestate) if traceparent else None
    span = _tracer.start_span(
        name,
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes={
            "http.request.method": method,
            "url.path": path,
            "muxgate.deployment": deployment,
        },
    )
    return ServerSpan(span)


# -- sending ----------------------------------------------------------------------


async def send_error(send: Send, exc: BaseException, request_id: str, replica_id: str) -> int:
    """Answer ``exc`` as the JSON error document; return the status sent."""
    status: int
    status, headers, body = error_response(exc, request_id)
    headers.append((b"content-length", str(len(body)).encode()))
    headers.append((b"x-request-id", request_id.encode()))
    headers.append((b"x-muxgate-replica", replica_id.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return status


class _TooLarge(Exception):
    pass


# -- the front end ----------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Target:
    """Where ``FrontEnd._resolve`` sends a request.

    Attributes:
        name: the deployment (the metrics label); ``""`` when none matched,
            and then the request is not counted.
        dispatcher: the deployment's dispatcher (None when none matched).
        path: the path the span reports.
        span_name: the SERVER span's name.
        refusal: raised before anything else when set (no route, not allowed).
        extra: what the endpoint needs later (the path below the prefix, the
            method name of a handle call).
    """

    name: str
    dispatcher: Dispatcher | None
    _: KW_ONLY
    path: str
    span_name: str = ""
    refusal: GatewayError | None = None
    extra: str = ""


class Shutdown:
    """The front ends' part in a graceful shutdown, shared by the endpoints
    of one server.

    ``begin()``: requests that arrive from now on are answered 503
    ``shutting_down`` (the server has stopped accepting connections; this is
    for requests still coming on open ones). ``cut_off()``: the grace period
    is over; every request still in flight is cancelled (and with it its call
    in the replica) and answered 503 ``shutting_down`` with ``Retry-After``
    and ``connection: close``, in the JSON error contract.
    """

    __slots__ = ("cut", "draining", "in_flight")

    def __init__(self) -> None:
        self.draining = False
        self.cut = False
        #: the tasks of requests not yet answered
        self.in_flight: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        state = "cut" if self.cut else "draining" if self.draining else "serving"
        return f"<Shutdown {state} in_flight={len(self.in_flight)}>"

    def begin(self) -> None:
        self.draining = True

    def cut_off(self) -> int:
        """Cancel the requests in flight (they answer 503); return how many."""
        self.draining = self.cut = True
        tasks = list(self.in_flight)
        for task in tasks:
            task.cancel()
        return len(tasks)


class BodyBudget:
    """The bytes of request bodies the gateway holds at once, shared by the
    endpoints of one server (``http.limits.max_body_bytes_in_flight``).

    Every body is held whole until its request ends (it is sent to a
    replica in one message, and again if the request is routed again), so
    without a bound a thousand connections each sending a body just under
    ``max_body_bytes`` made the gateway hold ten gigabytes. Counted as the
    bytes arrive, not as ``content-length`` announces them: a client that
    announces a body and sends nothing holds none of it."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def __repr__(self) -> str:
        return f"<BodyBudget {self.held}/{self.limit}>"

    def take(self, n: int) -> bool:
        """Hold ``n`` more bytes, if they fit."""
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


class FrontEndOptions(TypedDict, total=False):
    """``FrontEnd``'s optional settings, passed on as they are by its subclasses."""

    metrics: GatewayMetrics | None
    body_timeout_s: float | None
    shutdown: Shutdown | None
    body_budget: BodyBudget | None


class _Exchange:
    """One request's state, for the metrics and the span at its end."""

    __slots__ = (
        "body_held",
        "model_id",
        "replica_id",
        "request_id",
        "responded",
        "span",
        "status",
        "task",
    )

    def __init__(self, request_id: str, task: asyncio.Task[Any] | None) -> None:
        self.request_id = request_id
        self.task = task
        self.body_held = 0  # bytes of the body held in the BodyBudget
        self.model_id = ""
        self.replica_id = ""
        self.status = 500
        self.responded = False
        self.span: ServerSpan | None = None


class FrontEnd:
    """The request skeleton both raw ASGI endpoints share.

    Args:
        max_body_bytes: larger bodies get 413.
        request_timeout_s: per-request deadline, from arrival.
        metrics: request counts and durations go here.
        body_timeout_s: the body must have arrived this long after the
            headers (and before the request's deadline), else 408.
        shutdown: the server's shutdown state (a private one when None).
        body_budget: the server's bytes of bodies held at once (unbounded
            when None).
    """

    #: collect every header for the replica (HTTP ingress) or not (handles)
    keep_headers: ClassVar[bool] = True
    #: how the gateway's log names one request ("request", "handle call")
    what: ClassVar[str] = "request"

    def __init__(
        self, *, max_body_bytes: int, request_timeout_s: float, **options: Unpack[FrontEndOptions]
    ) -> None:
        self._max_body = max_body_bytes
        self._timeout = request_timeout_s
        body_timeout_s = options.get("body_timeout_s")
        self._body_timeout = body_timeout_s if body_timeout_s is not None else request_timeout_s
        shutdown = options.get("shutdown")
        self.shutdown = shutdown if shutdown is not None else Shutdown()
        budget = options.get("body_budget")
        self._budget = budget if budget is not None else BodyBudget(1 << 62)
        metrics = self._metrics = options.get("metrics")
        self._per_model = metrics.per_model_labels if metrics is not None else False

    # -- what an endpoint says ---------------------------------------------------

    def _resolve(self, scope: Scope, head: RequestHead) -> Target:
        """The deployment this request goes to, or why it is refused."""
        raise NotImplementedError

    def _call_args(
        self, scope: Scope, target: Target, head: RequestHead, body: bytes
    ) -> dict[str, Any]:
        """The dispatch's arguments beside the ids, deadline and trace context."""
        raise NotImplementedError

    def _reply(self, reply: Reply) -> tuple[int, list[Header]]:
        """Status and headers of a successful reply (the ids are added after)."""
        raise NotImplementedError

    def _timeout_s(self, head: RequestHead) -> float:
        return self._timeout

    def _too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"request body is over {self._max_body} bytes (http.max_body_bytes)"
        )

    # -- the skeleton ------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1000})
            return
        perf_start = time.perf_counter()
        head = read_head(scope["headers"], keep=self.keep_headers)
        target = self._resolve(scope, head)
        ex = _Exchange(head.request_id or new_request_id(), asyncio.current_task())
        if ex.task is not None:
            self.shutdown.in_flight.add(ex.task)
        try:
            await self._exchange(ex, scope, receive, send, head, target)
        except BaseException as exc:
            await self._failed(ex, send, exc)
        finally:
            self._budget.give(ex.body_held)
            self.shutdown.in_flight.discard(ex.task)
            if ex.span is not None:
                ex.span.finish(ex.status, ex.replica_id, ex.model_id)
            if self._metrics is not None and target.name:
                self._metrics.observe_request(
                    target.name,
                    ex.status,
                    time.perf_counter() - perf_start,
                    ex.model_id if self._per_model else "",
                )

    async def _exchange(
        self,
        ex: _Exchange,
        scope: Scope,
        receive: Receive,
        send: Send,
        head: RequestHead,
        target: Target,
    ) -> None:
        """The request's way when nothing fails: checks, body, dispatch, reply."""
        if self.shutdown.draining:
            raise ShuttingDownError("the gateway is shutting down")
        if target.refusal is not None:
            raise target.refusal
        dispatcher = target.dispatcher
        assert dispatcher is not None
        # On the dispatcher's clock (the pool's): the queue decides from it.
        timeout_s = self._timeout_s(head)
        deadline = dispatcher.clock() + timeout_s
        traceparent, tracestate = head.traceparent, head.tracestate
        ex.span = span = server_span(
            target.span_name,
            method=scope["method"],
            path=target.path,
            deployment=target.name,
            traceparent=traceparent,
            tracestate=tracestate,
        )
        if span is not None:
            # Current while dispatching: the route span becomes its child,
            # and the replica continues this span.
            span.attach()
            traceparent, tracestate = span.traceparent()
        ex.model_id = model_id_of(head)
        if head.content_length > self._max_body:
            raise self._too_large()
        if head.content_length > 0 or head.chunked:
            body = await self._read_body(receive, min(self._body_timeout, timeout_s), ex)
        else:  # no body: the server has the whole request already
            body = await self._receive_body(receive, ex)
        reply, ex.replica_id = await until_disconnect(
            receive,
            dispatcher.dispatch(
                request_id=ex.request_id,
                model_id=ex.model_id,
                deadline=deadline,
                traceparent=traceparent,
                tracestate=tracestate,
                **self._call_args(scope, target, head, body),
            ),
        )
        ex.status, headers = self._reply(reply)
        if ex.status != 204 and ex.status != 304:  # RFC 9110: no content-length on a 204
            headers.append((b"content-length", str(len(reply.body)).encode()))
        headers.append((b"x-request-id", ex.request_id.encode()))
        headers.append((b"x-muxgate-replica", ex.replica_id.encode()))
        self.shutdown.in_flight.discard(ex.task)
        ex.responded = True  # from here on, a failure cannot become an error response
        await send({"type": "http.response.start", "status": ex.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})

    async def _failed(self, ex: _Exchange, send: Send, exc: BaseException) -> None:
        """Answer what ``_exchange`` raised, if anyone is left to answer."""
        if isinstance(exc, _TooLarge):
            exc = self._too_large()
        elif isinstance(exc, ClientDisconnected):
            ex.status = CLIENT_CLOSED_REQUEST  # nobody to answer
            _log.debug("client of %s disconnected; %s cancelled", ex.request_id, self.what)
            return
        elif isinstance(exc, asyncio.CancelledError):
            if ex.responded or not self.shutdown.cut or ex.task is None:
                raise exc
            # The shutdown grace is over: answer instead of leaving the server
            # to send a plain-text 500 (the replica call is cancelled).
            ex.task.uncancel()
            exc = ShuttingDownError("the gateway shut down before the request finished")
        elif not isinstance(exc, Exception):
            raise exc
        elif ex.responded:
            _log.info("could not send the response of %s: %r", ex.request_id, exc)
            return
        else:
            if not isinstance(exc, GatewayError):
                _log.exception("gateway error for %s %s", self.what, ex.request_id, exc_info=exc)
            ex.replica_id = getattr(exc, "replica_id", "")
        ex.status = await send_error(send, exc, ex.request_id, ex.replica_id)

    async def _read_body(self, receive: Receive, within_s: float, ex: _Exchange) -> bytes:
        """The whole body, at most ``max_body_bytes``, within ``within_s`` of
        the headers: a slow client cannot hold a request past its limits.

        One timer that cancels this task, not ``asyncio.timeout`` (a third
        of the front end's own time per request, measured).
        """
        task = asyncio.current_task()
        assert task is not None
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = asyncio.get_running_loop().call_later(within_s, expire)
        try:
            return await self._receive_body(receive, ex)
        except asyncio.CancelledError:
            if expired and task.uncancel() == 0:
                raise RequestTimeoutError(
                    f"the request body did not arrive within {within_s:.3g} s"
                ) from None
            raise
        finally:
            timer.cancel()

    async def _receive_body(self, receive: Receive, ex: _Exchange) -> bytes:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("the client disconnected before sending the body")
        body: bytes = message.get("body", b"")
        if len(body) > self._max_body:
            raise _TooLarge  # at once: more of the body may never come
        self._hold(ex, len(body))
        if not message.get("more_body", False):
            return body
        chunks = [body]
        size = len(body)
        while message.get("more_body", False):
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected("the client disconnected while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                raise _TooLarge
            self._hold(ex, len(chunk))
            chunks.append(chunk)
        return b"".join(chunks)

    def _hold(self, ex: _Exchange, n: int) -> None:
        """Count ``n`` more bytes of ``ex``'s body in the server's budget."""
        if not self._budget.take(n):
            raise OverCapacityError(
                "the gateway holds as many request bodies as it may "
                "(http.limits.max_body_bytes_in_flight); try again"
            )
        ex.body_held += n
