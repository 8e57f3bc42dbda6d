"""The byte budget of a model cache (``max_bytes_per_replica``), kept models
(``pinned``), warming and the operator's unload: the pure state first, then
the async cache with real torch modules."""

from __future__ import annotations

import anyio
import pytest
import torch

from muxgate.replicas._cache_state import CacheState
from muxgate.replicas._context import request_scope
from muxgate.replicas._model_size import model_nbytes
from muxgate.replicas._multiplex import (
    ModelCache,
    ModelTooLargeError,
    instance_caches,
    multiplexed,
)


class Blob:
    """A model that says its own size and records its unload."""

    def __init__(self, model_id: str, nbytes: int, journal: list[str]) -> None:
        self.model_id, self.nbytes, self.journal = model_id, nbytes, journal

    def __muxgate_nbytes__(self) -> int:
        return self.nbytes

    async def aclose(self) -> None:
        self.journal.append(f"unload {self.model_id}")


# -- measuring ----------------------------------------------------------------------------------


def test_a_module_counts_parameters_and_buffers_once_per_storage() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.BatchNorm1d(20))
    expected = (10 * 20 + 20) * 4 + (20 + 20) * 4 + (20 + 20) * 4 + 8  # weights, bn, running stats
    assert model_nbytes(net) == expected
    tied = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False))
    tied[1].weight = tied[0].weight
    assert model_nbytes(tied) == 8 * 8 * 4
    # a state dict sharing storage with the module, and views of one tensor
    base = torch.zeros(100)
    assert model_nbytes({"a": base, "b": base[:10], "m": {"c": base[50:]}}) == 400
    assert model_nbytes(torch.nn.Linear(1000, 1000, device="meta")) == 0


def test_the_hook_and_sizeof_win_and_bad_sizes_are_refused() -> None:
    assert model_nbytes(Blob("x", 123, [])) == 123
    assert model_nbytes(Blob("x", 123, []), sizeof=lambda m: 7) == 7
    assert model_nbytes(object()) == 0
    with pytest.raises(TypeError, match="non-negative int"):
        model_nbytes(Blob("x", -1, []))
    with pytest.raises(TypeError, match="sizeof must return"):
        model_nbytes(object(), sizeof=lambda m: 1.5)  # type: ignore[arg-type,return-value]


def _exits(model: object) -> int:
    raise SystemExit(6)


@pytest.mark.anyio
async def test_sizeof_that_exits_fails_the_load_not_the_process() -> None:
    # SystemExit out of a flight's task would stop the event loop (the replica).
    with pytest.raises(TypeError, match=r"^sizeof raised SystemExit: 6\.$"):
        model_nbytes(object(), sizeof=_exits)
    journal: list[str] = []

    @multiplexed(max_bytes_per_replica=100, sizeof=lambda m: _exits(m) if m.model_id == "x" else 1)
    async def load(model_id: str) -> Blob:
        return Blob(model_id, 1, journal)

    with pytest.raises(TypeError, match="sizeof raised SystemExit"):
        await load("x")
    assert journal == ["unload x"]  # built, not kept: its hook ran
    assert (await load("y")).model_id == "y"


# -- the pure state -----------------------------------------------------------------------------


def test_eviction_frees_bytes_until_the_new_model_fits() -> None:
    state: CacheState[str] = CacheState(-1, max_bytes=100)
    for model_id, size in (("a", 40), ("b", 30), ("c", 20)):
        state.start_load(model_id)
        assert state.room_error(model_id, size) is None
        assert state.finish_load(model_id, model_id, size) == []
    assert state.model_bytes() == 90
    state.start_load("d")
    # 90 + 60 = 150: "a" (40) is not enough, "b" (30) goes too
    assert state.finish_load("d", "d", 60) == [("a", "a"), ("b", "b")]
    assert state.loaded_ids() == ["c", "d"]
    assert state.model_bytes() == 80
    assert state.sizes() == {"c": 20, "d": 60}


def test_a_model_larger_than_the_budget_or_than_the_kept_ones_leave_cannot_fit() -> None:
    state: CacheState[str] = CacheState(5, max_bytes=100)
    assert state.room_error("big", 101) is not None
    assert "more than the byte budget" in (state.room_error("big", 101) or "")
    state.keep("k")
    state.start_load("k")
    state.finish_load("k", "k", 70)
    assert state.room_error("m", 30) is None
    assert "leaves 30 beside the pinned models" in (state.room_error("m", 31) or "")
    # a kept model is never a victim, whatever the pressure
    state.start_load("m")
    assert state.finish_load("m", "m", 30) == []
    state.start_load("n")
    assert state.finish_load("n", "n", 30) == [("m", "m")]
    assert state.kept_ids() == ["k"]
    assert "kept=['k']" in repr(state) and "bytes=100/100" in repr(state)


