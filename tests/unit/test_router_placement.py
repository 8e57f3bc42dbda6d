"""Router: least-loaded holders, placement of models held nowhere, pending marks."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from muxgate.gateway._placement import loads_in_flight
from muxgate.gateway._router import PopularitySketch, Router


def make_router(n: int, **kwargs: Any) -> Router:
    router = Router(rng=random.Random(0), **kwargs)
    for i in range(n):
        router.add_replica(f"replica-{i}")
    return router


def heat(router: Router, model_id: str, times: int) -> None:
    """Count ``times`` requests for ``model_id`` in the router's popularity sketch."""
    for _ in range(times):
        router.popularity.record(model_id)


# -- placement of a model no replica holds -------------------------------------------------


def full_caches(router: Router, model: str) -> list[str]:
    """Fill the first four preference replicas of ``model`` (cache size 2) with
    a hot LRU model everywhere but prefs[3], whose LRU model is rare."""
    prefs = router.preference_list(model)
    router.observe(prefs[0], models=["hot-a", "hot-b"], loading=[], cache_limit=2)
    router.observe(prefs[1], models=["hot-c", "hot-b"], loading=[], cache_limit=2)
    router.observe(prefs[2], models=["warm", "hot-b"], loading=[], cache_limit=2)
    router.observe(prefs[3], models=["rare", "hot-b"], loading=[], cache_limit=2)
    heat(router, "hot-a", 50)
    heat(router, "hot-b", 50)
    heat(router, "hot-c", 50)
    heat(router, "warm", 5)
    heat(router, "rare", 1)
    return prefs


def test_cold_miss_goes_where_it_evicts_the_least_popular_model() -> None:
    router = make_router(8)
    prefs = full_caches(router, "new")
    d = router.choose("new")
    assert d is not None
    assert (d.replica_id, d.spillover, d.home_replica_id, d.reason) == (
        prefs[3],
        False,  # placement by popularity, not a spill
        prefs[0],
        "placed",
    )
    # Once sent there, the model sticks to that replica (a holder under capacity).
    router.acquire(d.replica_id, "new")
    again = router.choose("new")
    assert again is not None and again.replica_id == prefs[3] and again.reason == "cached"


def test_free_cache_slot_wins_over_any_victim() -> None:
    router = make_router(8)
    prefs = full_caches(router, "new")
    router.observe(prefs[1], models=["hot-c"], loading=[])  # one of two slots free
    d = router.choose("new")
    assert d is not None and d.replica_id == prefs[1] and d.reason == "placed"


def test_a_cold_miss_goes_where_fewest_loads_run() -> None:
    # prefs[3] has the least popular victim, but a load already runs there
    # (reported, or a miss sent and not answered): the new load would wait
    # behind it, so the replica with no load wins, then its victim decides.
    router = make_router(8)
    prefs = full_caches(router, "new")
    router.observe(prefs[3], models=["rare", "hot-b"], loading=["other"], cache_limit=2)
    d = router.choose("new")
    assert d is not None and d.replica_id == prefs[2]  # victim "warm", no load
    router.observe(prefs[3], models=["rare", "hot-b"], loading=[], cache_limit=2)
    router.acquire(prefs[3], "cold")  # a request for a model it does not hold
    d = router.choose("new")
    assert d is not None and d.replica_id == prefs[2]
    router.release(prefs[3], "cold")
    router.acquire(prefs[3], "rare")  # a hit: no load (and it pins the victim)
    router.acquire(prefs[2], "warm")
    d = router.choose("new")
    assert d is not None and d.replica_id == prefs[0]  # every victim hot: home
    # Every candidate running as many loads: the victims decide, as before.
    router = make_router(8)
    prefs = full_caches(router, "new")
    for i, r in enumerate(prefs[:4]):
        router.acquire(r, f"cold-{i}")
    d = router.choose("new")
    assert d is not None and d.replica_id == prefs[3]


def test_without_popularity_a_cold_miss_goes_home() -> None:
    router = make_router(8)
    prefs = router.preference_list("new")
    for r in prefs[:4]:
        router.observe(r, models=["x", "y"], loading=[], cache_limit=2)
    d = router.choose("new")
    assert d is not None and d.replica_id == prefs[0] and d.reason == "home"


