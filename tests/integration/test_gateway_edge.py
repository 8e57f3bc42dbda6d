"""The HTTP edge under hostile clients (``http.limits``), against a real gateway
on 127.0.0.1 with raw sockets for the hostile side: oversized and too many
headers (431, refused while they arrive), slow heads and bodies (408), idle
connections (closed), the connection cap (the idle longest make room; 503
when every connection is busy), each while a normal client keeps being
served; and model-id headers that disagree (400)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from gateway_harness import MODEL, running_gateway
from waiting import wait_until

from muxgate.gateway._serve import Gateway

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

LIMITS = {
    "max_header_bytes": 4096,
    "max_headers": 20,
    "header_timeout_s": 0.5,
    "body_timeout_s": 1.0,
    "keep_alive_timeout_s": 0.5,
    "max_connections": 8,
    "max_pipelined": 4,
}


@pytest.fixture(scope="module")
async def gateway() -> AsyncIterator[Gateway]:
    config = {
        "http": {"port": 0, "request_timeout_s": 10, "limits": LIMITS},
        "deployments": [
            {
                "name": "Edge",
                "import_path": "gateway_apps:Echo1",
                "num_replicas": 1,
                "max_ongoing_requests": 16,
            }
        ],
    }
    async with running_gateway(config) as gw:
        yield gw


@pytest.fixture
async def quiet(gateway: Gateway) -> Gateway:
    """The gateway with no connection left open by an earlier test."""
    assert gateway.edge is not None
    edge = gateway.edge

    async def no_connections() -> bool:
        return not edge.open

    await wait_until(no_connections, within_s=10)
    return gateway


# -- a raw client -------------------------------------------------------------------


async def connect(gw: Gateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = urlsplit(gw.url)
    assert url.hostname is not None and url.port is not None
    return await asyncio.open_connection(url.hostname, url.port)


async def read_response(
    reader: asyncio.StreamReader, within_s: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response: status, headers (lower-case names), body."""
    async with asyncio.timeout(within_s):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def closed_by_server(reader: asyncio.StreamReader, within_s: float = 10.0) -> bool:
    """True once the server closed the connection (EOF or reset)."""
    async with asyncio.timeout(within_s):
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
    return True


def error_of(body: bytes) -> dict[str, Any]:
    err: dict[str, Any] = json.loads(body)["error"]
    return err


async def while_normal_client(gw: Gateway, hostile: Awaitable[Any]) -> Any:
    """Run ``hostile`` while a normal client keeps sending requests (a fresh
    connection each); every one of those must be answered 200."""
    done = asyncio.Event()
    statuses: list[int] = []

    async def normal() -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=gw.url, timeout=10, limits=limits) as client:
            while not done.is_set() or len(statuses) < 3:
                r = await client.get("/normal", headers={MODEL: "n"})
                statuses.append(r.status_code)

    task = asyncio.create_task(normal())
    try:
        result = await hostile
    finally:
        done.set()
    await task
    assert statuses and set(statuses) == {200}, statuses
    return result


# -- headers ----------------------------------------------------------------------


async def test_headers_over_the_byte_limit_get_431_while_others_are_served(
    quiet: Gateway,
) -> None:
    gw = quiet
    assert gw.edge is not None
    before = gw.edge.refused.get("header_bytes", 0)

    async def flood() -> None:
        reader, writer = await connect(gw)
        # A head that never ends, far over the limit: refused once 4096 bytes came.
        writer.write(b"GET /x HTTP/1.1\r\nhost: a\r\nx-big: " + b"a" * 256 * 1024)
        status, headers, body = await read_response(reader)
        assert status == 431
        assert headers["connection"] == "close"
        assert headers["x-request-id"]
        err = error_of(body)
        assert err["code"] == "headers_too_large"
        assert "4096 bytes" in err["message"]
        assert await closed_by_server(reader)
        writer.close()

    await while_normal_client(gw, asyncio.gather(*(flood() for _ in range(5))))
    assert gw.edge.refused["header_bytes"] == before + 5
    # A head just under the limit is served.
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        r = await client.get("/x", headers={MODEL: "m", "x-pad": "p" * 3500})
        assert r.status_code == 200


