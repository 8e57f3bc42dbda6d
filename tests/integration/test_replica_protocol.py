"""The gateway <-> replica protocol against a real replica process.

One Echo replica and one connection are shared by the module (a replica costs
a process start); tests that end a replica live in test_replica_lifecycle.py.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest

from muxgate.gateway._connection import (
    HandshakeError,
    ReplicaConnection,
    ReplicaDiedError,
    connect_stream,
)
from muxgate.gateway.launchers.local import LocalLauncher, ReplicaProcess
from muxgate.replicas._protocol import (
    HANDSHAKE_MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    FrameDecoder,
    Hello,
    HttpRequest,
    ModelEvent,
    Ping,
    Pong,
    Refused,
    ReplicaState,
    Reply,
    StatePush,
    Welcome,
    encode_frame,
)
from muxgate.replicas.contract import ChannelAuth, ReplicaSpec

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

APP_DIR = str(Path(__file__).resolve().parents[1] / "apps")


@pytest.fixture(scope="module")
async def replica() -> AsyncIterator[tuple[ReplicaProcess, ReplicaConnection]]:
    launcher = LocalLauncher()
    spec = ReplicaSpec(
        deployment="Echo",
        import_path="echo:Echo",
        replica_id="Echo#proto",
        init_kwargs={"greeting": "hi"},
        app_dir=APP_DIR,
        listen="unix:",
        max_ongoing_requests=64,
    )
    process = await launcher.start(spec)
    conn = await ReplicaConnection.connect(process.address)
    try:
        yield process, conn
    finally:
        await conn.aclose()
        with anyio.fail_after(20):
            # Closing the only connection makes the replica exit by itself.
            assert await process.wait() == 0
        await launcher.aclose()


@pytest.fixture
def conn(replica: tuple[ReplicaProcess, ReplicaConnection]) -> ReplicaConnection:
    return replica[1]


def pack(*args: Any, **kwargs: Any) -> dict[str, bytes]:
    return {
        "args": msgspec.msgpack.encode(list(args)),
        "kwargs": msgspec.msgpack.encode(kwargs),
    }


def value(reply: Reply) -> Any:
    assert reply.error is None, reply.error
    return msgspec.msgpack.decode(reply.body)


async def test_handshake_reports_identity(
    replica: tuple[ReplicaProcess, ReplicaConnection],
) -> None:
    process, conn = replica
    assert conn.deployment == "Echo"
    assert conn.replica_id == "Echo#proto"
    assert conn.pid == process.pid
    assert conn.version == PROTOCOL_VERSION
    assert conn.state.in_flight == 0
    assert "open" in repr(conn)


async def _raw_handshake(address: str, hello: Hello) -> tuple[list[Any], bool]:
    """Send one Hello on a fresh socket: (messages received, closed by peer)."""
    stream = await connect_stream(address)
    async with stream:
        await stream.send(encode_frame(hello))
        decoder = FrameDecoder()
        messages: list[Any] = []
        with anyio.fail_after(10):
            while True:
                try:
                    messages += decoder.feed(await stream.receive())
                except anyio.EndOfStream:
                    return messages, True


async def test_version_mismatch_is_refused_and_replica_keeps_serving(
    replica: tuple[ReplicaProcess, ReplicaConnection],
) -> None:
    process, conn = replica
    messages, closed = await _raw_handshake(process.address, Hello(version=PROTOCOL_VERSION + 1))
    assert closed
    assert len(messages) == 1 and isinstance(messages[0], Refused)
    assert f"speaks {PROTOCOL_VERSION}" in messages[0].reason
    # A refused connection is not the gateway leaving: the replica serves on.
    assert value(await conn.call(request_id="after-refusal", method="add", **pack(2, 3))) == 5


async def test_second_gateway_connection_is_welcome(
    replica: tuple[ReplicaProcess, ReplicaConnection],
) -> None:
    process, conn = replica
    other = await ReplicaConnection.connect(process.address)
    try:
        assert other.replica_id == conn.replica_id
        assert value(await other.call(request_id="other", method="add", **pack(1, 2))) == 3
    finally:
        await other.aclose()
    # Closing one of two connections does not stop the replica.
    assert value(await conn.call(request_id="still", method="add", **pack(3, 4))) == 7


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (Refused(reason="go away"), "refused by replica"),
        (
            Welcome(
                version=PROTOCOL_VERSION + 1,
                deployment="D",
                replica_id="r",
                pid=1,
                state=ReplicaState(),
            ),
            f"gateway speaks {PROTOCOL_VERSION}",
        ),
        (Pong(state=ReplicaState()), "unexpected Pong"),
    ],
)
async def test_connect_raises_handshake_error(tmp_path: Path, answer: Any, expected: str) -> None:
    # A stand-in replica at a real socket that answers the Hello wrongly.
    path = f"/tmp/muxgate-hs-{os.getpid()}-{len(expected)}.sock"
    listener = await anyio.create_unix_listener(path)
    try:
        async with anyio.create_task_group() as tg:

            async def serve_one() -> None:
                stream = await listener.accept()
                async with stream:
                    await stream.receive()
                    await stream.send(encode_frame(answer))

            tg.start_soon(serve_one)
            with pytest.raises(HandshakeError, match=expected):
                await ReplicaConnection.connect(f"unix:{path}", connect_timeout=10)
    finally:
        await listener.aclose()
        os.unlink(path)


async def test_an_unproven_peer_cannot_make_the_gateway_buffer_a_large_frame() -> None:
    """A stand-in at a replica's address that answers the Hello with a length
    prefix of 1 GiB and streams bytes behind it: before the peer proved the
    cluster secret, the gateway refuses the prefix at once (as a replica
    does a gateway's), instead of buffering what comes until the connect
    timeout (it did: a gigabyte per probe of a static address)."""
    path = f"/tmp/muxgate-hs-big-{os.getpid()}.sock"
    listener = await anyio.create_unix_listener(path)
    sent = 0
    try:
        async with anyio.create_task_group() as tg:

            async def serve_one() -> None:
                nonlocal sent
                stream = await listener.accept()
                async with stream:
                    await stream.receive()  # the Hello
                    await stream.send(((1 << 30) - 1).to_bytes(4, "big"))
                    chunk = bytes(1 << 16)
                    with contextlib.suppress(anyio.BrokenResourceError, OSError):
                        for _ in range(256):  # 16 MiB, if the gateway reads on
                            await stream.send(chunk)
                            sent += len(chunk)

            tg.start_soon(serve_one)
            with anyio.fail_after(5), pytest.raises(HandshakeError, match="exceeds the limit"):
                await ReplicaConnection.connect(
                    f"unix:{path}", auth=ChannelAuth(b"s" * 32), connect_timeout=30
                )
    finally:
        await listener.aclose()
        os.unlink(path)
    assert sent < 16 << 20


async def test_a_replica_without_the_secret_and_a_large_welcome_is_named_so() -> None:
    """A gateway with the secret, a replica without it (on loopback) that
    has served a while: its Welcome, state and all, is past the 4 KiB held
    to before the proof. The error says the likely cause, not only that a
    frame was too large."""
    path = f"/tmp/muxgate-hs-welcome-{os.getpid()}.sock"
    listener = await anyio.create_unix_listener(path)
    models = [f"org/model-{i:04d}" for i in range(400)]
    welcome = Welcome(
        version=PROTOCOL_VERSION,
        deployment="D",
        replica_id="r",
        pid=1,
        state=ReplicaState(models=models),
    )
    assert len(encode_frame(welcome)) > HANDSHAKE_MAX_FRAME_BYTES
    try:
        async with anyio.create_task_group() as tg:

            async def serve_one() -> None:
                stream = await listener.accept()
                async with stream:
                    await stream.receive()  # the Hello
                    with contextlib.suppress(anyio.BrokenResourceError, OSError):
                        await stream.send(encode_frame(welcome))

            tg.start_soon(serve_one)
            with anyio.fail_after(10), pytest.raises(HandshakeError) as raised:
                await ReplicaConnection.connect(
                    f"unix:{path}", auth=ChannelAuth(b"s" * 32), connect_timeout=10
                )
    finally:
        await listener.aclose()
        os.unlink(path)
    assert "exceeds the limit" in str(raised.value)
    assert "a replica without the cluster secret" in str(raised.value)


async def test_connect_to_nothing_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        await ReplicaConnection.connect(f"unix:{tmp_path}/absent.sock")


async def test_http_round_trip(conn: ReplicaConnection) -> None:
    http = HttpRequest(
        method="POST",
        path="/predict",
        query="a=1&b=two",
        headers=[("x-test", "yes"), ("content-type", "text/plain")],
        body=b"payload",
    )
    reply = await conn.call(request_id="req-http", model_id="m7", http=http)
    assert reply.error is None, reply.error
    assert reply.status == 200
    assert ("content-type", "application/json") in [(k.lower(), v) for k, v in reply.headers]
    assert json.loads(reply.body) == {
        "greeting": "hi",
        "method": "POST",
        "path": "/predict",
        "query": {"a": "1", "b": "two"},
        "header": "yes",
        "model_id": "m7",
        "body": "payload",
    }


async def test_handle_call_with_args_and_kwargs(conn: ReplicaConnection) -> None:
    assert value(await conn.call(request_id="r1", method="add", **pack(1, b=41))) == 42
    assert value(await conn.call(request_id="r2", method="echo", **pack({"k": [1, 2]}))) == {
        "k": [1, 2]
    }


async def test_sync_method_runs_with_request_context(conn: ReplicaConnection) -> None:
    reply = await conn.call(request_id="r3", model_id="model-a", method="sync_echo", **pack(9))
    assert value(reply) == {"value": 9, "model_id": "model-a"}


async def test_fifty_concurrent_calls_on_one_connection(conn: ReplicaConnection) -> None:
    results: dict[int, Any] = {}
    seen_in_flight: list[int] = []

    async def one(i: int) -> None:
        # Later calls sleep less, so replies come back out of order.
        await conn.call(request_id=f"c{i}", method="sleep", **pack((50 - i) * 0.002))
        reply = await conn.call(request_id=f"e{i}", model_id=f"m{i}", method="echo", **pack(i))
        results[i] = value(reply)
        seen_in_flight.append(reply.state.in_flight)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(one, i)
    assert results == {i: i for i in range(50)}
    assert conn.in_flight == 0
    assert conn.state.in_flight == 0 or max(seen_in_flight) > 0


async def test_user_exception_is_user_error_and_replica_keeps_serving(
    conn: ReplicaConnection,
) -> None:
    reply = await conn.call(request_id="boom", method="fail", **pack("kaput"))
    assert reply.error is not None
    assert (reply.error.code, reply.error.status, reply.status) == ("user_error", 500, 500)
    assert reply.error.message == "ValueError: kaput"
    reply = await conn.call(request_id="boom-sync", method="sync_fail", **pack("k"))
    assert reply.error is not None and reply.error.message == "KeyError: 'k'"
    assert value(await conn.call(request_id="after", method="add", **pack(1, 1))) == 2


async def test_model_not_found_maps_to_404(conn: ReplicaConnection) -> None:
    reply = await conn.call(request_id="nf", method="missing_model", **pack("ghost"))
    assert reply.error is not None
    assert (reply.error.code, reply.error.status) == ("model_not_found", 404)
    assert "ghost" in reply.error.message


@pytest.mark.parametrize("method", ["sleep", "sync_sleep"])
async def test_deadline_gives_504_and_replica_keeps_serving(
    conn: ReplicaConnection, method: str
) -> None:
    with anyio.fail_after(10):
        reply = await conn.call(request_id="late", method=method, timeout_s=0.05, **pack(3.0))
    assert reply.error is not None
    assert (reply.error.code, reply.error.status, reply.status) == ("deadline", 504, 504)
    assert value(await conn.call(request_id="in-time", method="add", **pack(2, 2))) == 4


async def test_expired_deadline_is_not_run(conn: ReplicaConnection) -> None:
    reply = await conn.call(request_id="expired", method="add", timeout_s=0.0, **pack(1))
    assert reply.error is not None and reply.error.code == "deadline"


@pytest.mark.parametrize("method", ["nope", "_private", "__init__", ""])
async def test_unknown_or_private_method_is_bad_request(
    conn: ReplicaConnection, method: str
) -> None:
    reply = await conn.call(request_id="bad", method=method)
    assert reply.error is not None
    assert (reply.error.code, reply.error.status) == ("bad_request", 400)


@pytest.mark.parametrize(
    "args",
    [
        {"args": b"\xc1"},
        {"args": msgspec.msgpack.encode(5)},
        # keys that are not strings: the caller's mistake, not the method's
        # (it was 500 user_error "TypeError: keywords must be strings")
        {"kwargs": msgspec.msgpack.encode({1: 2})},
        # past msgspec's depth limit (a RecursionError: was 500 user_error)
        {"args": b"\x91" * 100_000 + b"\xc0"},
    ],
    ids=["undecodable", "not_a_list", "kwargs_keys", "nested_too_deeply"],
)
async def test_undecodable_args_are_bad_request(
    conn: ReplicaConnection, args: dict[str, bytes]
) -> None:
    reply = await conn.call(request_id="bad-args", method="add", **args)
    assert reply.error is not None and reply.error.code == "bad_request", reply.error


async def test_ping_returns_state_and_counters(conn: ReplicaConnection) -> None:
    seen: list[Any] = []
    conn.on_state = seen.append
    try:
        pong = await conn.ping()
    finally:
        conn.on_state = None
    assert pong.state.in_flight == 0
    assert seen == [pong.state]
    assert {"model_loads", "cache_hits", "models_loaded"} <= set(pong.counters)
    assert conn.counters == pong.counters


async def test_ping_asks_for_model_events_only_when_told(conn: ReplicaConnection) -> None:
    # Echo multiplexes nothing: its log is empty whatever the gateway asks.
    assert (await conn.ping(events_after=0)).events == []
    assert (await conn.ping()).events == []


class PingBeforeEvents(msgspec.Struct, frozen=True, tag="ping", tag_field="t"):
    pass


class PongBeforeEvents(msgspec.Struct, frozen=True, tag="pong", tag_field="t"):
    state: ReplicaState
    counters: dict[str, float] = {}


def test_the_event_fields_decode_across_versions() -> None:
    """Peers from before the model events and peers with them understand each other."""
    event = ModelEvent(seq=7, time=1.5, kind="unload", model="m", duration_ms=2.0, reason="lru")
    new = Pong(state=ReplicaState(models=["m"]), counters={"model_loads": 1.0}, events=[event])
    old = msgspec.msgpack.decode(msgspec.msgpack.encode(new), type=PongBeforeEvents)
    assert old == PongBeforeEvents(state=new.state, counters=new.counters)
    payload = msgspec.msgpack.encode(PingBeforeEvents())
    (ping,) = FrameDecoder().feed(len(payload).to_bytes(4, "big") + payload)
    assert ping == Ping(events_after=None)
    (pong,) = FrameDecoder().feed(encode_frame(new))
    assert isinstance(pong, Pong) and pong.events == [event]


class HelloBeforePushes(msgspec.Struct, frozen=True, tag="hello", tag_field="t"):
    version: int
    nonce: bytes = b""


def test_the_push_fields_decode_across_versions() -> None:
    """A gateway that asks for pushes still talks to a replica from before
    them, and one that does not ask sends the very bytes it always sent."""
    assert encode_frame(Hello(version=PROTOCOL_VERSION, nonce=b"n")) == encode_frame(
        HelloBeforePushes(version=PROTOCOL_VERSION, nonce=b"n")  # type: ignore[arg-type]
    )
    asking = msgspec.msgpack.encode(Hello(version=PROTOCOL_VERSION, nonce=b"n", push_state=True))
    old = msgspec.msgpack.decode(asking, type=HelloBeforePushes)
    assert old == HelloBeforePushes(version=PROTOCOL_VERSION, nonce=b"n")
    (hello,) = FrameDecoder().feed(encode_frame(HelloBeforePushes(version=PROTOCOL_VERSION)))  # type: ignore[arg-type]
    assert hello == Hello(version=PROTOCOL_VERSION, push_state=False)
    push = StatePush(state=ReplicaState(in_flight=2, models=["a"], loading=["b"]))
    assert FrameDecoder().feed(encode_frame(push)) == [push]


async def test_replica_process_repr_and_pid(
    replica: tuple[ReplicaProcess, ReplicaConnection],
) -> None:
    process, _ = replica
    assert process.returncode is None
    assert f"pid={process.pid}" in repr(process) and "running" in repr(process)
    os.kill(process.pid, 0)  # alive


async def test_large_payloads_cross_many_reads(conn: ReplicaConnection) -> None:
    blob = os.urandom(3 << 20)
    assert value(await conn.call(request_id="big", method="echo", **pack(blob))) == blob
    http = HttpRequest(method="POST", path="/", query="", headers=[], body=b"x" * (2 << 20))
    reply = await conn.call(request_id="big-http", http=http)
    assert len(json.loads(reply.body)["body"]) == 2 << 20


async def test_cancelled_call_leaves_connection_usable(conn: ReplicaConnection) -> None:
    with anyio.move_on_after(0.05) as scope:
        await conn.call(request_id="abandoned", method="sleep", **pack(0.3))
    assert scope.cancelled_caught
    assert conn.in_flight == 0  # the caller's entry is gone; a late reply is dropped
    assert value(await conn.call(request_id="next", method="add", **pack(5, 5))) == 10
    # Many callers cancelled at once while their frames are being written.
    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(lambda i=i: conn.call(request_id=f"x{i}", method="echo", **pack(i)))
        await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    assert value(await conn.call(request_id="after-cancel", method="add", **pack(1, 2))) == 3
    assert conn.close_reason is None


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


_HELLO = Hello(version=PROTOCOL_VERSION)
_HELLO_PUSH = Hello(version=PROTOCOL_VERSION, push_state=True)


@pytest.mark.parametrize(
    ("hello", "garbage"),
    [
        (None, b"\xff\xff\xff\xffnot a frame at all"),  # length over the limit
        (None, _frame(b"\x00\x01\x02 not msgpack")),
        (_HELLO, _frame(msgspec.msgpack.encode({"t": "no-such-message", "id": 1}))),
        (_HELLO, _frame(msgspec.msgpack.encode({"t": "call", "id": "not an int"}))),
        (_HELLO, _frame(b"\xc1")),  # a byte msgpack never uses
        (_HELLO_PUSH, _frame(msgspec.msgpack.encode({"t": "state_push", "state": 1}))),
    ],
)
async def test_garbage_closes_only_that_connection(
    replica: tuple[ReplicaProcess, ReplicaConnection], hello: Hello | None, garbage: bytes
) -> None:
    process, conn = replica
    stream = await connect_stream(process.address)
    async with stream:
        decoder = FrameDecoder()
        if hello is not None:
            await stream.send(encode_frame(hello))
            with anyio.fail_after(10):
                (welcome,) = decoder.feed(await stream.receive())
            assert isinstance(welcome, Welcome)
        await stream.send(garbage)
        with anyio.fail_after(10), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            while True:  # the replica closes this connection, sending nothing more
                assert decoder.feed(await stream.receive()) == []
    # The replica keeps serving its gateway.
    assert value(await conn.call(request_id="after-garbage", method="add", **pack(4, 5))) == 9
    os.kill(process.pid, 0)


async def test_gateway_closes_a_connection_whose_replica_sends_garbage() -> None:
    """A stand-in replica that welcomes, then answers a call with garbage: the
    connection closes with the reason, and the pending call raises."""
    path = f"/tmp/muxgate-garbage-{os.getpid()}.sock"
    listener = await anyio.create_unix_listener(path)
    try:
        async with anyio.create_task_group() as tg:

            async def serve_one() -> None:
                stream = await listener.accept()
                async with stream:
                    await stream.receive()
                    await stream.send(
                        encode_frame(
                            Welcome(
                                version=PROTOCOL_VERSION,
                                deployment="D",
                                replica_id="fake",
                                pid=1,
                                state=ReplicaState(),
                            )
                        )
                    )
                    await stream.receive()  # the Call
                    await stream.send(_frame(msgspec.msgpack.encode({"t": "bogus"})))
                    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                        await stream.receive()

            tg.start_soon(serve_one)
            fake = await ReplicaConnection.connect(f"unix:{path}", connect_timeout=10)
            with anyio.fail_after(10), pytest.raises(ReplicaDiedError):
                await fake.call(request_id="to-garbage", method="add", **pack(1))
            assert fake.close_reason is not None
            assert fake.close_reason.startswith("protocol error")
            await fake.aclose()
    finally:
        await listener.aclose()
        os.unlink(path)
