"""Request (what __call__ receives) and encode_result (what it returns)."""

from __future__ import annotations

import msgspec
import pytest

from muxgate.replicas import multiplexed
from muxgate.replicas._call_errors import error_for
from muxgate.replicas._context import request_scope
from muxgate.replicas._http import (
    BadRequestError,
    MissingModelIdError,
    Request,
    RequestBodyDecodeError,
    RequestBodyTextError,
    Response,
    empty_model_id_error,
    encode_result,
)
from muxgate.replicas._protocol import HttpRequest

JSON = [("content-type", "application/json")]
TEXT = [("content-type", "text/plain; charset=utf-8")]
OCTETS = [("content-type", "application/octet-stream")]


@pytest.mark.anyio
async def test_request_from_the_wire() -> None:
    wire = HttpRequest(
        method="post",
        path="/predict",
        query="a=1&b=&a=2",
        headers=[("content-type", "application/json"), ("x-tag", "one"), ("x-tag", "two")],
        body=b'{"x": [1, 2]}',
    )
    request = Request.from_wire(wire)
    assert request.method == "POST"
    assert request.path == "/predict"
    assert request.query_string == "a=1&b=&a=2"
    assert request.query_params["a"] == "1"
    assert request.query_params.getlist("a") == ["1", "2"]
    assert request.query_params["b"] == ""
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers.get("X-TAG") == "one"
    assert request.headers.getlist("x-Tag") == ["one", "two"]
    assert "CONTENT-TYPE" in request.headers
    assert "missing" not in request.headers
    assert await request.body() == b'{"x": [1, 2]}'
    assert await request.json() == {"x": [1, 2]}
    assert await request.text() == '{"x": [1, 2]}'
    assert repr(request) == "<Request POST /predict?a=1&b=&a=2 body=13B>"


@pytest.mark.anyio
async def test_request_json_of_a_bad_body_raises_msgspec_decode_error() -> None:
    with pytest.raises(msgspec.DecodeError):
        await Request("POST", "/", body=b"not json").json()


class Point(msgspec.Struct):
    x: int
    y: int


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        ({"y": [1.5]}, (200, JSON, b'{"y":[1.5]}')),
        ([1, "a"], (200, JSON, b'[1,"a"]')),
        (3, (200, JSON, b"3")),
        (2.5, (200, JSON, b"2.5")),
        (None, (200, JSON, b"null")),
        (True, (200, JSON, b"true")),
        ("héllo", (200, TEXT, "héllo".encode())),
        (b"\x00\x01", (200, OCTETS, b"\x00\x01")),
        (bytearray(b"ab"), (200, OCTETS, b"ab")),
        (Point(1, 2), (200, JSON, b'{"x":1,"y":2}')),
    ],
)
def test_encode_result_of_plain_values(result: object, expected: object) -> None:
    assert encode_result(result) == expected


def test_encode_result_of_a_response() -> None:
    assert encode_result(Response({"error": "nope"}, status_code=422)) == (
        422,
        JSON,
        b'{"error":"nope"}',
    )
    assert encode_result(Response("<b>hi</b>", media_type="text/html")) == (
        200,
        [("content-type", "text/html")],
        b"<b>hi</b>",
    )
    assert encode_result(Response(b"raw", headers={"X-Model": "7"})) == (
        200,
        [("x-model", "7"), ("content-type", "application/octet-stream")],
        b"raw",
    )
    assert encode_result(Response("x", headers=[("Content-Type", "text/csv")])) == (
        200,
        [("content-type", "text/csv")],
        b"x",
    )
    assert encode_result(Response(None, status_code=204)) == (204, [], b"")


