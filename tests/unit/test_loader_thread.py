"""Async ``@multiplexed`` loaders run on a loader thread's event loop by default.

In process, with blocking loaders the test holds on ``threading.Event``s (the
way torch code blocks the thread it runs on). The end-to-end behaviour, in a
replica process behind a gateway, is in
``tests/integration/test_loader_thread_replica.py``.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.to_thread
import pytest
from anyio.lowlevel import checkpoint

from muxgate.replicas._context import get_multiplexed_model_id, request_scope
from muxgate.replicas._loader_thread import LoaderLoopError, is_other_loop_error, loader_thread
from muxgate.replicas._multiplex import (
    ModelCacheClosedError,
    configure_model_caches,
    model_cache,
    multiplexed,
)

pytestmark = pytest.mark.anyio

_note: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "test_note", default=None
)
_set_by_loader: contextvars.ContextVar[str] = contextvars.ContextVar("set_by_loader", default="")

#: how long a blocked loader waits for the test at most (a failing test must not hang)
HOLD_S = 10.0


class Model:
    def __init__(self, model_id: str, journal: list[str]) -> None:
        self.model_id = model_id
        self.journal = journal

    async def aclose(self) -> None:
        self.journal.append(f"unload {self.model_id}")


class Blocking:
    """A loader whose loads of ``held`` ids block their thread until ``release``."""

    def __init__(self, *held: str) -> None:
        self.held = set(held)
        self.started = {model_id: threading.Event() for model_id in held}
        self.release = threading.Event()
        self.journal: list[str] = []
        self.threads: dict[str, int] = {}

    async def __call__(self, model_id: str) -> Model:
        self.threads[model_id] = threading.get_ident()
        if model_id in self.held:
            self.started[model_id].set()
            self.release.wait(HOLD_S)  # blocking, as torch code is
        self.journal.append(f"load {model_id}")
        return Model(model_id, self.journal)

    def loader(self, **options: Any) -> Any:
        @multiplexed(**options)
        async def get_model(model_id: str) -> Model:
            return await self(model_id)

        return get_model


@pytest.fixture
def deployment_options() -> Iterator[None]:
    yield
    configure_model_caches()  # back to the decorators' own settings


async def wait_started(event: threading.Event) -> None:
    assert await anyio.to_thread.run_sync(event.wait, HOLD_S), "the load never started"


async def test_the_loader_runs_off_the_loop_in_a_copy_of_the_callers_context() -> None:
    seen: dict[str, Any] = {}

    @multiplexed
    async def get_model(model_id: str) -> str:
        seen["thread"] = threading.get_ident()
        seen["loop"] = asyncio.get_running_loop()
        seen["model_id"] = get_multiplexed_model_id()
        note = _note.get()
        assert note is not None
        note["loaded"] = True  # the shared peer app reports its loads this way
        _set_by_loader.set("inside")
        return model_id.upper()

    note: dict[str, Any] = {"loaded": False}
    token = _note.set(note)
    try:
        with request_scope("r1", "m1"):
            assert await get_model("m1") == "M1"
    finally:
        _note.reset(token)
    assert seen["thread"] != threading.get_ident()
    assert seen["loop"] is not asyncio.get_running_loop()
    assert seen["model_id"] == "m1"
    assert note == {"loaded": True}
    assert _set_by_loader.get() == ""  # the loader's own sets stay in its copy


async def test_a_hit_is_served_while_a_blocking_load_runs() -> None:
    loads = Blocking("slow")
    get_model = loads.loader(max_num_models_per_replica=2)
    cache = model_cache(get_model)
    await get_model("a")
    async with anyio.create_task_group() as tg:
        tg.start_soon(get_model, "slow")
        await wait_started(loads.started["slow"])
        model = await get_model("a")  # the loop is free while "slow" blocks its thread
        assert model.model_id == "a"
        assert cache.loading_ids() == ["slow"]
        assert loads.journal == ["load a"]
        loads.release.set()
    assert cache.loaded_ids() == ["a", "slow"]
    assert loads.threads["slow"] != threading.get_ident()


async def test_loads_interleave_at_their_awaits_on_one_loader_thread() -> None:
    barrier = threading.Barrier(2, timeout=HOLD_S)
    threads: list[int] = []

    @multiplexed(max_num_models_per_replica=2, max_concurrent_loads=2)
    async def get_model(model_id: str) -> str:
        threads.append(threading.get_ident())
        # passes only if both loads wait here at once: the awaits interleave
        await anyio.to_thread.run_sync(barrier.wait)
        return model_id

    async with anyio.create_task_group() as tg:
        tg.start_soon(get_model, "a")
        tg.start_soon(get_model, "b")
    assert sorted(model_cache(get_model).loaded_ids()) == ["a", "b"]
    assert len(set(threads)) == 1 and threads[0] != threading.get_ident()
    assert repr(loader_thread()) == "<LoaderThread busy=0>"


async def test_a_loader_that_calls_another_loader_uses_that_loaders_cache_on_the_loop() -> None:
    inner_loops: list[asyncio.AbstractEventLoop] = []

    @multiplexed(load_on_loop=True)
    async def get_tokenizer(model_id: str) -> str:
        inner_loops.append(asyncio.get_running_loop())
        return f"tokenizer {model_id} for {get_multiplexed_model_id()}"

    @multiplexed
    async def get_model(model_id: str) -> tuple[str, str]:
        assert asyncio.get_running_loop() is not here  # on the loader thread
        return model_id, await get_tokenizer(model_id)

    here = asyncio.get_running_loop()
    with request_scope("r1", "m1"):
        assert await get_model("m1") == ("m1", "tokenizer m1 for m1")
        assert await get_tokenizer("m1") == "tokenizer m1 for m1"  # a hit: loaded once
    assert inner_loops == [here]  # the inner cache stayed on the caller's loop
    assert model_cache(get_tokenizer).loaded_ids() == ["m1"]
    assert model_cache(get_tokenizer).pins() == {}  # released with the request


async def test_load_on_loop_keeps_the_loader_on_the_callers_loop(
    deployment_options: None,
) -> None:
    loops: list[asyncio.AbstractEventLoop] = []

    async def record(model_id: str) -> str:
        loops.append(asyncio.get_running_loop())
        return model_id

    here = asyncio.get_running_loop()
    assert await multiplexed(load_on_loop=True)(record)("a") == "a"
    assert loops[-1] is here
    # the deployment's setting (the app config's load_on_loop) wins either way
    configure_model_caches(load_on_loop=True)
    await multiplexed(record)("b")
    assert loops[-1] is here
    configure_model_caches(load_on_loop=False)
    await multiplexed(load_on_loop=True)(record)("c")
    assert loops[-1] is not here
    with pytest.raises(TypeError, match="load_on_loop must be a bool"):
        multiplexed(load_on_loop="yes")(record)  # type: ignore[call-overload]


@pytest.mark.parametrize("bound_to", ["future", "event"])
async def test_awaiting_an_object_of_the_replicas_loop_names_the_opt_out(bound_to: str) -> None:
    here = asyncio.get_running_loop()
    future: asyncio.Future[None] = here.create_future()
    event = asyncio.Event()
    waiting = here.create_task(event.wait())  # binds the event to this loop
    await anyio.wait_all_tasks_blocked()

    @multiplexed
    async def get_model(model_id: str) -> str:
        if bound_to == "future":
            await future
        else:
            await event.wait()
        return model_id

    with pytest.raises(LoaderLoopError, match=r"@multiplexed\(load_on_loop=True\)") as info:
        await get_model("a")
    assert "load_on_loop: true" in str(info.value)
    assert is_other_loop_error(info.value.__cause__)  # type: ignore[arg-type]
    assert model_cache(get_model).loaded_ids() == []  # a failed load is not kept
    event.set()
    await waiting
    future.cancel()


async def test_other_load_errors_reach_the_caller_as_they_are() -> None:
    @multiplexed
    async def get_model(model_id: str) -> str:
        raise RuntimeError(f"no model {model_id}")

    with pytest.raises(RuntimeError, match=r"^no model a$"):
        await get_model("a")
    assert not is_other_loop_error(RuntimeError("no model a"))


async def test_closing_waits_for_a_blocking_load_and_unloads_what_it_built() -> None:
    loads = Blocking("slow")
    get_model = loads.loader()
    cache = model_cache(get_model)
    outcome: list[BaseException] = []

    async def caller() -> None:
        try:
            await get_model("slow")
        except ModelCacheClosedError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller)
        await wait_started(loads.started["slow"])
        closing = asyncio.get_running_loop().create_task(cache.aclose())
        await anyio.wait_all_tasks_blocked()
        assert not closing.done()  # the load still runs on its thread
        loads.release.set()
        await closing
    assert len(outcome) == 1
    # built after the cache was closed: never handed out, its unload hook ran
    assert loads.journal == ["load slow", "unload slow"]
    assert cache.loaded_ids() == [] and cache.loading_ids() == []


async def test_closing_cancels_a_load_that_awaits() -> None:
    started, cancelled = threading.Event(), threading.Event()

    @multiplexed
    async def get_model(model_id: str) -> str:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return model_id

    cache = model_cache(get_model)
    async with anyio.create_task_group() as tg:
        failed: list[BaseException] = []

        async def caller() -> None:
            try:
                await get_model("a")
            except ModelCacheClosedError as exc:
                failed.append(exc)

        tg.start_soon(caller)
        await wait_started(started)
        await cache.aclose()
        await checkpoint()
    assert cancelled.is_set()
    assert len(failed) == 1
    assert cache.loaded_ids() == [] and cache.loading_ids() == []
