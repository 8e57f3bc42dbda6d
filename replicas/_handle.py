"""Deployment handles: call a deployment's methods from Python, through its gateway.

A ``DeploymentHandle`` is the programmatic twin of an HTTP request. As in Ray
Serve, ``handle.remote(...)`` returns a :class:`DeploymentResponse` at once,
with the call already under way as a task; ``await response`` gives the
result. The task sends
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

Context: the task is created by ``remote()``, so it runs in a copy of the
caller's context taken at that moment: the trace context (``traceparent``)
and the deadline of the request being served are the caller's even when the
response is awaited elsewhere, later, or never.

Sync code: ``remote()`` needs no running loop. With none in the calling
thread the task runs on the replica's loop (a sync deployment method) or on
a private background loop (anywhere else), see
:mod:`muxgate.replicas._handle_loops`; ``response.result()`` blocks for it.

Transport: one pooled keep-alive ``httpx.AsyncClient`` per event loop and
process, created on first use, so a call costs one HTTP round trip on a warm
connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import os
import time
from collections.abc import Coroutine, Generator, Iterator
from typing import TYPE_CHECKING, Any, Final

import msgspec
from opentelemetry import context as otel_context

from muxgate.replicas._codes import ErrorCode
from muxgate.replicas._handle_loops import (
    SyncCalls,
    aclose_handle_clients,
    client,
    loop_for_sync_caller,
    running_loop,
    sync_calls,
)
from muxgate.replicas._propagation import inject_traceparent
from muxgate.replicas._tracing import tracing_active

if TYPE_CHECKING:
    import httpx

__all__ = [
    "DeploymentHandle",
    "DeploymentResponse",
    "HandleBadRequestError",
    "HandleCancelledError",
    "HandleDeadlineError",
    "HandleError",
    "HandleNotFoundError",
    "HandleUnavailableError",
    "HandleUserError",
    "aclose_handle_clients",
    "call_deadline",
    "get_deployment_handle",
    "not_a_value",
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
        code: the stable error code, a value of
            ``muxgate.replicas.contract.ErrorCode`` (``user_error``,
            ``model_not_found``, ``not_found``, ``bad_model_id``,
            ``bad_request``, ``replica_died``, ``over_capacity``,
            ``no_replica``, ``deadline``, ...).
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


class HandleCancelledError(HandleError):
    """499 ``cancelled``: the awaited response was cancelled (``cancel()``, or
    a task awaiting it was cancelled), like Ray Serve's ``RequestCancelledError``."""


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
    code: str = ErrorCode.INTERNAL
    message: str = ""
    request_id: str = ""


class _ErrorEnvelope(msgspec.Struct):
    error: _ErrorBody


_decode_error = msgspec.json.Decoder(_ErrorEnvelope).decode


#: what a 401 about the token adds: where a handle's token comes from
_NO_TOKEN_HINT: Final = (
    " (give it with get_deployment_handle(..., token=...) or MUXGATE_ADMIN_TOKEN)"
)
_TOKEN_REFUSED_HINT: Final = (
    " (the token given was refused: check get_deployment_handle(..., token=...)"
    " or MUXGATE_ADMIN_TOKEN)"
)


def _raise_for(
    status: int, body: bytes, headers: httpx.Headers, *, token_sent: bool = False
) -> None:
    request_id = headers.get("x-request-id", "")
    replica_id = headers.get("x-muxgate-replica", "")
    try:
        err = _decode_error(body).error
        code, message = err.code, err.message
        request_id = err.request_id or request_id
    except (msgspec.DecodeError, msgspec.ValidationError):
        code, message = ErrorCode.HTTP_ERROR, body[:200].decode("utf-8", "replace")
    if code == ErrorCode.UNAUTHORIZED and "token" in message:
        message += _TOKEN_REFUSED_HINT if token_sent else _NO_TOKEN_HINT
    cls = _error_class(status)
    if cls is HandleUserError and code != ErrorCode.USER_ERROR:
        cls = HandleError  # a 500 from the gateway itself, not the deployment
    raise cls(status, code, message, request_id, replica_id)


