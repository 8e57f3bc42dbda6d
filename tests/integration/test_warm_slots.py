"""Warming on a free call slot, with a real replica process
(``warm_apps:Gated``: two call slots, calls and model loads held until a
``release`` call): a warming load (``ModelControl.after_slot``) starts only
while a slot is free, one at a time, and holds no slot (a call that arrives
while it loads runs at once); a message with only ``after_calls`` (a gateway
before ``after_slot``) still waits for an idle replica.

Whether a warm started is read from a ``Pong``: the replica starts the tasks
of the frames it reads in order, so a warm that may not start has checked
the rule and is waiting before the ``Ping`` sent after it is answered (and
one that may start is waited for until its model is ``loading``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import pytest
from waiting import wait_until

from muxgate.gateway._connection import ReplicaConnection
from muxgate.gateway.launchers.local import LocalLauncher
from muxgate.replicas._protocol import Reply
from muxgate.replicas.contract import ReplicaSpec

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

APP_DIR = str(Path(__file__).resolve().parents[1] / "apps")


@pytest.fixture
async def conn() -> AsyncIterator[ReplicaConnection]:
    launcher = LocalLauncher()
    spec = ReplicaSpec(
        deployment="Gated",
        import_path="warm_apps:Gated",
        replica_id="Gated#slots",
        app_dir=APP_DIR,
        listen="unix:",
    )
    process = await launcher.start(spec)
    connection = await ReplicaConnection.connect(process.address)
    try:
        yield connection
    finally:
        await connection.aclose()
        with anyio.fail_after(20):
            await process.wait()
        await launcher.aclose()


def call(conn: ReplicaConnection, method: str, name: str) -> asyncio.Task[Reply]:
    return asyncio.create_task(
        conn.call(
            request_id=f"{method}-{name}",
            method=method,
            args=msgspec.msgpack.encode([name]),
        )
    )


def warm(conn: ReplicaConnection, model_id: str, **when: bool) -> asyncio.Task[Reply]:
    return asyncio.create_task(conn.control("warm", model_id, timeout_s=30, **when))


async def sent(conn: ReplicaConnection, n: int) -> None:
    """Wait until the tasks just created wrote their frames (``n`` unanswered)."""
    await wait_until(lambda: conn.in_flight == n, what=f"{n} frames sent")


async def loading(conn: ReplicaConnection, ids: list[str]) -> None:
    async def check() -> bool:
        return (await conn.ping()).state.loading == ids

    await wait_until(check, what=f"the replica loading {ids}")


def loaded(reply: Reply) -> bool:
    assert reply.error is None, reply.error
    return bool(msgspec.json.decode(reply.body)["loaded"])


async def test_a_warm_takes_a_free_slot_one_at_a_time_and_never_one_a_call_needs(
    conn: ReplicaConnection,
) -> None:
    with anyio.fail_after(60):
        held = [call(conn, "hold", "a"), call(conn, "hold", "b")]
        w1 = warm(conn, "w1", after_calls=True, after_slot=True)
        await sent(conn, 3)
        pong = await conn.ping()
        # both slots taken: the warm waits for one
        assert pong.state.in_flight == 2
        assert pong.state.loading == []

        # a slot frees (the gateway gives up on a call): the warm starts,
        # though a call is still in flight
        held[0].cancel()
        await loading(conn, ["w1"])
        assert (await conn.ping()).state.in_flight == 1

        # one warming load at a time
        w2 = warm(conn, "w2", after_calls=True, after_slot=True)
        await sent(conn, 3)  # b, w1, w2
        assert (await conn.ping()).state.loading == ["w1"]

        # the warm holds no slot: with one call in flight and w1 loading,
        # two more calls run at once (the second slot, then the freed one)
        reply = await call(conn, "release", "b")
        assert reply.error is None
        assert reply.state.loading == ["w1"]
        assert (await held[1]).error is None
        reply = await call(conn, "release", "load-w1")
        assert reply.error is None
        assert loaded(await w1)

        # w1 done: w2 starts, and loads once released
        await loading(conn, ["w2"])
        await call(conn, "release", "load-w2")
        assert loaded(await w2)
        assert sorted((await conn.ping()).state.models) == ["w1", "w2"]


async def test_after_calls_alone_still_waits_for_an_idle_replica(
    conn: ReplicaConnection,
) -> None:
    with anyio.fail_after(60):
        held = call(conn, "hold", "c")
        w3 = warm(conn, "w3", after_calls=True)
        await sent(conn, 2)
        pong = await conn.ping()
        assert pong.state.in_flight == 1  # a slot is free, but a call is in flight
        assert pong.state.loading == []
        await call(conn, "release", "c")
        assert (await held).error is None
        await loading(conn, ["w3"])
        await call(conn, "release", "load-w3")
        assert loaded(await w3)
