"""Router: consistent-hash ring with bounded loads (pure, no I/O)."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from muxgate.gateway._ring import CachedRing
from muxgate.gateway._router import HashRing, RouteDecision, Router, stable_hash

MODEL_IDS = [f"model-{i}" for i in range(2000)]


def make_router(n: int, **kwargs: Any) -> Router:
    router = Router(rng=random.Random(0), **kwargs)
    for i in range(n):
        router.add_replica(f"replica-{i}")
    return router


def homes(router: Router, model_ids: list[str]) -> dict[str, str]:
    return {m: router.preference_list(m)[0] for m in model_ids}


def test_stable_hash_is_fixed() -> None:
    # Same value in every process (not Python's salted hash()).
    assert stable_hash("model-1") == stable_hash("model-1")
    assert stable_hash("a") != stable_hash("b")
    assert 0 <= stable_hash("x") < 2**64


def test_empty_router_returns_none() -> None:
    router = Router()
    assert router.choose("m") is None
    assert router.choose("") is None
    assert router.capacity() == 0
    assert router.replica_ids == []


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="balance_factor"):
        Router(balance_factor=1.0)
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        Router(max_ongoing_requests=0)
    with pytest.raises(ValueError, match="min_capacity"):
        Router(min_capacity=0)
    with pytest.raises(ValueError, match="virtual_nodes"):
        HashRing(virtual_nodes=0)


@settings(max_examples=30, deadline=None)
@given(st.permutations([f"r{i}" for i in range(7)]), st.sampled_from(MODEL_IDS[:50]))
def test_same_replica_for_any_insertion_order(order: list[str], model_id: str) -> None:
    a = Router()
    b = Router()
    for r in sorted(order):
        a.add_replica(r)
    for r in order:
        b.add_replica(r)
    assert a.preference_list(model_id) == b.preference_list(model_id)
    da, db = a.choose(model_id), b.choose(model_id)
    assert da == db
    assert da is not None
    assert da.replica_id == a.preference_list(model_id)[0]
    assert not da.spillover
    assert da.reason == "home"


def test_preference_list_is_a_permutation() -> None:
    router = make_router(9)
    for m in MODEL_IDS[:100]:
        prefs = router.preference_list(m)
        assert sorted(prefs) == router.replica_ids


@settings(max_examples=15, deadline=None)
@given(st.integers(min_value=4, max_value=24), st.data())
def test_adding_or_removing_one_replica_moves_about_one_nth(n: int, data: st.DataObject) -> None:
    router = make_router(n)
    before = homes(router, MODEL_IDS)
    victim = data.draw(st.sampled_from(router.replica_ids))
    router.remove_replica(victim)
    after_remove = homes(router, MODEL_IDS)
    moved = [m for m in MODEL_IDS if before[m] != after_remove[m]]
    # Only the victim's models move, and they move to their second choice.
    assert all(before[m] == victim for m in moved)
    assert len(moved) <= 2 * len(MODEL_IDS) / n
    router.add_replica(victim)
    assert homes(router, MODEL_IDS) == before
    router.add_replica("newcomer")
    after_add = homes(router, MODEL_IDS)
    moved = [m for m in MODEL_IDS if before[m] != after_add[m]]
    assert all(after_add[m] == "newcomer" for m in moved)
    assert len(moved) <= 2 * len(MODEL_IDS) / (n + 1)


def test_spread_is_roughly_even() -> None:
    router = make_router(10)
    counts: dict[str, int] = {}
    for home in homes(router, MODEL_IDS).values():
        counts[home] = counts.get(home, 0) + 1
    assert len(counts) == 10
    # 64 virtual nodes: every replica within a factor ~1.6 of the mean (200).
    assert min(counts.values()) > 120
    assert max(counts.values()) < 320


def test_capacity_rule() -> None:
    router = make_router(4, balance_factor=1.5, max_ongoing_requests=8, min_capacity=1)
    assert router.capacity() == math.ceil(1.5 * 1 / 4)
    for _ in range(9):
        router.acquire("replica-0", "")
    assert router.total_in_flight == 9
    assert router.capacity() == 4  # ceil(1.5 * 10 / 4)
    for _ in range(20):
        router.acquire("replica-1", "")
    assert router.capacity() == 8  # capped at max_ongoing_requests


def test_min_capacity_floor_keeps_second_request_home() -> None:
    model = "hot"
    no_floor = make_router(8, min_capacity=1)
    floor = make_router(8, min_capacity=2)
    for router in (no_floor, floor):
        first = router.choose(model)
        assert first is not None
        router.acquire(first.replica_id, model)
    second_no_floor = no_floor.choose(model)
    second_floor = floor.choose(model)
    assert second_no_floor is not None and second_no_floor.spillover
    assert second_no_floor.reason == "spill"
    assert second_floor is not None and not second_floor.spillover


@pytest.mark.parametrize("holder_choice", ["first", "least_loaded"])
def test_spill_follows_preference_order_and_sticks_to_holders(holder_choice: Any) -> None:
    router = make_router(
        6,
        balance_factor=1.25,
        max_ongoing_requests=2,
        min_capacity=2,
        holder_choice=holder_choice,
    )
    model = "m"
    prefs = router.preference_list(model)
    # Fill the home replica to max_ongoing_requests.
    router.acquire(prefs[0], model)
    router.acquire(prefs[0], model)
    d = router.choose(model)
    assert d == RouteDecision(prefs[1], True, prefs[0], "spill")
    # Another model is already on prefs[3]: the request goes to the holder, not prefs[1].
    router.observe(prefs[3], models=[model], loading=[])
    d = router.choose(model)
    assert d == RouteDecision(prefs[3], False, prefs[0], "cached")  # an existing copy: no spill
    # The replies report the model loaded; once the home has room again, home
    # wins (it holds the model; both holders are idle, so ties go home).
    router.observe(prefs[0], models=[model], loading=[])
    router.release(prefs[0], model)
    router.release(prefs[0], model)
    d = router.choose(model)
    assert d is not None and d.replica_id == prefs[0] and d.reason == "home"
    # A busier home: "first" stays home, "least_loaded" takes the idle copy.
    router.acquire(prefs[0], model)
    d = router.choose(model)
    assert d is not None
    expected = prefs[0] if holder_choice == "first" else prefs[3]
    assert d.replica_id == expected


def test_acquire_marks_model_until_its_release() -> None:
    router = make_router(5, min_capacity=1, max_ongoing_requests=4)
    model = "m"
    prefs = router.preference_list(model)
    router.acquire(prefs[0], "other")
    router.acquire(prefs[0], "other")
    d = router.choose(model)
    assert d is not None and d.replica_id != prefs[0]
    router.acquire(d.replica_id, model)
    assert model in router.models(d.replica_id)
    assert d.replica_id in router.holders(model)
    # A report written before the request arrived does not drop the mark:
    # the request is still in transit and will load the model there.
    router.observe(d.replica_id, models=[], loading=[])
    assert router.holders(model) == {d.replica_id}
    again = router.choose(model)
    assert again is not None and again.replica_id == d.replica_id and again.reason == "cached"
    # Its reply (the load failed, nothing reported) removes it.
    router.release(d.replica_id, model)
    assert router.holders(model) == set()


def test_returns_none_only_when_all_full() -> None:
    router = make_router(3, max_ongoing_requests=2)
    for r in router.replica_ids:
        router.acquire(r, "")
    assert router.choose("m") is not None
    for r in router.replica_ids:
        router.acquire(r, "")
    assert router.choose("m") is None
    assert router.choose("") is None
    router.release("replica-1", "")
    d = router.choose("m")
    assert d is not None and d.replica_id == "replica-1"
    d = router.choose("")
    assert d is not None and d.replica_id == "replica-1" and d.reason == "no_model"


def test_power_of_two_choices_prefers_less_loaded() -> None:
    router = make_router(2, max_ongoing_requests=8)
    for _ in range(3):
        router.acquire("replica-0", "")
    for _ in range(20):
        d = router.choose("")
        assert d is not None and d.replica_id == "replica-1" and not d.spillover


def test_removal_order_prefers_fewest_unique_models() -> None:
    router = make_router(3)
    router.observe("replica-0", models=["a", "b", "c"], loading=[])
    router.observe("replica-1", models=["a"], loading=["d"])
    router.observe("replica-2", models=["b", "c"], loading=[])
    assert router.removal_cost("replica-0") == 0  # a, b, c all held elsewhere
    assert router.removal_cost("replica-1") == 1  # d
    assert router.removal_cost("replica-2") == 0
    router.acquire("replica-2", "")
    assert router.removal_order() == ["replica-0", "replica-2", "replica-1"]
    assert router.removal_cost("nope") == 0


def test_remove_replica_forgets_its_state() -> None:
    router = make_router(3)
    router.acquire("replica-0", "m")
    router.acquire("replica-0", "m")
    router.remove_replica("replica-0")
    assert router.total_in_flight == 0
    assert router.holders("m") == set()
    router.release("replica-0", "m")  # a late reply from a removed replica is ignored
    router.observe("replica-0", models=["m"], loading=[])
    assert router.holders("m") == set()
    assert "replica-0" not in router.replica_ids


def test_repr_summarises_state() -> None:
    router = make_router(2, max_ongoing_requests=4)
    router.observe("replica-0", models=["a", "b"], loading=[])
    router.acquire("replica-1", "c")
    text = repr(router)
    assert "replicas=2" in text
    assert "in_flight=1" in text
    assert "models_held=2" in text
    assert "distinct_models=3" in text
    assert repr(HashRing()) == "HashRing(members=0, virtual_nodes=64)"


def test_walk_beyond_cached_prefix() -> None:
    # max_ongoing 1: fill the first five preferences, the sixth must be found.
    router = make_router(8, max_ongoing_requests=1)
    prefs = router.preference_list("m")
    for r in prefs[:5]:
        router.acquire(r, "")
    d = router.choose("m")
    assert d is not None and d.replica_id == prefs[5]


@settings(max_examples=60, deadline=None)
@given(
    changes=st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=9)), max_size=30),
    keys=st.lists(st.sampled_from(MODEL_IDS[:6]), min_size=1, max_size=20),
    cache_size=st.sampled_from([0, 1, 3, 1000]),
)
def test_cached_ring_walks_as_the_ring(
    changes: list[tuple[bool, int]], keys: list[str], cache_size: int
) -> None:
    # Cached prefixes (4 members) never change a walk: across membership
    # changes, LRU evictions and rings of fewer, exactly and more than 4 members.
    cached = CachedRing(virtual_nodes=8, cache_size=cache_size)
    plain = HashRing(virtual_nodes=8)
    for add, i in changes:
        for ring in (cached, plain):
            (ring.add if add else ring.remove)(f"replica-{i}")
        for key in keys:
            assert list(cached.walk(key)) == list(plain.walk(key))
    assert repr(cached).startswith(f"CachedRing({plain!r}, cached_prefixes=")


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=12),
    balance_factor=st.sampled_from([1.1, 1.25, 1.5, 2.0]),
    min_capacity=st.integers(min_value=1, max_value=4),
    ops=st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=30)), max_size=200),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_choices_respect_capacity(
    n: int,
    balance_factor: float,
    min_capacity: int,
    ops: list[tuple[bool, int]],
    seed: int,
) -> None:
    router = make_router(
        n, balance_factor=balance_factor, min_capacity=min_capacity, max_ongoing_requests=6
    )
    rng = random.Random(seed)
    sent: list[tuple[str, str]] = []
    for is_send, model_index in ops:
        if is_send:
            model = f"m{model_index}" if model_index else ""
            cap = router.capacity()
            d = router.choose(model)
            if d is None:
                assert all(router.in_flight(r) >= 6 for r in router.replica_ids)
                continue
            limit = 6 if model == "" else cap
            assert router.in_flight(d.replica_id) < limit
            router.acquire(d.replica_id, model)
            sent.append((d.replica_id, model))
        elif sent:
            router.release(*sent.pop(rng.randrange(len(sent))))


class RouterMachine(RuleBasedStateMachine):
    """Random add/remove/acquire/release/observe against a simple model; the
    reports also carry other gateways' calls."""

    def __init__(self) -> None:
        super().__init__()
        self.router = Router(
            rng=random.Random(1), max_ongoing_requests=3, balance_factor=1.25, min_capacity=1
        )
        self.in_flight: dict[str, int] = {}  # every gateway's
        self.others: dict[str, int] = {}  # other gateways', as last reported
        self.reported: dict[str, set[str]] = {}
        self.sent: list[tuple[str, str]] = []  # (replica, model) of requests in flight
        self.next_id = 0

    def held(self, rid: str) -> set[str]:
        return self.reported[rid] | {m for r, m in self.sent if r == rid and m}

    @rule()
    def add(self) -> None:
        rid = f"r{self.next_id}"
        self.next_id += 1
        self.router.add_replica(rid)
        self.in_flight[rid] = 0
        self.others[rid] = 0
        self.reported[rid] = set()

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.in_flight)))
        self.router.remove_replica(rid)
        del self.in_flight[rid]
        del self.others[rid]
        del self.reported[rid]
        self.sent = [(r, m) for r, m in self.sent if r != rid]

    @rule(model=st.sampled_from(["", "a", "b", "c", "d", "e"]))
    def send(self, model: str) -> None:
        cap = self.router.capacity()
        d = self.router.choose(model)
        if d is None:
            assert all(v >= 3 for v in self.in_flight.values())
            return
        assert d.replica_id in self.in_flight
        if model:
            prefs = self.router.preference_list(model)
            assert d.home_replica_id == prefs[0]
            assert d.spillover == (d.reason == "spill")
            assert d.spillover <= (d.replica_id != prefs[0])
            under = [r for r in prefs if self.in_flight[r] < cap]
            holding = [r for r in under if model in self.held(r)]
            if holding:
                # A holder under capacity always wins: the least loaded, ties
                # in preference order.
                assert d.replica_id == min(holding, key=lambda r: self.in_flight[r])
            elif any(model in self.held(r) for r in prefs):
                assert d.replica_id == under[0]  # spill: the first under capacity
            else:
                # Held nowhere: one of the first few under capacity.
                assert d.replica_id in under[: self.router.placement_choices]
                assert d.replica_id == under[0] or d.reason == "placed"
        else:
            assert self.in_flight[d.replica_id] < 3
        self.router.acquire(d.replica_id, model)
        self.in_flight[d.replica_id] += 1
        self.sent.append((d.replica_id, model))

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        rid, model = self.sent.pop(data.draw(st.integers(0, len(self.sent) - 1)))
        self.router.release(rid, model)
        self.in_flight[rid] -= 1

    @precondition(lambda self: self.in_flight)
    @rule(
        data=st.data(),
        models=st.sets(st.sampled_from(["a", "b", "c", "d", "e"])),
        others=st.none() | st.integers(0, 4),
    )
    def observe(self, data: st.DataObject, models: set[str], others: int | None) -> None:
        rid = data.draw(st.sampled_from(sorted(self.in_flight)))
        loaded = sorted(models)[:2]
        loading = sorted(models)[2:]
        own = self.in_flight[rid] - self.others[rid]
        if others is None:  # a report without a count
            self.router.observe(rid, models=loaded, loading=loading)
        else:
            self.router.observe(
                rid, models=loaded, loading=loading, in_flight=own + others, own=own
            )
            self.in_flight[rid] = own + others
            self.others[rid] = others
        self.reported[rid] = set(models)

    @invariant()
    def matches_model(self) -> None:
        assert self.router.replica_ids == sorted(self.in_flight)
        assert self.router.total_in_flight == sum(self.in_flight.values())
        for rid, count in self.in_flight.items():
            assert self.router.in_flight(rid) == count
            assert self.router.own_in_flight(rid) == count - self.others[rid]
            assert self.router.models(rid) == self.held(rid)
        for model in "abcde":
            assert self.router.holders(model) == {
                r for r in self.in_flight if model in self.held(r)
            }