# -- process defaults and clients ----------------------------------------------


class _Defaults:
    url: str | None = None
    token: str | None = None


_defaults = _Defaults()


def set_handle_defaults(gateway_url: str | None, token: str | None = None) -> None:
    """Set this process's default gateway (the replica entry point calls it
    with the URL and admin token of the gateway that started the replica)."""
    _defaults.url = _http_url(gateway_url) if gateway_url else None
    _defaults.token = token or None


# -- deadlines ------------------------------------------------------------------

# time.monotonic() by which the request being served must be answered.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "muxgate_call_deadline", default=None
)


#: OpenTelemetry context key under which muxgate.backends finds the deadline
#: of the request a storage call serves (muxgate.backends._deadline.DEADLINE_KEY;
#: the OpenTelemetry context, so that neither package imports the other).
_STORAGE_DEADLINE_KEY: Final = "muxgate.deadline"


@contextlib.contextmanager
def call_deadline(timeout_s: float) -> Iterator[None]:
    """Within the block, handle calls get at most ``timeout_s`` (from now),
    and storage calls give up in time for the replica to answer; the
    replica wraps every call with a deadline in it."""
    deadline = time.monotonic() + timeout_s
    token = _deadline.set(deadline)
    # ~2 us a call: the price of a storage outage answered with 503, not 504.
    otel_token = otel_context.attach(otel_context.set_value(_STORAGE_DEADLINE_KEY, deadline))
    try:
        yield
    finally:
        otel_context.detach(otel_token)
        _deadline.reset(token)