async def test_a_head_read_with_the_end_of_the_request_before_it_is_counted_whole(
    quiet: Gateway,
) -> None:
    # The bytes of a head were counted from the read after the one holding
    # the end of the request before it: a pipelined head that began in that
    # read passed the limit by what it held (6000 bytes of head were served)
    reader, writer = await connect(quiet)
    second = b"GET /x HTTP/1.1\r\nhost: a\r\nx-long: " + b"a" * 6000 + b"\r\n\r\n"
    writer.write(b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n" + second[:2000])
    status, _, _ = await read_response(reader)  # the first is answered: its read was parsed
    assert status == 200
    writer.write(second[2000:])
    status, headers, body = await read_response(reader)
    assert (status, headers["connection"]) == (431, "close"), body
    assert error_of(body)["message"] == "request headers are over 4096 bytes"
    writer.close()


async def test_a_head_at_the_byte_limit_is_served_when_its_fields_have_no_space(
    quiet: Gateway,
) -> None:
    # "name:value" (no space after the colon) is as valid as "name: value";
    # the head measured as parsed counted a space for every field, so a
    # head within the limit as it arrived was refused 431 when it ended
    fields = b"".join(b"x-f%02d:v\r\n" % i for i in range(18))
    start = b"GET /x HTTP/1.1\r\nhost:a\r\n" + fields + b"x-pad:"
    head = start + b"p" * (LIMITS["max_header_bytes"] - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == LIMITS["max_header_bytes"]
    reader, writer = await connect(quiet)
    writer.write(head)
    status, _, body = await read_response(reader)
    assert status == 200, body
    writer.close()


async def test_too_many_headers_get_431(quiet: Gateway) -> None:
    gw = quiet

    async def many() -> None:
        reader, writer = await connect(gw)
        fields = b"".join(b"x-h%d: v\r\n" % i for i in range(30))
        writer.write(b"GET /x HTTP/1.1\r\nhost: a\r\n" + fields + b"\r\n")
        status, _, body = await read_response(reader)
        assert status == 431
        assert error_of(body) == {
            "code": "headers_too_large",
            "message": "more than 20 request headers",
            "request_id": error_of(body)["request_id"],
        }
        writer.close()

    await while_normal_client(gw, many())
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        headers = {f"x-h{i}": "v" for i in range(12)}
        assert (await client.get("/x", headers=headers)).status_code == 200


@pytest.mark.parametrize(
    "head",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /x HTTP/1.1\r\nhost: a\r\ncontent-length: abc\r\n\r\n",
        b"GET /x HTTP/1.1\r\nhost: a\r\nx-ctl: a\x01b\r\n\r\n",
        # a method name the parser does not know (docs/http.md, 405 row)
        b"FOO /x HTTP/1.1\r\nhost: a\r\n\r\n",
        # a head that parses, a body that does not: answered at once, not
        # after the body timeout (before: 408 once body_timeout_s passed)
        b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc",
        b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip\r\n\r\nabc",
    ],
    ids=["request_line", "content_length", "control_char", "method", "chunk_size", "te_gzip"],
)
async def test_a_malformed_request_gets_400_in_the_error_contract(
    quiet: Gateway, head: bytes
) -> None:
    gw = quiet
    assert gw.edge is not None
    before = gw.edge.refused.get("malformed", 0)

    async def malformed() -> None:
        reader, writer = await connect(gw)
        writer.write(head)
        status, headers, body = await read_response(reader, within_s=LIMITS["body_timeout_s"] / 2)
        assert status == 400
        assert headers["content-type"] == "application/json"
        assert headers["connection"] == "close"
        assert headers["x-muxgate-replica"] == ""
        err = error_of(body)
        assert (err["code"], err["message"]) == ("bad_request", "malformed HTTP request")
        assert err["request_id"] == headers["x-request-id"]
        assert await closed_by_server(reader)
        writer.close()

    await while_normal_client(gw, malformed())
    assert gw.edge.refused["malformed"] == before + 1


# -- slow and idle clients ------------------------------------------------------------


async def test_a_head_sent_too_slowly_gets_408_and_a_silent_connection_is_closed(
    quiet: Gateway,
) -> None:
    gw = quiet

    async def slow_head() -> float:
        reader, writer = await connect(gw)
        started = time.monotonic()
        writer.write(b"GET /x HTTP/1.1\r\nhost: a\r\n")  # ... and the rest never comes
        status, headers, body = await read_response(reader)
        took = time.monotonic() - started
        assert status == 408
        assert headers["connection"] == "close"
        assert error_of(body)["code"] == "request_timeout"
        writer.close()
        return took

    async def silent() -> float:
        reader, writer = await connect(gw)
        started = time.monotonic()
        assert await closed_by_server(reader)
        writer.close()
        return time.monotonic() - started

    took = await while_normal_client(gw, asyncio.gather(slow_head(), silent(), silent()))
    for seconds in took:
        assert 0.4 < seconds < 5.0


async def test_a_body_sent_too_slowly_gets_408_bounded_by_the_deadline(quiet: Gateway) -> None:
    gw = quiet

    async def slow_body(path: str, extra: bytes) -> float:
        reader, writer = await connect(gw)
        started = time.monotonic()
        writer.write(
            f"POST {path} HTTP/1.1\r\nhost: a\r\ncontent-length: 1000\r\n".encode()
            + extra
            + b"\r\n"
            + b"x" * 10  # then nothing more
        )
        status, headers, body = await read_response(reader)
        took = time.monotonic() - started
        assert status == 408
        assert headers["connection"] == "close"
        assert error_of(body)["code"] == "request_timeout"
        assert await closed_by_server(reader)
        writer.close()
        return took

    # body_timeout_s is 1 s; the handle call's caller waits 0.3 s only, and the
    # body read never outlives the request's deadline.
    by_limit, by_deadline = await while_normal_client(
        gw,
        asyncio.gather(
            slow_body("/x", b""),
            slow_body("/-/handles/Edge/__call__", b"x-muxgate-timeout-s: 0.3\r\n"),
        ),
    )
    assert 0.9 < by_limit < 5.0
    assert 0.2 < by_deadline < 0.9


async def test_an_idle_keep_alive_connection_is_closed(quiet: Gateway) -> None:
    gw = quiet

    async def kept_alive() -> float:
        reader, writer = await connect(gw)
        writer.write(f"GET /x HTTP/1.1\r\nhost: a\r\n{MODEL}: k\r\n\r\n".encode())
        status, headers, _ = await read_response(reader)
        assert status == 200
        assert "connection" not in headers  # kept alive ...
        answered = time.monotonic()
        assert await closed_by_server(reader)  # ... until idle for keep_alive_timeout_s
        writer.close()
        return time.monotonic() - answered

    idle = await while_normal_client(gw, kept_alive())
    assert 0.4 < idle < 5.0


# -- the connection cap ---------------------------------------------------------------


async def test_at_the_connection_cap_the_longest_idle_make_room(quiet: Gateway) -> None:
    gw = quiet
    edge = gw.edge
    assert edge is not None
    opened = [await connect(gw) for _ in range(12)]  # 8 allowed: the first 4 go

    async def capped() -> bool:
        return len(edge.open) == 8

    await wait_until(capped, within_s=10)
    for reader, _ in opened[:4]:
        assert await closed_by_server(reader, within_s=2)

    async def served() -> None:
        # Each new connection closes one more idle one; none is refused.
        for _ in range(3):
            async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
                assert (await client.get("/x", headers={MODEL: "c"})).status_code == 200

    await while_normal_client(gw, served())
    assert edge.refused["evicted_idle"] >= 4
    for _, writer in opened:
        writer.close()


async def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503(quiet: Gateway) -> None:
    gw = quiet
    edge = gw.edge
    assert edge is not None
    busy = []
    for _ in range(8):
        reader, writer = await connect(gw)
        writer.write(f"GET /slow?s=2 HTTP/1.1\r\nhost: a\r\n{MODEL}: b\r\n\r\n".encode())
        busy.append((reader, writer))

    async def all_busy() -> bool:
        return len(edge.open) == 8 and not edge.idle

    await wait_until(all_busy, within_s=10)
    assert repr(edge).startswith("<Edge open=8/8 idle=0 ")
    reader, writer = await connect(gw)
    writer.write(b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert status == 503
    assert headers["retry-after"] == "1"
    assert error_of(body)["code"] == "over_capacity"
    writer.close()
    for reader, writer in busy:  # the requests in flight are not disturbed
        status, _, _ = await read_response(reader)
        assert status == 200
        writer.close()


# -- model-id headers -----------------------------------------------------------------


async def test_model_id_headers_that_disagree_are_400(quiet: Gateway) -> None:
    async with httpx.AsyncClient(base_url=quiet.url, timeout=10) as client:
        both = [("serve_multiplexed_model_id", "2"), ("serve-multiplexed-model-id", "5")]
        r = await client.get("/x", headers=both)
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "bad_model_id"
        for part in ("serve_multiplexed_model_id", "'2'", "serve-multiplexed-model-id", "'5'"):
            assert part in err["message"]
        repeated = [(MODEL, "2"), (MODEL, "5")]
        r = await client.get("/x", headers=repeated)
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "bad_model_id"
        # The same id twice, in either spelling, is fine.
        same = [(MODEL, "2"), ("serve-multiplexed-model-id", "2"), (MODEL, "2")]
        r = await client.get("/x", headers=same)
        assert r.status_code == 200
        assert r.json()["model"] == "2"
        # Handle calls read the same headers.
        r = await client.post("/-/handles/Edge/__call__", headers=both)
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "bad_model_id"


# -- trailers -------------------------------------------------------------------------

CHUNKED = b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n0\r\n"


async def test_trailers_are_dropped_and_count_for_their_request_only(quiet: Gateway) -> None:
    # uvicorn merged trailer fields into the request's headers: a trailer
    # could add a model id (or any header) a proxy checking the head never saw
    reader, writer = await connect(quiet)
    writer.write(CHUNKED + f"{MODEL}: smuggled\r\nx-request-id: from-a-trailer\r\n\r\n".encode())
    status, headers, body = await read_response(reader)
    assert status == 200, body
    assert json.loads(body)["model"] == ""
    assert headers["x-request-id"] != "from-a-trailer"
    # 19 trailer fields, then a request of 20 header fields on the same
    # connection: each within max_headers (20)
    writer.write(CHUNKED + b"".join(b"x-t%d: v\r\n" % i for i in range(19)) + b"\r\n")
    status, _, body = await read_response(reader)
    assert status == 200, body
    head = b"GET /x HTTP/1.1\r\nhost: a\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(18))
    writer.write(head + f"{MODEL}: m\r\n\r\n".encode())
    status, _, body = await read_response(reader)
    assert (status, json.loads(body).get("model")) == (200, "m"), body
    writer.close()


@pytest.mark.parametrize(
    ("trailers", "message"),
    [
        # one field that never ends (httptools buffers it whole, by repeated
        # concatenation: it grew the gateway by hundreds of MB)
        (b"x-long: " + b"v" * 65536, "request trailers or chunk extensions are over 4096 bytes"),
        (b"".join(b"x-t%d: v\r\n" % i for i in range(30)), "more than 20 request trailer fields"),
    ],
    ids=["endless_field", "too_many_fields"],
)
async def test_trailers_over_the_header_limits_get_431(
    quiet: Gateway, trailers: bytes, message: str
) -> None:
    # before: nothing bounded trailers but the body timeout, then its 408
    async def too_much() -> None:
        reader, writer = await connect(quiet)
        with contextlib.suppress(ConnectionError):
            writer.write(CHUNKED + trailers)
            await writer.drain()
        status, headers, body = await read_response(reader)
        assert (status, headers["connection"]) == (431, "close"), body
        assert error_of(body)["message"] == message
        writer.close()

    await while_normal_client(quiet, too_much())


# -- pipelining -----------------------------------------------------------------------


async def test_requests_pipelined_past_the_limit_get_503_after_the_answers_before(
    quiet: Gateway,
) -> None:
    # uvicorn parsed every request of a read behind the one in flight: a few
    # bytes each, one read held thousands of them (5 MB a connection)
    async def pipelined() -> None:
        reader, writer = await connect(quiet)
        writer.write(
            b"GET /slow?s=0.3 HTTP/1.1\r\nhost: a\r\n\r\n"
            + b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n" * 200
        )
        statuses = []
        for _ in range(5):  # the one in flight and the 4 behind it
            status, _, body = await read_response(reader)
            statuses.append(status)
        assert statuses == [200] * 5
        status, headers, body = await read_response(reader)
        assert (status, headers["connection"], headers["retry-after"]) == (503, "close", "1")
        assert error_of(body)["code"] == "over_capacity"
        assert "more than 4 requests pipelined" in error_of(body)["message"]
        assert await closed_by_server(reader)
        writer.close()

    await while_normal_client(quiet, pipelined())


# -- bodies held at once ----------------------------------------------------------------


@pytest.fixture(scope="module")
async def budgeted() -> AsyncIterator[Gateway]:
    """Bodies of up to 32 KiB, 64 KiB of them held at once: two fit, not three."""
    config = {
        "http": {
            "port": 0,
            "max_body_bytes": 32768,
            "limits": {"max_body_bytes_in_flight": 65536},
        },
        "deployments": [{"name": "Edge", "import_path": "gateway_apps:Echo1"}],
    }
    async with running_gateway(config) as gw:
        yield gw


async def test_a_body_past_the_gateways_budget_gets_503_while_the_others_go_on(
    budgeted: Gateway,
) -> None:
    quiet = budgeted
    # Every body is held whole until its request ends: before the budget, a
    # thousand connections each sending one just under max_body_bytes held
    # ten gigabytes of them.
    head = b"POST /body HTTP/1.1\r\nhost: a\r\ncontent-length: 32000\r\n\r\n"

    async def body_but_the_end() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await connect(quiet)
        writer.write(head + b"x" * 30000)
        await writer.drain()
        return reader, writer

    async def scenario() -> None:
        clients = [await body_but_the_end() for _ in range(3)]  # 90000 bytes: two fit
        answers = {asyncio.ensure_future(read_response(r)): (r, w) for r, w in clients}
        done, waiting = await asyncio.wait(answers, timeout=10, return_when="FIRST_COMPLETED")
        assert len(done) == 1, "no body was refused"
        status, headers, body = done.pop().result()
        assert (status, headers["connection"], headers["retry-after"]) == (503, "close", "1")
        assert error_of(body)["code"] == "over_capacity"
        assert "max_body_bytes_in_flight" in error_of(body)["message"]
        for task in waiting:  # the two held go on, and are served whole
            answers[task][1].write(b"y" * 2000)
        for task in waiting:
            status, _, body = await task
            assert (status, len(body)) == (200, 32000)
        for _, writer in clients:
            writer.close()
        # their bytes are given back: a body fits again
        async with httpx.AsyncClient(base_url=quiet.url, timeout=10) as client:
            r = await client.post("/body", content=b"z" * 30000)
            assert (r.status_code, len(r.content)) == (200, 30000)

    await while_normal_client(quiet, scenario())
