"""What user code sees of HTTP: :class:`Request` in, a return value or :class:`Response` out.

The replica receives an :class:`~muxgate.replicas._protocol.HttpRequest` from the
gateway, builds a :class:`Request` for ``__call__``, and turns whatever it returns
into ``(status, headers, body)`` with :func:`encode_result`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import parse_qsl

import msgspec

from muxgate.replicas._context import current_request
from muxgate.replicas._protocol import HttpRequest

__all__ = [
    "MODEL_ID_HEADER",
    "BadRequestError",
    "Headers",
    "MissingModelIdError",
    "QueryParams",
    "Request",
    "RequestBodyDecodeError",
    "Response",
    "empty_model_id_error",
    "encode_result",
]

#: the request header that carries the multiplexed model id
MODEL_ID_HEADER = "serve_multiplexed_model_id"

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
OCTETS = "application/octet-stream"
_json_encoder = msgspec.json.Encoder()
_NO_BODY_STATUSES = frozenset({204, 304})


class BadRequestError(Exception):
    """The request is malformed: the client's mistake, not the deployment's.

    A replica answers it with 400 ``bad_request`` and this message, wherever
    in user code it surfaces (user code that catches it keeps full control).
    """


class RequestBodyDecodeError(BadRequestError, msgspec.DecodeError):
    """``Request.json()`` could not decode the body.

    Still a ``msgspec.DecodeError`` (and a ``ValueError``) for code that
    catches those; a ``DecodeError`` raised by the user's own decoding is not
    one of these, and stays a 500 ``user_error``.
    """


class RequestBodyTextError(BadRequestError, UnicodeDecodeError):
    """``Request.text()`` could not decode the body as UTF-8.

    Still a ``UnicodeDecodeError`` (a ``ValueError``) for code that catches
    those; the same error from the user's own ``bytes.decode`` stays a 500.
    """

    def __str__(self) -> str:
        return f"The request body is not valid UTF-8: {UnicodeDecodeError.__str__(self)}"


class MissingModelIdError(BadRequestError, ValueError):
    """A multiplexed loader got an empty model id while serving a request
    that carried none (no model-id header, or a handle call without
    ``options(multiplexed_model_id=...)``). A ``ValueError`` as before."""


def empty_model_id_error() -> ValueError:
    """What a multiplexed loader raises for an empty model id.

    Inside a request that carried no model id, the client forgot it:
    :class:`MissingModelIdError`, answered with 400. Anywhere else (outside a
    request, or the code passed ``""`` although the request had an id) it is
    the code's mistake: a plain ``ValueError``.
    """
    request = current_request()
    if request is not None and not request.multiplexed_model_id:
        return MissingModelIdError(
            f"The model ID cannot be empty: the request has no {MODEL_ID_HEADER!r} header."
        )
    return ValueError("The model ID cannot be empty.")


class _MultiDict(Mapping[str, str]):
    """A read-only multi-valued mapping: ``m[key]`` is the first value, ``getlist`` all."""

    __slots__ = ("_first", "_items")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items = [(self._fold(k), v) for k, v in items]
        self._first: dict[str, str] = {}
        for key, value in self._items:
            self._first.setdefault(key, value)

    @staticmethod
    def _fold(key: str) -> str:
        return key

    def __getitem__(self, key: str) -> str:
        return self._first[self._fold(key)]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._fold(key) in self._first

    def __iter__(self) -> Iterator[str]:
        return iter(self._first)

    def __len__(self) -> int:
        return len(self._first)

    def getlist(self, key: str) -> list[str]:
        """Every value of ``key``, in order."""
        folded = self._fold(key)
        return [v for k, v in self._items if k == folded]

    def multi_items(self) -> list[tuple[str, str]]:
        """All ``(key, value)`` pairs, repeats included, in order."""
        return list(self._items)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._items!r})"


class Headers(_MultiDict):
    """Request headers; names are case-insensitive (stored lower-case)."""

    __slots__ = ()

    @staticmethod
    def _fold(key: str) -> str:
        return key.lower()


class QueryParams(_MultiDict):
    """Query string parameters (case-sensitive, blank values kept)."""

    __slots__ = ()


class Request:
    """An HTTP request as user code sees it.

    Attributes:
        method: upper-case HTTP method.
        path: the path below the deployment's route prefix, starting with ``/``.
        query_string: the raw query string, without ``?``.
        query_params: parsed query parameters.
        headers: case-insensitive headers.
    """

    __slots__ = ("_body", "headers", "method", "path", "query_params", "query_string")

    def __init__(
        self,
        method: str = "GET",
        path: str = "/",
        *,
        query_string: str = "",
        headers: Iterable[tuple[str, str]] | Mapping[str, str] = (),
        body: bytes = b"",
    ) -> None:
        self.method = method.upper()
        self.path = path
        self.query_string = query_string
        self.query_params = QueryParams(parse_qsl(query_string, keep_blank_values=True))
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        self.headers = Headers(pairs)
        self._body = bytes(body)

    @classmethod
    def from_wire(cls, http: HttpRequest) -> Request:
        """Build from the gateway's :class:`HttpRequest` message."""
        return cls(
            http.method, http.path, query_string=http.query, headers=http.headers, body=http.body
        )

    async def body(self) -> bytes:
        """The whole request body."""
        return self._body

    async def text(self) -> str:
        """The body decoded as UTF-8.

        Raises:
            RequestBodyTextError: the body is not UTF-8 (a
                ``UnicodeDecodeError``; the client gets 400 ``bad_request``).
        """
        try:
            return self._body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestBodyTextError(
                exc.encoding, exc.object, exc.start, exc.end, exc.reason
            ) from exc

    async def json(self) -> Any:
        """The body decoded as JSON.

        Raises:
            RequestBodyDecodeError: the body is not JSON, or nested past the
                interpreter's recursion limit (a ``msgspec.DecodeError``; the
                client gets 400 ``bad_request``).
        """
        try:
            return msgspec.json.decode(self._body)
        except msgspec.DecodeError as exc:
            # msgspec calls an empty body "truncated": say what the client sent.
            reason = "the body is empty" if not self._body else str(exc)
            raise RequestBodyDecodeError(f"The request body is not valid JSON: {reason}") from exc
        except RecursionError as exc:  # msgspec's depth limit: the client's input too
            raise RequestBodyDecodeError(
                "The request body is not valid JSON: it is nested too deeply"
            ) from exc

    def __repr__(self) -> str:
        query = f"?{self.query_string}" if self.query_string else ""
        return f"<Request {self.method} {self.path}{query} body={len(self._body)}B>"


