"""The gateway's handle endpoint.

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

The request skeleton (header pass, body read, errors, span, metrics) is the
shared ``FrontEnd`` of ``_frontend``; this module adds the route parsing,
the access check, the argument decoding and the MessagePack reply.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Unpack

import msgspec

from muxgate.gateway._dispatch import Dispatcher
from muxgate.gateway._errors import (
    AdminForbiddenError,
    BadRequestError,
    GatewayError,
    RouteNotFoundError,
    no_deployment_named,
)
from muxgate.gateway._frontend import (
    FrontEnd,
    FrontEndOptions,
    RequestHead,
    Scope,
    Target,
    bearer_matches,
    is_local_client,
)
from muxgate.replicas.contract import ErrorCode, Reply

__all__ = ["HANDLES_PREFIX", "HandleIngress"]

HANDLES_PREFIX = "/-/handles/"

_EMPTY_LIST = msgspec.msgpack.encode([])
_EMPTY_MAP = msgspec.msgpack.encode({})


class MethodNotAllowedError(GatewayError):
    """The handle endpoint takes POST only."""

    code = ErrorCode.METHOD_NOT_ALLOWED
    extra_headers = ((b"allow", b"POST"),)


class _CallBody(msgspec.Struct):
    # Raw: the encoded arguments pass through to the replica untouched.
    args: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(_EMPTY_LIST))
    kwargs: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(_EMPTY_MAP))


_decode_body = msgspec.msgpack.Decoder(_CallBody).decode
_SPAN_NAME = f"POST {HANDLES_PREFIX}{{deployment}}/{{method}}"


class HandleIngress(FrontEnd):
    """Raw ASGI handler of ``/-/handles/{deployment}/{method}``.

    Args:
        dispatchers: deployment name -> its ``Dispatcher``.
        max_body_bytes: larger bodies get 413.
        request_timeout_s: per-call deadline, from arrival.
        admin_token: when set, calls need ``Authorization: Bearer <token>``;
            otherwise only loopback clients are served.
        options: ``metrics`` (calls are counted as requests of the deployment),
            ``body_timeout_s``, ``shutdown`` (see ``FrontEnd``).
    """

    keep_headers = False
    what = "handle call"

    def __init__(
        self,
        dispatchers: Mapping[str, Dispatcher],
        *,
        max_body_bytes: int,
        request_timeout_s: float,
        admin_token: str | None = None,
        **options: Unpack[FrontEndOptions],
    ) -> None:
        super().__init__(
            max_body_bytes=max_body_bytes, request_timeout_s=request_timeout_s, **options
        )
        self._dispatchers = dict(dispatchers)
        self._expected_auth = f"Bearer {admin_token}".encode() if admin_token else None

    def __repr__(self) -> str:
        return f"<HandleIngress deployments={sorted(self._dispatchers)}>"

    def _allowed(self, scope: Scope, auth: bytes) -> bool:
        if self._expected_auth is not None:
            return bearer_matches(auth, self._expected_auth)
        client = scope.get("client")
        return client is not None and is_local_client(client[0])

    def _resolve(self, scope: Scope, head: RequestHead) -> Target:
        path: str = scope["path"]
        name, _, method = path[len(HANDLES_PREFIX) :].partition("/")
        dispatcher = self._dispatchers.get(name)
        refusal: GatewayError | None = None
        if not self._allowed(scope, head.auth):
            refusal = AdminForbiddenError(
                "handle calls need the admin bearer token"
                if self._expected_auth is not None
                else "handle calls are answered for local clients only"
            )
        elif scope["method"] != "POST":
            refusal = MethodNotAllowedError("handle calls are POST requests")
        elif dispatcher is None:
            refusal = RouteNotFoundError(no_deployment_named(name, self._dispatchers))
        elif not method or "/" in method:
            refusal = RouteNotFoundError("handle calls are POST /-/handles/{deployment}/{method}")
        # Calls to an unknown deployment are not counted (no such label).
        return Target(
            name if dispatcher is not None else "",
            dispatcher,
            path=path,
            span_name=_SPAN_NAME,
            refusal=refusal,
            extra=method,
        )

    def _timeout_s(self, head: RequestHead) -> float:
        # The caller waits no longer than x-muxgate-timeout-s: neither do we.
        if head.timeout_s is None:
            return self._timeout
        return max(0.0, min(self._timeout, head.timeout_s))

    def _call_args(
        self, scope: Scope, target: Target, head: RequestHead, body: bytes
    ) -> dict[str, Any]:
        try:
            call = _decode_body(body) if body else _CallBody()
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise BadRequestError(
                f"the body must be MessagePack {{args: list, kwargs: map}}: {exc}"
            ) from None
        except RecursionError:  # msgspec's depth limit, also when skipping a Raw
            raise BadRequestError(
                "the body must be MessagePack {args: list, kwargs: map}: it is nested too deeply"
            ) from None
        return {
            "http": None,
            "method": target.extra,
            "args": bytes(call.args),
            "kwargs": bytes(call.kwargs),
        }

    def _reply(self, reply: Reply) -> tuple[int, list[tuple[bytes, bytes]]]:
        return 200, [(b"content-type", b"application/msgpack")]
