"""Deployment handles: call a deployment's methods from Python, through its gateway.

A ``DeploymentHandle`` is the programmatic twin of an HTTP request. It sends
``POST /-/handles/{deployment}/{method}`` to the gateway with a MessagePack
body ``{"args": [...], "kwargs": {...}}`` and the model id in the
``serve_multiplexed_model_id`` header; the gateway routes it with the same
router, queue and deadline as HTTP traffic (so a handle call for model "2"
goes to the replica that holds "2"), the replica calls the method with those
arguments and the MessagePack-encoded return value comes back.

Arguments and results are MessagePack values (msgspec): ``None``, bools,
numbers, str, bytes, lists, dicts, msgspec Structs (decoded as dicts). Never
pickle: a pickle is code, and a handle endpoint must not run code it was sent.

As in Ray Serve, ``options(multiplexed_model_id=...)`` returns a *new*
handle, and the model id is never inherited: a deployment that serves model
"foo" and calls another one through a handle sends whatever id that handle
carries (none unless set), and its own ``get_multiplexed_model_id()`` still
returns "foo".

Inside a replica the gateway URL (and the admin token, when one is
configured) come from the replica's spec; elsewhere pass ``gateway_url``, or
set ``MUXGATE_GATEWAY_URL`` (and ``MUXGATE_ADMIN_TOKEN``).

Deadlines: a handle call made while a replica serves a request gets at most
the time that request has left (sent as ``x-muxgate-timeout-s``; the gateway
takes the smaller of it and ``http.request_timeout_s``), so a downstream call
never outlives its caller. ``options(timeout_s=...)`` bounds a call further.

Transport: one pooled keep-alive ``httpx.AsyncClient`` per event loop and
process, created on first use, so a call costs one HTTP round trip on a warm
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import msgspec

from muxgate.replicas._tracing import inject_traceparent, tracing_active

if TYPE_CHECKING:
    import httpx

__all__ = [
    "DeploymentHandle",
    "HandleBadRequestError",
    "HandleDeadlineError",
    "HandleError",
    "HandleNotFoundError",
    "HandleUnavailableError",
    "HandleUserError",
    "aclose_handle_clients",
    "call_deadline",
    "get_deployment_handle",
    "set_handle_defaults",
]

#: Header carrying the model id (the same as for HTTP requests).
MODEL_ID_HEADER = "serve_multiplexed_model_id"
#: Header carrying the seconds the caller still waits for the answer.
TIMEOUT_HEADER = "x-muxgate-timeout-s"
_MSGPACK = "application/msgpack"


# -- errors --------------------------------------------------------------------


class HandleError(Exception):
    """A handle call failed; the fields mirror the gateway's HTTP error body.

    Attributes:
        status: the HTTP status the gateway answered (or 503 when it could
            not be reached).
        code: the stable error code (``user_error``, ``model_not_found``,
            ``not_found``, ``bad_model_id``, ``bad_request``, ``replica_died``,
            ``over_capacity``, ``no_replica``, ``deadline``, ...).
        message: the message meant for the caller (for ``user_error``:
            the exception type and message raised by the deployment).
        request_id: the gateway's request id (find the call in the logs).
        replica_id: the replica that produced the error, if any.
    """

    def __init__(
        self, status: int, code: str, message: str, request_id: str = "", replica_id: str = ""
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.replica_id = replica_id


class HandleBadRequestError(HandleError):
    """400: a bad model id, an unknown or private method, undecodable arguments."""


class HandleNotFoundError(HandleError):
    """404: no deployment of that name, or the model is not in storage."""


class HandleUserError(HandleError):
    """500 ``user_error``: the deployment's code raised; ``message`` says what."""


class HandleUnavailableError(HandleError):
    """502/503: the replica died mid-call, the deployment is over capacity or
    has no replica, or the gateway cannot be reached."""


class HandleDeadlineError(HandleError):
    """504: the call's deadline passed."""


def _error_class(status: int) -> type[HandleError]:
    if status == 400:
        return HandleBadRequestError
    if status == 404:
        return HandleNotFoundError
    if status == 504:
        return HandleDeadlineError
    if status in (502, 503):
        return HandleUnavailableError
    if status == 500:
        return HandleUserError
    return HandleError


class _ErrorBody(msgspec.Struct):
    code: str = "internal"
    message: str = ""
    request_id: str = ""


