"""The model cache rules of DESIGN.md section 2, one test per rule, observed from outside."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from opentelemetry import trace
from otlp_receiver import OtlpReceiver
from span_export import exporting_spans
from waiting import wait_until

from muxgate.replicas._cache_stats import watch_residency
from muxgate.replicas._context import (
    current_replica,
    get_multiplexed_model_id,
    request_scope,
    set_replica_context,
)
from muxgate.replicas._counters import MODEL_LOAD_BUCKETS, load_bucket_key
from muxgate.replicas._multiplex import (
    EventLog,
    LRUState,
    ModelCache,
    ModelCacheClosedError,
    counters,
    events_since,
    model_cache,
    model_caches,
    multiplexed,
    replica_state_snapshot,
)
from muxgate.replicas._protocol import ModelEvent
from muxgate.replicas._tracing import flush_tracing

pytestmark = pytest.mark.anyio


class FakeModel:
    """A model whose unload hook records itself."""

    def __init__(self, model_id: str, journal: list[str]) -> None:
        self.model_id = model_id
        self.journal = journal

    async def aclose(self) -> None:
        self.journal.append(f"unload {self.model_id}")

    def __repr__(self) -> str:
        return f"FakeModel({self.model_id!r})"


class Loads:
    """An async loader the test drives: loads wait for ``finish(id)`` unless ``auto``."""

    def __init__(self, *, auto: bool = True) -> None:
        self.auto = auto
        self.calls: list[str] = []
        self.journal: list[str] = []
        self.failures: dict[str, BaseException] = {}
        self.cancelled: list[str] = []
        self._started: dict[str, anyio.Event] = {}
        self._gates: dict[str, anyio.Event] = {}

    def started(self, model_id: str) -> anyio.Event:
        return self._started.setdefault(model_id, anyio.Event())

    def finish(self, model_id: str) -> None:
        self._gates.setdefault(model_id, anyio.Event()).set()

    async def __call__(self, model_id: str) -> FakeModel:
        self.calls.append(model_id)
        self.journal.append(f"load {model_id}")
        self.started(model_id).set()
        if not self.auto:
            try:
                await self._gates.setdefault(model_id, anyio.Event()).wait()
            except anyio.get_cancelled_exc_class():
                self.cancelled.append(model_id)
                raise
            self._gates.pop(model_id)
            self._started.pop(model_id)
        if model_id in self.failures:
            raise self.failures.pop(model_id)
        return FakeModel(model_id, self.journal)


def make_loader(
    loads: Loads, limit: int = 3, max_loads: int = 4, load_order: Any = "evict_after"
) -> Any:
    # On the test's loop: the loads wait on events the test sets from it (the
    # loader-thread default is tested in tests/unit/test_loader_thread.py).
    @multiplexed(
        max_num_models_per_replica=limit,
        max_concurrent_loads=max_loads,
        load_order=load_order,
        load_on_loop=True,
    )
    async def get_model(model_id: str) -> FakeModel:
        return await loads(model_id)

    return get_model


# -- the pure bookkeeping --------------------------------------------------------------------


def test_lru_state_decides_evictions_without_io() -> None:
    state: LRUState[str] = LRUState(2)
    assert state.start_load("a") == []
    assert state.finish_load("a", "A") == []
    state.start_load("b")
    state.finish_load("b", "B")
    assert state.lookup("a") == "A"  # hit: a becomes most recently used
    state.pin("a")
    assert repr(state) == "<LRUState capacity=2 loaded=['b', 'a'] loading=[] pinned={'a': 1}>"
    assert state.start_load("c") == [("b", "B")]  # evicted before c loads
    assert state.start_load("d") == []  # a is pinned: over the limit, nothing to evict
    state.finish_load("c", "C")
    state.fail_load("d")
    assert state.loaded_ids() == ["a", "c"]
    assert state.unpin("a") == []  # back at the limit
    assert repr(state) == "<LRUState capacity=2 loaded=['a', 'c'] loading=[] pinned={}>"
    with pytest.raises(ValueError, match="not pinned"):
        state.unpin("a")


def test_lru_state_sheds_the_excess_when_pins_release_and_spares_a_fresh_load() -> None:
    state: LRUState[str] = LRUState(1)
    state.start_load("a")
    state.finish_load("a", "A")
    state.pin("a")
    assert state.start_load("b") == []
    assert state.finish_load("b", "B") == []  # b is about to be handed out: spared
    assert state.unpin("a") == [("a", "A")]
    assert state.loaded_ids() == ["b"]
    unlimited: LRUState[int] = LRUState(-1)
    for i in range(100):
        unlimited.start_load(str(i))
        unlimited.finish_load(str(i), i)
    assert len(unlimited) == 100
    assert repr(unlimited).startswith("<LRUState capacity=unlimited")


# -- LRU -------------------------------------------------------------------------------------


async def test_a_hit_moves_the_model_to_the_most_recently_used_end() -> None:
    loads = Loads()
    get_model = make_loader(loads, limit=2)
    a = await get_model("a")
    await get_model("b")
    assert await get_model("a") is a
    assert model_cache(get_model).loaded_ids() == ["b", "a"]
    await get_model("c")  # evicts b, the least recently used
    assert model_cache(get_model).loaded_ids() == ["a", "c"]
    assert loads.calls == ["a", "b", "c"]
    await wait_until(lambda: "unload b" in loads.journal)
    assert "unload a" not in loads.journal


async def test_minus_one_means_no_limit() -> None:
    loads = Loads()
    get_model = make_loader(loads, limit=-1)
    for i in range(20):
        await get_model(str(i))
    assert len(model_cache(get_model).loaded_ids()) == 20
    assert not any(line.startswith("unload") for line in loads.journal)


# -- single flight and concurrency -------------------------------------------------------------


async def test_fifty_concurrent_calls_for_one_id_share_one_load() -> None:
    loads = Loads(auto=False)
    get_model = make_loader(loads)
    results: list[FakeModel] = []

    async def call() -> None:
        results.append(await get_model("x"))

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(call)
        await loads.started("x").wait()
        assert model_cache(get_model).loading_ids() == ["x"]
        loads.finish("x")
    assert loads.calls == ["x"]
    assert len(results) == 50
    assert all(model is results[0] for model in results)


async def test_loads_of_different_ids_run_concurrently() -> None:
    loads = Loads(auto=False)
    get_model = make_loader(loads)
    async with anyio.create_task_group() as tg:
        tg.start_soon(get_model, "a")
        tg.start_soon(get_model, "b")
        with anyio.fail_after(5):
            # Both loaders are running while neither is allowed to finish: no global lock.
            await loads.started("a").wait()
            await loads.started("b").wait()
        loads.finish("b")
        loads.finish("a")
    assert sorted(model_cache(get_model).loaded_ids()) == ["a", "b"]


async def test_concurrent_loads_are_bounded() -> None:
    loads = Loads(auto=False)
    get_model = make_loader(loads, limit=5, max_loads=2)
    cache = model_cache(get_model)
    async with anyio.create_task_group() as tg:
        for model_id in "abc":
            tg.start_soon(get_model, model_id)
        await loads.started("a").wait()
        await loads.started("b").wait()
        await wait_until(lambda: len(cache.loading_ids()) == 3)
        for _ in range(20):
            await anyio.lowlevel.checkpoint()  # give c every chance to start, were it allowed
        assert loads.calls == ["a", "b"]
        loads.finish("a")
        await loads.started("c").wait()
        loads.finish("b")
        loads.finish("c")
    assert sorted(cache.loaded_ids()) == ["a", "b", "c"]


async def test_cancelling_the_caller_that_started_a_load_does_not_cancel_it() -> None:
    loads = Loads(auto=False)
    get_model = make_loader(loads)
    starter = anyio.CancelScope()

    async def start() -> None:
        with starter:
            await get_model("a")

    results: list[FakeModel] = []

    async def wait() -> None:
        results.append(await get_model("a"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(start)
        await loads.started("a").wait()
        starter.cancel()
        tg.start_soon(wait)
        await wait_until(lambda: starter.cancel_called)
        loads.finish("a")
    assert starter.cancelled_caught
    assert loads.cancelled == []
    assert loads.calls == ["a"]
    assert [m.model_id for m in results] == ["a"]


async def test_a_load_every_waiter_gave_up_on_still_lands_in_the_cache() -> None:
    loads = Loads(auto=False)
    get_model = make_loader(loads)
    cache = model_cache(get_model)
    with request_scope("r1", "a"):
        with anyio.move_on_after(0.05) as scope:
            await get_model("a")
        assert scope.cancelled_caught
        assert cache.pins() == {}  # the cancelled waiter's pin is gone at once
    loads.finish("a")
    await wait_until(lambda: cache.loaded_ids() == ["a"])
    assert loads.cancelled == []
    assert await get_model("a") is not None
    assert loads.calls == ["a"]


# -- pinning -------------------------------------------------------------------------------


async def test_pinned_models_are_not_evicted_and_the_excess_goes_when_pins_release() -> None:
    loads = Loads()
    get_model = make_loader(loads, limit=1)
    cache = model_cache(get_model)
    holding, release = anyio.Event(), anyio.Event()

    async def request() -> None:
        with request_scope("r1", "a"):
            await get_model("a")
            holding.set()
            await release.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(request)
        await holding.wait()
        assert cache.pins() == {"a": 1}
        await get_model("b")  # outside any request: the cache is full of pinned models
        assert cache.loaded_ids() == ["a", "b"]
        assert "unload a" not in loads.journal
        release.set()
    await wait_until(lambda: "unload a" in loads.journal)
    assert cache.loaded_ids() == ["b"]
    assert cache.pins() == {}


async def test_nothing_is_pinned_outside_a_request_scope() -> None:
    loads = Loads()
    get_model = make_loader(loads, limit=1)
    cache = model_cache(get_model)
    await get_model("a")
    await get_model("a")
    assert cache.pins() == {}
    await get_model("b")
    assert cache.loaded_ids() == ["b"]


async def test_each_call_in_a_request_pins_until_the_request_ends() -> None:
    get_model = make_loader(Loads(), limit=2)
    cache = model_cache(get_model)
    with request_scope("r1", "a"):
        await get_model("a")  # miss
        await get_model("a")  # hit
        assert cache.pins() == {"a": 2}
    assert cache.pins() == {}


async def test_evict_first_unloads_the_victim_before_the_new_load_starts() -> None:
    loads = Loads()
    get_model = make_loader(loads, limit=1, load_order="evict_first")
    await get_model("a")
    await get_model("b")
    assert loads.journal == ["load a", "unload a", "load b"]
    assert repr(model_cache(get_model)).endswith(
        "load_order=evict_first loaded=['b'] loading=[] pinned={}>"
    )


async def test_by_default_the_victim_is_unloaded_once_the_new_model_is_built() -> None:
    loads = Loads(auto=False)
    get_model = make_loader(loads, limit=1)
    cache = model_cache(get_model)
    assert cache.load_order == "evict_after"
    loads.finish("a")
    await get_model("a")
    async with anyio.create_task_group() as tg:
        tg.start_soon(get_model, "b")
        await loads.started("b").wait()
        assert cache.loaded_ids() == ["a"]  # a serves on while b is being built
        assert await get_model("a") is not None
        loads.finish("b")
    await wait_until(lambda: loads.journal[-1] == "unload a")
    assert loads.journal == ["load a", "load b", "unload a"]
    assert cache.loaded_ids() == ["b"]


@pytest.mark.parametrize("load_order", ["evict_after", "evict_first"])
async def test_a_failed_load_into_a_full_cache_costs_a_working_model_only_if_evict_first(
    load_order: str,
) -> None:
    loads = Loads()
    get_model = make_loader(loads, limit=2, load_order=load_order)
    first = await get_model("a")
    await get_model("b")
    loads.failures["broken"] = OSError("storage is down")
    with pytest.raises(OSError, match="storage is down"):
        await get_model("broken")
    cache = model_cache(get_model)
    if load_order == "evict_after":
        assert cache.loaded_ids() == ["a", "b"]
        assert await get_model("a") is first  # still served, not loaded again
        assert loads.calls == ["a", "b", "broken"]
    else:
        assert cache.loaded_ids() == ["b"]
        assert loads.journal[-2:] == ["unload a", "load broken"]


# -- failures ------------------------------------------------------------------------------


async def test_a_failed_load_is_not_cached_and_every_waiter_gets_the_same_error() -> None:
    loads = Loads(auto=False)
    boom = RuntimeError("boom")
    loads.failures["a"] = boom
    get_model = make_loader(loads)
    cache = model_cache(get_model)
    errors: list[BaseException] = []
    before = counters()

    async def call() -> None:
        with request_scope("r", "a"):
            try:
                await get_model("a")
            except RuntimeError as exc:
                errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(call)
        await loads.started("a").wait()
        loads.finish("a")
    assert len(errors) == 3
    assert all(error is boom for error in errors)
    assert cache.loaded_ids() == [] and cache.loading_ids() == [] and cache.pins() == {}
    assert counters()["model_load_failures"] == before["model_load_failures"] + 1
    loads.finish("a")
    assert (await get_model("a")).model_id == "a"  # the next call tries again
    assert loads.calls == ["a", "a"]


async def test_a_warm_whose_load_fails_raises_its_error_not_false() -> None:
    """False means "does not fit" (the gateway stops warming there); a
    failed load is the load's error, as a request gets it."""
    loads = Loads()
    boom = FileNotFoundError("no such model")
    loads.failures["a"] = boom
    cache = model_cache(make_loader(loads))
    with pytest.raises(FileNotFoundError) as info:
        await cache.warm("a")
    assert info.value is boom
    assert cache.loaded_ids() == [] and cache.loading_ids() == []
    assert await cache.warm("a") is True  # not cached: the next warm tries again
    assert loads.calls == ["a", "a"]
    await cache.aclose()


