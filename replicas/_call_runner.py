"""Running one ``Call`` against the deployment's instance: its request
scope and (when tracing is on) its ``muxgate.replica.handle`` span, its
deadline, the method it names, and the mapping of what it raises to an
``ErrorInfo`` (:mod:`muxgate.replicas._call_errors`).

Async user code runs in the call's task. Sync user code runs in a worker
thread, which cannot be interrupted: a call cancelled or cut off by its
deadline is *abandoned* (its task moves on, no reply), the thread runs to
its end, still holding a worker-thread token (so at most
``max_ongoing_requests`` threads ever run), and the model pins it took are
released when it returns, not before (a model is never unloaded under a
running thread). Handle calls the thread makes run on the replica's loop,
and those it waits for in ``result()`` are cancelled when the call is
abandoned (:mod:`muxgate.replicas._handle_loops`).

The replica (:mod:`muxgate.replicas._replica`) decides whether a call runs
(slots, draining) and sends the outcome back.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeAlias

import anyio
import anyio.abc
import anyio.to_thread
import msgspec
from opentelemetry import trace

from muxgate.replicas._call_errors import (
    EXPECTED_BACKEND_CODES,
    CallFailed,
    bad_request,
    error_for,
    is_cancellation,
)
from muxgate.replicas._codes import ErrorCode
from muxgate.replicas._context import current_request, request_scope
from muxgate.replicas._handle import call_deadline, not_a_value
from muxgate.replicas._handle_loops import SyncCalls
from muxgate.replicas._http import Request, encode_result
from muxgate.replicas._loader_thread import is_async_callable
from muxgate.replicas._logging import OUTCOME, outcome_logged_for, traceback_logged
from muxgate.replicas._names import nearest
from muxgate.replicas._propagation import extract_context
from muxgate.replicas._protocol import MAX_BODY_BYTES, Call, ErrorInfo
from muxgate.replicas._spec import ReplicaSpec
from muxgate.replicas._tracing import tracing_active

__all__ = ["CallRunner", "Outcome"]

_log = logging.getLogger("muxgate.replica")
_tracer = trace.get_tracer("muxgate")

#: A call's outcome: (status, headers, body), or the error to reply with.
Outcome: TypeAlias = tuple[int, list[tuple[str, str]], bytes] | ErrorInfo


def _check_size(body: bytes, headers: list[tuple[str, str]]) -> None:
    """ValueError (the call's failure) for a reply the channel cannot carry."""
    size = len(body) + sum(len(k) + len(v) for k, v in headers)
    if size > MAX_BODY_BYTES:
        raise ValueError(f"The response is {size} bytes; a reply carries at most {MAX_BODY_BYTES}.")


class CallRunner:
    """Runs calls against ``instance``, at most ``limit`` sync ones in worker
    threads at a time."""

    def __init__(self, spec: ReplicaSpec, instance: Any, limit: int) -> None:
        self.spec = spec
        self.instance = instance
        # Worker threads for sync user code; an abandoned thread keeps its
        # token until it returns.
        self._limiter = anyio.CapacityLimiter(limit)
        # method name -> coroutine function? (inspect is slow on the hot path)
        self._async_methods: dict[str, bool] = {}
        #: the replica's task group, which holds a sync call's thread token
        #: until the thread returns (set once the replica serves)
        self.task_group: anyio.abc.TaskGroup | None = None

    async def execute(self, call: Call, time_left: float | None) -> Outcome:
        """Run ``call`` within ``time_left`` seconds (None: no deadline)."""
        with request_scope(call.request_id, call.model_id):
            if not tracing_active():
                # No exporter: skip the span machinery (a fifth of the
                # per-call cost) since nothing would record it.
                return await self._run_with_deadline(call, None, time_left)
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
                outcome = await self._run_with_deadline(call, span, time_left)
                if isinstance(outcome, ErrorInfo):
                    span.set_attribute("muxgate.error_code", outcome.code)
                    span.set_status(trace.Status(trace.StatusCode.ERROR, outcome.code))
                else:
                    span.set_attribute("http.response.status_code", outcome[0])
                return outcome

    async def _run_with_deadline(
        self, call: Call, span: trace.Span | None, time_left: float | None
    ) -> Outcome:
        timeout = time_left
        if timeout is None:
            return await self._run_guarded(call, span)
        if timeout <= 0:
            return ErrorInfo.of(ErrorCode.DEADLINE, "deadline passed")
        with anyio.move_on_after(timeout), call_deadline(timeout):
            # Handle calls made from here get only the time left (call_deadline).
            return await self._run_guarded(call, span)
        # Only reached when the deadline cancelled the call.
        return ErrorInfo.of(ErrorCode.DEADLINE, f"deadline of {timeout:.3f}s passed in the replica")

    async def _run_guarded(self, call: Call, span: trace.Span | None) -> Outcome:
        try:
            return await self._invoke_call(call)
        except CallFailed as failed:
            return failed.error
        except BaseException as exc:
            # SystemExit, KeyboardInterrupt or a CancelledError the code raised
            # itself fail the request, not the replica; a real cancellation
            # (the deadline, the client gone, the replica stopping) goes on.
            if is_cancellation(exc):
                raise
            error = error_for(exc, http=call.http is not None)
            if error.code in EXPECTED_BACKEND_CODES:
                # An outcome, not a bug: the full detail, no traceback, once:
                # not again if this request's own failed model load wrote it.
                if not outcome_logged_for(exc, call.request_id):
                    _log.warning(
                        "Request %s: %s: %s",
                        call.request_id,
                        type(exc).__name__,
                        exc,
                        extra={OUTCOME: error.code},
                    )
            elif error.code in (ErrorCode.BAD_REQUEST, ErrorCode.MODEL_TOO_LARGE):
                _log.warning("%s", error.message, extra={OUTCOME: error.code})
            elif traceback_logged(exc):
                # the failed model load logged it, once for all its waiters
                _log.error(
                    "Request %s failed: %s of the model load logged above.",
                    call.request_id,
                    type(exc).__name__,
                )
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
            _check_size(encoded[2], encoded[1])
            return encoded
        target = self._target(call.method)
        try:
            args = msgspec.msgpack.decode(call.args) if call.args else []
            kwargs = msgspec.msgpack.decode(call.kwargs) if call.kwargs else {}
        except msgspec.DecodeError as exc:
            raise bad_request(f"undecodable arguments: {exc}") from exc
        except RecursionError as exc:  # msgspec's depth limit
            raise bad_request("undecodable arguments: nested too deeply") from exc
        if (
            not isinstance(args, list)
            or not isinstance(kwargs, dict)
            or not all(isinstance(name, str) for name in kwargs)
        ):
            raise bad_request("args must be a list, kwargs a map with string keys")
        result = await self._invoke(call.method, target, tuple(args), kwargs)
        try:
            body = msgspec.msgpack.encode(result)
        except TypeError as exc:
            if inspect.iscoroutine(result):
                result.close()  # never awaited: no warning about it later
            what = f"the {type(result).__name__} that {call.method}() returned"
            raise not_a_value(what, exc) from exc
        _check_size(body, [])
        return 200, [], body

    def _target(self, name: str) -> Callable[..., Any]:
        # Only public methods and __call__ are reachable from the wire.
        if name != "__call__" and (not name or name.startswith("_")):
            raise bad_request(f"method {name!r} is not callable")
        target = getattr(self.instance, name, None)
        if not callable(target) and name == "__call__":
            raise bad_request(
                f"{self.spec.deployment} has no __call__ method, so it answers no HTTP"
                " request and no handle.remote(); call its methods by name through a"
                " handle (handle.method.remote())"
            )
        if not callable(target):
            raise bad_request(f"{self.spec.deployment} has no method {name!r}{self._nearest(name)}")
        return target  # type: ignore[no-any-return]

    def _nearest(self, name: str) -> str:
        """``"; did you mean 'predict'?"`` for the closest public method."""
        cls = type(self.instance)  # static lookups: no property runs
        found = {n: inspect.getattr_static(cls, n, None) for n in dir(cls) if n[:1] != "_"}
        methods = [n for n, v in found.items() if callable(v) or isinstance(v, classmethod)]
        return nearest(name, methods)

    async def _invoke(
        self, name: str, target: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        is_async = self._async_methods.get(name)
        if is_async is None:
            is_async = self._async_methods[name] = is_async_callable(target)
        if is_async:
            return await target(*args, **kwargs)
        result = await self._run_in_thread(functools.partial(target, *args, **kwargs))
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _run_in_thread(self, func: Callable[[], Any]) -> Any:
        """Run sync user code in a worker thread; see the module docstring
        for what happens when the call is abandoned.

        The thread runs with this request's context (request scope, span), so
        get_multiplexed_model_id() and logging work, inside a request scope
        of its own: the pins it takes are released when it returns. A helper
        task in the replica's task group holds the thread token until then,
        while this call's task may be cancelled and move on.
        """
        assert self.task_group is not None
        request = current_request()
        request_id = request.request_id if request is not None else ""
        model_id = request.multiplexed_model_id if request is not None else ""

        # Handle calls the thread makes run on this loop (remote() in sync code).
        calls = SyncCalls(asyncio.get_running_loop())

        def work() -> Any:
            with request_scope(request_id, model_id), calls.bound():
                return func()

        ctx = contextvars.copy_context()
        done = anyio.Event()
        outcome: list[tuple[bool, Any]] = []

        async def hold() -> None:
            try:
                # Abandoned only when the replica's task group stops (exit).
                value = await anyio.to_thread.run_sync(
                    ctx.run, work, abandon_on_cancel=True, limiter=self._limiter
                )
                outcome.append((True, value))
            except BaseException as exc:
                if is_cancellation(exc):
                    raise
                outcome.append((False, exc))  # SystemExit too: the call's failure
            finally:
                done.set()

        self.task_group.start_soon(hold)
        try:
            await done.wait()
        except BaseException:
            # Abandoned: the thread runs on, but the handle calls it waits for
            # are cancelled, as those an async method awaits would be.
            calls.abandon()
            raise
        if not outcome:  # the helper was cancelled: the replica is stopping
            raise anyio.get_cancelled_exc_class()
        ok, value = outcome[0]
        if not ok:
            raise value
        return value