def test_placement_choices_one_is_the_plain_rule() -> None:
    router = make_router(8, placement_choices=1)
    prefs = full_caches(router, "new")
    d = router.choose("new")
    assert d is not None and d.replica_id == prefs[0] and d.reason == "home"


def test_a_spill_of_a_held_model_keeps_preference_order() -> None:
    # m is held (on a full replica): its spill goes to the first replica under
    # capacity, not to the one with the coldest victim.
    router = make_router(8, max_ongoing_requests=2, min_capacity=2)
    prefs = full_caches(router, "m")
    router.observe(prefs[0], models=["hot-a", "m"], loading=[])
    router.acquire(prefs[0], "m")
    router.acquire(prefs[0], "m")
    d = router.choose("m")
    assert d is not None and d.replica_id == prefs[1] and d.reason == "spill"


def test_pinned_lru_model_is_not_the_victim() -> None:
    # prefs[3]'s LRU model "rare" has a request in flight there: the SDK will
    # evict hot-b instead, so prefs[3] is no better than the others.
    router = make_router(8)
    prefs = full_caches(router, "new")
    router.acquire(prefs[3], "rare")
    d = router.choose("new")
    assert d is not None and d.replica_id == prefs[2]  # victim "warm"


def test_cache_size_is_learnt_from_reports() -> None:
    # No cache_limit anywhere: the most models a replica was seen holding (3)
    # is taken as every replica's size, so prefs[1] with two has a free slot.
    router = make_router(8)
    prefs = router.preference_list("new")
    router.observe(prefs[5], models=["a", "b", "c"], loading=[])
    for r in prefs[:4]:
        router.observe(r, models=["hot-x", "hot-y", "hot-z"], loading=[])
    router.observe(prefs[1], models=["hot-x", "hot-y"], loading=[])
    heat(router, "hot-x", 10)
    d = router.choose("new")
    assert d is not None and d.replica_id == prefs[1]
    # A replica's own report overrides the estimate.
    router2 = make_router(8)
    for r in prefs[:4]:
        router2.observe(r, models=["hot-x", "hot-y"], loading=[], cache_limit=2)
    heat(router2, "hot-x", 10)
    heat(router2, "hot-y", 10)
    d2 = router2.choose("new")
    assert d2 is not None and d2.replica_id == prefs[0]


# -- holders --------------------------------------------------------------------------------


def test_least_loaded_holder_ties_in_preference_order() -> None:
    router = make_router(6, max_ongoing_requests=8, min_capacity=8)
    prefs = router.preference_list("m")
    for r in (prefs[0], prefs[2], prefs[4]):
        router.observe(r, models=["m"], loading=[])
    d = router.choose("m")
    assert d is not None and d.replica_id == prefs[0] and d.reason == "home"
    router.acquire(prefs[0], "m")
    d = router.choose("m")
    assert d is not None and d.replica_id == prefs[2] and d.reason == "cached"
    router.acquire(prefs[2], "m")
    router.acquire(prefs[4], "")
    router.acquire(prefs[4], "")
    d = router.choose("m")
    assert d is not None and d.replica_id == prefs[0]


# -- pending marks --------------------------------------------------------------------------


def test_pending_marks_count_requests() -> None:
    router = make_router(3)
    r = "replica-0"
    router.acquire(r, "m")
    router.acquire(r, "m")
    router.observe(r, models=[], loading=[])  # sent before either arrived
    assert router.holders("m") == {r}
    router.release(r, "m")
    assert router.holders("m") == {r}  # one request still in transit
    router.release(r, "m")
    assert router.holders("m") == set()
    # A mark for a model the replica reports stays a holder after release.
    router.acquire(r, "n")
    router.observe(r, models=["n"], loading=[])
    router.release(r, "n")
    assert router.holders("n") == {r}