class _ErrorEnvelope(msgspec.Struct):
    error: _ErrorBody


_decode_error = msgspec.json.Decoder(_ErrorEnvelope).decode


def _raise_for(status: int, body: bytes, headers: httpx.Headers) -> None:
    request_id = headers.get("x-request-id", "")
    replica_id = headers.get("x-muxgate-replica", "")
    try:
        err = _decode_error(body).error
        code, message = err.code, err.message
        request_id = err.request_id or request_id
    except (msgspec.DecodeError, msgspec.ValidationError):
        code, message = "http_error", body[:200].decode("utf-8", "replace")
    cls = _error_class(status)
    if cls is HandleUserError and code != "user_error":
        cls = HandleError  # a 500 from the gateway itself, not the deployment
    raise cls(status, code, message, request_id, replica_id)


# -- process defaults and clients ----------------------------------------------


class _Defaults:
    url: str | None = None
    token: str | None = None


_defaults = _Defaults()
# One client per event loop: an httpx client's connections belong to the loop
# that opened them. Weak keys, so a closed and dropped loop takes its entry along.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
    weakref.WeakKeyDictionary()
)


def set_handle_defaults(gateway_url: str | None, token: str | None = None) -> None:
    """Set this process's default gateway (the replica entry point calls it
    with the URL and admin token of the gateway that started the replica)."""
    _defaults.url = gateway_url.rstrip("/") if gateway_url else None
    _defaults.token = token or None


def _client() -> httpx.AsyncClient:
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None or client.is_closed:
        import httpx  # imported on first use: replicas that never call out skip it

        client = httpx.AsyncClient(
            # No overall timeout: the gateway enforces each call's deadline
            # and answers 504; only connecting is bounded here.
            timeout=httpx.Timeout(None, connect=10.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            trust_env=False,
        )
        _clients[loop] = client
    return client


async def aclose_handle_clients() -> None:
    """Close this event loop's handle connections (harmless when there are none).

    Handles keep working afterwards: the next call opens a new client.
    """
    loop = asyncio.get_running_loop()
    client = _clients.pop(loop, None)
    if client is not None:
        await client.aclose()


# -- deadlines ------------------------------------------------------------------

# time.monotonic() by which the request being served must be answered.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "muxgate_call_deadline", default=None
)


@contextlib.contextmanager
def call_deadline(timeout_s: float) -> Iterator[None]:
    """Within the block, handle calls get at most ``timeout_s`` (from now);
    the replica wraps every call with a deadline in it."""
    token = _deadline.set(time.monotonic() + timeout_s)
    try:
        yield
    finally:
        _deadline.reset(token)


