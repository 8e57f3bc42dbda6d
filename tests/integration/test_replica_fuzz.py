"""A real ``muxgate replica`` (cluster secret required) against hostile peers:
random bytes, truncated frames, absurd length prefixes, frames nested past
the decoder's depth limit, floods of hellos, wrong proofs, calls before the
proof, slow peers. Each is closed on its own;
the replica stays up, keeps serving an authenticated gateway throughout, and
its memory stays bounded (the frame cap before ``Welcome`` is checked on the
length prefix, before the frame is buffered)."""

from __future__ import annotations

import contextlib
import random
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import anyio.abc
import msgspec
import pytest
from standalone_replicas import SECRET, Standalone, standalone_replica, write_config

from muxgate.gateway._connection import ReplicaConnection, connect_stream
from muxgate.gateway._handshake import handshake
from muxgate.replicas._channel import ChannelAuth
from muxgate.replicas._protocol import (
    PROTOCOL_VERSION,
    Call,
    Challenge,
    FrameDecoder,
    Hello,
    Proof,
    Refused,
    encode_frame,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

AUTH = ChannelAuth(SECRET.encode())
#: the replica's handshake deadline in this module (cluster.handshake_timeout_s)
HANDSHAKE_S = 1.0
#: how long after its deadline a peer may still be connected (scheduling slack)
SLACK_S = 4.0
MiB = 1 << 20


@pytest.fixture(scope="module")
async def replica(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Standalone]:
    folder = tmp_path_factory.mktemp("fuzz")
    config = write_config(
        folder,
        [{"name": "Echo", "import_path": "echo:Echo"}],
        cluster={"handshake_timeout_s": HANDSHAKE_S},
    )
    async with standalone_replica(config, "Echo", "echo-fuzz") as running:
        yield running
        assert running.process.returncode is None, "the replica died under fuzzing"


@pytest.fixture(scope="module")
async def gateway(replica: Standalone) -> AsyncIterator[ReplicaConnection]:
    conn = await ReplicaConnection.connect(replica.address, auth=AUTH)
    yield conn
    await conn.aclose()


async def add(conn: ReplicaConnection, a: int, b: int) -> int:
    reply = await conn.call(
        request_id="fuzz-check",
        method="add",
        args=msgspec.msgpack.encode([a, b]),
        kwargs=msgspec.msgpack.encode({}),
    )
    assert reply.error is None, reply.error
    result: int = msgspec.msgpack.decode(reply.body)
    return result


async def served_throughout(conn: ReplicaConnection, attack: Callable[[], Awaitable[None]]) -> int:
    """Run ``attack`` while calling the replica over ``conn`` every few ms;
    the number of calls, each of which must succeed."""
    calls = 0
    async with anyio.create_task_group() as tg:

        async def keep_calling() -> None:
            nonlocal calls
            while True:
                assert await add(conn, calls, 1) == calls + 1
                calls += 1
                await anyio.sleep(0.005)  # pacing, not synchronisation

        tg.start_soon(keep_calling)
        await attack()
        tg.cancel_scope.cancel()
    return calls


async def hostile(address: str, payload: bytes, *, read: bool = True) -> tuple[list[object], float]:
    """Connect, send ``payload``, read until the replica closes: (messages
    it sent, seconds until it closed). The replica must close it."""
    started = time.monotonic()
    messages: list[object] = []
    stream = await connect_stream(address)
    async with stream:
        decoder = FrameDecoder()
        with anyio.fail_after(HANDSHAKE_S + SLACK_S):
            # closed while we were still sending: what we expect for some
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                await stream.send(payload)
            while read:
                try:
                    messages += decoder.feed(await stream.receive())
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    break
    return messages, time.monotonic() - started


async def many(count: int, concurrency: int, one: Callable[[int], Awaitable[object]]) -> None:
    limiter = anyio.CapacityLimiter(concurrency)

    async def run(i: int) -> None:
        async with limiter:
            await one(i)

    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(run, i)


def hello(nonce: bytes | None = None) -> bytes:
    return encode_frame(Hello(version=PROTOCOL_VERSION, nonce=nonce or AUTH.nonce()))


async def test_garbage_floods_and_absurd_lengths_leave_memory_bounded(
    replica: Standalone, gateway: ReplicaConnection
) -> None:
    rng = random.Random(17)
    address = replica.address

    async def random_bytes(i: int) -> None:
        await hostile(address, rng.randbytes(rng.randrange(1, 8192)))

    async def truncated(i: int) -> None:
        frame = hello()
        await hostile(address, frame[: rng.randrange(1, len(frame))])

    async def absurd_length(i: int) -> None:
        prefix = rng.choice([0xFFFFFFFF, 1 << 30, 1 << 24, 5000])
        # 2 MiB behind the prefix: buffered, 40 of these would be 80 MiB
        await hostile(address, struct.pack(">I", prefix) + rng.randbytes(2 * MiB))

    async def hello_flood_on_one_connection() -> None:
        messages, _ = await hostile(address, b"".join(hello() for _ in range(20_000)))
        assert all(isinstance(m, (Challenge, Refused)) for m in messages)

    async def hello_then_leave(i: int) -> None:
        await hostile(address, hello(), read=i % 2 == 0)

    async def attack() -> None:
        await many(300, 50, random_bytes)
        await many(100, 50, truncated)
        await many(40, 40, absurd_length)
        await hello_flood_on_one_connection()
        await many(400, 200, hello_then_leave)

    await served_throughout(gateway, attack)  # a warm-up round: allocator arenas, buffers
    replica.reset_peak_rss()
    before = replica.rss_bytes()
    calls = await served_throughout(gateway, attack)
    peak = replica.rss_bytes("VmHWM")
    assert calls > 0
    # the peak, not the end: buffers are freed when their connection closes
    assert peak - before < 16 * MiB, (before, peak)
    # The replica is up, and a new gateway connects at once.
    fresh = await ReplicaConnection.connect(replica.address, auth=AUTH)
    assert await add(fresh, 20, 22) == 42
    await fresh.aclose()


async def test_wrong_proofs_and_calls_before_the_proof_are_refused(
    replica: Standalone, gateway: ReplicaConnection
) -> None:
    address = replica.address

    async def attack() -> None:
        # a Hello without a nonce: this replica requires the secret
        messages, _ = await hostile(address, encode_frame(Hello(version=PROTOCOL_VERSION)))
        assert [type(m) for m in messages] == [Refused]
        assert "requires the cluster secret" in messages[0].reason  # type: ignore[attr-defined]
        # a wrong proof: a peer that does not hold the secret
        stream = await connect_stream(address)
        async with stream:
            decoder = FrameDecoder()
            await stream.send(hello())
            with anyio.fail_after(5):
                (challenge,) = decoder.feed(await stream.receive())
                assert isinstance(challenge, Challenge)
                await stream.send(encode_frame(Proof(proof=challenge.proof)))  # replayed back
                refused = decoder.feed(await stream.receive())
                assert refused == [Refused(reason="authentication failed")]
        # a Call sent with the Hello, before any proof: refused, never run
        early = hello() + encode_frame(
            Call(id=1, request_id="early", method="sleep", args=msgspec.msgpack.encode([30]))
        )
        messages, _ = await hostile(address, early)
        assert messages == [Refused(reason="authentication failed")]
        # a Call instead of a Hello
        messages, _ = await hostile(
            address, encode_frame(Call(id=1, request_id="x", method="sleep"))
        )
        assert messages == [Refused(reason="expected Hello")]

    await served_throughout(gateway, attack)
    assert (await gateway.ping()).state.in_flight == 0  # the early sleep never started


def nested_too_deeply(frame: bytes) -> bytes:
    """``frame`` (a map) with one more field, unknown to the replica, whose
    value is 4000 nested arrays: 4 KiB that msgspec cannot even skip past
    its depth limit (a ``RecursionError``, not a ``DecodeError``)."""
    body = frame[4:]
    assert 0x80 <= body[0] < 0x8F  # a fixmap of fewer than 15 fields
    body = bytes([body[0] + 1]) + body[1:] + b"\xa3zzz" + b"\x91" * 4000 + b"\xc0"
    return struct.pack(">I", len(body)) + body


async def test_a_frame_nested_too_deeply_closes_only_its_connection(
    replica: Standalone, gateway: ReplicaConnection
) -> None:
    # Before, the RecursionError escaped the handshake and ended the replica:
    # one 4 KiB frame from a peer that proved nothing stopped it.
    address = replica.address

    async def attack() -> None:
        for frame in (hello(), encode_frame(Hello(version=PROTOCOL_VERSION))):
            messages, _ = await hostile(address, nested_too_deeply(frame))
            assert all(isinstance(m, Refused) for m in messages), messages
        # after the proof too: a frame of a gateway that proved the secret
        stream, _, _, _ = await handshake(
            address, connect_timeout=10, auth=AUTH, ssl_context=None, server_hostname=None
        )
        async with stream:
            await stream.send(nested_too_deeply(encode_frame(Hello(version=PROTOCOL_VERSION))))
            ended = (anyio.EndOfStream, anyio.BrokenResourceError, OSError)
            with anyio.fail_after(10), contextlib.suppress(*ended):
                while await stream.receive():  # until the replica closes it
                    pass

    await served_throughout(gateway, attack)
    assert replica.process.returncode is None


async def test_silent_peers_at_the_cap_of_handshakes_do_not_lock_a_gateway_out(
    replica: Standalone, gateway: ReplicaConnection
) -> None:
    # Past the cap of 64 handshakes under way, the newcomer was closed at
    # once: 64 silent connections, renewed every deadline, kept every gateway
    # from connecting (a restarted gateway could not reach its replicas).
    # Now the oldest handshake makes room.
    silent = [await connect_stream(replica.address) for _ in range(80)]
    try:
        with anyio.fail_after(HANDSHAKE_S + SLACK_S):
            fresh = await ReplicaConnection.connect(replica.address, auth=AUTH)
        assert await add(fresh, 1, 2) == 3
        await fresh.aclose()
    finally:
        for stream in silent:
            await stream.aclose()
    assert await add(gateway, 2, 2) == 4


async def test_slow_peers_are_cut_off_at_the_handshake_deadline(
    replica: Standalone, gateway: ReplicaConnection
) -> None:
    address = replica.address
    closed_after: list[float] = []

    async def silent(i: int) -> None:
        closed_after.append((await hostile(address, b""))[1])

    async def trickle(i: int) -> None:
        # a Hello one byte at a time, slower than the deadline allows
        started = time.monotonic()
        stream = await connect_stream(address)
        async with stream:
            with anyio.fail_after(HANDSHAKE_S + SLACK_S):
                try:
                    for byte in hello():
                        await stream.send(bytes([byte]))
                        await anyio.sleep(HANDSHAKE_S / 4)  # the attack's pace
                except (anyio.BrokenResourceError, OSError):
                    pass
                while True:
                    try:
                        await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        break
        closed_after.append(time.monotonic() - started)

    async def attack() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(many, 20, 20, silent)
            tg.start_soon(many, 5, 5, trickle)

    await served_throughout(gateway, attack)
    assert len(closed_after) == 25
    assert all(HANDSHAKE_S * 0.9 <= t <= HANDSHAKE_S + SLACK_S for t in closed_after), closed_after
