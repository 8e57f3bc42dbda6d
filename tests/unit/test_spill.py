"""The spill rules (``priced``, ``bounded_load``, ``never``): pure
functions, and the router that applies them."""

from __future__ import annotations

import math
import random

import pytest

from muxgate.gateway._router import Router
from muxgate.gateway._spill import (
    ServiceTimeEstimate,
    expected_wait_s,
    holder_limit,
    service_interval_s,
    should_spill,
    spill_now,
    spill_price_s,
    victim_share,
)

# The measured workload: a ~4 MB torch MLP loads in ~7 ms, a hit takes ~1 ms.
LOAD_S = 0.007
SERVICE_S = 0.001


def test_expected_wait_is_the_queue_for_the_model_shared_by_its_holders() -> None:
    assert expected_wait_s(1, 1, SERVICE_S) == pytest.approx(0.001)
    assert expected_wait_s(8, 2, SERVICE_S) == pytest.approx(0.004)
    assert expected_wait_s(0, 0, SERVICE_S) == pytest.approx(0.001)  # at least this one


def test_victim_share_is_zero_for_a_free_slot_and_at_most_one_load() -> None:
    assert victim_share(-1.0, 5.0) == 0.0
    assert victim_share(1.0, 4.0) == pytest.approx(0.25)
    assert victim_share(9.0, 3.0) == 1.0  # hotter than the model: a full reload
    assert victim_share(1.0, 0.0) == 1.0
    assert spill_price_s(LOAD_S, 0.5) == pytest.approx(0.0105)


def test_waiting_a_millisecond_for_the_holder_beats_a_seven_millisecond_load() -> None:
    # One request waiting for the only holder: ~1 ms against 7 ms (free slot) or 14 ms.
    assert not should_spill(waiting=1, holders=1, service_s=SERVICE_S, load_s=LOAD_S, victim=0.0)
    assert not should_spill(waiting=6, holders=1, service_s=SERVICE_S, load_s=LOAD_S, victim=0.0)
    # A pile of 8 behind one holder waits 8 ms: a copy on a free slot (7 ms) pays...
    assert should_spill(waiting=8, holders=1, service_s=SERVICE_S, load_s=LOAD_S, victim=0.0)
    # ...but not when it evicts a model as hot as this one (14 ms), nor with two holders.
    assert not should_spill(waiting=8, holders=1, service_s=SERVICE_S, load_s=LOAD_S, victim=1.0)
    assert not should_spill(waiting=8, holders=2, service_s=SERVICE_S, load_s=LOAD_S, victim=0.0)


def test_a_wait_longer_than_a_spill_ends_in_a_spill_whatever_the_estimate() -> None:
    kwargs = {"waiting": 1, "holders": 1, "service_s": SERVICE_S, "load_s": LOAD_S}
    assert not should_spill(**kwargs, victim=1.0, waited_s=0.013)
    assert should_spill(**kwargs, victim=1.0, waited_s=0.015)


def test_slow_requests_make_spills_worth_it() -> None:
    # A model whose call takes 50 ms per slot: waiting behind it costs more than a load.
    assert should_spill(waiting=1, holders=1, service_s=0.05, load_s=LOAD_S, victim=1.0)


def test_service_time_estimate_divides_a_hit_by_the_requests_it_shared_with() -> None:
    estimate = ServiceTimeEstimate(initial_s=0.01, alpha=0.5)
    assert estimate.observe(0.004, 4) == pytest.approx(0.0055)  # sample 1 ms
    assert estimate.observe(0.001, 0) == pytest.approx(0.00325)  # in_flight 0 counts as 1
    assert estimate.observe(-1.0, 1) == pytest.approx(0.00325)  # a clock step is ignored
    assert repr(estimate) == "<ServiceTimeEstimate local=3.250 ms reported=->"