def test_count_and_bytes_both_bound_the_cache() -> None:
    state: CacheState[str] = CacheState(2, max_bytes=1000)
    for model_id in "abc":
        state.start_load(model_id)
        state.finish_load(model_id, model_id, 10)
    assert state.loaded_ids() == ["b", "c"]
    assert state.model_bytes() == 20


def test_request_pins_delay_a_byte_eviction_until_they_release() -> None:
    state: CacheState[str] = CacheState(-1, max_bytes=100)
    state.start_load("a")
    state.finish_load("a", "a", 80)
    state.pin("a")
    state.start_load("b")
    assert state.finish_load("b", "b", 50) == []  # over budget while "a" is in use
    assert state.model_bytes() == 130
    assert state.unpin("a") == [("a", "a")]
    assert state.model_bytes() == 50


def test_a_warming_load_is_kept_only_if_it_fits_without_evicting() -> None:
    state: CacheState[str] = CacheState(2, max_bytes=100)
    state.start_load("a")
    state.finish_load("a", "a", 60)
    assert state.has_room()
    state.start_warm("w")
    assert state.finish_load("w", "w", 50, evict=False) == [("w", "w")]  # 110 > 100
    assert state.loaded_ids() == ["a"]
    state.start_warm("v")
    assert state.finish_load("v", "v", 40, evict=False) == []
    assert state.loaded_ids() == ["a", "v"]
    assert not state.has_room()


def test_a_warming_load_evicts_only_listed_unpinned_ids_as_few_as_fit() -> None:
    state: CacheState[str] = CacheState(4, max_bytes=100)
    for model_id, nbytes in [("a", 30), ("b", 30), ("k", 20), ("p", 10)]:
        state.start_load(model_id)
        state.finish_load(model_id, model_id, nbytes)
    state.keep("k")
    state.pin("p")
    assert not state.has_room()  # four of four
    may_evict = ["gone", "k", "p", "b", "a"]  # not held, kept, pinned: skipped
    assert state.room_evicting(may_evict)
    assert not state.room_evicting(["k", "p", "gone"])
    state.start_warm("w")
    # 50 more bytes: "b" alone (30) is not enough, "b" then "a" is; in the listed order
    assert state.finish_load("w", "w", 50, evict=False, may_evict=may_evict) == [
        ("b", "b"),
        ("a", "a"),
    ]
    assert state.loaded_ids() == ["k", "p", "w"] and state.model_bytes() == 80
    # what cannot fit even with every listed id gone costs none of them
    state.start_warm("big")
    assert state.finish_load("big", "big", 95, evict=False, may_evict=["w"]) == [("big", "big")]
    assert state.loaded_ids() == ["k", "p", "w"]
    # evict_first caches never evict for a warm
    first: CacheState[str] = CacheState(1, evict_first=True)
    first.start_load("a")
    first.finish_load("a", "a")
    assert not first.room_evicting(["a"])


def test_removing_a_model_in_use_drops_it_once_its_requests_end() -> None:
    state: CacheState[str] = CacheState(3, max_bytes=100)
    state.keep("a")
    state.start_load("a")
    state.finish_load("a", "a", 10)
    state.pin("a")
    assert state.remove("a") == []
    assert state.loaded_ids() == [] and state.kept_ids() == [] and state.model_bytes() == 0
    assert state.unpin("a") == [("a", "a")]
    assert state.remove("never") == []


# -- the async cache ----------------------------------------------------------------------------


def blob_cache(
    sizes: dict[str, int], journal: list[str], *, max_bytes: int, capacity: int = -1
) -> ModelCache[Blob]:
    async def load(model_id: str) -> Blob:
        journal.append(f"load {model_id}")
        return Blob(model_id, sizes[model_id], journal)

    return ModelCache(load, max_num_models=capacity, max_bytes=max_bytes, name="blobs")


@pytest.mark.anyio
async def test_a_model_over_the_budget_fails_is_unloaded_and_others_stay() -> None:
    journal: list[str] = []
    cache = blob_cache({"a": 40, "big": 500, "b": 40}, journal, max_bytes=100)
    await cache.get("a")
    with pytest.raises(ModelTooLargeError, match="more than the byte budget") as caught:
        await cache.get("big")
    assert (caught.value.nbytes, caught.value.max_bytes) == (500, 100)
    assert journal == ["load a", "load big", "unload big"]
    assert cache.loaded_ids() == ["a"]
    await cache.get("b")
    assert cache.loaded_ids() == ["a", "b"] and cache.model_bytes() == 80
    # the next request for it tries again (nothing cached, no negative entry)
    with pytest.raises(ModelTooLargeError):
        await cache.get("big")
    await cache.aclose()


@pytest.mark.anyio
async def test_resident_bytes_stay_within_the_budget_through_a_sweep() -> None:
    journal: list[str] = []
    sizes = {f"m{i}": 10 + (i * 37) % 90 for i in range(60)}
    cache = blob_cache(sizes, journal, max_bytes=200)
    peak = 0
    for model_id in sizes:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cache.get, model_id)
        await anyio.wait_all_tasks_blocked()  # the background unloads ran
        peak = max(peak, cache.model_bytes())
        assert sum(cache.sizes().values()) == cache.model_bytes()
    assert peak <= 200
    await cache.aclose()


