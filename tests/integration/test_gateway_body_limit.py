"""Request bodies a hostile client will not stop sending, against ``muxgate
serve`` as a user runs it (a real gateway process, its log in a file), with
raw sockets.

* A ``content-length`` over ``http.max_body_bytes`` (here 10 GB announced) is
  answered 413 with ``connection: close`` before the client sends any of the
  body; the gateway then lingers (reads and drops at most ``LINGER_BYTES``
  for at most ``LINGER_S``) and closes. Before, it kept the connection alive
  and read and dropped the whole announced body.
* A chunked body that passes the limit mid-stream, and a body slower than
  ``body_timeout_s`` (408): answered, then the same bounded linger.
* A normal client on another connection is served meanwhile; keep-alive
  after a normal 200 still works; a flood of such requests logs nothing
  at warning level and no line per request.

What the gateway read is measured from the client: it sends in a loop until
the gateway closes the connection or a deadline passes, and counts what its
socket accepted. The client's send buffer is made small, so the count is
what the gateway read plus the gateway's receive buffer; a gateway that read
on (as before) lets the client send until the deadline, hundreds of MB.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from serve_process import RawClient, ServedGateway, served_gateway

from muxgate.gateway._edge import LINGER_BYTES, LINGER_S

APPS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "apps"))

pytestmark = pytest.mark.slow

MAX_BODY = 1000
BODY_TIMEOUT_S = 1.0

#: what the client may get into the connection after the answer: what the
#: gateway reads while lingering, plus its socket's receive buffer (measured:
#: about 370 KB in all; a gateway that reads on takes 16 MB and more in
#: SEND_FOR_S, and keeps the connection open)
BOUND = LINGER_BYTES + 4 * 1024 * 1024

#: how long the client tries to send after the answer; the gateway must close
#: well before (it lingers LINGER_S at most)
SEND_FOR_S = 10.0

#: requests of each kind in a flood: the log must not grow with it
FLOOD = 50


Gateway = ServedGateway


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config = (
        f"app_dir: {APPS}\n"
        "http:\n"
        f"  max_body_bytes: {MAX_BODY}\n"
        f"  limits: {{body_timeout_s: {BODY_TIMEOUT_S}}}\n"
        "deployments:\n"
        "  - {name: Body, import_path: 'gateway_apps:Echo1', num_replicas: 1}\n"
    )
    with served_gateway(tmp_path_factory.mktemp("body_limit"), config) as gw:
        yield gw


class Client(RawClient):
    """A raw connection with a small send buffer, which sends until the
    gateway closes."""

    def __init__(self, gw: Gateway) -> None:
        super().__init__(gw, send_buffer=32 * 1024)

    def send_until_closed(self, chunk: bytes) -> tuple[int, float]:
        """Send ``chunk`` over and over until the gateway closes the
        connection (the send fails) or ``SEND_FOR_S`` pass; the bytes the
        socket accepted and the seconds it took."""
        self.sock.settimeout(0.5)  # a send blocked by a full window is retried
        sent = 0
        started = time.monotonic()
        while time.monotonic() - started < SEND_FOR_S:
            try:
                sent += self.sock.send(chunk)
            except TimeoutError:
                continue
            except OSError:  # EPIPE, ECONNRESET: closed
                break
        return sent, time.monotonic() - started


def error_of(body: bytes) -> dict[str, Any]:
    err: dict[str, Any] = json.loads(body)["error"]
    return err


def head(target: bytes, headers: bytes, method: bytes = b"POST") -> bytes:
    return method + b" " + target + b" HTTP/1.1\r\nHost: gw\r\n" + headers + b"\r\n"


def assert_answered_and_closed(c: Client, status: int, code: str, chunk: bytes) -> None:
    """``status`` with ``connection: close``, then the gateway reads at most
    the linger's bytes and closes within a bounded time."""
    got, headers, body = c.response()
    assert (got, error_of(body)["code"]) == (status, code)
    assert headers["connection"] == "close"
    sent, took = c.send_until_closed(chunk)
    assert took < SEND_FOR_S / 2, f"still open after {took:.1f} s, {sent} bytes accepted"
    assert sent < BOUND, sent