#: a header name: RFC 9110 token characters
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: a header value: visible Latin-1 characters, spaces and tabs (no CR, LF or NUL)
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


def _checked_header(name: str, value: str) -> tuple[str, str]:
    """``(name, value)``, or ValueError now, in the deployment's code, for
    what no HTTP server could send (the client would get no answer)."""
    if _HEADER_NAME.fullmatch(name) is None:
        raise ValueError(f"Invalid response header name {name!r}.")
    if _HEADER_VALUE.fullmatch(value) is None:
        raise ValueError(
            f"Invalid value of response header {name!r}: {value!r} (CR, LF, control"
            " characters and characters outside Latin-1 cannot be sent)."
        )
    return name, value


class Response:
    """An explicit response: status, headers and media type of the user's choosing.

    ``content`` is encoded like a plain return value (bytes as is, str as UTF-8
    text, anything else as JSON); ``media_type`` overrides the content type.
    """

    __slots__ = ("content", "headers", "media_type", "status_code")

    def __init__(
        self,
        content: Any = None,
        status_code: int = 200,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        media_type: str | None = None,
    ) -> None:
        if type(status_code) is not int:
            raise TypeError(f"status_code must be an int, got {type(status_code).__name__}.")
        if not 200 <= status_code <= 599:
            # 1xx are interim answers: sent as the final one, the client
            # would wait for another that never comes.
            raise ValueError(f"status_code must be between 200 and 599, got {status_code}.")
        self.content = content
        self.status_code = status_code
        pairs = headers.items() if isinstance(headers, Mapping) else (headers or ())
        self.headers = [_checked_header(str(k).lower(), str(v)) for k, v in pairs]
        if media_type is not None:
            _checked_header("content-type", media_type)
        self.media_type = media_type

    def __repr__(self) -> str:
        return f"<Response {self.status_code} {self.media_type or type(self.content).__name__}>"


def _encode_content(content: Any) -> tuple[str, bytes]:
    if isinstance(content, bytes | bytearray | memoryview):
        return OCTETS, bytes(content)
    if isinstance(content, str):
        return TEXT, content.encode("utf-8")
    try:
        return JSON, _json_encoder.encode(content)
    except TypeError as exc:
        kind = type(content).__name__
        if isinstance(content, dict | list | tuple | msgspec.Struct):
            # The container is fine; something inside it is not JSON.
            inner = str(exc)
            hint = (
                " (call .tolist() on tensors and arrays)"
                if "Tensor" in inner or ("ndarray" in inner)
                else ""
            )
            raise TypeError(f"Cannot encode the {kind} returned as JSON: {inner}{hint}.") from exc
        if inspect.iscoroutine(content):
            content.close()  # never awaited: no warning about it later
            raise TypeError("A coroutine is not a response: an `await` is missing.") from exc
        raise TypeError(
            f"Cannot turn a {kind} into a response; return a dict, list, "
            "str, number, None, bytes, a msgspec Struct or a Response."
        ) from exc


def encode_result(result: Any) -> tuple[int, list[tuple[str, str]], bytes]:
    """Turn what ``__call__`` returned into ``(status, headers, body)``.

    dict, list, number, bool, ``None`` and msgspec Structs become JSON; ``str``
    becomes ``text/plain; charset=utf-8``; bytes ``application/octet-stream``;
    a :class:`Response` keeps its status and headers (its 204/304 have no body).

    Raises:
        TypeError: the value cannot be encoded.
    """
    if not isinstance(result, Response):
        media_type, body = _encode_content(result)
        return 200, [("content-type", media_type)], body
    headers = list(result.headers)
    if result.status_code in _NO_BODY_STATUSES or result.status_code < 200:
        return result.status_code, headers, b""
    media_type, body = _encode_content(result.content)
    if result.media_type is not None:
        media_type = result.media_type
    if not any(name == "content-type" for name, _ in headers):
        headers.append(("content-type", media_type))
    return result.status_code, headers, body
