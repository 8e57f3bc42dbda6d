"""Replicas forked by the fork server: they serve like spawned ones, start in
parallel, report start failures, die visibly, never outlive the launcher or
the gateway, and the launcher spawns instead when forking is off or broken."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from waiting import wait_until

from muxgate.gateway._config import parse_config
from muxgate.gateway._connection import ReplicaConnection
from muxgate.gateway._serve import start_gateway
from muxgate.gateway.launchers.local import LocalLauncher, ReplicaProcess, ReplicaStartError
from muxgate.replicas._protocol import HttpRequest
from muxgate.replicas.contract import ReplicaSpec

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

APP_DIR = str(Path(__file__).resolve().parents[1] / "apps")


def spec(replica_id: str, import_path: str = "fork_apps:TorchOps", **kwargs: Any) -> ReplicaSpec:
    return ReplicaSpec(
        deployment=import_path.rpartition(":")[2],
        import_path=import_path,
        replica_id=replica_id,
        app_dir=APP_DIR,
        listen=kwargs.pop("listen", "unix:"),
        **kwargs,
    )


def pack(*args: Any, **kwargs: Any) -> dict[str, bytes]:
    out = {"args": msgspec.msgpack.encode(list(args))}
    if kwargs:
        out["kwargs"] = msgspec.msgpack.encode(kwargs)
    return out


async def call(conn: ReplicaConnection, method: str, *args: Any, **kwargs: Any) -> Any:
    reply = await conn.call(request_id=method, method=method, **pack(*args, **kwargs))
    assert reply.error is None, reply.error
    return msgspec.msgpack.decode(reply.body)


def process_gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def wait_gone(*pids: int) -> None:
    # Not our children: nothing to wait on, so check with a deadline.
    await wait_until(
        lambda: all(process_gone(pid) for pid in pids), within_s=15.0, what=f"{pids} to exit"
    )


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def fork_server_pid(launcher: LocalLauncher) -> int:
    server = launcher._server
    assert server is not None
    return server.process.pid


@pytest.fixture(scope="module")
async def launcher() -> AsyncIterator[LocalLauncher]:
    launcher = LocalLauncher(fork_server=True)
    try:
        assert await launcher.warm_up()
        yield launcher
    finally:
        await launcher.aclose()


@contextlib.asynccontextmanager
async def running(
    launcher: LocalLauncher, s: ReplicaSpec
) -> AsyncIterator[tuple[ReplicaProcess, ReplicaConnection]]:
    process = await launcher.start(s)
    try:
        async with await ReplicaConnection.connect(process.address) as conn:
            yield process, conn
    finally:
        # The connection closed: the replica exits by itself.
        with anyio.fail_after(20):
            await process.wait()


async def test_forked_replica_serves_http_handle_calls_and_torch(launcher: LocalLauncher) -> None:
    async with running(launcher, spec("ops#1", init_kwargs={"threads": 2})) as (process, conn):
        assert process.forked
        assert parent_of(process.pid) == fork_server_pid(launcher)
        assert conn.pid == process.pid
        http = HttpRequest(method="GET", path="/x", query="", headers=[], body=b"")
        reply = await conn.call(request_id="h", http=http)
        assert reply.status == 200
        assert msgspec.json.decode(reply.body) == {
            "pid": process.pid,
            "path": "/x",
            "ready": 256.0**3,
        }
        with anyio.fail_after(30):  # a deadlocked intra-op pool would hang here
            result = await call(conn, "matmul", 512)
            assert result == {"sum": 512.0**3, "threads": 2}
            # Resizing the pool after fork works too.
            assert await call(conn, "matmul", 512, threads=1) == {"sum": 512.0**3, "threads": 1}
        facts = await call(conn, "facts")
        assert facts["ppid"] == fork_server_pid(launcher)
        assert facts["stdin_is_devnull"]
    assert process.returncode == 0
    assert "exited(0)" in repr(process)


async def test_four_parallel_starts(launcher: LocalLauncher) -> None:
    processes: dict[str, ReplicaProcess] = {}

    async def start(s: ReplicaSpec) -> None:
        processes[s.replica_id] = await launcher.start(s)

    specs = [spec(f"par#{i}") for i in range(3)] + [spec("par#tcp", listen="tcp:127.0.0.1:0")]
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for s in specs:
                tg.start_soon(start, s)
    assert len({p.pid for p in processes.values()}) == 4
    assert all(p.forked for p in processes.values())
    randoms = set()
    for process in processes.values():
        async with await ReplicaConnection.connect(process.address) as conn:
            facts = await call(conn, "facts")
            assert facts["pid"] == process.pid
            randoms.add(facts["random"])
        with anyio.fail_after(20):
            assert await process.wait() == 0
    # Each child reseeded: no two replicas share a random sequence.
    assert len(randoms) == 4


async def test_raising_init_is_a_start_error_with_the_reason(launcher: LocalLauncher) -> None:
    with pytest.raises(ReplicaStartError) as info:
        await launcher.start(spec("bad#1", "echo:BadInit", init_kwargs={"why": "no weights"}))
    # the reason says where the user's code raised
    assert info.value.reason.startswith("RuntimeError: no weights (at ")
    assert info.value.reason.endswith("echo.py:93 in __init__)")
    with pytest.raises(ReplicaStartError, match="ModuleNotFoundError"):
        await launcher.start(spec("bad#2", "no_such_module_here:Thing"))
    # A failing replica is not a failing fork server.
    assert launcher.fork_disabled_reason is None


async def test_sigkill_of_a_forked_replica_is_seen_by_wait_and_the_connection(
    launcher: LocalLauncher,
) -> None:
    process = await launcher.start(spec("victim#1", "echo:Echo"))
    conn = await ReplicaConnection.connect(process.address)
    try:
        with anyio.fail_after(20):
            os.kill(process.pid, signal.SIGKILL)
            await conn.closed.wait()
            assert await process.wait() == -signal.SIGKILL
        assert process.returncode == -signal.SIGKILL
        process.kill()  # already gone (and reaped): a no-op, not an error
    finally:
        await conn.aclose()


class RecordingLauncher(LocalLauncher):
    def __init__(self) -> None:
        super().__init__(fork_server=True)
        self.processes: list[ReplicaProcess] = []

    async def start(self, spec: ReplicaSpec) -> ReplicaProcess:
        process = await super().start(spec)
        self.processes.append(process)
        return process


async def test_pool_replaces_a_killed_forked_replica_over_http() -> None:
    config = parse_config(
        {
            "http": {"port": 0},
            "deployments": [
                {"name": "Ops", "import_path": "fork_apps:TorchOps", "num_replicas": 1}
            ],
        },
        base_dir=APP_DIR,
    )
    launcher = RecordingLauncher()
    try:
        async with (
            start_gateway(config, launcher=launcher) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=30) as client,
        ):
            pool = gw.pools["Ops"]
            first = launcher.processes[0]
            assert first.forked
            response = await client.get("/ops")
            assert response.json()["pid"] == first.pid
            (old_id,) = pool.targets
            with anyio.fail_after(30):
                first.kill()
                assert await first.wait() == -signal.SIGKILL
                # The connection dropped: the pool replaces the replica.
                await pool.wait_for(lambda: pool.running == 1 and old_id not in pool.targets)
            second = launcher.processes[-1]
            assert second is not first and second.forked
            assert (await client.get("/ops")).json()["pid"] == second.pid
    finally:
        await launcher.aclose()


async def test_closing_the_launcher_leaves_no_fork_server_and_no_children() -> None:
    launcher = LocalLauncher(fork_server=True)
    try:
        processes = [await launcher.start(spec(f"left#{i}", "echo:Echo")) for i in range(2)]
        server_pid = fork_server_pid(launcher)
        # One replica has a gateway connection open, one has none.
        conn = await ReplicaConnection.connect(processes[0].address)
    finally:
        await launcher.aclose()
    try:
        await wait_gone(server_pid, *(p.pid for p in processes))
        for process in processes:
            with anyio.fail_after(10):
                await process.wait()
        assert repr(launcher).startswith("<LocalLauncher")
    finally:
        await conn.aclose()


async def test_a_burst_of_starts_waits_its_turn_at_a_stalled_fork_server() -> None:
    """More starts at once than the fork server's control socket can queue
    take turns to send, rather than failing with "Another task is already
    writing to this resource" (the test shrinks the socket's send buffer to
    the minimum, so that a few requests fill it, as hundreds would)."""
    launcher = LocalLauncher(fork_server=True)
    n = 24
    entered = 0
    started: list[ReplicaProcess] = []
    try:
        assert await launcher.warm_up()
        server = launcher._server
        assert server is not None
        server.control.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
        fork = server.fork

        async def counted_fork(s: ReplicaSpec) -> Any:
            nonlocal entered
            entered += 1
            return await fork(s)

        server.fork = counted_fork  # type: ignore[method-assign]

        async def start(i: int) -> None:
            started.append(await launcher.start(spec(f"burst#{i}", "echo:Echo")))

        # Stopped, the fork server reads nothing: the queue fills after a few.
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(start, i)
                await wait_until(lambda: entered == n, within_s=10.0, what="every start to ask")
                os.kill(server.process.pid, signal.SIGCONT)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert len(started) == n
        assert len({p.pid for p in started}) == n
        assert all(p.forked for p in started)
    finally:
        await launcher.aclose()
    for process in started:
        with anyio.fail_after(10):
            await process.wait()


_FAKE_GATEWAY = """
import anyio, sys
from muxgate.gateway.launchers.local import LocalLauncher
from muxgate.replicas.contract import ReplicaSpec