TestRouterMachine = RouterMachine.TestCase
TestRouterMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_default_capacity_floor_is_half_of_max_ongoing() -> None:
    from muxgate.gateway._router import DEFAULT_BALANCE_FACTOR, default_min_capacity

    assert Router().balance_factor == DEFAULT_BALANCE_FACTOR
    assert Router(max_ongoing_requests=8).min_capacity == 4
    assert Router(max_ongoing_requests=1).min_capacity == 1
    assert default_min_capacity(5) == 3
    router = make_router(8, max_ongoing_requests=8)
    assert router.capacity() == 4


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(MODEL_IDS[:200]), st.integers(min_value=2, max_value=10))
def test_hot_model_fills_preference_list_in_order(model: str, n: int) -> None:
    # A burst for one model fills its home, then the next replicas, in order:
    # every gateway spills a hot model to the same few replicas.
    router = make_router(n, balance_factor=100.0, max_ongoing_requests=2)
    prefs = router.preference_list(model)
    chosen = []
    for _ in range(2 * n):
        d = router.choose(model)
        assert d is not None
        assert d.home_replica_id == prefs[0]
        router.acquire(d.replica_id, model)
        chosen.append(d.replica_id)
    assert chosen == [r for r in prefs for _ in range(2)]
    assert router.choose(model) is None
    # Released slots on a holder are refilled before a non-holder is used.
    router.release(prefs[-1], model)
    d = router.choose(model)
    assert d is not None and d.replica_id == prefs[-1] and d.reason == "cached"


