"""Starting and ending replica processes: failures at start, parallel starts,
death of the replica, of its connection and of its parent."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from waiting import wait_until

from muxgate.gateway._connection import (
    ReplicaConnection,
    ReplicaDiedError,
    ReplicaUnavailableError,
)
from muxgate.gateway.launchers.local import LocalLauncher, ReplicaProcess, ReplicaStartError
from muxgate.replicas._protocol import HttpRequest
from muxgate.replicas.contract import ReplicaSpec

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

APP_DIR = str(Path(__file__).resolve().parents[1] / "apps")


def spec(replica_id: str, import_path: str = "echo:Echo", **kwargs: Any) -> ReplicaSpec:
    return ReplicaSpec(
        deployment=import_path.rpartition(":")[2],
        import_path=import_path,
        replica_id=replica_id,
        app_dir=APP_DIR,
        listen=kwargs.pop("listen", "unix:"),
        **kwargs,
    )


def pack(*args: Any) -> dict[str, bytes]:
    return {"args": msgspec.msgpack.encode(list(args))}


def process_gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a zombie waiting for a reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture(params=[False, True], ids=["spawn", "fork"])
async def launcher(request: pytest.FixtureRequest) -> AsyncIterator[LocalLauncher]:
    # Each test runs with spawned replicas and with forked ones.
    launcher = LocalLauncher(start_timeout=60, fork_server=request.param)
    try:
        yield launcher
    finally:
        await launcher.aclose()


async def test_raising_init_is_a_start_error_with_the_reason(launcher: LocalLauncher) -> None:
    with pytest.raises(ReplicaStartError) as info:
        await launcher.start(spec("bad#1", "echo:BadInit", init_kwargs={"why": "no weights"}))
    # the reason says where the user's code raised
    assert info.value.reason.startswith("RuntimeError: no weights (at ")
    assert info.value.reason.endswith("echo.py:93 in __init__)")


@pytest.mark.parametrize(
    ("import_path", "reason"),
    [
        ("no_such_module:Thing", "ModuleNotFoundError: No module named 'no_such_module'"),
        ("echo:Missing", "AttributeError"),
        (
            "echo:get_multiplexed_model_id",
            "TypeError: echo:get_multiplexed_model_id is not a class",
        ),
        ("echo", "ValueError: import_path 'echo' is not 'module:Class'"),
    ],
)
async def test_bad_import_path_is_a_start_error(
    launcher: LocalLauncher, import_path: str, reason: str
) -> None:
    with pytest.raises(ReplicaStartError, match=reason.replace("(", r"\(")):
        await launcher.start(spec("bad#2", import_path))


async def test_invalid_spec_field_is_a_start_error(launcher: LocalLauncher) -> None:
    with pytest.raises(ReplicaStartError, match="cannot listen"):
        await launcher.start(spec("bad#3", listen="udp:nowhere"))


async def test_user_prints_do_not_confuse_readiness(launcher: LocalLauncher) -> None:
    process = await launcher.start(spec("noisy#1", "echo:Noisy"))
    async with await ReplicaConnection.connect(process.address) as conn:
        http = HttpRequest(method="GET", path="/", query="", headers=[], body=b"")
        reply = await conn.call(request_id="n", http=http)
        assert (reply.status, reply.body) == (200, b"ok")
    with anyio.fail_after(15):
        assert await process.wait() == 0


async def test_parallel_starts_and_closing_the_connection_ends_each_replica(
    launcher: LocalLauncher,
) -> None:
    specs = [spec(f"par#{i}") for i in range(3)] + [spec("par#tcp", listen="tcp:127.0.0.1:0")]
    processes: dict[str, Any] = {}

    async def start(s: ReplicaSpec) -> None:
        processes[s.replica_id] = await launcher.start(s)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for s in specs:
                tg.start_soon(start, s)
    assert len({p.pid for p in processes.values()}) == 4
    assert processes["par#tcp"].address.startswith("tcp:127.0.0.1:")
    for process in processes.values():
        conn = await ReplicaConnection.connect(process.address)
        assert conn.pid == process.pid
        reply = await conn.call(request_id="p", method="pid")
        assert msgspec.msgpack.decode(reply.body) == process.pid
        # The gateway going away (its connection closing) ends the replica.
        await conn.aclose()
        with anyio.fail_after(15):
            assert await process.wait() == 0
        if process.address.startswith("unix:"):
            assert not await anyio.Path(process.address[len("unix:") :]).exists()


async def test_sigkill_fails_pending_calls_with_replica_died(launcher: LocalLauncher) -> None:
    process = await launcher.start(spec("victim#1"))
    conn = await ReplicaConnection.connect(process.address)
    errors: list[BaseException] = []

    async def pending(i: int) -> None:
        try:
            await conn.call(request_id=f"p{i}", method="sleep", **pack(60))
        except ReplicaDiedError as exc:
            errors.append(exc)

    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(5):
                    tg.start_soon(pending, i)
                # Frames are read in order: the Pong proves all five calls arrived.
                while (await conn.ping()).state.in_flight < 5:
                    pass
                assert conn.in_flight == 5
                process.kill()
            await conn.closed.wait()
        assert len(errors) == 5
        assert conn.close_reason is not None
        with pytest.raises(ReplicaUnavailableError):
            await conn.call(request_id="after", method="add", **pack(1))
        with pytest.raises(ReplicaUnavailableError):
            await conn.ping()
        assert await process.wait() == -signal.SIGKILL
    finally:
        await conn.aclose()


async def sigterm_during_a_sleep(
    process: ReplicaProcess, conn: ReplicaConnection, seconds: float
) -> Any:
    """SIGTERM ``process`` while it runs a call sleeping ``seconds``; the
    call's reply, or the exception the call raised."""
    outcome: list[Any] = []

    async def slow() -> None:
        try:
            outcome.append(await conn.call(request_id="s", method="sleep", **pack(seconds)))
        except Exception as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(slow)
        while (await conn.ping()).state.in_flight < 1:
            pass
        process.terminate()
    return outcome[0]


