"""Error codes: the one list of the stable codes a failure carries, from the
replica (``ErrorInfo.code``) through the gateway (``GatewayError.code``, the
JSON error body) to the handle client (``HandleError.code``).

Each code has the HTTP status it is answered with by default. A code is a
``str`` (``ErrorCode.USER_ERROR == "user_error"``), so it travels on the wire
and in JSON as its plain value, and a code a newer peer sends that this list
does not know still decodes as a string.
"""

from __future__ import annotations

import enum

__all__ = ["BACKEND_ERROR_CODES", "ErrorCode"]


class ErrorCode(enum.StrEnum):
    """A stable, machine-readable error code and its default HTTP status."""

    status: int

    def __new__(cls, value: str, status: int) -> ErrorCode:
        member = str.__new__(cls, value)
        member._value_ = value
        member.status = status
        return member

    # -- the client's request --------------------------------------------------
    #: malformed request (body, arguments, method name, missing model id)
    BAD_REQUEST = "bad_request", 400
    #: the model id is not valid, or would leave the storage root
    BAD_MODEL_ID = "bad_model_id", 400
    #: admin endpoint without the token, or from a non-local client
    UNAUTHORIZED = "unauthorized", 401
    #: no deployment's route prefix matches the path
    NOT_FOUND = "not_found", 404
    #: the route exists but not for this HTTP method
    METHOD_NOT_ALLOWED = "method_not_allowed", 405
    #: the model is not in storage
    MODEL_NOT_FOUND = "model_not_found", 404
    #: the client was too slow sending the request
    REQUEST_TIMEOUT = "request_timeout", 408
    #: the request body is over the limit
    PAYLOAD_TOO_LARGE = "payload_too_large", 413
    #: the request's headers are over the limit
    HEADERS_TOO_LARGE = "headers_too_large", 431
    #: the caller cancelled the call (handle client)
    CANCELLED = "cancelled", 499

    # -- the deployment or the gateway failed --------------------------------
    #: the deployment's code raised; the replica keeps serving
    USER_ERROR = "user_error", 500
    #: a bug in the gateway (generic message)
    INTERNAL = "internal", 500
    #: the replica died while the call was in flight
    REPLICA_DIED = "replica_died", 502
    #: the model is larger than its replica's byte budget (max_bytes_per_replica)
    #: can ever hold: retrying cannot help, the deployment's config must change
    MODEL_TOO_LARGE = "model_too_large", 507

    # -- try again later ---------------------------------------------------------
    #: the deployment's queue is full, or the replica is draining
    OVER_CAPACITY = "over_capacity", 503
    #: the deployment has no replica running and none starting
    NO_REPLICA = "no_replica", 503
    #: the model id is refused for a while after replicas died with it
    QUARANTINED = "quarantined", 503
    #: the gateway is shutting down
    SHUTTING_DOWN = "shutting_down", 503
    #: model storage kept failing after its retries
    STORAGE_UNAVAILABLE = "storage_unavailable", 503
    #: model storage refused the replica's credentials, or it has none
    #: (a 503 as storage being down is: the replica cannot read the model;
    #: it lasts until an operator fixes the credentials or permissions)
    STORAGE_DENIED = "storage_denied", 503
    #: replica-side: the replica is stopping (the gateway answers over_capacity)
    DRAINING = "draining", 503
    #: replica-side: its own max_ongoing_requests guard refused the call
    #: (the gateway reroutes it)
    OVERLOADED = "overloaded", 503
    #: handle client: the gateway cannot be reached
    GATEWAY_UNREACHABLE = "gateway_unreachable", 503
    #: the request's deadline passed
    DEADLINE = "deadline", 504

    # -- handle client: an answer that is not a gateway error body ------------
    HTTP_ERROR = "http_error", 500


#: muxgate.backends errors that mean something to the client, by class name
#: (the package is optional in a replica and never imported by it), and
#: their codes. They are outcomes, not bugs: logged without a traceback.
#: Anything else user code raises is a 500 ``user_error``.
BACKEND_ERROR_CODES: dict[str, ErrorCode] = {
    "ModelNotFoundError": ErrorCode.MODEL_NOT_FOUND,
    # an id that would leave the storage root: the client's mistake, not ours
    "InvalidModelIdError": ErrorCode.BAD_MODEL_ID,
    # storage kept failing after retries: worth retrying later
    "StorageUnavailableError": ErrorCode.STORAGE_UNAVAILABLE,
    # credentials missing or refused: the deployment's storage setup, not its code
    "StorageAccessDeniedError": ErrorCode.STORAGE_DENIED,
}