def test_encode_result_refuses_what_it_cannot_encode() -> None:
    with pytest.raises(TypeError, match="Cannot turn a object into a response"):
        encode_result(object())
    # A dict is fine, what is in it is not: say that, and how to fix a tensor.
    import torch

    with pytest.raises(TypeError) as info:
        encode_result({"y": torch.zeros(2)})
    assert str(info.value) == (
        "Cannot encode the dict returned as JSON: Encoding objects of type Tensor is"
        " unsupported (call .tolist() on tensors and arrays)."
    )

    async def forgot() -> dict[str, int]:
        return {}

    with pytest.raises(TypeError, match=r"^A coroutine is not a response: an `await` is missing"):
        encode_result(forgot())  # closed: no "never awaited" warning (warnings are errors)
    with pytest.raises(ValueError, match="status_code must be between 200 and 599, got 600"):
        Response("x", status_code=600)
    # Headers no HTTP server could send fail in the deployment's code (a 500
    # user_error naming them), not as a dropped connection.
    with pytest.raises(ValueError, match=r"^Invalid value of response header 'x-a': '1\\r\\nx-b"):
        Response("x", headers={"x-a": "1\r\nx-b: 2"})
    with pytest.raises(ValueError, match="outside Latin-1"):
        Response("x", headers=[("x-a", "\u65e5")])
    with pytest.raises(ValueError, match=r"^Invalid response header name 'bad name'"):
        Response("x", headers={"bad name": "1"})
    with pytest.raises(ValueError, match="content-type"):
        Response("x", media_type="text/plain\r\nx-b: 1")
    assert Response("x", headers={"Set-Cookie": "a=b; Path=/", "x-c": "caf\u00e9"}).headers == [
        ("set-cookie", "a=b; Path=/"),
        ("x-c", "caf\u00e9"),
    ]
    with pytest.raises(ValueError, match="status_code must be between 200 and 599, got 101"):
        Response("x", status_code=101)  # an interim answer: the client would wait on
    with pytest.raises(TypeError, match="status_code must be an int, got str"):
        Response("x", status_code="200")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_body_that_is_not_json_is_the_clients_mistake() -> None:
    request = Request("POST", body=b'{"x": [1')
    with pytest.raises(RequestBodyDecodeError, match=r"^The request body is not valid JSON: ") as e:
        await request.json()
    # still what code that catches decode errors expects
    assert isinstance(e.value, msgspec.DecodeError)
    assert isinstance(e.value, BadRequestError)
    empty = Request("GET", body=b"")
    with pytest.raises(RequestBodyDecodeError, match=r"JSON: the body is empty$"):
        await empty.json()
    # the deployment's own decoding is not the client's mistake
    with pytest.raises(msgspec.DecodeError) as own:
        msgspec.json.decode(b'{"x": [1')
    assert not isinstance(own.value, BadRequestError)


@pytest.mark.anyio
async def test_a_body_that_is_not_utf8_is_the_clients_mistake_for_text() -> None:
    request = Request("POST", body=b"caf\xe9")
    with pytest.raises(RequestBodyTextError) as e:
        await request.text()
    assert str(e.value).startswith("The request body is not valid UTF-8: 'utf-8' codec")
    assert isinstance(e.value, UnicodeDecodeError)  # what code catching it expects
    assert isinstance(e.value, BadRequestError)
    assert error_for(e.value).code == "bad_request"
    assert await Request("POST", body="café".encode()).text() == "café"


def test_an_empty_model_id_is_the_clients_mistake_only_in_a_request_without_one() -> None:
    outside = empty_model_id_error()
    assert type(outside) is ValueError
    assert str(outside) == "The model ID cannot be empty."
    with request_scope("r1", ""):
        missing = empty_model_id_error()
    assert isinstance(missing, MissingModelIdError) and isinstance(missing, ValueError)
    assert str(missing) == (
        "The model ID cannot be empty: the request has no 'serve_multiplexed_model_id' header."
    )
    with request_scope("r2", "7"):
        assert type(empty_model_id_error()) is ValueError


def test_a_loader_called_without_await_names_the_missing_await() -> None:
    @multiplexed
    async def get_model(model_id: str) -> str:
        return model_id

    model = get_model("m1")  # what a plain `def __call__` gets: a coroutine
    try:
        with pytest.raises(TypeError) as raised:
            model("x")
    finally:
        model.close()
    info = error_for(raised.value)
    assert (info.code, info.status) == ("user_error", 500)
    assert info.message == (
        "TypeError: 'coroutine' object is not callable (an `await` is missing, e.g. a"
        " @multiplexed loader called from a plain `def` method: it is a coroutine function,"
        " to await from an `async def` one)"
    )


def test_a_state_dict_loaded_without_await_names_the_missing_await() -> None:
    """The README's loader with the ``await`` before ``load_state_dict``
    left out: torch's own type check gets the coroutine."""
    import torch

    async def load_state_dict() -> dict[str, torch.Tensor]:
        return {}

    state = load_state_dict()
    try:
        with pytest.raises(TypeError) as raised:
            torch.nn.Linear(1, 1).load_state_dict(state)  # type: ignore[arg-type]
    finally:
        state.close()
    info = error_for(raised.value)
    assert (info.code, info.status) == ("user_error", 500)
    assert info.message.startswith(
        "TypeError: Expected state_dict to be dict-like, got <class 'coroutine'>. (an `await`"
        " is missing, e.g. a @multiplexed loader"
    )
