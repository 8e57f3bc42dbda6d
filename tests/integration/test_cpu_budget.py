"""A replica's CPU budget reaches its process: torch's intra-op and inter-op
threads and OMP/MKL/OpenBLAS variables equal ``ceil(num_cpus)`` (from the
spec, else the class's decorator, else 1), for spawned and forked replicas;
a fork server that preloads a module running torch ops at import still
forks (one thread, no OpenMP pool) and its children size their own pools.
With ``pin_cpus`` each replica gets cores of its own while they last."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from muxgate.gateway._connection import ReplicaConnection
from muxgate.gateway.launchers._processes import CpuPins
from muxgate.gateway.launchers.local import LocalLauncher, ReplicaProcess
from muxgate.replicas._server import ReplicaSpec

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

APP_DIR = str(Path(__file__).resolve().parents[1] / "apps")


def spec(replica_id: str, import_path: str, num_cpus: float | None) -> ReplicaSpec:
    return ReplicaSpec(
        deployment=import_path.rpartition(":")[2],
        import_path=import_path,
        replica_id=replica_id,
        app_dir=APP_DIR,
        listen="unix:",
        num_cpus=num_cpus,
    )


async def call(conn: ReplicaConnection, method: str) -> Any:
    reply = await conn.call(request_id=method, method=method, args=msgspec.msgpack.encode([]))
    assert reply.error is None, reply.error
    return msgspec.msgpack.decode(reply.body)


def expected(threads: int) -> dict[str, Any]:
    return {
        "threads": threads,
        "interop": threads,
        "env": dict.fromkeys(
            ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"), str(threads)
        ),
        "sum": 384.0**3,
    }


#: (import path, spec's num_cpus, threads the replica must run)
CASES = [
    ("fork_apps:CpuFacts", 2.0, 2),
    ("fork_apps:CpuFacts", 0.5, 1),
    ("fork_apps:CpuFactsTwo", None, 2),  # @deployment(num_cpus=2)
    ("fork_apps:CpuFacts", None, 1),  # the default
]


@pytest.mark.parametrize("fork", [False, True], ids=["spawn", "fork"])
async def test_replica_threads_follow_its_budget(
    fork: bool, caplog: pytest.LogCaptureFixture
) -> None:
    launcher = LocalLauncher(fork_server=fork)
    processes: dict[int, ReplicaProcess] = {}

    async def start(i: int, import_path: str, num_cpus: float | None) -> None:
        processes[i] = await launcher.start(spec(f"cpu#{i}", import_path, num_cpus))

    facts: dict[int, tuple[Any, Any]] = {}
    try:
        with caplog.at_level(logging.WARNING, logger="muxgate.gateway.launcher"):
            with anyio.fail_after(90):
                async with anyio.create_task_group() as tg:
                    for i, (import_path, num_cpus, _) in enumerate(CASES):
                        tg.start_soon(start, i, import_path, num_cpus)
        # All four run now: their budgets add up to 5.5 CPUs.
        for i, process in processes.items():
            assert process.forked is fork
            async with await ReplicaConnection.connect(process.address) as conn:
                facts[i] = (await call(conn, "facts"), await call(conn, "loop_facts"))
            with anyio.fail_after(20):
                await process.wait()
    finally:
        await launcher.aclose()
    for i, (_, _, threads) in enumerate(CASES):
        assert facts[i] == (expected(threads), expected(threads)), CASES[i]
    # More budget than cores (unless the box has 6): warned exactly once.
    cores = launcher.cpu_budgets.cores
    oversubscribed = [r for r in caplog.records if "CPU budgets" in r.getMessage()]
    assert len(oversubscribed) == (1 if cores < 5.5 else 0)


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


async def test_fork_server_that_ran_torch_at_import_still_forks_safely() -> None:
    launcher = LocalLauncher(
        fork_server=True,
        fork_server_preload=["fork_torch_at_import"],
        env={"PYTHONPATH": APP_DIR},
    )
    try:
        assert await launcher.warm_up(), launcher.fork_disabled_reason
        server = launcher._server
        assert server is not None
        # The import-time matmul ran single-threaded: no OpenMP pool to fork.
        assert thread_count(server.process.pid) == 1
        process = await launcher.start(spec("t#1", "fork_torch_at_import:ImportTimeTorch", 2))
        assert process.forked
        async with await ReplicaConnection.connect(process.address) as conn:
            with anyio.fail_after(30):  # a pool broken by the fork would hang here
                assert await call(conn, "facts") == expected(2)
                assert await call(conn, "loop_facts") == expected(2)
        with anyio.fail_after(20):
            assert await process.wait() == 0
        assert thread_count(server.process.pid) == 1
    finally:
        await launcher.aclose()


def affinities(pid: int) -> set[frozenset[int]]:
    """The CPU affinity of each thread of ``pid``."""
    return {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
async def test_pinned_replicas_get_cores_of_their_own_while_they_last() -> None:
    every = sorted(os.sched_getaffinity(0))
    launcher = LocalLauncher(fork_server=True)
    launcher.cpu_pins = CpuPins(every[:2])  # two cores to hand out
    pinned = msgspec.structs.replace(spec("pin#1", "fork_apps:CpuFacts", None), pin_cpus=True)
    try:
        with anyio.fail_after(60):
            first = await launcher.start(pinned)
            second = await launcher.start(msgspec.structs.replace(pinned, replica_id="pin#2"))
            third = await launcher.start(msgspec.structs.replace(pinned, replica_id="pin#3"))
        assert (first.cores, second.cores, third.cores) == ([every[0]], [every[1]], None)
        for process in (first, second):
            # threads started after the pinning (the call's worker thread) inherit it
            async with await ReplicaConnection.connect(process.address) as conn:
                await call(conn, "facts")
            assert affinities(process.pid) == {frozenset(process.cores or [])}
        assert affinities(third.pid) == {frozenset(every)}  # floats over every core
        # A replica's cores go back when it has exited.
        with anyio.fail_after(30):
            await launcher.stop(first, 10.0)
            fourth = await launcher.start(msgspec.structs.replace(pinned, replica_id="pin#4"))
        assert fourth.cores == [every[0]]
    finally:
        await launcher.aclose()
