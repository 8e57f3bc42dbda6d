"""What a failed replica call answers: exceptions mapped to error codes.

User code, the SDK and the storage backends raise; the gateway gets an
``ErrorInfo`` (code and client message). ``muxgate.backends`` is optional in
a replica and never imported here: its errors are matched by class name.
"""

from __future__ import annotations

import asyncio
from typing import Final

from muxgate.replicas._codes import BACKEND_ERROR_CODES, ErrorCode
from muxgate.replicas._http import BadRequestError, MissingModelIdError
from muxgate.replicas._logging import describe_exception
from muxgate.replicas._multiplex import ModelTooLargeError
from muxgate.replicas._protocol import ErrorInfo

__all__ = [
    "EXPECTED_BACKEND_CODES",
    "CallFailed",
    "bad_request",
    "error_for",
    "is_backend_error",
    "is_cancellation",
]


class CallFailed(Exception):
    """Internal: a call ends with this ``ErrorInfo`` instead of a result."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


def bad_request(message: str) -> CallFailed:
    return CallFailed(ErrorInfo.of(ErrorCode.BAD_REQUEST, message))


#: Codes of backend errors that are outcomes (logged without a traceback).
EXPECTED_BACKEND_CODES: frozenset[str] = frozenset(BACKEND_ERROR_CODES.values())


#: the hint on a user error that used a coroutine as a value (typically a
#: ``@multiplexed`` loader called from a plain ``def`` method)
_MISSING_AWAIT: Final = (
    "an `await` is missing, e.g. a @multiplexed loader called from a plain `def`"
    " method: it is a coroutine function, to await from an `async def` one"
)


def _names_a_coroutine(message: str) -> bool:
    """Whether an error's text says it got a coroutine: Python's own
    ``'coroutine' object is not ...``, or a library's type check, as torch's
    ``load_state_dict`` ``got <class 'coroutine'>`` for an ``await`` missing
    before ``load_state_dict(...)`` of muxgate.backends."""
    return "'coroutine' object" in message or "<class 'coroutine'>" in message


def is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc``, caught around user code, is the current task being
    cancelled (by a deadline, a client gone, the replica stopping), which
    must go on, rather than the code's own failure, which fails only its call.

    An ``Exception`` and ``SystemExit``/``KeyboardInterrupt`` (the replica
    takes its signals with a handler, so neither comes from one) are the
    code's; any other ``BaseException`` (``CancelledError`` above all) is a
    cancellation only while someone is cancelling the task: code that raises
    ``CancelledError`` itself fails its call.
    """
    if isinstance(exc, Exception | SystemExit | KeyboardInterrupt):
        return False
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def is_backend_error(exc: BaseException) -> bool:
    return any(cls.__name__ == "BackendError" for cls in type(exc).__mro__)


def error_for(exc: BaseException, *, http: bool = True) -> ErrorInfo:
    """Map an exception raised by user code to what the gateway gets.

    A :class:`BadRequestError` (the body is not JSON, no model id) is the
    client's mistake: 400 ``bad_request`` with its message; for a handle call
    a missing model id names ``options(multiplexed_model_id=...)``. A
    ``TypeError`` or ``AttributeError`` about a ``'coroutine' object`` gets
    a hint that an ``await`` is missing.
    """
    if isinstance(exc, MissingModelIdError) and not http:
        return ErrorInfo.of(
            ErrorCode.BAD_REQUEST,
            "The model ID cannot be empty: the handle call has no model id;"
            " use handle.options(multiplexed_model_id=...).",
        )
    if isinstance(exc, BadRequestError):
        return ErrorInfo.of(ErrorCode.BAD_REQUEST, str(exc))
    if isinstance(exc, ModelTooLargeError):
        return ErrorInfo.of(ErrorCode.MODEL_TOO_LARGE, str(exc))
    message = describe_exception(exc)
    # muxgate.backends is optional here (and must not be imported eagerly):
    # match its errors by name anywhere in the class hierarchy.
    if is_backend_error(exc):
        # Its client_message names no bucket, path or endpoint; str(exc),
        # which does, goes to the replica's log (see ``CallRunner._run_guarded``).
        client = getattr(exc, "client_message", "")
        if isinstance(client, str) and client:
            message = client
    for cls in type(exc).__mro__:
        known = BACKEND_ERROR_CODES.get(cls.__name__)
        if known is not None:
            return ErrorInfo.of(known, message)
    if isinstance(exc, TypeError | AttributeError) and _names_a_coroutine(message):
        message += f" ({_MISSING_AWAIT})"
    return ErrorInfo.of(ErrorCode.USER_ERROR, message)
