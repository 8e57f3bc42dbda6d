"""A load's CPU: the steps of its loader, on the thread that ran each, and
nothing of what ran while it was suspended."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from muxgate.replicas._load_cpu import charge, charged, charging, thread_cpu_of

pytestmark = pytest.mark.anyio


def burn(seconds: float) -> float:
    """Spin until this thread has used ``seconds`` more CPU; the CPU it used."""
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        pass
    return time.thread_time() - start


async def test_only_the_loaders_own_steps_are_charged() -> None:
    release = asyncio.Event()
    own: list[float] = []

    async def loader() -> str:
        own.append(burn(0.03))
        await release.wait()  # suspended: what runs now is not the loader's
        own.append(burn(0.02))
        return "model"

    async def neighbour() -> float:
        used = burn(0.06)  # the same thread, while the loader waits
        release.set()
        return used

    with charging() as cpu:
        task = asyncio.create_task(charged(loader()))
        await asyncio.sleep(0)  # the loader's first step runs
        other = await neighbour()
        assert await task == "model"

    assert sum(own) <= cpu.seconds < sum(own) + 0.01
    assert cpu.seconds < sum(own) + other


async def test_errors_and_cancellation_pass_through_and_are_charged() -> None:
    async def failing() -> None:
        burn(0.01)
        raise ValueError("corrupt file")

    with charging() as cpu, pytest.raises(ValueError, match="corrupt file"):
        await charged(failing())
    assert cpu.seconds >= 0.01

    cleaned = asyncio.Event()

    async def waits_forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    with charging():
        task = asyncio.create_task(charged(waits_forever()))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert cleaned.is_set()


async def test_outside_a_load_nothing_is_charged_and_the_result_comes_back() -> None:
    async def loader() -> int:
        return 7

    assert await charged(loader()) == 7
    charge(1.0)  # no scope: ignored, no error


def test_a_worker_threads_cpu_is_charged_through_the_copied_context() -> None:
    import contextvars

    with charging() as cpu:
        context = contextvars.copy_context()
        used: list[float] = []
        worker = threading.Thread(
            target=context.run, args=(thread_cpu_of, lambda: used.append(burn(0.02)))
        )
        worker.start()
        worker.join()
    assert used[0] <= cpu.seconds < used[0] + 0.01


def test_scopes_nest_and_restore() -> None:
    with charging() as outer:
        with charging() as inner:
            charge(0.5)
        charge(0.25)
    assert (inner.seconds, outer.seconds) == (0.5, 0.25)