def remaining_time() -> float | None:
    """Seconds left before the current request's deadline (None: no deadline)."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


# -- responses ------------------------------------------------------------------

_encode = msgspec.msgpack.Encoder().encode


def not_a_value(what: str, exc: TypeError) -> TypeError:
    """The error for ``what`` (a handle call's arguments, a method's result)
    when msgspec cannot encode it: what it could not encode, what can travel,
    and the usual way out (``.tolist()``, or the missing ``await``)."""
    inner = str(exc)  # "Encoding objects of type Tensor is unsupported"
    if "type coroutine" in inner:
        hint = ": an `await` is missing"
    elif "Tensor" in inner or "ndarray" in inner:
        hint = " (call .tolist() on tensors and arrays)"
    elif "DeploymentResponse" in inner:
        hint = " (a response is resolved as a top-level argument only: pass it as one, or await it)"
    else:
        hint = ""
    return TypeError(
        f"Cannot send {what}: {inner}; handle arguments and results are MessagePack"
        f" values (None, bool, int, float, str, bytes, list, dict, msgspec Struct){hint}."
    )


# Calls whose response was dropped unawaited: the loop keeps only weak
# references to tasks, and a fire-and-forget call must still finish.
_in_flight: set[asyncio.Task[Any]] = set()


def _call_finished(task: asyncio.Task[Any]) -> None:
    _in_flight.discard(task)
    if not task.cancelled():
        # Marks the exception retrieved: a failed call nobody awaited is not
        # "Task exception was never retrieved" when the task is collected.
        task.exception()


def _awaiter_cancelled() -> bool:
    """Whether the task running this code is itself being cancelled."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class DeploymentResponse:
    """The result of a handle call, returned at once by ``remote()`` while the
    call runs (Ray Serve's ``DeploymentResponse``).

    ``await response`` (async code) or ``response.result()`` (sync code)
    returns the method's result or raises the call's :class:`HandleError`;
    doing so again returns the same result (or raises the same error)
    without calling again. Pass a response as a top-level positional or
    keyword argument to another ``remote()`` call and that call waits for
    its value and sends the value.

    Cancellation: ``cancel()`` cancels the call (the gateway and the replica
    see the client go away), and awaiting it then raises
    :class:`HandleCancelledError`. Cancelling a task that awaits the response
    cancels the call too, as awaiting a task does. A call that a response was
    passed to does not cancel that response when it is cancelled itself.

    Made by ``DeploymentHandle.remote``, not directly.
    """

    __slots__ = ("_cancel_requested", "_loop", "_target", "_task")

    def __init__(
        self, task: asyncio.Task[Any] | None, target: str, loop: asyncio.AbstractEventLoop
    ) -> None:
        # None until _start() runs on ``loop`` (remote() called from sync code).
        self._task = task
        self._loop = loop
        self._target = target
        self._cancel_requested = False

    def __repr__(self) -> str:
        task = self._task
        if task is None or not task.done():
            state = "pending"
        elif task.cancelled():
            state = "cancelled"
        elif (exc := task.exception()) is not None:
            state = f"failed: {type(exc).__name__}"
        else:
            state = "done"
        return f"<DeploymentResponse {self._target} {state}>"

    def _start(self, call: Coroutine[Any, Any, Any], context: contextvars.Context) -> None:
        # On self._loop, before anything else there sees this response: the
        # loop runs callbacks in order, and whoever got the response from the
        # sync caller got it after remote() scheduled this.
        self._task = _start_call(self._loop, call, context)

    def cancel(self) -> None:
        """Cancel the call (nothing happens once it has finished)."""
        # Once: each Task.cancel() interrupts the task again, including the
        # shielded cleanup in which httpx closes the connection, and then the
        # gateway never sees the caller go away.
        if not self._cancel_requested:
            self._cancel_requested = True
            if running_loop() is self._loop:
                self._cancel_task()
            else:
                self._loop.call_soon_threadsafe(self._cancel_task)

    def _cancel_task(self) -> None:
        assert self._task is not None
        self._task.cancel()

    def __await__(self) -> Generator[Any, None, Any]:
        return self._result(cancel_with_awaiter=True).__await__()

    def result(self, *, timeout_s: float | None = None) -> Any:
        """Wait for the call in sync code and return its result (Ray Serve's
        ``DeploymentResponse.result``).

        Args:
            timeout_s: wait at most this long (default: until the call ends,
                which its own deadline bounds). Giving up waiting does not
                cancel the call: ``result()`` again may still get its value.

        Raises:
            HandleError: (a subclass by status) the call failed, as ``await``.
            TimeoutError: no result within ``timeout_s``.
            RuntimeError: an event loop runs in this thread (use ``await``).
            ValueError: ``timeout_s`` is negative.
        """
        if timeout_s is not None and not timeout_s >= 0:
            raise ValueError(f"timeout_s must be >= 0, got {timeout_s}")
        if running_loop() is not None:
            # Blocking here would stall this loop, and with it the call if
            # it runs on this loop: a deadlock.
            raise RuntimeError(
                "DeploymentResponse.result() blocks, and this thread runs an event "
                "loop: use `await response` in async code"
            )
        calls = sync_calls()
        waiter = asyncio.run_coroutine_threadsafe(
            self._wait(calls if calls is not None and calls.loop is self._loop else None),
            self._loop,
        )
        try:
            return waiter.result(timeout_s)
        except concurrent.futures.TimeoutError:
            waiter.cancel()  # stop waiting; the call goes on
            raise TimeoutError(
                f"no result from {self._target} within {timeout_s} s (the call goes on)"
            ) from None

    async def _wait(self, calls: SyncCalls | None) -> Any:
        # result() waits here, on self._loop.
        if calls is None:
            return await self._result(cancel_with_awaiter=False)
        if calls.abandoned:
            self.cancel()  # the request this thread serves is gone
        calls.waiting.add(self)
        try:
            return await self._result(cancel_with_awaiter=False)
        finally:
            calls.waiting.discard(self)

    async def _result(self, *, cancel_with_awaiter: bool) -> Any:
        if self._loop is not asyncio.get_running_loop():
            # Made by sync code (its call runs on another thread's loop):
            # wait there. Cancelling this wait cancels the one there.
            return await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(
                    self._result(cancel_with_awaiter=cancel_with_awaiter), self._loop
                )
            )
        task = self._task
        assert task is not None  # see _start
        try:
            # Shielded, because an awaiting task may be cancelled many times
            # (anyio's cancel scopes repeat it until the task yields); the
            # call is cancelled once, below.
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and not _awaiter_cancelled():
                # The call was cancelled, the awaiting task was not: a
                # CancelledError escaping into it would look like its own
                # cancellation (anyio and TaskGroup would treat it so).
                raise HandleCancelledError(
                    ErrorCode.CANCELLED.status,
                    ErrorCode.CANCELLED,
                    f"the call to {self._target} was cancelled",
                ) from None
            if cancel_with_awaiter:
                self.cancel()
            raise


