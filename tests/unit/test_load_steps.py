"""Calls whose model is loaded wait out the load step under way
(``hits_wait_for_loads``; :mod:`muxgate.replicas._load_steps`).

In process: :class:`LoadSteps` alone, then ``@multiplexed`` loaders on the
loader thread whose loads block that thread on ``threading.Event``s (as
torch code does). Waiting for something to *not* happen is checked by
letting the event loop run every ready callback a few times over, never by
sleeping; where time is the subject (the cap), the cap is shortened.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from functools import partial
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import pytest

from muxgate.replicas import _load_steps
from muxgate.replicas._context import request_scope
from muxgate.replicas._load_steps import LoadSteps
from muxgate.replicas._loader_thread import in_a_load, loader_thread
from muxgate.replicas._multiplex import model_cache, multiplexed

pytestmark = pytest.mark.anyio

#: how long a blocked loader waits for the test at most (a failing test must not hang)
HOLD_S = 10.0


async def settle() -> None:
    """Let every callback that is ready run, a few rounds over."""
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def a_step_running() -> LoadSteps:
    """Steps with waiting on and one step under way."""
    steps = LoadSteps()
    steps.enabled = True
    steps.begin()
    return steps


async def a_waiter(steps: LoadSteps) -> asyncio.Task[None]:
    """A call waiting for ``steps``, settled into its wait."""
    waiter = asyncio.create_task(steps.wait_for_step())
    await settle()
    return waiter


@pytest.fixture
def steps_on() -> Iterator[LoadSteps]:
    """The process's loader thread with waiting on, as in a replica with
    ``hits_wait_for_loads``."""
    steps = loader_thread().steps
    steps.enabled = True
    try:
        yield steps
    finally:
        steps.enabled = False


async def test_a_call_waits_for_the_step_running_when_it_came() -> None:
    steps = a_step_running()
    waiter = await a_waiter(steps)
    assert not waiter.done()
    # The step ends on another thread; the next one starts at once.
    await anyio.to_thread.run_sync(lambda: (steps.end(), steps.begin()))
    await asyncio.wait_for(waiter, HOLD_S)  # not held by the step that began after it
    assert steps.running
    steps.end()
    assert not steps.running
    assert repr(steps) == "<LoadSteps idle begun=2 waiters=0>"


async def test_no_wait_when_off_or_idle() -> None:
    steps = LoadSteps()
    steps.begin()
    await asyncio.wait_for(steps.wait_for_step(), HOLD_S)  # off: never waits
    steps.end()
    steps.enabled = True
    await asyncio.wait_for(steps.wait_for_step(), HOLD_S)  # idle


async def test_a_step_that_runs_on_holds_a_call_only_up_to_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_load_steps, "MAX_WAIT_S", 0.01)
    steps = a_step_running()
    await asyncio.wait_for(steps.wait_for_step(), HOLD_S)
    assert steps.running  # it went on beside the step
    assert repr(steps) == "<LoadSteps running begun=1 waiters=0>"
    steps.end()
    assert repr(steps) == "<LoadSteps idle begun=1 waiters=0>"


async def test_a_cancelled_call_stops_waiting() -> None:
    steps = a_step_running()
    waiter = await a_waiter(steps)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert repr(steps) == "<LoadSteps running begun=1 waiters=0>"
    steps.end()


async def test_a_forked_child_starts_with_no_step_and_no_waiter() -> None:
    steps = a_step_running()
    waiter = await a_waiter(steps)
    steps.reset_after_fork()
    assert not steps.running
    assert repr(steps) == "<LoadSteps idle begun=0 waiters=0>"
    waiter.cancel()


class Held:
    """A loader whose load of ``held`` blocks its thread until ``release``."""

    def __init__(self, held: str) -> None:
        self.held = held
        self.started = threading.Event()
        self.release = threading.Event()
        self.order: list[str] = []

    def loader(self) -> Any:
        @multiplexed(max_num_models_per_replica=3)
        async def get_model(model_id: str) -> str:
            if model_id == self.held:
                self.started.set()
                self.release.wait(HOLD_S)  # blocking, as torch code is
                self.order.append(f"loaded {model_id}")
            return model_id

        return get_model


async def _hit(get_model: Any, model_id: str, order: list[str]) -> None:
    with request_scope(f"r-{model_id}", model_id):
        await get_model(model_id)
        order.append(f"hit {model_id}")


async def slow_with_a_loaded(monkeypatch: pytest.MonkeyPatch) -> tuple[Held, Any]:
    """A loader whose load of ``slow`` blocks, ``a`` loaded already, and
    the wait's cap out of the way (a slow host: no early end)."""
    monkeypatch.setattr(_load_steps, "MAX_WAIT_S", HOLD_S)
    loads = Held("slow")
    get_model = loads.loader()
    await get_model("a")
    return loads, get_model