def remaining_time() -> float | None:
    """Seconds left before the current request's deadline (None: no deadline)."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


# -- the handle -----------------------------------------------------------------

_encode = msgspec.msgpack.Encoder().encode


class DeploymentHandle:
    """Calls one deployment through its gateway; get one with
    :func:`get_deployment_handle`.

    ``await handle.remote(*args, **kwargs)`` calls ``__call__``;
    ``await handle.other.remote(...)`` calls the method ``other``;
    ``handle.options(multiplexed_model_id="2")`` returns a new handle whose
    calls carry model id "2" (the original is unchanged). Handles are
    immutable and cheap; share them between tasks freely.

    Raises (from ``remote``):
        HandleError: (a subclass by status) the call failed; see its
            ``status``, ``code``, ``message`` and ``request_id``.
        TypeError: an argument is not a MessagePack value.
    """

    __slots__ = (
        "_headers",
        "_url",
        "deployment_name",
        "method_name",
        "multiplexed_model_id",
        "timeout_s",
    )

    def __init__(
        self,
        deployment_name: str,
        *,
        gateway_url: str,
        token: str | None = None,
        multiplexed_model_id: str = "",
        method_name: str = "__call__",
        timeout_s: float | None = None,
    ) -> None:
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.deployment_name = deployment_name
        self.method_name = method_name
        self.multiplexed_model_id = multiplexed_model_id
        self.timeout_s = timeout_s
        base = gateway_url.rstrip("/")
        self._url = f"{base}/-/handles/{deployment_name}/{method_name}"
        headers = {"content-type": _MSGPACK, "accept": _MSGPACK}
        if token:
            headers["authorization"] = f"Bearer {token}"
        if multiplexed_model_id:
            headers[MODEL_ID_HEADER] = multiplexed_model_id
        self._headers = headers

    def __repr__(self) -> str:
        model = f" model_id={self.multiplexed_model_id!r}" if self.multiplexed_model_id else ""
        return f"<DeploymentHandle {self.deployment_name}.{self.method_name}{model}>"

    @property
    def gateway_url(self) -> str:
        return self._url.rsplit("/-/handles/", 1)[0]

    def _token(self) -> str | None:
        auth = self._headers.get("authorization")
        return auth[len("Bearer ") :] if auth else None

    def options(
        self,
        *,
        multiplexed_model_id: str | None = None,
        method_name: str | None = None,
        timeout_s: float | None = None,
    ) -> DeploymentHandle:
        """A new handle with these options changed; this one is not modified.

        Args:
            multiplexed_model_id: the model id the calls carry (``""``: none).
            method_name: the method the calls invoke (default ``__call__``).
            timeout_s: the longest a call may take (the gateway answers 504
                after it); default: the gateway's ``request_timeout_s``, or
                less inside a request that has less time left.
        """
        return DeploymentHandle(
            self.deployment_name,
            gateway_url=self.gateway_url,
            token=self._token(),
            multiplexed_model_id=(
                self.multiplexed_model_id if multiplexed_model_id is None else multiplexed_model_id
            ),
            method_name=self.method_name if method_name is None else method_name,
            timeout_s=self.timeout_s if timeout_s is None else timeout_s,
        )

    def __getattr__(self, name: str) -> DeploymentHandle:
        # handle.predict -> a handle for the method "predict". Private names
        # stay ordinary attribute errors (copy, pickle and friends probe them).
        if name.startswith("_"):
            raise AttributeError(name)
        return self.options(method_name=name)

    async def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Call the method with these arguments and return its result."""
        content = _encode({"args": args, "kwargs": kwargs})
        headers = self._headers
        budget = self.timeout_s
        left = remaining_time()
        if left is not None:
            if left <= 0:
                raise HandleDeadlineError(
                    504, "deadline", "the calling request's deadline passed before the call"
                )
            budget = left if budget is None else min(budget, left)
        if budget is not None:
            headers = dict(headers)
            headers[TIMEOUT_HEADER] = f"{budget:.3f}"
        if tracing_active():
            traceparent, tracestate = inject_traceparent()
            if traceparent:
                headers = dict(headers, traceparent=traceparent)
                if tracestate:
                    headers["tracestate"] = tracestate
        import httpx

        try:
            response = await _client().post(self._url, content=content, headers=headers)
        except httpx.TransportError as exc:
            raise HandleUnavailableError(
                503,
                "gateway_unreachable",
                f"cannot reach the gateway at {self.gateway_url}: {exc!r}",
            ) from exc
        if response.status_code != 200:
            _raise_for(response.status_code, response.content, response.headers)
        return msgspec.msgpack.decode(response.content)


def get_deployment_handle(
    deployment_name: str, gateway_url: str | None = None, *, token: str | None = None
) -> DeploymentHandle:
    """A handle to the deployment ``deployment_name``, like Ray Serve's
    ``serve.get_deployment_handle``.

    Args:
        deployment_name: the deployment's ``name`` in the app config.
        gateway_url: the gateway's base URL, e.g. ``http://127.0.0.1:8000``.
            Inside a replica it defaults to the gateway that started it;
            elsewhere to ``MUXGATE_GATEWAY_URL``.
        token: the gateway's admin token, when one is configured (default:
            the replica's, else ``MUXGATE_ADMIN_TOKEN``).

    Raises:
        ValueError: no gateway URL given and none known to this process.
    """
    url = gateway_url or _defaults.url or os.environ.get("MUXGATE_GATEWAY_URL")
    if not url:
        raise ValueError(
            "no gateway URL: pass gateway_url=, or set MUXGATE_GATEWAY_URL "
            "(inside a replica the gateway sets it)"
        )
    if token is None:
        # The replica's own token belongs to its own gateway only.
        own = _defaults.token if url.rstrip("/") == _defaults.url else None
        token = own or os.environ.get("MUXGATE_ADMIN_TOKEN")
    return DeploymentHandle(deployment_name, gateway_url=url, token=token)