class NormalClient:
    """Requests on connections of its own while a test runs; each must be 200."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.statuses: list[int] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self.done.is_set() or len(self.statuses) < 3:
            with Client(self.gw) as c:
                c.send(head(b"/body", b"Content-Length: 5\r\nConnection: close\r\n") + b"hello")
                status, _, body = c.response()
                self.statuses.append(status if body == b"hello" else -status)

    def __enter__(self) -> NormalClient:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()
        assert self.statuses and set(self.statuses) == {200}, self.statuses


# -- over the limit -------------------------------------------------------------------


def test_an_announced_body_over_the_limit_is_refused_before_it_is_sent(gateway: Gateway) -> None:
    with NormalClient(gateway), Client(gateway) as c:
        # Only the head: the answer must come without the body.
        c.send(head(b"/big", b"Content-Length: 10000000000\r\n"))
        assert_answered_and_closed(c, 413, "payload_too_large", b"x" * 65536)


def test_an_announced_body_with_expect_100_continue_gets_413_and_no_100(
    gateway: Gateway,
) -> None:
    with Client(gateway) as c:
        c.send(head(b"/big", b"Content-Length: 10000000000\r\nExpect: 100-continue\r\n"))
        assert_answered_and_closed(c, 413, "payload_too_large", b"x" * 65536)


def test_a_chunked_body_passing_the_limit_is_refused_mid_stream(gateway: Gateway) -> None:
    chunk = b"%x\r\n%s\r\n" % (300, b"y" * 300)
    with NormalClient(gateway), Client(gateway) as c:
        c.send(head(b"/chunked", b"Transfer-Encoding: chunked\r\n") + chunk * 4)
        assert_answered_and_closed(c, 413, "payload_too_large", chunk * 200)


def test_a_body_slower_than_the_body_timeout_gets_408_then_the_same_close(
    gateway: Gateway,
) -> None:
    with NormalClient(gateway), Client(gateway) as c:
        c.send(head(b"/slow", b"Content-Length: 1000\r\n") + b"x" * 10)  # then nothing
        started = time.monotonic()
        got, headers, body = c.response()
        assert BODY_TIMEOUT_S * 0.9 < time.monotonic() - started < BODY_TIMEOUT_S + 5
        assert (got, error_of(body)["code"], headers["connection"]) == (
            408,
            "request_timeout",
            "close",
        )
        sent, took = c.send_until_closed(b"x" * 65536)
        assert took < SEND_FOR_S / 2 and sent < BOUND, (took, sent)


def test_a_client_that_stops_sending_is_closed_after_the_linger(gateway: Gateway) -> None:
    with Client(gateway) as c:
        c.send(head(b"/big", b"Content-Length: 10000000000\r\n"))
        started = time.monotonic()
        assert c.response()[0] == 413
        # Half-closed at once (EOF); a trickle after it is read until
        # LINGER_S at most, then the connection is closed.
        assert c.file.read() == b""
        sent, _ = c.send_until_closed(b"x")
        assert time.monotonic() - started < LINGER_S + 2, sent


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (head(b"/-/healthz", b"", method=b"GET"), 200),
        (head(b"/-/healthz", b""), 405),
        (head(b"/x", b"serve_multiplexed_model_id: a b\r\n"), 400),
        (head(b"/-/healthz", b"Connection: Upgrade\r\nUpgrade: h2c\r\n"), 405),
    ],
    ids=["healthz", "method_not_allowed", "bad_model_id", "after_an_upgrade"],
)
def test_any_answer_before_the_body_closes_without_reading_it(
    gateway: Gateway, request_head: bytes, status: int
) -> None:
    # Answers that never read the body: the announced 10 GB is not read
    # either (before, the connection was kept alive and read to its end).
    with Client(gateway) as c:
        c.send(request_head[:-2] + b"Content-Length: 10000000000\r\n\r\n")
        got, headers, _ = c.response()
        assert (got, headers["connection"]) == (status, "close")
        sent, took = c.send_until_closed(b"x" * 65536)
        assert took < SEND_FOR_S / 2 and sent < BOUND, (took, sent)


def test_a_library_that_writes_the_whole_body_first_still_gets_the_413(
    gateway: Gateway,
) -> None:
    # httpx writes all 10 MB before it reads; the gateway reads at most the
    # linger's bytes, and on Linux the 413 queued before the reset is read.
    host, port = gateway.address
    with httpx.Client(base_url=f"http://{host}:{port}", timeout=10) as client:
        r = client.post("/body", content=b"x" * 10_000_000)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"


# -- under it --------------------------------------------------------------------------


def test_keep_alive_after_normal_requests_still_works(gateway: Gateway) -> None:
    with Client(gateway) as c:
        for body in (b"a" * MAX_BODY, b"short", b""):
            c.send(head(b"/body", b"Content-Length: %d\r\n" % len(body)) + body)
            status, headers, answer = c.response()
            assert status == 200
            assert "connection" not in headers
            if body:
                assert answer == body
        chunk = b"%x\r\n%s\r\n" % (500, b"c" * 500)
        c.send(head(b"/body", b"Transfer-Encoding: chunked\r\n") + chunk * 2 + b"0\r\n\r\n")
        assert c.response()[::2] == (200, b"c" * MAX_BODY)
        c.send(head(b"/keep", b"", method=b"GET"))
        assert c.response()[0] == 200


def test_a_flood_of_refused_bodies_logs_nothing_per_request(gateway: Gateway) -> None:
    before = len(gateway.log_lines())
    chunk = b"%x\r\n%s\r\n" % (600, b"z" * 600)
    for i in range(FLOOD):
        with Client(gateway) as c:
            if i % 2:
                c.send(head(b"/big", b"Content-Length: 10000000000\r\n"))
            else:
                c.send(head(b"/chunked", b"Transfer-Encoding: chunked\r\n") + chunk * 2)
            status, headers, _ = c.response()
            assert (status, headers["connection"]) == (413, "close")
    lines = gateway.log_lines()[before:]
    assert not [line for line in lines if "WARNING" in line or "ERROR" in line], lines
    assert len(lines) < 5, lines