async def hit_a_while_slow_loads(
    tg: anyio.abc.TaskGroup, loads: Held, get_model: Any, load_slow: Any
) -> None:
    """Start ``load_slow``, and once its load blocks, a hit on ``a``."""
    tg.start_soon(load_slow)
    assert await anyio.to_thread.run_sync(loads.started.wait, HOLD_S)
    tg.start_soon(_hit, get_model, "a", loads.order)
    await settle()


async def test_a_hit_waits_out_a_blocking_load_on_the_loader_thread(
    steps_on: LoadSteps, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads, get_model = await slow_with_a_loaded(monkeypatch)
    async with anyio.create_task_group() as tg:
        await hit_a_while_slow_loads(tg, loads, get_model, partial(get_model, "slow"))
        assert loads.order == []  # the hit waits while the load's code runs
        loads.release.set()
    assert loads.order == ["loaded slow", "hit a"]
    assert model_cache(get_model).pins() == {}
    assert not steps_on.running


async def test_by_default_a_hit_runs_beside_the_load() -> None:
    loads = Held("slow")
    get_model = loads.loader()
    await get_model("a")
    async with anyio.create_task_group() as tg:
        tg.start_soon(get_model, "slow")
        assert await anyio.to_thread.run_sync(loads.started.wait, HOLD_S)
        await _hit(get_model, "a", loads.order)
        assert loads.order == ["hit a"]
        loads.release.set()


async def test_a_load_suspended_on_storage_holds_no_hit(steps_on: LoadSteps) -> None:
    storage = asyncio.Event()
    here = asyncio.get_running_loop()
    awaiting = threading.Event()

    @multiplexed(max_num_models_per_replica=3)
    async def get_model(model_id: str) -> str:
        if model_id == "remote":
            awaiting.set()
            # an await on storage: the load's step ends here
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(storage.wait(), here))
        return model_id

    await get_model("a")
    async with anyio.create_task_group() as tg:
        tg.start_soon(get_model, "remote")
        assert await anyio.to_thread.run_sync(awaiting.wait, HOLD_S)
        order: list[str] = []
        await asyncio.wait_for(_hit(get_model, "a", order), HOLD_S)
        assert order == ["hit a"]
        storage.set()
    assert sorted(model_cache(get_model).loaded_ids()) == ["a", "remote"]


async def test_a_loaders_own_calls_run_as_part_of_its_load(steps_on: LoadSteps) -> None:
    seen: dict[str, bool] = {}

    @multiplexed(load_on_loop=True)
    async def get_tokenizer(model_id: str) -> str:
        seen["tokenizer in a load"] = in_a_load()
        return f"tokenizer {model_id}"

    @multiplexed
    async def get_model(model_id: str) -> str:
        seen["model in a load"] = in_a_load()
        await get_tokenizer(model_id)  # a load first
        return await get_tokenizer(model_id)  # then a hit, from the loader's body

    with request_scope("r1", "m1"):
        assert await asyncio.wait_for(get_model("m1"), HOLD_S) == "tokenizer m1"
    assert seen == {"model in a load": True, "tokenizer in a load": True}
    assert not in_a_load()
    assert not steps_on.running


async def test_a_loads_last_step_lasts_until_the_replicas_loop_takes_the_model(
    steps_on: LoadSteps,
) -> None:
    loads = Held("slow")
    get_model = loads.loader()
    async with anyio.create_task_group() as tg:
        tg.start_soon(get_model, "slow")
        assert await anyio.to_thread.run_sync(loads.started.wait, HOLD_S)
        loads.release.set()
        # This loop blocks until the loader loop has run a callback queued after
        # the load's last step: that step has returned on the loader thread,
        # and this loop has not taken the model back yet.
        loader_loop = loader_thread()._loop
        assert loader_loop is not None
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loader_loop.loop).result(HOLD_S)
        assert loads.order == ["loaded slow"]
        assert steps_on.running  # the hand-over is part of the load
    assert not steps_on.running


async def test_the_loads_own_requests_resume_before_the_hits_its_last_step_held(
    steps_on: LoadSteps, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads, get_model = await slow_with_a_loaded(monkeypatch)

    async def miss() -> None:
        with request_scope("r-slow", "slow"):
            await get_model("slow")
            loads.order.append("miss slow")

    async with anyio.create_task_group() as tg:
        await hit_a_while_slow_loads(tg, loads, get_model, miss)
        loads.release.set()
    # The request that waited for the load (the longest) goes on first.
    assert loads.order == ["loaded slow", "miss slow", "hit a"]
