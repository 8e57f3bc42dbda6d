"""Gateway errors and the one place they become HTTP responses.

Every failure a client can see is a ``GatewayError`` subclass with a stable
``code`` and an HTTP ``status``. ``error_response`` is the only function that
turns an exception into a response, so the mapping lives in exactly one
module: clients get the code, a message meant for them and the request id,
never a traceback or the ``str()`` of an internal error.
"""

from __future__ import annotations

import msgspec

from muxgate.replicas.contract import ErrorInfo

__all__ = [
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
    "StorageUnavailableError",
    "error_body",
    "error_from_info",
    "error_response",
]


class ConfigError(Exception):
    """The application config file is invalid; the message names the file,
    the field's path and the reason."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.reason = message


class GatewayError(Exception):
    """Base of every error a client of the gateway can receive."""

    status: int = 500
    code: str = "internal"
    #: seconds for a ``Retry-After`` header, or ``None`` for no header
    retry_after: int | None = None
    #: answer with ``connection: close`` (the rest of the request is not read)
    close_connection: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        #: the replica that produced the error, if any (``x-muxgate-replica``)
        self.replica_id = ""


class BadModelIdError(GatewayError):
    """The model id header is not 1-256 printable ASCII without whitespace."""

    status = 400
    code = "bad_model_id"


class BadRequestError(GatewayError):
    """The request is malformed (reported by the gateway or the replica)."""

    status = 400
    code = "bad_request"


class AdminForbiddenError(GatewayError):
    """Admin endpoint without the bearer token, or from a non-local client."""

    status = 401
    code = "unauthorized"


class RouteNotFoundError(GatewayError):
    """No deployment's route prefix matches the path."""

    status = 404
    code = "not_found"


class ModelNotFoundError(GatewayError):
    """The replica could not find the model in storage."""

    status = 404
    code = "model_not_found"


class RequestTimeoutError(GatewayError):
    """The client did not send its headers or body in time
    (``http.limits.header_timeout_s``, ``body_timeout_s``)."""

    status = 408
    code = "request_timeout"
    close_connection = True


class HeadersTooLargeError(GatewayError):
    """The request's headers are over ``http.limits.max_header_bytes`` or
    ``max_headers`` (refused while they arrive)."""

    status = 431
    code = "headers_too_large"
    close_connection = True


class PayloadTooLargeError(GatewayError):
    """The request body is over ``http.max_body_bytes``."""

    status = 413
    code = "payload_too_large"


class DeploymentError(GatewayError):
    """The deployment's code raised; the replica keeps serving."""

    status = 500
    code = "user_error"


class InternalError(GatewayError):
    """A bug in the gateway; the message given to clients is generic."""

    status = 500
    code = "internal"


class ReplicaFailedError(GatewayError):
    """The replica died while the request was in flight."""

    status = 502
    code = "replica_died"


class OverCapacityError(GatewayError):
    """The deployment's queue is full (or the replica is draining)."""

    status = 503
    code = "over_capacity"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NoReplicaError(GatewayError):
    """The deployment has no replica running and none starting."""

    status = 503
    code = "no_replica"

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StorageUnavailableError(GatewayError):
    """The replica's model storage kept failing after its retries; try again later."""

    status = 503
    code = "storage_unavailable"

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QuarantinedError(GatewayError):
    """The model id was loading or in flight when replicas died, repeatedly;
    it is refused until its back-off ends (``Retry-After``)."""

    status = 503
    code = "quarantined"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDownError(GatewayError):
    """The gateway is shutting down: the request came after the shutdown began,
    or was still running when the grace period (``http.shutdown_grace_s``) ended."""

    status = 503
    code = "shutting_down"
    retry_after = 1
    close_connection = True


class DeadlineExceededError(GatewayError):
    """The request's deadline passed before it was answered."""

    status = 504
    code = "deadline"


# Replica-side ErrorInfo.code -> gateway error class.
_INFO_CODES: dict[str, type[GatewayError]] = {
    "user_error": DeploymentError,
    "model_not_found": ModelNotFoundError,
    "bad_model_id": BadModelIdError,
    "bad_request": BadRequestError,
    "storage_unavailable": StorageUnavailableError,
    "deadline": DeadlineExceededError,
    "payload_too_large": PayloadTooLargeError,
}


def error_from_info(info: ErrorInfo) -> GatewayError:
    """Translate a replica's ``ErrorInfo`` into the matching gateway error.

    The replica already wrote ``message`` for clients (it never includes a
    traceback); unknown codes fall back on the reported status.
    """
    if info.code == "draining":
        return OverCapacityError(info.message or "replica is draining")
    cls = _INFO_CODES.get(info.code)
    if cls is None:
        err = GatewayError(info.message)
        err.status = info.status if 400 <= info.status <= 599 else 500
        err.code = info.code or "internal"
        return err
    return cls(info.message)


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
    return exc.status, headers, error_body(exc.code, exc.message, request_id)
