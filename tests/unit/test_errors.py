"""The one mapping from exceptions to HTTP error responses."""

from __future__ import annotations

import json

import pytest

from muxgate import backends
from muxgate.gateway._errors import (
    BadModelIdError,
    DeadlineExceededError,
    DeploymentError,
    GatewayError,
    ModelNotFoundError,
    NoReplicaError,
    OverCapacityError,
    PayloadTooLargeError,
    ReplicaFailedError,
    RouteNotFoundError,
    StorageUnavailableError,
    error_body,
    error_from_info,
    error_response,
    no_deployment_named,
)
from muxgate.replicas._call_errors import error_for as _error_for
from muxgate.replicas.contract import (
    ErrorCode,
    ErrorInfo,
    FrameDecoder,
    ReplicaState,
    Reply,
    encode_frame,
)


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (BadModelIdError("m"), 400, "bad_model_id"),
        (RouteNotFoundError("m"), 404, "not_found"),
        (ModelNotFoundError("m"), 404, "model_not_found"),
        (PayloadTooLargeError("m"), 413, "payload_too_large"),
        (DeploymentError("m"), 500, "user_error"),
        (ReplicaFailedError("m"), 502, "replica_died"),
        (OverCapacityError("m"), 503, "over_capacity"),
        (NoReplicaError("m"), 503, "no_replica"),
        (DeadlineExceededError("m"), 504, "deadline"),
    ],
)
def test_statuses_and_body(exc: GatewayError, status: int, code: str) -> None:
    got_status, headers, body = error_response(exc, "rid")
    assert got_status == status
    assert json.loads(body) == {"error": {"code": code, "message": "m", "request_id": "rid"}}
    assert (b"content-type", b"application/json") in headers
    assert any(k == b"retry-after" for k, _ in headers) == (status == 503)


def test_internal_errors_hide_details() -> None:
    status, _, body = error_response(RuntimeError("secret path /etc/x"), "rid")
    assert status == 500
    assert b"secret" not in body
    assert json.loads(body)["error"]["code"] == "internal"


@pytest.mark.parametrize(
    ("code", "cls", "status"),
    [
        ("user_error", DeploymentError, 500),
        ("model_not_found", ModelNotFoundError, 404),
        ("deadline", DeadlineExceededError, 504),
        ("payload_too_large", PayloadTooLargeError, 413),
        ("draining", OverCapacityError, 503),
        ("bad_model_id", BadModelIdError, 400),
        ("storage_unavailable", StorageUnavailableError, 503),
    ],
)
def test_replica_error_codes(code: str, cls: type[GatewayError], status: int) -> None:
    err = error_from_info(ErrorInfo(code=code, message="msg", status=status))
    assert isinstance(err, cls)
    assert err.status == status


def test_unknown_replica_code_keeps_status() -> None:
    err = error_from_info(ErrorInfo(code="teapot", message="short", status=418))
    assert (err.status, err.code, err.message) == (418, "teapot", "short")
    err = error_from_info(ErrorInfo(code="odd", message="x", status=200))
    assert err.status == 500


@pytest.mark.parametrize(
    ("exc", "code", "status"),
    [
        (backends.ModelNotFoundError("s3://b/m/model.pt"), "model_not_found", 404),
        (backends.InvalidModelIdError("../m", "leaves the root"), "bad_model_id", 400),
        (
            backends.StorageUnavailableError("s3://b/m", attempts=3, elapsed=1.0, reason="reset"),
            "storage_unavailable",
            503,
        ),
        (backends.ModelFormatError("file:///m", "torch", "truncated"), "user_error", 500),
        (RuntimeError("bug in the model"), "user_error", 500),
    ],
)
def test_backend_errors_raised_in_a_replica_keep_their_meaning(
    exc: Exception, code: str, status: int
) -> None:
    info = _error_for(exc)
    assert (info.code, info.status) == (code, status)
    if isinstance(exc, backends.BackendError):
        # what the client reads names no bucket, URL or path
        assert info.message == exc.client_message
        assert "://" not in info.message and "b/m" not in info.message
    else:
        assert info.message == f"{type(exc).__name__}: {exc}"
    status_, headers, _ = error_response(error_from_info(info), "rid")
    assert status_ == status
    # a storage outage is worth retrying, and says when
    assert any(k == b"retry-after" for k, _ in headers) == (status == 503)