def test_other_gateways_calls_count_against_capacity_and_the_limit() -> None:
    # Two replicas shared with another gateway, which keeps replica-0 full.
    router = make_router(2, max_ongoing_requests=2, min_capacity=2)
    model = next(m for m in MODEL_IDS if router.preference_list(m)[0] == "replica-0")
    router.observe("replica-0", models=[model], loading=[], in_flight=2, own=0)
    assert router.in_flight("replica-0") == 2
    assert router.own_in_flight("replica-0") == 0
    assert router.total_in_flight == 2
    # Its holder is full of the other gateway's calls: the model spills.
    d = router.choose(model)
    assert d is not None and d.replica_id == "replica-1" and d.reason == "spill"
    router.acquire("replica-1", model)
    router.acquire("replica-1", "")
    assert router.choose(model) is None  # every replica at max_ongoing_requests, all gateways'
    assert router.choose("") is None
    # The other gateway's calls finished (a pong says so): room again, at the holder.
    router.observe("replica-0", models=[model], loading=[], in_flight=0, own=0)
    d = router.choose(model)
    assert d is not None and d.replica_id == "replica-0" and d.reason == "home"
    assert "in_flight=2, others=0" in repr(router)


def test_own_unanswered_calls_are_not_counted_twice() -> None:
    router = make_router(1, max_ongoing_requests=4)
    router.acquire("replica-0", "a")
    router.acquire("replica-0", "a")
    # The replica holds our two calls and one of another gateway.
    router.observe("replica-0", models=["a"], loading=[], in_flight=3, own=2)
    assert (router.in_flight("replica-0"), router.own_in_flight("replica-0")) == (3, 2)
    router.release("replica-0", "a")
    router.release("replica-0", "a")
    router.release("replica-0", "a")  # one too many: the others' share stays
    assert (router.in_flight("replica-0"), router.own_in_flight("replica-0")) == (1, 0)
    # Without ``own``, the router's own count stands for it.
    router.acquire("replica-0", "a")
    router.observe("replica-0", models=["a"], loading=[], in_flight=1)
    assert router.in_flight("replica-0") == 1
    router.remove_replica("replica-0")
    assert router.total_in_flight == 0