async def test_sigterm_finishes_in_flight_calls_then_exits(launcher: LocalLauncher) -> None:
    process = await launcher.start(spec("term#1"))
    conn = await ReplicaConnection.connect(process.address)
    try:
        with anyio.fail_after(20):
            reply = await sigterm_during_a_sleep(process, conn, 0.3)
            assert msgspec.msgpack.decode(reply.body) == 0.3
            assert await process.wait() == 0
            await conn.closed.wait()
    finally:
        await conn.aclose()


async def test_a_class_grace_shorter_than_the_gateways_cancels_the_slow_calls(
    launcher: LocalLauncher,
) -> None:
    # The gateway's grace (the spec's) is long; the class asks for 0.2 s.
    process = await launcher.start(
        spec("grace#1", "echo:ShortGrace", graceful_shutdown_timeout_s=60.0)
    )
    conn = await ReplicaConnection.connect(process.address)
    try:
        with anyio.fail_after(20):
            outcome = await sigterm_during_a_sleep(process, conn, 30.0)
            assert await process.wait() == 0
        assert isinstance(outcome, Exception)  # cancelled at the class's grace, not after 30 s
    finally:
        await conn.aclose()


_FAKE_GATEWAY = """
import anyio, sys
from muxgate.gateway.launchers.local import LocalLauncher
from muxgate.replicas.contract import ReplicaSpec

async def main():
    launcher = LocalLauncher()
    process = await launcher.start(ReplicaSpec(
        deployment="Echo", import_path="echo:Echo", replica_id="orphan#1",
        app_dir=sys.argv[1], listen="unix:"))
    print(process.pid, flush=True)
    await anyio.sleep_forever()

anyio.run(main)
"""