# -- unload hooks ----------------------------------------------------------------------------


class SyncClose:
    def __init__(self) -> None:
        self.closed_in: list[int] = []

    def close(self) -> None:
        self.closed_in.append(threading.get_ident())


class BothHooks:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def aclose(self) -> None:
        self.calls.append("aclose")

    def close(self) -> None:
        self.calls.append("close")


class Finalized:
    deleted = 0

    def __del__(self) -> None:
        type(self).deleted += 1


class BrokenHook:
    async def aclose(self) -> None:
        raise OSError("disk on fire")


async def test_unload_hooks_prefer_aclose_then_close_in_a_thread_then_del() -> None:
    made: dict[str, Any] = {"both": BothHooks(), "sync": SyncClose(), "del": Finalized()}

    @multiplexed(max_num_models_per_replica=1)
    async def get_model(model_id: str) -> Any:
        return made[model_id]

    both, sync = made["both"], made["sync"]
    await get_model("both")
    await get_model("sync")
    await get_model("del")
    await wait_until(lambda: bool(sync.closed_in))
    assert both.calls == ["aclose"]
    assert sync.closed_in != [threading.get_ident()]  # close() ran in a worker thread
    await model_cache(get_model).aclose()
    assert Finalized.deleted == 1
    made.clear()
    gc.collect()
    assert Finalized.deleted == 1  # not a second time when the object is collected


