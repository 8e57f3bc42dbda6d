"""The frequency-aware eviction policy (LRU order, TinyLFU admission): the
sketch, the admission rule inside the cache's guarantees, and its hit rate on
the peer benchmark's id sequences replayed without a server."""

from __future__ import annotations

import bisect
import random
from typing import Any

import anyio
import pytest

from muxgate.replicas._cache_state import MISSING, CacheState
from muxgate.replicas._context import request_scope
from muxgate.replicas._eviction import EvictionPolicy, make_policy
from muxgate.replicas._multiplex import model_cache, multiplexed
from muxgate.replicas._tinylfu import FrequencySketch, TinyLFU


def zipf_sequence(n_models: int, count: int, s: float, seed: int) -> list[int]:
    """Ids 1..n drawn as the peer benchmark's load generator draws them."""
    rng = random.Random(seed)
    cumulative: list[float] = []
    total = 0.0
    for rank in range(1, n_models + 1):
        total += 1.0 / rank**s
        cumulative.append(total)
    return [bisect.bisect_left(cumulative, rng.random() * total) + 1 for _ in range(count)]


def replay(ids: list[int], policy: str, *, replicas: int = 2, k: int = 4) -> float:
    """Hit rate of hash routing (the benchmark simulator's hash) and one cache per replica."""
    states: list[CacheState[str]] = [CacheState(k, make_policy(policy, k)) for _ in range(replicas)]
    hits = 0
    for model in ids:
        state = states[(model * 2654435761) % replicas]
        key = str(model)
        if state.lookup(key) is not MISSING:
            hits += 1
        else:
            state.start_load(key)
            state.finish_load(key, key)
    return hits / len(ids)


@pytest.mark.parametrize(
    ("n_models", "lru", "tinylfu_exact"),
    # the simulator's figures for this sequence: hash + LRU, hash + TinyLFU with exact counts
    [(20, 0.6833, 0.7647), (100, 0.4087, 0.566)],
)
def test_replay_reaches_the_tinylfu_figures(
    n_models: int, lru: float, tinylfu_exact: float
) -> None:
    ids = zipf_sequence(n_models, 1500, 1.1, seed=42)
    assert replay(ids, "lru") == pytest.approx(lru, abs=5e-4)  # the same sequence and routing
    assert replay(ids, "tinylfu") >= tinylfu_exact - 0.01


def test_the_sketch_counts_saturates_and_ages() -> None:
    sketch = FrequencySketch(width=64, depth=4, sample_size=1000)
    for _ in range(3):
        sketch.increment("a")
    assert sketch.frequency("a") == 3
    assert sketch.frequency("never") == 0
    for _ in range(40):
        sketch.increment("hot")
    assert sketch.frequency("hot") == 15  # 4-bit counters
    aging = FrequencySketch(width=64, sample_size=10)
    for _ in range(9):
        aging.increment("b")
    assert aging.frequency("b") == 9
    aging.increment("b")  # the 10th access halves every counter
    assert aging.frequency("b") == 5
    assert repr(aging) == "<FrequencySketch 4x64 additions=5/10>"
    with pytest.raises(ValueError, match="at least 1"):
        FrequencySketch(width=0)


def test_a_one_off_model_does_not_evict_a_model_in_steady_use() -> None:
    policy: EvictionPolicy = TinyLFU(2)
    state: CacheState[str] = CacheState(2, policy)
    for model in ("a", "b", "a", "b", "a", "b"):
        if state.lookup(model) is MISSING:
            state.start_load(model)
            assert state.finish_load(model, model.upper()) == []
    assert state.lookup("c") is MISSING  # asked for once: less often than the victim a
    state.start_load("c")
    assert state.loaded_ids() == ["a", "b"]  # evict-after: nothing went yet
    assert state.finish_load("c", "C") == [("c", "C")]  # refused, nobody holds it: dropped
    assert state.loaded_ids() == ["a", "b"]
    for _ in range(4):  # a was asked for 3 times
        state.lookup("d")
    state.start_load("d")
    assert state.finish_load("d", "D") == [("a", "A")]  # asked for more often than a: admitted
    assert repr(state).startswith("<CacheState capacity=2 policy=tinylfu loaded=['b', 'd']")


def test_a_refused_model_serves_its_pinned_requests_then_goes() -> None:
    state: CacheState[str] = CacheState(1, TinyLFU(1))
    for _ in range(3):
        state.lookup("a")
    state.start_load("a")
    state.finish_load("a", "A")
    state.lookup("b")
    state.pin("b")  # a request waits for b
    state.start_load("b")
    assert state.finish_load("b", "B") == []  # refused, but pinned: kept aside
    assert "transient=['b']" in repr(state)
    assert state.lookup("b") == "B"  # served while it is there
    assert state.holds("B")
    assert state.unpin("b") == [("b", "B")]  # its last request ended: dropped, a stays
    assert state.loaded_ids() == ["a"]


def test_evict_first_asks_for_admission_before_the_load() -> None:
    state: CacheState[str] = CacheState(1, TinyLFU(1), evict_first=True)
    for _ in range(3):
        state.lookup("a")
    state.start_load("a")
    state.finish_load("a", "A")
    state.lookup("b")
    assert state.start_load("b") == []  # refused: a is not evicted for it
    assert state.finish_load("b", "B") == [("b", "B")]
    for _ in range(5):
        state.lookup("c")
    assert state.start_load("c") == [("a", "A")]  # admitted: a goes first


@pytest.mark.anyio
async def test_the_decorator_takes_the_policy_by_name() -> None:
    unloaded: list[str] = []

    class Model:
        def __init__(self, model_id: str) -> None:
            self.model_id = model_id

        async def aclose(self) -> None:
            unloaded.append(self.model_id)

    @multiplexed(max_num_models_per_replica=1, eviction_policy="tinylfu")
    async def get_model(model_id: str) -> Any:
        return Model(model_id)

    cache = model_cache(get_model)
    assert cache.policy.name == "tinylfu"
    for _ in range(3):
        await get_model("hot")
    with request_scope("req-1", "cold"):
        cold = await get_model("cold")  # refused, yet served to the request
        assert cold.model_id == "cold"
        assert cache.loaded_ids() == ["hot"]
    with anyio.fail_after(5):
        while unloaded != ["cold"]:  # noqa: ASYNC110 (the unload runs in a task of the cache)
            await anyio.sleep(0.001)
    assert cache.loaded_ids() == ["hot"]
    await cache.aclose()
    with pytest.raises(ValueError, match="eviction_policy must be one of 'lru', 'tinylfu'"):
        multiplexed(eviction_policy="lfu")
