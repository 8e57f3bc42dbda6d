"""A multiplexed torch deployment in a real replica: the state every reply
carries (models LRU-first), counters, and drain (in-flight calls finish,
then every model is unloaded through its hook and the process exits)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import pytest

from muxgate.gateway._connection import ReplicaConnection, ReplicaUnavailableError
from muxgate.gateway.launchers.local import LocalLauncher, ReplicaProcess
from muxgate.replicas._protocol import HttpRequest, Reply
from muxgate.replicas.contract import ReplicaSpec

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

APP_DIR = str(Path(__file__).resolve().parents[1] / "apps")


@pytest.fixture
async def torch_replica(
    tmp_path: Path,
) -> AsyncIterator[tuple[ReplicaProcess, ReplicaConnection, Path]]:
    events = tmp_path / "events.txt"
    launcher = LocalLauncher()
    process = await launcher.start(
        ReplicaSpec(
            deployment="TorchModels",
            import_path="torch_models:TorchModels",
            replica_id="TorchModels#t1",
            init_kwargs={"events_path": str(events), "state_dir": str(tmp_path)},
            app_dir=APP_DIR,
            listen="unix:",
        )
    )
    conn = await ReplicaConnection.connect(process.address)
    try:
        yield process, conn, events
    finally:
        await conn.aclose()
        with anyio.fail_after(30):
            await process.wait()
        await launcher.aclose()


async def predict(conn: ReplicaConnection, model_id: str) -> Reply:
    reply = await conn.call(
        request_id=f"req-{model_id}",
        model_id=model_id,
        method="predict",
        args=msgspec.msgpack.encode([[1.0, 2.0, 3.0, 4.0]]),
    )
    assert reply.error is None, reply.error
    assert len(msgspec.msgpack.decode(reply.body)) == 2
    return reply


async def test_replies_carry_loaded_models_lru_first(
    torch_replica: tuple[ReplicaProcess, ReplicaConnection, Path],
) -> None:
    _, conn, events = torch_replica
    observed: list[list[str]] = []
    conn.on_state = lambda state: observed.append(state.models)
    assert (await predict(conn, "m1")).state.models == ["m1"]
    assert (await predict(conn, "m2")).state.models == ["m1", "m2"]
    assert (await predict(conn, "m1")).state.models == ["m2", "m1"]  # hit: m1 most recent
    # Capacity 2: loading m3 evicts the least recently used, m2.
    reply = await predict(conn, "m3")
    assert reply.state.models == ["m1", "m3"]
    assert reply.state.loading == []
    assert reply.state.in_flight == 0
    assert observed[-1] == ["m1", "m3"]
    assert conn.state.models == ["m1", "m3"]

    http = HttpRequest(
        method="POST",
        path="/",
        query="",
        headers=[("content-type", "application/json")],
        body=b'{"x": [0.5, 0.5, 0.5, 0.5]}',
    )
    reply = await conn.call(request_id="http", model_id="m3", http=http)
    assert reply.status == 200, reply.error
    assert json.loads(reply.body)["model_id"] == "m3"
    assert reply.state.models == ["m1", "m3"]

    pong = await conn.ping()
    assert pong.counters["model_loads"] == 3
    assert pong.counters["model_unloads_lru"] == 1
    assert pong.counters["cache_hits"] >= 2
    assert pong.counters["models_loaded"] == 2
    # Five calls, one at a time: busy while each ran, loads included.
    assert pong.counters["calls_finished"] == 5
    assert pong.counters["busy_seconds"] >= pong.counters["model_load_seconds_sum"] > 0
    lines = (await anyio.Path(events).read_text()).splitlines()
    # The victim goes once the model that needs the room is built.
    assert lines == ["load m1", "load m2", "load m3", "unload m2"]


async def test_drain_finishes_in_flight_then_unloads_every_model_and_exits(
    torch_replica: tuple[ReplicaProcess, ReplicaConnection, Path], tmp_path: Path
) -> None:
    process, conn, events = torch_replica
    await predict(conn, "a")
    await predict(conn, "b")
    fifo = tmp_path / "release.fifo"
    os.mkfifo(fifo)
    other = await ReplicaConnection.connect(process.address)
    held: list[Reply] = []
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:

                async def hold() -> None:
                    held.append(
                        await conn.call(
                            request_id="held",
                            model_id="a",
                            method="hold",
                            args=msgspec.msgpack.encode([str(fifo)]),
                        )
                    )

                tg.start_soon(hold)
                while (await conn.ping()).state.in_flight < 1:
                    pass
                tg.start_soon(conn.drain)
                await anyio.wait_all_tasks_blocked()
                # Drain was written before this Ping, and frames are handled
                # in order: once the Pong is back the replica is draining.
                await conn.ping()
                with pytest.raises(ReplicaUnavailableError):
                    await conn.call(request_id="late", model_id="a", method="predict")
                refused = await other.call(request_id="late2", model_id="b", method="predict")
                assert refused.error is not None
                assert (refused.error.code, refused.error.status) == ("draining", 503)
                assert "draining" in repr(conn)

                def release() -> None:
                    with open(fifo, "w") as f:
                        f.write("go")

                await anyio.to_thread.run_sync(release)
            # drain() returned: the held call finished first, with its result.
            assert msgspec.msgpack.decode(held[0].body) == "a:go"
            assert await process.wait() == 0
            await conn.closed.wait()
            await other.closed.wait()
    finally:
        await other.aclose()
    lines = (await anyio.Path(events).read_text()).splitlines()
    assert sorted(line for line in lines if line.startswith("unload")) == ["unload a", "unload b"]