async def test_a_hook_runs_once_per_object_even_when_cached_under_two_ids() -> None:
    shared = BothHooks()

    @multiplexed(max_num_models_per_replica=2)
    async def get_model(model_id: str) -> Any:
        return shared if model_id in ("a", "b") else BothHooks()

    await get_model("a")
    await get_model("b")
    await get_model("c")  # evicts a; b still holds the object: no hook yet
    await get_model("d")  # evicts b
    await wait_until(lambda: shared.calls == ["aclose"])
    await model_cache(get_model).aclose()
    assert shared.calls == ["aclose"]


class EqualModel:
    """Every instance equals every other: the at-most-once record must go by identity."""

    closed = 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EqualModel)

    def __hash__(self) -> int:
        return 0

    async def aclose(self) -> None:
        type(self).closed += 1


async def test_equal_but_distinct_models_are_each_unloaded() -> None:
    @multiplexed(max_num_models_per_replica=1)
    async def get_model(model_id: str) -> EqualModel:
        return EqualModel()

    for model_id in "abc":
        await get_model(model_id)
    await model_cache(get_model).aclose()
    assert EqualModel.closed == 3


async def test_a_failing_hook_is_logged_and_the_request_that_evicted_succeeds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @multiplexed(max_num_models_per_replica=1)
    async def get_model(model_id: str) -> Any:
        return BrokenHook() if model_id == "broken" else FakeModel(model_id, [])

    await get_model("broken")
    with caplog.at_level(logging.INFO, logger="muxgate.replicas"):
        model = await get_model("fine")
    assert model.model_id == "fine"
    failures = [r for r in caplog.records if "Unload hook of model 'broken' failed" in r.message]
    assert len(failures) == 1 and failures[0].exc_info is not None


