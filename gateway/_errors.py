"""Gateway errors and the one place they become HTTP responses.

Every failure a client can see is a ``GatewayError`` subclass with a stable
``code`` and an HTTP ``status``. ``error_response`` is the only function that
turns an exception into a response, so the mapping lives in exactly one
module: clients get the code, a message meant for them and the request id,
never a traceback or the ``str()`` of an internal error.

Messages that come from a replica are passed through ``client_safe`` first:
storage errors already arrive as words fit for a client (``muxgate.backends``
keeps the URL in a field for the replica's log), but a deployment's own
exception can say anything, so URLs, absolute paths and things that look
like credentials are replaced before a client sees them. The replica logs
the full message once.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

import msgspec

from muxgate.replicas.contract import ErrorCode, ErrorInfo

__all__ = [
    "DEADLINE_SOURCE",
    "WWW_AUTHENTICATE",
    "AdminForbiddenError",
    "BadModelIdError",
    "BadRequestError",
    "ConfigError",
    "DeadlineExceededError",
    "DeploymentError",
    "GatewayError",
    "HeadersTooLargeError",
    "InternalError",
    "ModelNotFoundError",
    "NoReplicaError",
    "OverCapacityError",
    "PayloadTooLargeError",
    "QuarantinedError",
    "ReplicaFailedError",
    "RequestTimeoutError",
    "RouteNotFoundError",
    "ShuttingDownError",
    "StorageDeniedError",
    "StorageUnavailableError",
    "client_safe",
    "did_you_mean",
    "error_body",
    "error_from_info",
    "error_response",
    "no_deployment_named",
]


class ConfigError(Exception):
    """The application config file is invalid; the message names the file,
    the field's path and the reason."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.reason = message


class GatewayError(Exception):
    """Base of every error a client of the gateway can receive.

    A subclass names its ``code`` (an ``ErrorCode``); its ``status`` is the
    code's own unless the subclass says otherwise.
    """

    status: int = ErrorCode.INTERNAL.status
    code: str = ErrorCode.INTERNAL
    #: seconds for a ``Retry-After`` header, or ``None`` for no header
    retry_after: int | None = None
    #: answer with ``connection: close`` (the rest of the request is not read)
    close_connection: bool = False
    #: more response headers (a 405's ``allow``)
    extra_headers: tuple[tuple[bytes, bytes], ...] = ()

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        #: the replica that produced the error, if any (``x-muxgate-replica``)
        self.replica_id = ""

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        code = cls.__dict__.get("code")
        if isinstance(code, ErrorCode) and "status" not in cls.__dict__:
            cls.status = code.status


class BadModelIdError(GatewayError):
    """The model id header is not 1-256 printable ASCII without whitespace."""

    code = ErrorCode.BAD_MODEL_ID


class BadRequestError(GatewayError):
    """The request is malformed (reported by the gateway or the replica)."""

    code = ErrorCode.BAD_REQUEST


#: what a 401 must carry (RFC 9110, 11.6.1): the scheme the admin API takes
WWW_AUTHENTICATE = (b"www-authenticate", b'Bearer realm="muxgate"')


class AdminForbiddenError(GatewayError):
    """Admin endpoint without the bearer token, or from a non-local client."""

    code = ErrorCode.UNAUTHORIZED
    extra_headers = (WWW_AUTHENTICATE,)


class RouteNotFoundError(GatewayError):
    """No deployment's route prefix matches the path."""

    code = ErrorCode.NOT_FOUND


class ModelNotFoundError(GatewayError):
    """The replica could not find the model in storage."""

    code = ErrorCode.MODEL_NOT_FOUND


class RequestTimeoutError(GatewayError):
    """The client did not send its headers or body in time
    (``http.limits.header_timeout_s``, ``body_timeout_s``)."""

    code = ErrorCode.REQUEST_TIMEOUT
    close_connection = True


class HeadersTooLargeError(GatewayError):
    """The request's headers are over ``http.limits.max_header_bytes`` or
    ``max_headers`` (refused while they arrive)."""

    code = ErrorCode.HEADERS_TOO_LARGE
    close_connection = True


class PayloadTooLargeError(GatewayError):
    """The request body is over ``http.max_body_bytes`` (announced by its
    ``content-length``, or counted while a chunked one arrives). The rest of
    the body is not read: the connection is closed."""

    code = ErrorCode.PAYLOAD_TOO_LARGE
    close_connection = True


class DeploymentError(GatewayError):
    """The deployment's code raised; the replica keeps serving."""

    code = ErrorCode.USER_ERROR


class InternalError(GatewayError):
    """A bug in the gateway; the message given to clients is generic."""

    code = ErrorCode.INTERNAL


class ReplicaFailedError(GatewayError):
    """The replica died while the request was in flight."""

    code = ErrorCode.REPLICA_DIED