def _start_call(
    loop: asyncio.AbstractEventLoop,
    call: Coroutine[Any, Any, Any],
    context: contextvars.Context | None = None,
) -> asyncio.Task[Any]:
    # The task runs in a copy of the context of remote()'s caller: its trace
    # context and request deadline go with the call.
    task = loop.create_task(call, context=context)
    _in_flight.add(task)
    task.add_done_callback(_call_finished)
    return task


async def _resolve(value: Any) -> Any:
    # A response passed as an argument is not cancelled with the call it was
    # passed to: its owner may still await it.
    if isinstance(value, DeploymentResponse):
        return await value._result(cancel_with_awaiter=False)
    return value


# -- the handle -----------------------------------------------------------------


class DeploymentHandle:
    """Calls one deployment through its gateway; get one with
    :func:`get_deployment_handle`.

    ``await handle.remote(*args, **kwargs)`` calls ``__call__`` (in sync
    code: ``handle.remote(...).result()``);
    ``await handle.other.remote(...)`` calls the method ``other``;
    ``handle.options(multiplexed_model_id="2")`` returns a new handle whose
    calls carry model id "2" (the original is unchanged). Handles are
    immutable and cheap; share them between tasks freely.

    Any attribute reaches the deployment method of that name, except the
    reserved names ``options``, ``remote``, ``deployment_name`` and names
    starting with ``_``; call those with ``options(method_name=...)``
    (methods starting with ``_`` are private and cannot be called at all).

    Raises (from awaiting a response, or its ``result()``):
        HandleError: (a subclass by status) the call failed; see its
            ``status``, ``code``, ``message`` and ``request_id``.
        TypeError: an argument is not a MessagePack value (nothing is sent).
    """

    # Underscored, so that user methods of any other name are reachable
    # through __getattr__ (a slot named method_name would shadow one).
    __slots__ = (
        "_deployment_name",
        "_gateway_url",
        "_headers",
        "_method_name",
        "_model_id",
        "_timeout_s",
        "_token",
        "_url",
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
        if not isinstance(multiplexed_model_id, str):
            raise TypeError(
                "multiplexed_model_id must be a str (model ids are strings, as in the"
                f' header: multiplexed_model_id="2"), got {type(multiplexed_model_id).__name__}'
            )
        # A str subclass (a StrEnum member, numpy's str_) is a str: taken as
        # its plain text, as the header carries it.
        multiplexed_model_id = str.__str__(multiplexed_model_id)
        self._deployment_name = deployment_name
        self._method_name = method_name
        self._model_id = multiplexed_model_id
        self._timeout_s = timeout_s
        self._token = token or None
        self._gateway_url = _http_url(gateway_url)
        self._url = f"{self._gateway_url}/-/handles/{deployment_name}/{method_name}"
        headers = {"content-type": _MSGPACK, "accept": _MSGPACK}
        if token:
            headers["authorization"] = f"Bearer {token}"
        if multiplexed_model_id:
            headers[MODEL_ID_HEADER] = multiplexed_model_id
        self._headers = headers

    def __repr__(self) -> str:
        return f"<DeploymentHandle {self._target()}>"

    def _target(self) -> str:
        model = f" model_id={self._model_id!r}" if self._model_id else ""
        return f"{self._deployment_name}.{self._method_name}{model}"

    @property
    def deployment_name(self) -> str:
        """The name of the deployment this handle calls."""
        return self._deployment_name

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
            self._deployment_name,
            gateway_url=self._gateway_url,
            token=self._token,
            multiplexed_model_id=(
                self._model_id if multiplexed_model_id is None else multiplexed_model_id
            ),
            method_name=self._method_name if method_name is None else method_name,
            timeout_s=self._timeout_s if timeout_s is None else timeout_s,
        )

    def __getattr__(self, name: str) -> DeploymentHandle:
        # handle.predict -> a handle for the method "predict". Private names
        # stay ordinary attribute errors (copy, pickle and friends probe them).
        if name.startswith("_"):
            raise AttributeError(name)
        return self.options(method_name=name)

    def remote(self, *args: Any, **kwargs: Any) -> DeploymentResponse:
        """Start the call with these arguments and return its response at once.

        Arguments that are :class:`DeploymentResponse` objects (top level
        only, positional or keyword) are replaced by their results before
        the call is sent.

        The call runs on the event loop running in this thread; in sync code
        (no loop runs here), on the replica's loop inside a sync deployment
        method, else on a private loop in a background thread.
        """
        loop = running_loop()
        if loop is not None:
            # create_task copies the current context here, at remote() time.
            return DeploymentResponse(
                _start_call(loop, self._call(args, kwargs)), self._target(), loop
            )
        loop = loop_for_sync_caller()
        response = DeploymentResponse(None, self._target(), loop)
        call = self._call(args, kwargs)
        try:
            loop.call_soon_threadsafe(response._start, call, contextvars.copy_context())
        except RuntimeError:  # the loop is closed (the replica is stopping)
            call.close()
            raise
        return response

    async def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if any(isinstance(v, DeploymentResponse) for v in (*args, *kwargs.values())):
            args = tuple([await _resolve(a) for a in args])
            kwargs = {k: await _resolve(v) for k, v in kwargs.items()}
        try:
            content = _encode({"args": args, "kwargs": kwargs})
        except TypeError as exc:
            raise not_a_value("the arguments of a handle call", exc) from exc
        headers = self._headers
        budget = self._timeout_s
        left = remaining_time()
        if left is not None:
            if left <= 0:
                raise HandleDeadlineError(
                    ErrorCode.DEADLINE.status,
                    ErrorCode.DEADLINE,
                    "the calling request's deadline passed before the call",
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
            response = await client().post(self._url, content=content, headers=headers)
        except httpx.TransportError as exc:
            raise HandleUnavailableError(
                ErrorCode.GATEWAY_UNREACHABLE.status,
                ErrorCode.GATEWAY_UNREACHABLE,
                f"cannot reach the gateway at {self._gateway_url}: {exc!r}",
            ) from exc
        if response.status_code != 200:
            _raise_for(
                response.status_code,
                response.content,
                response.headers,
                token_sent=self._token is not None,
            )
        return msgspec.msgpack.decode(response.content)


def _http_url(url: str) -> str:
    """``url`` without a trailing ``/``, and ``http://`` before a bare
    ``HOST:PORT`` (as ``muxgate status`` takes it)."""
    return (url if "://" in url else "http://" + url).rstrip("/")


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
    url = _http_url(url)
    if token is None:
        # The replica's own token belongs to its own gateway only.
        own = _defaults.token if url == _defaults.url else None
        token = own or os.environ.get("MUXGATE_ADMIN_TOKEN")
    return DeploymentHandle(deployment_name, gateway_url=url, token=token)