async def test_closing_the_cache_unloads_every_model_with_its_reason() -> None:
    loads = Loads()
    get_model = make_loader(loads)
    await get_model("a")
    await get_model("b")
    before = counters()
    await model_cache(get_model).aclose("drain")
    assert sorted(loads.journal[2:]) == ["unload a", "unload b"]
    assert model_cache(get_model).loaded_ids() == []
    after = counters()
    assert after["model_unloads_drain"] == before["model_unloads_drain"] + 2
    with pytest.raises(ValueError, match="reason must be 'shutdown' or 'drain'"):
        await model_cache(get_model).aclose("lru")


async def test_closing_the_cache_during_a_load_fails_its_waiters() -> None:
    loads = Loads(auto=False)
    get_model = make_loader(loads)
    errors: list[BaseException] = []

    async def call() -> None:
        try:
            await get_model("a")
        except ModelCacheClosedError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await loads.started("a").wait()
        await model_cache(get_model).aclose("shutdown")
    assert [str(e) for e in errors] == ["The model cache was closed while loading model 'a'."]
    assert loads.cancelled == ["a"]
    assert model_cache(get_model).loading_ids() == []


# -- model ids, sync loaders, per-instance caches --------------------------------------------


async def test_an_empty_model_id_is_refused() -> None:
    get_model = make_loader(Loads())
    with pytest.raises(ValueError, match=r"^The model ID cannot be empty\.$"):
        await get_model("")
    assert get_multiplexed_model_id() == ""