def test_service_interval_takes_the_loads_out_of_the_busy_time() -> None:
    # 1 s busy, 400 calls of which 40 loaded for 0.28 s: 0.72 s over 360 hits.
    assert service_interval_s(1.0, 400, 0.28, 40) == pytest.approx(0.002)
    assert service_interval_s(0.5, 100) == pytest.approx(0.005)  # no loads
    # Nothing to learn: no call finished, only loads, loads longer than busy
    # (a warming load while idle), or no call counters (an older replica).
    assert service_interval_s(0.0, 0) is None
    assert service_interval_s(0.3, 5, 0.2, 5) is None
    assert service_interval_s(0.1, 10, 0.2, 2) is None
    assert service_interval_s(0.0, 0.0, 0.5, 3) is None


def test_reported_service_time_wins_over_the_local_one_once_there() -> None:
    estimate = ServiceTimeEstimate(initial_s=0.01, alpha=0.5, reported_alpha=0.5)
    assert estimate.report(None) == pytest.approx(0.01)  # no report yet: local
    assert estimate.observe(0.004, 1) == pytest.approx(0.007)  # local learns
    assert estimate.report(0.002) == pytest.approx(0.002)  # the first report replaces it
    assert estimate.observe(0.1, 1) == pytest.approx(0.002)  # local hits no longer decide
    assert estimate.local == pytest.approx(0.0535)
    assert estimate.report(0.004) == pytest.approx(0.003)
    assert estimate.report(None) == estimate.report(0.0) == pytest.approx(0.003)
    assert repr(estimate) == "<ServiceTimeEstimate local=53.500 ms reported=3.000 ms>"


def test_two_gateways_reading_the_same_replicas_price_alike() -> None:
    # Their own hits differ (one saw slow ones); the replicas' reports do not.
    a, b = ServiceTimeEstimate(), ServiceTimeEstimate()
    for _ in range(50):
        a.observe(0.002, 1)
        b.observe(0.020, 1)
    assert abs(a.value - b.value) > 0.005
    for busy, calls in ((1.0, 500), (1.0, 480), (1.0, 520)):
        interval = service_interval_s(busy, calls)
        a.report(interval)
        b.report(interval)
    assert a.value == b.value == pytest.approx(0.002, rel=0.05)


def make_router(rule: str, n: int = 3) -> Router:
    router = Router(
        rng=random.Random(0),
        max_ongoing_requests=2,
        min_capacity=2,
        balance_factor=1.25,
        spill_rule=rule,  # type: ignore[arg-type]
    )
    for i in range(n):
        router.add_replica(f"replica-{i}")
    router.load_s, router.service_s = LOAD_S, SERVICE_S
    return router


def test_priced_router_waits_for_a_full_holder_where_bounded_load_spills() -> None:
    bounded, priced = make_router("bounded_load"), make_router("priced")
    for router in (bounded, priced):
        home = router.preference_list("m")[0]
        router.observe(home, models=["m"], loading=[])
        router.acquire(home, "m")
        router.acquire(home, "m")  # the only holder is full
    spill = bounded.choose("m")
    assert spill is not None and spill.spillover
    assert priced.choose("m") is None  # waits: 1 ms against a 7 ms load
    assert priced.choose("m", waiting=8) is not None  # a pile worth a copy (free slot)
    decision = priced.choose("m", waited_s=0.02)  # waited longer than any spill costs
    assert decision is not None and decision.spillover
    assert "spill_rule=priced" in repr(priced)


def test_priced_router_counts_the_hot_model_a_spill_would_evict() -> None:
    router = make_router("priced", n=2)
    home, other = router.preference_list("m")
    router.observe(home, models=["m"], loading=[])
    router.observe(other, models=["hot"], loading=[], cache_limit=1)
    for _ in range(20):
        router.acquire(other, "hot")
        router.release(other, "hot")
    router.acquire(home, "m")
    router.acquire(home, "m")
    # 8 waiting: 8 ms of wait; free slot price 7 ms, but "hot" (as hot as m) makes it 14 ms.
    assert router.choose("m", waiting=8) is None
    assert router.choose("m", waiting=15) is not None