@pytest.mark.anyio
async def test_a_warm_may_evict_a_listed_spare_copy_once_built() -> None:
    journal: list[str] = []
    cache = blob_cache({"a": 40, "b": 40, "w": 30}, journal, max_bytes=100, capacity=2)
    await cache.get("a")
    await cache.get("b")
    assert await cache.warm("w") is False  # full: nothing listed, nothing loaded
    assert "load w" not in journal
    assert await cache.warm("w", ["b", "a"]) is True  # one slot needed: "b" only
    await anyio.wait_all_tasks_blocked()
    assert cache.loaded_ids() == ["a", "w"]
    assert journal.index("load w") < journal.index("unload b")  # after the build
    with request_scope("r1", "a"):
        await cache.get("a")  # a request holds "a"
        assert await cache.warm("b", ["a"]) is False  # pinned: not given up
    assert cache.loaded_ids() == ["w", "a"]
    await cache.aclose()


@pytest.mark.anyio
async def test_preload_pin_warm_and_unload() -> None:
    journal: list[str] = []
    cache = blob_cache({"p": 50, "a": 30, "b": 30, "w": 10}, journal, max_bytes=100)
    await cache.preload("p", pin=True)
    assert cache.kept_ids() == ["p"]
    await cache.get("a")
    await cache.get("b")  # 110 > 100: "a" goes, never the pinned "p"
    assert cache.loaded_ids() == ["p", "b"]
    assert await cache.warm("w") is True  # 90 <= 100
    assert await cache.warm("a") is False  # 120 > 100: built, not kept, nothing evicted
    assert cache.loaded_ids() == ["p", "b", "w"]
    assert "unload a" in journal
    assert cache.unload("p") is True
    await anyio.wait_all_tasks_blocked()
    assert cache.kept_ids() == [] and "p" not in cache.loaded_ids()
    assert "unload p" in journal
    assert cache.unload("p") is False
    await cache.aclose()


@pytest.mark.anyio
async def test_a_request_joining_a_warming_load_makes_it_an_ordinary_one() -> None:
    journal: list[str] = []
    release = anyio.Event()
    sizes = {"a": 60, "w": 60}

    async def load(model_id: str) -> Blob:
        if model_id == "w":
            await release.wait()
        return Blob(model_id, sizes[model_id], journal)

    cache: ModelCache[Blob] = ModelCache(load, max_num_models=-1, max_bytes=100)
    await cache.get("a")
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.warm, "w")
        await anyio.wait_all_tasks_blocked()
        with request_scope("r1", "w"):
            tg.start_soon(cache.get, "w")
            await anyio.wait_all_tasks_blocked()
        release.set()
    await anyio.wait_all_tasks_blocked()
    assert cache.loaded_ids() == ["w"]  # evicted "a" for it, as any request's load does
    await cache.aclose()


class Deployment:
    @multiplexed(max_num_models_per_replica=2, max_bytes_per_replica=64)
    async def get_model(self, model_id: str) -> torch.nn.Module:
        return torch.nn.Linear(2, 2)

    @multiplexed
    async def get_other(self, model_id: str) -> str:
        return model_id


def test_instance_caches_finds_every_loader_or_the_named_one() -> None:
    d = Deployment()
    caches = instance_caches(d)
    assert sorted(c.name for c in caches) == ["Deployment.get_model", "Deployment.get_other"]
    (named,) = instance_caches(d, "get_model")
    assert named.max_bytes == 64
    with pytest.raises(ValueError, match="not a @multiplexed loader"):
        instance_caches(d, "nope")


def test_decorator_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="max_bytes_per_replica"):
        multiplexed(max_bytes_per_replica=0)
    with pytest.raises(TypeError, match="sizeof must be callable"):
        multiplexed(sizeof=3)  # type: ignore[arg-type]


@pytest.mark.anyio
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_cuda_bytes_count_and_an_unload_hands_them_back() -> None:
    async def load(model_id: str) -> torch.nn.Module:
        return torch.nn.Linear(1024, 1024, device="cuda")

    cache: ModelCache[torch.nn.Module] = ModelCache(load, max_num_models=1)
    before = torch.cuda.memory_reserved()
    await cache.get("a")
    assert cache.model_bytes() == (1024 * 1024 + 1024) * 4
    assert torch.cuda.memory_reserved() > before
    one_model = torch.cuda.memory_allocated()
    await cache.get("b")  # evicts "a"
    await anyio.wait_all_tasks_blocked()
    assert cache.loaded_ids() == ["b"]
    assert torch.cuda.memory_allocated() == one_model
    await cache.aclose()
    # the cache handed the freed blocks back to the driver (torch.cuda.empty_cache)
    assert torch.cuda.memory_reserved() == before