async def test_a_sync_loader_runs_in_a_worker_thread_and_sees_the_request() -> None:
    seen: list[tuple[int, str]] = []

    @multiplexed
    def get_model(model_id: str) -> str:
        seen.append((threading.get_ident(), get_multiplexed_model_id()))
        return model_id.upper()

    with request_scope("r1", "m1"):
        assert await get_model("m1") == "M1"
    assert seen[0][0] != threading.get_ident()
    assert seen[0][1] == "m1"


async def test_a_sync_loader_that_returns_a_coroutine_gets_a_clear_error() -> None:
    # The likely slip: `return load_state_dict(...)` in a plain def.
    async def fetch(model_id: str) -> str:
        return model_id

    @multiplexed
    def get_model(model_id: str) -> Any:
        return fetch(model_id)

    with pytest.raises(TypeError, match=r"returned an awaitable, not a model: .* `async def`"):
        await get_model("m1")
    assert "m1" not in model_cache(get_model).loaded_ids()  # not cached


class Deployment:
    def __init__(self) -> None:
        self.loaded: list[str] = []

    @multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> tuple[Deployment, str]:
        self.loaded.append(model_id)
        return self, model_id

    @multiplexed
    def get_sync(self, model_id: str) -> str:
        self.loaded.append(model_id)
        return model_id


async def test_each_instance_has_its_own_cache_and_a_function_has_one() -> None:
    one, two = Deployment(), Deployment()
    assert await one.get_model("a") == (one, "a")
    assert await two.get_model("a") == (two, "a")
    assert await one.get_model("a") == (one, "a")
    assert one.loaded == ["a"] and two.loaded == ["a"]
    assert model_cache(one.get_model) is not model_cache(two.get_model)
    assert model_cache(one.get_model) is not model_cache(one.get_sync)
    assert await one.get_sync("s") == "s"
    get_model = make_loader(Loads())
    assert model_cache(get_model) is model_cache(get_model)
    with pytest.raises(TypeError, match="bound method"):
        model_cache(Deployment.get_model)


# -- observability -----------------------------------------------------------------------------


async def test_log_lines_for_loads_and_unloads(caplog: pytest.LogCaptureFixture) -> None:
    get_model = make_loader(Loads(), limit=1, load_order="evict_first")
    with caplog.at_level(logging.INFO, logger="muxgate.replicas"):
        await get_model("1")
        await get_model("3")
        await model_cache(get_model).aclose()
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("muxgate.replicas")]
    assert messages[0] == "Loading model '1'."
    assert re.fullmatch(r"Loaded model '1' in \d+\.\dms\.", messages[1])
    assert messages[2] == "Unloading model '1'."
    assert re.fullmatch(r"Unloaded model '1' in \d+\.\dms\.", messages[3])
    assert "Unloading model '3'." in messages
    assert all(r.levelno == logging.INFO for r in caplog.records if "oad" in r.getMessage())