class OverCapacityError(GatewayError):
    """The deployment's queue is full (or the replica is draining)."""

    code = ErrorCode.OVER_CAPACITY

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NoReplicaError(GatewayError):
    """The deployment has no replica running and none starting."""

    code = ErrorCode.NO_REPLICA

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StorageUnavailableError(GatewayError):
    """The replica's model storage kept failing after its retries; try again later."""

    code = ErrorCode.STORAGE_UNAVAILABLE

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StorageDeniedError(GatewayError):
    """The replica's model storage refused its credentials, or it has none."""

    code = ErrorCode.STORAGE_DENIED

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QuarantinedError(GatewayError):
    """The model id was loading or in flight when replicas died, repeatedly;
    it is refused until its back-off ends (``Retry-After``)."""

    code = ErrorCode.QUARANTINED

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDownError(GatewayError):
    """The gateway is shutting down: the request came after the shutdown began,
    or was still running when the grace period (``http.shutdown_grace_s``) ended."""

    code = ErrorCode.SHUTTING_DOWN
    retry_after = 1
    close_connection = True


class DeadlineExceededError(GatewayError):
    """The request's deadline passed before it was answered."""

    code = ErrorCode.DEADLINE


#: what a 504's message ends with: the settings that made the deadline
DEADLINE_SOURCE = " (http.request_timeout_s, or a handle call's shorter timeout)"


# Replica-side ErrorInfo.code -> gateway error class.
_INFO_CODES: dict[str, type[GatewayError]] = {
    cls.code: cls
    for cls in (
        DeploymentError,
        ModelNotFoundError,
        BadModelIdError,
        BadRequestError,
        StorageUnavailableError,
        StorageDeniedError,
        DeadlineExceededError,
        PayloadTooLargeError,
    )
}


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>()\[\]{},]+")
# Two or more components, not inside a relative path or a URL: "/srv/models/x".
_PATH = re.compile(r"(?<![\w.~:/\-])(?:/[\w.~@+%\-]+){2,}/?")
_SECRET = re.compile(
    r"(?i)(?<![A-Za-z0-9/.])(password|passwd|secret|token|api[_-]?key|access[_-]?key(?:[_-]?id)?"
    r"|secret[_-]?access[_-]?key|authorization|credentials?)"
    r"(['\"]?\s*[:=]\s*['\"]?)(?:bearer\s+)?[^\s'\",;&]+"
)
_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")


def client_safe(message: str) -> str:
    """``message`` without URLs, absolute paths or credential-like values."""
    if "/" in message:
        message = _PATH.sub("<path>", _URL.sub("<url>", message))
    message = _SECRET.sub(r"\1\2<redacted>", message)
    return _KEY_ID.sub("<redacted>", message)


def error_from_info(info: ErrorInfo) -> GatewayError:
    """Translate a replica's ``ErrorInfo`` into the matching gateway error.

    The replica wrote ``message`` for clients (never a traceback, and for
    storage errors no URL); ``client_safe`` removes what a deployment's own
    exception message may still carry. Unknown codes fall back on the
    reported status.
    """
    message = client_safe(info.message)
    if info.code == ErrorCode.DRAINING:
        return OverCapacityError(message or "replica is draining")
    cls = _INFO_CODES.get(info.code)
    if cls is None:
        err = GatewayError(message)
        err.status = info.status if 400 <= info.status <= 599 else 500
        err.code = info.code or ErrorCode.INTERNAL
        return err
    return cls(message)


class _Body(msgspec.Struct):
    code: str
    message: str
    request_id: str


class _Envelope(msgspec.Struct):
    error: _Body


_encode = msgspec.json.Encoder().encode


def error_body(code: str, message: str, request_id: str) -> bytes:
    """The JSON error document ``{"error": {"code", "message", "request_id"}}``."""
    return _encode(_Envelope(_Body(code, message, request_id)))


def error_response(
    exc: BaseException, request_id: str
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Map any exception to ``(status, headers, body)``.

    ``GatewayError`` keeps its status, code and message; anything else is a
    gateway bug and becomes a generic 500 (the caller logs the traceback).
    """
    if not isinstance(exc, GatewayError):
        exc = InternalError("internal error in the gateway")
    headers = [(b"content-type", b"application/json")]
    if exc.retry_after is not None:
        headers.append((b"retry-after", str(exc.retry_after).encode()))
    if exc.close_connection:
        headers.append((b"connection", b"close"))
    headers.extend(exc.extra_headers)
    return exc.status, headers, error_body(exc.code, exc.message, request_id)


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``known`` (a slip of a
    letter or two), else ``""``."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


def no_deployment_named(name: str, known: Iterable[str]) -> str:
    """``no deployment named 'Modle'; did you mean 'Model'?`` for a slip of a
    letter or two, else the deployments there are (up to 10). For admin and
    handle callers only: they may know the names."""
    names = sorted(known)
    hint = did_you_mean(name, names)
    if hint:
        return f"no deployment named {name!r}{hint}"
    if not names or len(names) > 10:
        return f"no deployment named {name!r}"
    return f"no deployment named {name!r} (deployments: {', '.join(names)})"
