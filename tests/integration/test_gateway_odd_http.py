"""Odd but legal HTTP/1.1 against ``muxgate serve`` as a user runs it (a
real gateway process, its log in a file), with raw sockets: each gets its
correct answer, and a flood of them leaves the log as it was.

* ``Connection: upgrade`` with ``Upgrade: websocket`` or ``h2c``: the
  gateway speaks HTTP/1.1 only and ignores the upgrade (RFC 9110 7.8): the
  request is served with its body (content-length or chunked, also after
  ``Expect: 100-continue``), and requests pipelined behind it too. uvicorn
  logged two warnings for each such request and dropped the body.
* ``CONNECT`` (a tunnel through a proxy) is 400 ``bad_request``.
* HTTP/1.0, pipelining, ``Expect: 100-continue``, an absolute-form target,
  a long header line under the limit and one over it.
* A request refused (431, 400 for its head or its body) while pipelined
  behind one in flight: the answer in flight comes first, then the refusal.

The log is read once the answers are in: the gateway writes a request's log
lines before it answers, so there is nothing to wait for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from serve_process import RawClient, ServedGateway, served_gateway

APPS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "apps"))

pytestmark = pytest.mark.slow

#: requests of each kind in a flood: the log must not grow with it
FLOOD = 100

WEBSOCKET = (
    b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)
H2C = (
    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
)


Gateway = ServedGateway
Client = RawClient


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config = (
        f"app_dir: {APPS}\n"
        "deployments:\n"
        "  - {name: Odd, import_path: 'gateway_apps:Echo1', num_replicas: 1}\n"
    )
    with served_gateway(tmp_path_factory.mktemp("odd_http"), config) as gw:
        yield gw


def echo(body: bytes) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(body)
    return answer


def request(
    target: bytes, headers: bytes = b"", body: bytes = b"", method: bytes = b"GET"
) -> bytes:
    if body and b"transfer-encoding" not in headers.lower():
        headers += b"Content-Length: %d\r\n" % len(body)
    return method + b" " + target + b" HTTP/1.1\r\nHost: gw\r\n" + headers + b"\r\n" + body


def new_lines(gw: Gateway, before: int) -> list[str]:
    return gw.log_lines()[before:]


def assert_quiet(lines: list[str]) -> None:
    """Nothing about upgrades, no warnings, and not a line per request."""
    assert not [line for line in lines if "upgrade" in line.lower() or "WARNING" in line], lines
    assert len(lines) < 5, lines


# -- upgrade ------------------------------------------------------------------------


@pytest.mark.parametrize("upgrade", [WEBSOCKET, H2C], ids=["websocket", "h2c"])
def test_an_upgrade_is_ignored_the_request_served_and_nothing_logged(
    gateway: Gateway, upgrade: bytes
) -> None:
    before = len(gateway.log_lines())
    body = b'{"x": [1, 2, 3, 4]}'
    chunked = b"Transfer-Encoding: chunked\r\n"
    for _ in range(FLOOD):
        with Client(gateway) as c:
            c.send(request(b"/x", upgrade))
            status, headers, answer = c.response()
            assert status == 200
            assert echo(answer)["path"] == "/x"
            assert "upgrade" not in headers.get("connection", "")
            # The connection is still HTTP/1.1: a body after an upgrade head
            # is the request's, by length or chunked, and what is pipelined
            # behind it is served in order.
            c.send(
                request(b"/body", upgrade, body, b"POST")
                + request(b"/body", upgrade + chunked, b"7\r\n" + body[:7] + b"\r\n", b"POST")
            )
            c.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body) - 7, body[7:]) + request(b"/after"))
            assert c.response()[::2] == (200, body)
            assert c.response()[::2] == (200, body)
            status, _, answer = c.response()
            assert (status, echo(answer)["path"]) == (200, "/after")
            # Expect: 100-continue with an upgrade: 100, then the body.
            expect = b"Expect: 100-continue\r\nContent-Length: %d\r\n" % len(body)
            c.send(request(b"/body", upgrade + expect, method=b"POST"))
            assert c.response()[0] == 100
            c.send(body)
            assert c.response()[::2] == (200, body)
    assert_quiet(new_lines(gateway, before))


def test_connect_is_refused_in_the_error_contract(gateway: Gateway) -> None:
    before = len(gateway.log_lines())
    for target in (b"example.com:443", b"/x"):
        for _ in range(FLOOD // 2):
            with Client(gateway) as c:
                c.send(request(target, method=b"CONNECT") + b"\x16\x03\x01tunnel bytes")
                status, headers, answer = c.response()
                assert status == 400
                assert headers["connection"] == "close"
                error = json.loads(answer)["error"]
                assert error["code"] == "bad_request"
                assert "CONNECT" in error["message"]
                assert error["request_id"] == headers["x-request-id"]
                assert c.closed()
    assert_quiet(new_lines(gateway, before))


# -- other odd but legal requests ----------------------------------------------------


def test_http_1_0_is_answered_and_closed(gateway: Gateway) -> None:
    for extra in (b"", b"Connection: keep-alive\r\n"):
        with Client(gateway) as c:
            c.send(b"GET /old HTTP/1.0\r\n" + extra + b"\r\n")
            status, headers, answer = c.response()
            assert (status, echo(answer)["path"]) == (200, "/old")
            assert headers["connection"] == "close"
            assert c.closed()


def test_pipelined_requests_are_answered_in_order(gateway: Gateway) -> None:
    with Client(gateway) as c:
        c.send(
            request(b"/slow?s=0.2")
            + request(b"/body", body=b"second", method=b"POST")
            + request(b"/third", b"Connection: close\r\n")
        )
        assert echo(c.response()[2])["path"] == "/slow"
        assert c.response()[::2] == (200, b"second")
        status, headers, answer = c.response()
        assert (status, echo(answer)["path"], headers["connection"]) == (200, "/third", "close")
        assert c.closed()


def test_expect_100_continue_gets_100_then_the_answer(gateway: Gateway) -> None:
    with Client(gateway) as c:
        c.send(request(b"/body", b"Expect: 100-continue\r\nContent-Length: 4\r\n", method=b"PUT"))
        assert c.response()[0] == 100
        c.send(b"data")
        assert c.response()[::2] == (200, b"data")


def test_an_absolute_form_target_is_routed_by_its_path(gateway: Gateway) -> None:
    with Client(gateway) as c:
        c.send(request(b"http://gw/x?q=1", b"serve_multiplexed_model_id: 7\r\n"))
        status, _, answer = c.response()
        assert status == 200
        assert (echo(answer)["path"], echo(answer)["model"]) == ("/x", "7")
        c.send(request(b"http://gw/-/healthz"))
        status, headers, answer = c.response()
        assert (status, json.loads(answer)) == (200, {"status": "ok"})
        assert headers["x-request-id"]


def test_a_long_header_line_is_served_under_the_limit_and_431_over_it(gateway: Gateway) -> None:
    before = len(gateway.log_lines())
    with Client(gateway) as c:
        c.send(request(b"/long", b"X-Long: " + b"a" * 60_000 + b"\r\n"))
        status, _, answer = c.response()
        assert (status, echo(answer)["path"]) == (200, "/long")
    for _ in range(FLOOD // 10):
        with Client(gateway) as c:
            c.send(request(b"/long", b"X-Long: " + b"a" * 70_000 + b"\r\n"))
            status, headers, answer = c.response()
            assert status == 431
            assert json.loads(answer)["error"]["code"] == "headers_too_large"
            assert headers["connection"] == "close"
    assert_quiet(new_lines(gateway, before))


@pytest.mark.parametrize(
    ("behind", "status"),
    [
        (request(b"/long", b"X-Long: " + b"a" * 70_000 + b"\r\n"), 431),
        (b"GET /x HTTP/1.1\r\nHost gw\r\n\r\n", 400),
        (request(b"/x", b"Transfer-Encoding: chunked\r\n", b"zz\r\n", b"POST"), 400),
    ],
    ids=["headers_too_large", "malformed", "malformed_body"],
)
def test_a_refused_request_pipelined_behind_one_in_flight_is_answered_after_it(
    gateway: Gateway, behind: bytes, status: int
) -> None:
    # Before, the refusal was written first, the answer in flight was lost
    # and each such connection logged an ERROR line.
    before = len(gateway.log_lines())
    for _ in range(FLOOD // 10):
        with Client(gateway) as c:
            c.send(request(b"/slow?s=0.1") + behind)
            got, _, answer = c.response()
            assert (got, echo(answer)["path"]) == (200, "/slow")
            got, headers, answer = c.response()
            assert (got, headers["connection"]) == (status, "close")
            assert json.loads(answer)["error"]["request_id"] == headers["x-request-id"]
            assert c.closed()
    assert_quiet(new_lines(gateway, before))