async def test_process_wide_caches_snapshot_and_counters() -> None:
    gc.collect()  # caches of earlier tests are weakly held
    loads = Loads(auto=False)
    get_model = make_loader(loads, limit=2)
    cache = model_cache(get_model)
    assert cache in model_caches()
    assert isinstance(cache, ModelCache)
    before = counters()
    async with anyio.create_task_group() as tg:
        tg.start_soon(get_model, "snap-a")
        await loads.started("snap-a").wait()
        assert "snap-a" in replica_state_snapshot()[1]
        loads.finish("snap-a")
    loads.auto = True
    await get_model("snap-b")
    await get_model("snap-a")
    models, loading, limit = replica_state_snapshot()
    assert [m for m in models if m.startswith("snap-")] == ["snap-b", "snap-a"]
    assert not [m for m in loading if m.startswith("snap-")]
    assert limit is not None and limit >= 2  # this cache's 2, and live caches of other tests
    after = counters()
    assert after["cache_misses"] - before["cache_misses"] == 2
    assert after["cache_hits"] - before["cache_hits"] == 1
    assert after["model_loads"] - before["model_loads"] == 2
    assert after["model_load_seconds_sum"] > before["model_load_seconds_sum"]
    assert after["models_loaded"] >= 2
    assert set(after) == {
        "model_loads",
        "model_load_failures",
        "model_unloads_lru",
        "model_unloads_shutdown",
        "model_unloads_drain",
        "model_unloads_admin",
        "cache_hits",
        "cache_misses",
        "model_load_seconds_sum",
        *(load_bucket_key(bound) for bound in MODEL_LOAD_BUCKETS),
        "model_load_cpu_seconds_sum",
        "load_step_waits",
        "load_step_wait_seconds_sum",
        "model_load_refused_ids",
        "model_load_not_found",
        "models_loaded",
    }
    # The loaders' own CPU, never more than the loads' wall time.
    cpu = after["model_load_cpu_seconds_sum"] - before["model_load_cpu_seconds_sum"]
    assert 0 < cpu <= after["model_load_seconds_sum"] - before["model_load_seconds_sum"]
    # The load duration histogram: each load lands in every bucket from its
    # duration up (cumulative), so the per-bucket increases step up to 2.
    steps = [after[load_bucket_key(b)] - before[load_bucket_key(b)] for b in MODEL_LOAD_BUCKETS]
    assert steps == sorted(steps)
    assert steps[-1] == 2
    assert repr(cache) == (
        "<ModelCache 'make_loader.<locals>.get_model' capacity=2 "
        "loaded=['snap-b', 'snap-a'] loading=[] pinned={}>"
    )
    await cache.aclose()
    unlimited = make_loader(Loads(), limit=-1)
    await unlimited("snap-u")
    assert replica_state_snapshot()[2] is None  # no bound on the count of models


def test_the_event_log_numbers_events_keeps_the_last_and_reads_after_a_number() -> None:
    ticks = iter(range(1000, 2000))
    log = EventLog(maxlen=3, clock=lambda: float(next(ticks)))
    assert log.since(0) == []
    first = log.record("load", "a", 0.0125)
    assert first == ModelEvent(seq=1, time=1000.0, kind="load", model="a", duration_ms=12.5)
    log.record("load_failed", "b", 0.002, "OSError")
    log.record("unload", "a", None, "lru")
    log.record("unload", "c", 0.001, "drain")  # the bound drops event 1
    assert [e.seq for e in log.since(0)] == [2, 3, 4]
    assert [e.seq for e in log.since(-7)] == [2, 3, 4]
    assert log.since(2) == [
        ModelEvent(seq=3, time=1002.0, kind="unload", model="a", reason="lru"),
        ModelEvent(seq=4, time=1003.0, kind="unload", model="c", duration_ms=1.0, reason="drain"),
    ]
    assert log.since(4) == []
    assert log.since(99) == []
    assert repr(log) == "<EventLog last_seq=4 kept=3/3>"


def last_event_seq() -> int:
    kept = events_since(0)
    return kept[-1].seq if kept else 0