async def test_replica_exits_when_its_parent_dies(tmp_path: Path) -> None:
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
        replica_pid = int(line)
        assert not process_gone(replica_pid)
        gateway.kill()
        await gateway.wait()
        await wait_until(
            lambda: process_gone(replica_pid), within_s=15.0, what="the replica to exit"
        )
    finally:
        if gateway.returncode is None:
            gateway.kill()
        await gateway.aclose()


def children() -> set[int]:
    """Pids of this process's children (all threads)."""
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            pids.update(int(p) for p in (task / "children").read_text().split())
    return pids


async def test_start_timeout_kills_the_process(tmp_path: Path) -> None:
    fifo = tmp_path / "init.fifo"
    os.mkfifo(fifo)  # nobody reads it: __init__ blocks opening it
    before = children()
    launcher = LocalLauncher(start_timeout=1.0)
    try:
        with pytest.raises(ReplicaStartError, match="not ready within 1s"):
            await launcher.start(
                spec("slow#1", "echo:SlowInit", init_kwargs={"fifo_path": str(fifo)})
            )
    finally:
        await launcher.aclose()
    assert children() - before == set()


async def test_sigterm_during_slow_init_exits_with_failed(tmp_path: Path) -> None:
    fifo = tmp_path / "init.fifo"
    os.mkfifo(fifo)
    raw = msgspec.json.encode(
        spec(
            "slow#2",
            "echo:SlowInit",
            init_kwargs={"fifo_path": str(fifo)},
            listen="tcp:127.0.0.1:0",
        )
    ).decode()
    process = await anyio.open_process(
        [sys.executable, "-m", "muxgate.replicas._server", "--spec", raw], stdout=subprocess.PIPE
    )
    try:

        def started() -> str:
            with open(fifo) as f:
                return f.read()

        with anyio.fail_after(30):
            # __init__ is running (in a worker thread) once it wrote this.
            assert await anyio.to_thread.run_sync(started) == "started\n"
            process.terminate()
            assert await process.wait() == 1
            assert process.stdout is not None
            out = b""
            with contextlib.suppress(anyio.EndOfStream):
                while True:
                    out += await process.stdout.receive()
        assert out.decode() == "FAILED stopped during start-up (shutdown)\n"
    finally:
        if process.returncode is None:
            process.kill()
        await process.aclose()


async def test_drain_over_tcp_delivers_a_large_last_reply(launcher: LocalLauncher) -> None:
    process = await launcher.start(spec("tcp#drain", listen="tcp:127.0.0.1:0"))
    conn = await ReplicaConnection.connect(process.address)
    blob = os.urandom(8 << 20)
    replies: list[Any] = []
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:

                async def big() -> None:
                    replies.append(await conn.call(request_id="big", method="echo", **pack(blob)))

                tg.start_soon(big)
                await anyio.wait_all_tasks_blocked()  # the call's frame is written
                await conn.drain()
            assert msgspec.msgpack.decode(replies[0].body) == blob
            assert await process.wait() == 0
            await conn.closed.wait()
    finally:
        await conn.aclose()


async def test_storage_options_from_the_spec_reach_the_backends(launcher: LocalLauncher) -> None:
    options = {
        "s3": {"endpoint_url": "http://127.0.0.1:9", "anon": True},
        "cache": {"max_bytes": 12345},
        "retry": {"max_attempts": 2},
        "transfer": {"part_size": 1 << 20},
    }
    process = await launcher.start(spec("store#1", "echo:StorageProbe", storage=options))
    async with await ReplicaConnection.connect(process.address) as conn:
        reply = await conn.call(request_id="o", method="options", **pack("s3"))
        assert msgspec.msgpack.decode(reply.body) == options["s3"]
        reply = await conn.call(request_id="s", method="settings")
        assert msgspec.msgpack.decode(reply.body) == {
            "cache_max_bytes": 12345,
            "retry_max_attempts": 2,
            "part_size": 1 << 20,
            "protocols": ["s3"],  # the settings sections are not protocols
        }
    with anyio.fail_after(15):
        assert await process.wait() == 0