async def main():
    launcher = LocalLauncher(fork_server=True)
    process = await launcher.start(ReplicaSpec(
        deployment="Echo", import_path="echo:Echo", replica_id="orphan#1",
        app_dir=sys.argv[1], listen="unix:"))
    print(process.pid, launcher._server.process.pid, process.forked, flush=True)
    await anyio.sleep_forever()

anyio.run(main)
"""


async def test_gateway_death_takes_the_fork_server_and_its_replicas(tmp_path: Path) -> None:
    script = tmp_path / "fake_gateway.py"
    script.write_text(_FAKE_GATEWAY)
    gateway = await anyio.open_process(
        [sys.executable, str(script), APP_DIR], stdout=subprocess.PIPE
    )
    try:
        assert gateway.stdout is not None
        with anyio.fail_after(60):
            line = b""
            while not line.endswith(b"\n"):
                line += await gateway.stdout.receive()
        replica_pid, server_pid, forked = line.decode().split()
        assert forked == "True"
        assert parent_of(int(replica_pid)) == int(server_pid)
        gateway.kill()
        await gateway.wait()
        await wait_gone(int(replica_pid), int(server_pid))
    finally:
        if gateway.returncode is None:
            gateway.kill()
        await gateway.aclose()


async def test_fork_server_death_stops_its_replicas_and_a_new_one_starts() -> None:
    launcher = LocalLauncher(fork_server=True)
    try:
        process = await launcher.start(spec("orphan#2", "echo:Echo"))
        old_server = fork_server_pid(launcher)
        os.kill(old_server, signal.SIGKILL)
        with anyio.fail_after(20):
            # The replica got its parent-death signal; nobody reports its
            # exit code any more.
            assert await process.wait() is None
        await wait_gone(process.pid)
        replacement = await launcher.start(spec("after#1", "echo:Echo"))
        assert replacement.forked
        assert fork_server_pid(launcher) != old_server
        replacement.terminate()
        with anyio.fail_after(20):
            assert await replacement.wait() == 0
    finally:
        await launcher.aclose()


def children() -> set[int]:
    """Pids of this process's children (all threads)."""
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            pids.update(int(p) for p in (task / "children").read_text().split())
    return pids


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"fork_server": False}, None),
        ({"fork_server": True, "fork_server_preload": ["no_such_module_here"]}, "ModuleNotFound"),
        ({"fork_server": True, "fork_server_preload": ["fork_threaded"]}, "threads"),
    ],
    ids=["disabled", "broken", "threaded"],
)
async def test_spawns_when_forking_is_off_or_broken(
    options: dict[str, Any], reason: str | None
) -> None:
    launcher = LocalLauncher(env={"PYTHONPATH": APP_DIR}, **options)
    try:
        async with running(launcher, spec("spawned#1", "echo:Echo")) as (process, conn):
            assert not process.forked
            assert process.pid in children()
            assert await call(conn, "pid") == process.pid
        if reason is None:
            assert launcher._server is None
        else:
            assert launcher.fork_disabled_reason is not None
            assert reason in launcher.fork_disabled_reason
            assert "spawn" in repr(launcher)
    finally:
        await launcher.aclose()
