"""Cancellation across the process boundary (real gateway, real replica).

A call the gateway gives up on (client disconnected, handle caller
cancelled, call cancelled on the connection) is cancelled in the replica:
the user code sees the cancellation, the replica's in-flight count and the
gateway's slot return to 0, and the model pin is released. A sync call in a
worker thread cannot be interrupted: it is abandoned (slot freed at once)
and runs to its end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from gateway_harness import MODEL, running_gateway
from waiting import wait_until

from muxgate.gateway._connection import ReplicaConnection
from muxgate.gateway._serve import Gateway
from muxgate.replicas._handle import aclose_handle_clients, get_deployment_handle

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture(scope="module")
def markers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cancel-markers")


@pytest.fixture(scope="module")
async def gateway(markers: Path) -> AsyncIterator[Gateway]:
    config = {
        "http": {"port": 0, "request_timeout_s": 60},
        "deployments": [
            {
                "name": "Holder",
                "import_path": "cancel_apps:Holder",
                "init_kwargs": {"marker_dir": str(markers)},
                "num_replicas": 1,
                # One slot for the held call, one for this test's side calls.
                "max_ongoing_requests": 2,
            },
        ],
    }
    async with running_gateway(config) as gw:
        yield gw
    await aclose_handle_clients()


@pytest.fixture(scope="module")
async def side(gateway: Gateway) -> AsyncIterator[ReplicaConnection]:
    """A second connection to the replica, to ask it for its own state."""
    view = gateway.pools["Holder"].snapshot()["replicas"][0]
    conn = await ReplicaConnection.connect(view["address"])
    try:
        yield conn
    finally:
        await conn.aclose()


async def assert_all_free(gateway: Gateway, side: ReplicaConnection) -> None:
    """Gateway and replica agree that nothing is in flight (within a deadline)."""
    pool = gateway.pools["Holder"]

    async def replica_idle() -> bool:
        return (await side.ping()).state.in_flight == 0

    await wait_until(replica_idle, what="replica in_flight back to 0")
    view = pool.snapshot()
    assert view["in_flight"] == 0
    assert [r["in_flight"] for r in view["replicas"]] == [0]
    replica_id = view["replicas"][0]["id"]
    assert pool.dispatcher.router.own_in_flight(replica_id) == 0
    # The side connection's calls count as another gateway's until the
    # replica's next report (a pong) says they are done.
    await wait_until(
        lambda: pool.dispatcher.router.in_flight(replica_id) == 0, what="the router's view"
    )


async def pins(side: ReplicaConnection) -> dict[str, int]:
    reply = await side.call(request_id="pins", method="pins")
    assert reply.error is None, reply.error
    out: dict[str, int] = msgspec.msgpack.decode(reply.body)
    return out


async def test_client_disconnect_cancels_the_call_in_the_replica(
    gateway: Gateway, side: ReplicaConnection, markers: Path
) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
        request = asyncio.ensure_future(
            client.get("/hold", params={"name": "http"}, headers={MODEL: "m-http"})
        )
        await wait_until((markers / "http.started").exists, what="call started in the replica")
        assert (await pins(side)).get("m-http") == 1
        request.cancel()  # httpx drops the connection: the client is gone
        with pytest.raises(asyncio.CancelledError):
            await request
        await wait_until((markers / "http.cancelled").exists, what="replica call cancelled")
        await assert_all_free(gateway, side)
        assert (await pins(side)).get("m-http", 0) == 0
        assert side.close_reason is None
        r = await client.get("/quick")
        assert (r.status_code, r.text) == (200, "quick")
        metrics = (await client.get("/-/metrics")).text
        assert 'muxgate_requests_total{deployment="Holder",status="499"} 1.0' in metrics
    assert any("cancels_sent=" in repr(r.conn) for r in gateway.pools["Holder"].replicas)


async def test_cancelled_handle_call_cancels_the_call_in_the_replica(
    gateway: Gateway, side: ReplicaConnection, markers: Path
) -> None:
    handle = get_deployment_handle("Holder", gateway.url)
    call = asyncio.ensure_future(handle.options(multiplexed_model_id="m-handle").hold.remote("h"))
    await wait_until((markers / "h.started").exists, what="handle call started")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await wait_until((markers / "h.cancelled").exists, what="replica call cancelled")
    await assert_all_free(gateway, side)
    assert (await pins(side)).get("m-handle", 0) == 0
    assert await handle.quick.remote() == "quick"


async def test_cancelled_connection_call_sends_cancel(
    side: ReplicaConnection, markers: Path
) -> None:
    before = side.cancels_sent
    call = asyncio.ensure_future(
        side.call(request_id="direct", method="hold", args=b"\x91\xa6direct")
    )
    await wait_until((markers / "direct.started").exists, what="call started")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert side.cancels_sent == before + 1
    await wait_until((markers / "direct.cancelled").exists, what="replica call cancelled")

    async def idle() -> bool:
        return (await side.ping()).state.in_flight == 0

    await wait_until(idle, what="replica idle")


async def test_cancelled_sync_call_is_abandoned_and_runs_to_its_end(
    side: ReplicaConnection, markers: Path
) -> None:
    args = msgspec.msgpack.encode(["sync", 60])
    call = asyncio.ensure_future(side.call(request_id="sync", method="sync_hold", args=args))
    await wait_until((markers / "sync.started").exists, what="sync call started")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    async def idle() -> bool:
        return (await side.ping()).state.in_flight == 0

    # The slot is freed while the thread still runs (it returns once released).
    await wait_until(idle, what="abandoned sync call out of in_flight")
    assert not (markers / "sync.returned").exists()
    (markers / "sync.release").touch()
    await wait_until((markers / "sync.returned").exists, what="the thread ran to its end")
    reply = await side.call(request_id="after-sync", method="quick")
    assert msgspec.msgpack.decode(reply.body) == "quick"


async def test_replica_guard_queues_then_refuses_and_the_gateway_waits_for_room(
    gateway: Gateway, side: ReplicaConnection, markers: Path
) -> None:
    """The side connection plays a second gateway that fills the replica:
    max_ongoing_requests (2) run, as many again wait, the next is refused
    ("overloaded", 503). This gateway learns from the replica's reports (a
    pong, or the refusal of its own request) that the replica is full of
    another gateway's calls: its request waits in its queue, not refused,
    and is served once the other gateway's calls are done."""

    def hold(name: str) -> asyncio.Future[Any]:
        args = msgspec.msgpack.encode([name])
        return asyncio.ensure_future(side.call(request_id=name, method="hold", args=args))

    running = [hold("g1"), hold("g2")]
    await wait_until(
        lambda: (markers / "g1.started").exists() and (markers / "g2.started").exists(),
        what="two calls running",
    )
    waiting = [hold("g3"), hold("g4")]

    async def four_in() -> bool:
        return (await side.ping()).state.in_flight == 4

    await wait_until(four_in, what="two calls waiting in the replica")
    assert not (markers / "g3.started").exists()
    refused = await side.call(request_id="g5", method="quick")
    assert refused.error is not None
    assert (refused.error.code, refused.error.status) == ("overloaded", 503)
    pool = gateway.pools["Holder"]
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        request = asyncio.ensure_future(client.get("/quick"))
        await wait_until(lambda: pool.dispatcher.queued == 1, what="the request queued")
        (replica_id,) = pool.targets
        assert pool.router.in_flight(replica_id) >= 2  # the other gateway's calls
        assert pool.router.own_in_flight(replica_id) == 0
        # A freed slot goes to the oldest waiter in the replica.
        running[0].cancel()
        await wait_until((markers / "g3.started").exists, what="first waiter runs")
        assert not (markers / "g4.started").exists()
        assert not request.done()
        for call in [*running, *waiting]:
            call.cancel()
        await asyncio.gather(*running, *waiting, return_exceptions=True)
        r = await request
        assert (r.status_code, r.text) == (200, "quick")
    await assert_all_free(gateway, side)


async def test_abandoned_sync_call_keeps_its_pin_until_the_thread_returns(
    side: ReplicaConnection, markers: Path
) -> None:
    args = msgspec.msgpack.encode(["pinned", 60])
    call = asyncio.ensure_future(
        side.call(request_id="pinned", model_id="m-sync", method="sync_hold_model", args=args)
    )
    await wait_until((markers / "pinned.started").exists, what="sync call started")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    async def idle() -> bool:
        return (await side.ping()).state.in_flight == 0

    await wait_until(idle, what="abandoned sync call out of in_flight")
    # The thread still uses the model: it stays pinned (cannot be evicted).
    assert not (markers / "pinned.returned").exists()
    assert (await pins(side)).get("m-sync") == 1
    (markers / "pinned.release").touch()
    await wait_until((markers / "pinned.returned").exists, what="the thread ran to its end")

    async def unpinned() -> bool:
        return (await pins(side)).get("m-sync", 0) == 0

    await wait_until(unpinned, what="pin released when the thread returned")
