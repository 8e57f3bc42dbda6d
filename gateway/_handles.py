"""The gateway's handle endpoint and the HTTP server span.

``POST /-/handles/{deployment}/{method}`` is what ``DeploymentHandle.remote``
calls: the body is MessagePack ``{"args": [...], "kwargs": {...}}``, the model
id comes in the usual header. The call goes through the deployment's
``Dispatcher`` exactly like HTTP traffic (same router, queue, deadline and
error mapping), as a method call instead of an HTTP request; the reply body
is the MessagePack-encoded return value. Errors are the HTTP contract's JSON
error document, so a handle raises with the same status and code a client
would see. A caller that gives up (its task cancelled, so its HTTP client
drops the connection) cancels the dispatch and the call in the replica, as
for HTTP ingress (status 499 in the metrics, see ``_disconnect``).

The endpoint is an admin endpoint: it answers loopback clients, or any
client with the bearer token when ``http.admin_token`` is set (replicas get
the token in their spec). It is raw ASGI, not a Litestar route, because it
is a hot path (composition calls it once per downstream call).

``server_span`` starts the SERVER-kind span of an incoming request (HTTP or
handle) continuing its ``traceparent``; it costs one function call when
tracing is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import trace

from muxgate.gateway._disconnect import (
    CLIENT_CLOSED_REQUEST,
    ClientDisconnected,
    until_disconnect,
)
from muxgate.gateway._dispatch import Dispatcher, validate_model_id
from muxgate.gateway._errors import (
    AdminForbiddenError,
    BadRequestError,
    GatewayError,
    PayloadTooLargeError,
    RouteNotFoundError,
    error_response,
)
from muxgate.gateway._metrics import GatewayMetrics
from muxgate.replicas._tracing import extract_context, inject_traceparent, tracing_active

__all__ = ["HANDLES_PREFIX", "HandleIngress", "ServerSpan", "server_span"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HANDLES_PREFIX = "/-/handles/"

_log = logging.getLogger("muxgate.gateway.handles")
_tracer = trace.get_tracer("muxgate")

_MODEL_HEADERS = (b"serve_multiplexed_model_id", b"serve-multiplexed-model-id")
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_TRACEPARENT = re.compile(rb"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_LOCAL_CLIENTS = frozenset({"127.0.0.1", "::1", "localhost"})
_EMPTY_LIST = msgspec.msgpack.encode([])
_EMPTY_MAP = msgspec.msgpack.encode({})


class MethodNotAllowedError(GatewayError):
    """The handle endpoint takes POST only."""

    status = 405
    code = "method_not_allowed"


# -- server span ------------------------------------------------------------------


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


# -- handle endpoint --------------------------------------------------------------


class _CallBody(msgspec.Struct):
    # Raw: the encoded arguments pass through to the replica untouched.
    args: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(_EMPTY_LIST))
    kwargs: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(_EMPTY_MAP))


_decode_body = msgspec.msgpack.Decoder(_CallBody).decode


class _TooLarge(Exception):
    pass


class HandleIngress:
    """Raw ASGI handler of ``/-/handles/{deployment}/{method}``.

    Args:
        dispatchers: deployment name -> its ``Dispatcher``.
        max_body_bytes: larger bodies get 413.
        request_timeout_s: per-call deadline, from arrival.
        admin_token: when set, calls need ``Authorization: Bearer <token>``;
            otherwise only loopback clients are served.
        metrics: call counts and durations go here (as requests of the deployment).
    """

    def __init__(
        self,
        dispatchers: Mapping[str, Dispatcher],
        *,
        max_body_bytes: int,
        request_timeout_s: float,
        admin_token: str | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._dispatchers = dict(dispatchers)
        self._max_body = max_body_bytes
        self._timeout = request_timeout_s
        self._expected_auth = f"Bearer {admin_token}".encode() if admin_token else None
        self._metrics = metrics
        self._per_model = metrics.per_model_labels if metrics is not None else False

    def __repr__(self) -> str:
        return f"<HandleIngress deployments={sorted(self._dispatchers)}>"

    def _allowed(self, scope: Scope, auth: bytes) -> bool:
        if self._expected_auth is not None:
            return hmac.compare_digest(auth, self._expected_auth)
        client = scope.get("client")
        return client is not None and client[0] in _LOCAL_CLIENTS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        perf_start = time.perf_counter()
        request_id = ""
        model_raw: bytes | None = None
        traceparent: str | None = None
        tracestate: str | None = None
        auth = b""
        timeout = self._timeout
        content_length = -1
        for name, value in scope["headers"]:
            lname = name.lower()
            if lname in _MODEL_HEADERS:
                model_raw = value
            elif lname == b"x-request-id":
                if _REQUEST_ID.fullmatch(value) is not None:
                    request_id = value.decode()
            elif lname == b"authorization":
                auth = value
            elif lname == b"x-muxgate-timeout-s":
                # The caller waits no longer than this: neither do we.
                with contextlib.suppress(ValueError):
                    timeout = max(0.0, min(timeout, float(value)))
            elif lname == b"traceparent":
                if _TRACEPARENT.fullmatch(value) is not None:
                    traceparent = value.decode()
            elif lname == b"tracestate":
                tracestate = value.decode("latin-1")
            elif lname == b"content-length":
                try:
                    content_length = int(value)
                except ValueError:
                    content_length = -1
        if not request_id:
            request_id = os.urandom(12).hex()
        path: str = scope["path"]
        name, _, method = path[len(HANDLES_PREFIX) :].partition("/")
        dispatcher = self._dispatchers.get(name)
        model_id = ""
        status = 500
        replica_id = ""
        span: ServerSpan | None = None
        responded = False
        try:
            if not self._allowed(scope, auth):
                raise AdminForbiddenError(
                    "handle calls need the admin bearer token"
                    if self._expected_auth is not None
                    else "handle calls are answered for local clients only"
                )
            if scope["method"] != "POST":
                raise MethodNotAllowedError("handle calls are POST requests")
            if dispatcher is None:
                raise RouteNotFoundError(f"no deployment named {name!r}")
            if not method or "/" in method:
                raise RouteNotFoundError("handle calls are POST /-/handles/{deployment}/{method}")
            span = server_span(
                f"POST {HANDLES_PREFIX}{{deployment}}/{{method}}",
                method="POST",
                path=path,
                deployment=name,
                traceparent=traceparent,
                tracestate=tracestate,
            )
            if span is not None:
                span.attach()
                traceparent, tracestate = span.traceparent()
            if model_raw is not None:
                model_id = validate_model_id(model_raw)
            if content_length > self._max_body:
                raise PayloadTooLargeError(f"request body is over {self._max_body} bytes")
            body = await self._read_body(receive)
            try:
                call = _decode_body(body) if body else _CallBody()
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise BadRequestError(
                    f"the body must be MessagePack {{args: list, kwargs: map}}: {exc}"
                ) from None
            reply, replica_id = await until_disconnect(
                receive,
                dispatcher.dispatch(
                    request_id=request_id,
                    model_id=model_id,
                    http=None,
                    deadline=started + timeout,
                    traceparent=traceparent,
                    tracestate=tracestate,
                    method=method,
                    args=bytes(call.args),
                    kwargs=bytes(call.kwargs),
                ),
            )
            status = 200
            headers = [
                (b"content-type", b"application/msgpack"),
                (b"content-length", str(len(reply.body)).encode()),
                (b"x-request-id", request_id.encode()),
                (b"x-muxgate-replica", replica_id.encode()),
            ]
            responded = True
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": reply.body})
        except _TooLarge:
            status = await _send_error(
                send,
                PayloadTooLargeError(f"request body is over {self._max_body} bytes"),
                request_id,
                "",
            )
        except ClientDisconnected:
            status = CLIENT_CLOSED_REQUEST  # nobody to answer
        except Exception as exc:
            if responded:
                _log.info("could not send the reply of %s: %r", request_id, exc)
                return
            if not isinstance(exc, GatewayError):
                _log.exception("gateway error for handle call %s", request_id)
            replica_id = getattr(exc, "replica_id", "")
            status = await _send_error(send, exc, request_id, replica_id)
        finally:
            if span is not None:
                span.finish(status, replica_id, model_id)
            if self._metrics is not None and dispatcher is not None:
                self._metrics.observe_request(
                    name,
                    status,
                    time.perf_counter() - perf_start,
                    model_id if self._per_model else "",
                )

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected("the client disconnected while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _send_error(send: Send, exc: BaseException, request_id: str, replica_id: str) -> int:
    status: int
    status, headers, body = error_response(exc, request_id)
    headers.append((b"content-length", str(len(body)).encode()))
    headers.append((b"x-request-id", request_id.encode()))
    headers.append((b"x-muxgate-replica", replica_id.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return status