async def test_finished_loads_and_unloads_are_logged_for_the_gateway_and_hits_are_not() -> None:
    mark = last_event_seq()
    started = time.time()
    loads = Loads()
    loads.failures["ev-bad"] = OSError("disk gone")
    get_model = make_loader(loads, limit=1)
    await get_model("ev-a")
    await get_model("ev-a")  # a hit: nothing logged
    with pytest.raises(OSError):
        await get_model("ev-bad")  # ev-a stays: evicted only for a model that was built
    await get_model("ev-b")
    await model_cache(get_model).aclose("drain")
    events = events_since(mark)
    assert [(e.kind, e.model, e.reason) for e in events] == [
        ("load", "ev-a", None),
        ("load_failed", "ev-bad", "OSError"),
        ("load", "ev-b", None),
        ("unload", "ev-a", "lru"),
        ("unload", "ev-b", "drain"),
    ]
    assert [e.seq for e in events] == list(range(mark + 1, mark + 6))
    assert all(e.duration_ms is not None and e.duration_ms >= 0 for e in events)
    assert all(started <= e.time <= time.time() for e in events)
    assert events_since(events[2].seq) == events[3:]


async def test_residency_watchers_hear_of_load_starts_ends_and_unloads_not_of_hits() -> None:
    """What the replica pushes to its gateways on: each change of the ids a
    cache holds or loads, seen as the watcher is called."""
    loads = Loads(auto=False)
    loads.failures["rw-bad"] = OSError("disk gone")
    get_model = make_loader(loads, limit=1)
    cache = model_cache(get_model)
    seen: list[tuple[list[str], list[str]]] = []
    stop = watch_residency(lambda: seen.append((cache.loaded_ids(), cache.loading_ids())))
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(get_model, "rw-a")
            await loads.started("rw-a").wait()
            assert seen == [([], ["rw-a"])]  # the load started: told before it ends
            loads.finish("rw-a")
        assert seen[-1] == (["rw-a"], [])
        del seen[:]
        await get_model("rw-a")  # a hit changes no id held
        assert seen == []
        loads.finish("rw-bad")
        with pytest.raises(OSError):
            await get_model("rw-bad")
        assert seen == [(["rw-a"], ["rw-bad"]), (["rw-a"], [])]
        del seen[:]
        loads.finish("rw-b")
        await get_model("rw-b")  # evicts rw-a once built
        assert seen[0] == (["rw-a"], ["rw-b"])
        assert seen[-1] == (["rw-b"], [])
        del seen[:]
        assert cache.unload("rw-b")
        assert seen == [([], [])]
    finally:
        stop()
    loads.finish("rw-c")
    await get_model("rw-c")
    assert seen == [([], [])]  # stopped: told nothing more


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    previous = current_replica()
    set_replica_context("Model", "Model#t1")
    try:
        with exporting_spans(monkeypatch, "muxgate-sdk-tests") as r:
            yield r
    finally:
        set_replica_context(previous.deployment, previous.replica_id)


async def test_load_and_unload_spans_are_children_of_the_caller(receiver: OtlpReceiver) -> None:
    loads = Loads()
    loads.failures["bad"] = RuntimeError("no such model")
    get_model = make_loader(loads, limit=1)
    tracer = trace.get_tracer("muxgate.tests")
    with tracer.start_as_current_span("request") as parent:
        await get_model("a")
        await get_model("b")  # evicts a (lru)
        with pytest.raises(RuntimeError):
            await get_model("bad")  # evicts b first
        await get_model("c")
    await model_cache(get_model).aclose("shutdown")
    assert flush_tracing()
    parent_id = format(parent.get_span_context().span_id, "016x")
    common = {"muxgate.replica_id": "Model#t1", "muxgate.deployment": "Model"}
    load_a = receiver.wait_for_span("muxgate.model.load", **{"muxgate.model_id": "a"}, **common)
    assert load_a.parent_span_id == parent_id
    evict = receiver.wait_for_span(
        "muxgate.model.unload", **{"muxgate.model_id": "a", "muxgate.unload_reason": "lru"}
    )
    assert evict.parent_span_id == parent_id
    failed = receiver.wait_for_span("muxgate.model.load", **{"muxgate.model_id": "bad"})
    assert failed.status_code == trace.StatusCode.ERROR.value
    receiver.wait_for_span(
        "muxgate.model.unload",
        **{"muxgate.model_id": "c", "muxgate.unload_reason": "shutdown"},
        **common,
    )


async def test_a_callable_object_with_an_async_call_is_an_async_loader() -> None:
    class Loader:
        async def __call__(self, model_id: str) -> str:
            await asyncio.sleep(0)
            return model_id.upper()

    get_model = multiplexed(Loader())
    assert await get_model("m1") == "M1"  # the model, not an un-awaited coroutine
    assert model_cache(get_model).loaded_ids() == ["m1"]