def _subclasses(cls: type[GatewayError]) -> list[type[GatewayError]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def test_every_gateway_error_has_an_error_code_and_its_status() -> None:
    classes = _subclasses(GatewayError)
    assert len(classes) >= 15
    for cls in classes:
        assert isinstance(cls.code, ErrorCode), cls
        assert cls.status == cls.code.status, cls


def test_error_codes_travel_as_plain_strings() -> None:
    sent = Reply(id=1, state=ReplicaState(), error=ErrorInfo.of(ErrorCode.OVERLOADED, "busy"))
    (received,) = FrameDecoder().feed(encode_frame(sent))
    assert isinstance(received, Reply) and received.error is not None
    assert (received.error.code, received.error.status) == ("overloaded", 503)
    assert received.error.code == ErrorCode.OVERLOADED
    # a code this version does not know still decodes, and keeps its status
    unknown = error_from_info(ErrorInfo(code="from_the_future", message="m", status=418))
    assert (unknown.code, unknown.status) == ("from_the_future", 418)
    assert json.loads(error_body(ErrorCode.NO_REPLICA, "m", "r"))["error"]["code"] == "no_replica"


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        (
            "FileNotFoundError: [Errno 2] No such file or directory: '/srv/models/7/model.pt'",
            "FileNotFoundError: [Errno 2] No such file or directory: '<path>'",
        ),
        (
            "OSError: cannot read s3://my-bucket/m/7 (endpoint http://10.0.0.3:9000)",
            "OSError: cannot read <url> (endpoint <url>)",
        ),
        (
            "RuntimeError: aws_secret_access_key=ab/C+d password: hunter2, token=Bearer xyz",
            "RuntimeError: aws_secret_access_key=<redacted> password: <redacted>, token=<redacted>",
        ),
        ("KeyError: AKIAABCDEFGHIJKLMNOP", "KeyError: <redacted>"),
        # Left alone: one-component paths, ratios, a refused id echoed back.
        ("ValueError: bad ratio 1/2 for /predict", "ValueError: bad ratio 1/2 for /predict"),
        (
            "invalid model id '../../etc/passwd': would leave the storage root",
            "invalid model id '../../etc/passwd': would leave the storage root",
        ),
    ],
)
def test_messages_from_replicas_are_made_client_safe(message: str, shown: str) -> None:
    from muxgate.gateway._errors import client_safe

    assert client_safe(message) == shown
    error = error_from_info(ErrorInfo(code="user_error", message=message, status=500))
    assert error.message == shown


def test_edge_errors_close_the_connection() -> None:
    from muxgate.gateway._errors import (
        HeadersTooLargeError,
        RequestTimeoutError,
        ShuttingDownError,
    )

    for exc, status, retry in (
        (HeadersTooLargeError("m"), 431, None),
        (RequestTimeoutError("m"), 408, None),
        (ShuttingDownError("m"), 503, b"1"),
    ):
        got, headers, _ = error_response(exc, "rid")
        assert got == status
        assert (b"connection", b"close") in headers
        assert dict(headers).get(b"retry-after") == retry


def test_no_deployment_named_suggests_the_closest_or_lists_them() -> None:
    known = ["Model", "Ensemble"]
    assert no_deployment_named("Modle", known) == (
        "no deployment named 'Modle'; did you mean 'Model'?"
    )
    assert no_deployment_named("Nope", known) == (
        "no deployment named 'Nope' (deployments: Ensemble, Model)"
    )
    many = [f"D{i}" for i in range(11)]  # more than 10: not listed
    assert no_deployment_named("Nope", many) == "no deployment named 'Nope'"
    assert no_deployment_named("Nope", []) == "no deployment named 'Nope'"