def test_invalid_placement_arguments() -> None:
    with pytest.raises(ValueError, match="placement_choices"):
        Router(placement_choices=0)
    with pytest.raises(ValueError, match="holder_choice"):
        Router(holder_choice="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="half_life"):
        PopularitySketch(half_life=0)


# -- popularity sketch ----------------------------------------------------------------------


def test_popularity_halves_every_half_life() -> None:
    sketch = PopularitySketch(half_life=100)
    sketch.record("a")
    assert sketch.score("a") == pytest.approx(1.0)
    for _ in range(100):
        sketch.record("b")
    assert sketch.score("a") == pytest.approx(0.5)
    assert sketch.score("b") > sketch.score("a")
    assert sketch.score("never") == 0.0
    assert repr(sketch) == "PopularitySketch(tracked=2, half_life=100)"


def test_popularity_rescales_and_stays_bounded() -> None:
    # half_life 1: the weight doubles per request and is rescaled every ~330.
    sketch = PopularitySketch(half_life=1.0, max_tracked=16)
    for i in range(2000):
        sketch.record(f"m{i % 40}")
        sketch.record("hot")
        assert len(sketch) <= 16
    assert 1.0 < sketch.score("hot") <= 2.0  # 1 + 1/4 + 1/16 + ...
    assert sketch.score("hot") > sketch.score("m39") > sketch.score("m38")


# -- properties -----------------------------------------------------------------------------

MODELS = [f"m{i}" for i in range(12)]

_op = st.one_of(
    st.tuples(st.just("send"), st.sampled_from(["", *MODELS])),
    st.tuples(st.just("reply"), st.integers(min_value=0, max_value=10**6)),
    st.tuples(
        st.just("report"),
        st.integers(min_value=0, max_value=10**6),
        st.lists(st.sampled_from(MODELS), max_size=4, unique=True),
    ),
)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=9),
    placement_choices=st.integers(min_value=1, max_value=5),
    ops=st.lists(_op, max_size=150),
    order_seed=st.integers(min_value=0, max_value=2**16),
)
def test_decisions_are_bounded_affine_and_deterministic(
    n: int, placement_choices: int, ops: list[tuple[Any, ...]], order_seed: int
) -> None:
    ids = [f"r{i}" for i in range(n)]
    shuffled = ids[:]
    random.Random(order_seed).shuffle(shuffled)
    routers = []
    for order in (ids, shuffled):
        router = Router(
            rng=random.Random(0),
            max_ongoing_requests=4,
            min_capacity=1,
            balance_factor=1.5,
            placement_choices=placement_choices,
        )
        for r in order:
            router.add_replica(r)
        routers.append(router)
    a, b = routers
    sent: list[tuple[str, str]] = []
    for op in ops:
        if op[0] == "send":
            model = op[1]
            cap = a.capacity()
            da = a.choose(model)
            if model:
                # Same replica set, same reports, same requests: same choice.
                assert da == b.choose(model)
            if da is None:
                assert all(a.in_flight(r) >= 4 for r in ids)
                continue
            assert a.in_flight(da.replica_id) < (cap if model else 4)
            if model:
                holding = [r for r in a.holders(model) if a.in_flight(r) < cap]
                if holding:
                    assert da.replica_id in holding
                    assert a.in_flight(da.replica_id) == min(a.in_flight(r) for r in holding)
            a.acquire(da.replica_id, model)
            b.acquire(da.replica_id, model)
            sent.append((da.replica_id, model))
        elif op[0] == "reply" and sent:
            rid, model = sent.pop(op[1] % len(sent))
            a.release(rid, model)
            b.release(rid, model)
        elif op[0] == "report":
            rid = ids[op[1] % n]
            in_use = [m for r, m in sent if r == rid and m]
            models = list(dict.fromkeys([*op[2], *in_use]))
            loading = op[2][:1]  # one of them reported loading instead
            models = [m for m in models if m not in loading]
            a.observe(rid, models=models, loading=loading)
            b.observe(rid, models=models, loading=loading)
        for r in ids:
            # the loads counted as they happen = the loads counted from scratch
            rep = a._replicas[r]
            fresh = [m for m in rep.pending if m not in rep.models and m not in rep.loading]
            assert loads_in_flight(rep) == len(rep.loading) + len(fresh)
    assert repr(a) == repr(b)