def test_hits_are_marked_for_the_service_time_sample() -> None:
    router = make_router("priced")
    home = router.preference_list("m")[0]
    first = router.choose("m")
    assert first is not None and not first.hit  # held nowhere: a load
    router.observe(home, models=["m"], loading=[])
    again = router.choose("m")
    assert again is not None and again.hit and again.replica_id == home


def test_unknown_spill_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="spill_rule must be one of"):
        Router(spill_rule="sometimes")  # type: ignore[arg-type]


def test_spill_now_per_rule() -> None:
    cheap = {"waiting": 1, "holders": 1, "service_s": SERVICE_S, "load_s": LOAD_S, "victim": 0.0}
    pile = {**cheap, "waiting": 100}  # 100 ms of wait against a 7 ms load
    # bounded_load: spill whenever the holders are full.
    assert spill_now("bounded_load", **cheap) is None
    # priced: wait (looked at again at the price) unless waiting costs more.
    assert spill_now("priced", **cheap) == pytest.approx(LOAD_S)
    assert spill_now("priced", **pile) is None
    assert spill_now("priced", **cheap, waited_s=1.0) is None
    # never: wait however long the queue or the wait already is.
    assert spill_now("never", **cheap) == math.inf
    assert spill_now("never", **pile, waited_s=3600.0) == math.inf


def test_a_holder_takes_up_to_max_ongoing_requests_only_under_never() -> None:
    assert holder_limit("priced", 3, 8) == 3
    assert holder_limit("bounded_load", 3, 8) == 3
    assert holder_limit("never", 3, 8) == 8


def never_router(n: int = 8, max_ongoing: int = 4) -> Router:
    router = Router(
        rng=random.Random(0),
        max_ongoing_requests=max_ongoing,
        min_capacity=1,
        balance_factor=1.25,
        spill_rule="never",
    )
    for i in range(n):
        router.add_replica(f"replica-{i}")
    router.load_s, router.service_s = LOAD_S, SERVICE_S
    return router


def test_never_fills_the_holder_to_max_ongoing_then_waits_for_it() -> None:
    router, priced = never_router(), never_router()
    priced.spill_rule = "priced"
    holder = router.preference_list("m")[0]
    for r in (router, priced):
        r.observe(holder, models=["m"], loading=[])
        r.acquire(holder, "m")
        r.acquire(holder, "m")
    # Two in flight over 8 replicas: the bounded-load capacity is 1, so the
    # other rules look past the holder; never sends to its free slots.
    assert router.capacity() == 1 and router.holder_capacity() == 4
    spill = priced.choose("m", waiting=100)
    assert spill is not None and spill.spillover
    for _ in range(2):
        decision = router.choose("m")
        assert decision is not None and decision.replica_id == holder and decision.hit
        router.acquire(holder, "m")
    # The holder is at max_ongoing_requests: wait, whatever the pile or the wait.
    assert router.choose("m", waiting=1000, waited_s=3600.0) is None
    assert router.refused_spill_price_s == math.inf
    assert router.holders("m") == {holder}
    assert "spill_rule=never" in repr(router)
    router.release(holder, "m")
    again = router.choose("m", waiting=1000)
    assert again is not None and again.replica_id == holder


def test_never_places_a_model_held_nowhere_and_moves_on_when_its_holder_leaves() -> None:
    router = never_router(n=3, max_ongoing=1)
    cold = router.choose("m")  # held nowhere: placed as under any rule
    assert cold is not None and not cold.spillover
    first = cold.replica_id
    router.acquire(first, "m")
    assert router.choose("m") is None  # its holder is full: wait for it
    router.remove_replica(first)  # dead or drained: the model may go elsewhere
    moved = router.choose("m")
    assert moved is not None and moved.replica_id != first and not moved.spillover
