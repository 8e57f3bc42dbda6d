"""What a replica warms and in which order (pure functions), the
popularity ranking they read (this gateway's, or the calls per model the
replicas report), and when a replica starts a warming load
(``warm_may_start`` and the turns of ``WarmTurns``)."""

from __future__ import annotations

import anyio
import pytest

from muxgate.gateway._pool_reports import request_growth
from muxgate.gateway._popularity import PopularitySketch
from muxgate.gateway._warming import (
    MAX_HANDOVER_S,
    after_zero,
    handed_over,
    handover_bound_s,
    moved_home,
    spare_copies,
    warm_counts,
)
from muxgate.replicas._model_control import MAX_WARMING_LOADS, WarmTurns, warm_may_start
from muxgate.replicas._request_counts import RequestCounts


def test_top_ranks_by_decayed_count_ties_by_id() -> None:
    sketch = PopularitySketch(half_life=100)
    for model_id in ["a"] * 5 + ["b"] * 3 + ["d", "c"]:
        sketch.record(model_id)
    assert [m for m, _ in sketch.top(10)] == ["a", "b", "c", "d"]
    assert [m for m, _ in sketch.top(2)] == ["a", "b"]
    assert sketch.top(0) == []
    (_, score), *_ = sketch.top(1)
    assert score == sketch.score("a")


def test_after_zero_puts_deferred_first_then_the_hottest_not_held() -> None:
    ranked = [("hot", 9.0), ("warm", 5.0), ("held", 4.0), ("cool", 1.0), ("gone", 0.0)]
    assert after_zero(ranked, {"held"}) == ["hot", "warm", "cool"]
    # deferred (the config's pinned and preload) first, even if held or hot
    assert after_zero(ranked, {"held"}, deferred=["pin", "held", "hot"]) == [
        "pin",
        "held",
        "hot",
        "warm",
        "cool",
    ]
    assert after_zero(ranked, set(), limit=2) == ["hot", "warm"]
    assert after_zero(ranked, set(), refused=["hot"], deferred=["hot"]) == [
        "warm",
        "held",
        "cool",
    ]
    assert after_zero([], set()) == []


def test_moved_home_takes_the_recent_models_whose_home_is_the_new_replica() -> None:
    from muxgate.gateway._ring import HashRing

    ring = HashRing(virtual_nodes=64)
    for replica_id in ("a", "b"):
        ring.add(replica_id)
    before = {f"m{i}": ring.preference_list(f"m{i}")[0] for i in range(200)}
    ring.add("c")
    ranked = [(f"m{i}", 200.0 - i) for i in range(200)]
    held_by_c = {"m0", "m1", "m2"}
    plan = moved_home(
        ranked, "c", ring.preference_list, lambda r, m: r == "c" and m in held_by_c, limit=500
    )
    moved = [m for m, _ in ranked if ring.preference_list(m)[0] == "c"]
    assert plan == [m for m in moved if m not in held_by_c]  # hottest first
    assert all(before[m] != "c" for m in plan)  # a consistent hash moves only these
    assert 30 < len(moved) < 110  # about a third
    assert moved_home(ranked, "c", ring.preference_list, lambda r, m: False, limit=5) == moved[:5]
    assert moved_home([("m9", 0.0)], "c", ring.preference_list, lambda r, m: False) == []
    # A model suspected of killing replicas is never warmed unasked.
    suspected = set(moved[:2])
    assert (
        moved_home(
            ranked,
            "c",
            ring.preference_list,
            lambda r, m: False,
            limit=5,
            refused=suspected.__contains__,
        )
        == moved[2:7]
    )


def test_handed_over_sends_each_recent_model_to_its_next_home() -> None:
    prefs = {"x": ["d", "a", "b"], "y": ["d", "b", "a"], "z": ["a", "d"], "cold": ["d", "a"]}
    scores = {"x": 3.0, "y": 5.0, "z": 1.0, "cold": 0.0}
    plan = handed_over(
        ["x", "y", "z", "cold"],
        "d",
        scores.__getitem__,
        prefs.__getitem__,
        lambda r, m: (r, m) == ("a", "z"),  # a holds z already
    )
    assert plan == {"b": ["y"], "a": ["x"]}
    assert handed_over(
        ["x", "y"], "d", scores.__getitem__, prefs.__getitem__, lambda r, m: False, limit=1
    ) == {"b": ["y"]}
    assert handed_over(
        ["x", "y"],
        "d",
        scores.__getitem__,
        prefs.__getitem__,
        lambda r, m: False,
        refused=lambda m: m == "y",
    ) == {"a": ["x"]}


def test_a_full_next_home_may_give_up_only_spare_copies_coldest_first() -> None:
    # d leaves; a and b stay. a is to warm "x", b to warm "y".
    held = {"a": ["s1", "s2", "only", "pin", "mine"], "b": ["s1", "s2", "mine", "both"], "d": []}
    prefs = {
        "s1": ["b", "a"],  # b keeps s1: a's copy is spare
        "s2": ["d", "b", "a"],  # the leaving d is no keeper: b keeps it
        "only": ["a", "b"],  # a's only copy
        "pin": ["b", "a"],  # spare, but pinned
        "mine": ["a", "b"],  # a keeps it: b's copy is spare
        "both": ["c", "b"],  # b's only copy among the staying (c is not in the pool)
    }
    scores = {"s1": 5.0, "s2": 1.0, "only": 0.0, "pin": 0.0, "mine": 2.0, "both": 0.0}

    def holds(r: str, m: str) -> bool:
        return m in held.get(r, []) or (r, m) == ("d", "s2")

    spares = spare_copies(
        {"a": ["x"], "b": ["y"], "gone": ["z"]},
        ["a", "b"],
        held.__getitem__,
        scores.__getitem__,
        prefs.__getitem__,
        holds,
        pinned={"pin"},
    )
    assert spares == {"a": ["s2", "s1"], "b": ["mine"]}
    # never both copies of a model: each has a keeper that is on no list
    for model_id in {m for ms in spares.values() for m in ms}:
        assert {r for r in ("a", "b") if holds(r, model_id)} - {
            r for r, ms in spares.items() if model_id in ms
        }
    # a model being warmed on a home is not given up there; no spares, no entry
    assert spare_copies(
        {"a": ["s1"]}, ["a", "b"], held.__getitem__, scores.__getitem__, prefs.__getitem__, holds
    ) == {"a": ["s2"]}
    assert (
        spare_copies(
            {"a": ["x"]}, ["a"], held.__getitem__, scores.__getitem__, prefs.__getitem__, holds
        )
        == {}
    )


def test_the_handover_is_bounded() -> None:
    assert handover_bound_s(0.5, {}) == 0.0
    assert handover_bound_s(0.5, {"a": ["x", "y"], "b": ["z"]}) == 3.0
    assert handover_bound_s(10.0, {"a": ["x"] * 10}) == MAX_HANDOVER_S


def test_a_warm_may_start_only_on_a_free_slot_and_one_at_a_time() -> None:
    assert MAX_WARMING_LOADS == 1
    assert warm_may_start(in_flight=0, max_ongoing=4, warming=0)
    assert warm_may_start(in_flight=3, max_ongoing=4, warming=0)  # busy, not full
    assert not warm_may_start(in_flight=4, max_ongoing=4, warming=0)  # every slot taken
    assert not warm_may_start(in_flight=6, max_ongoing=4, warming=0)  # calls waiting
    assert not warm_may_start(in_flight=0, max_ongoing=4, warming=1)  # one runs already
    assert warm_may_start(in_flight=1, max_ongoing=4, warming=1, max_warming=2)


@pytest.mark.anyio
async def test_warm_turns_wait_for_a_free_slot_and_for_the_running_warm() -> None:
    turns = WarmTurns()
    in_flight = [2]
    started: list[str] = []

    async def warm(name: str) -> None:
        assert await turns.acquire(lambda: in_flight[0], 2, None)
        started.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(warm, "w1")
        tg.start_soon(warm, "w2")
        await anyio.wait_all_tasks_blocked()
        assert (started, turns.waiting) == ([], 2)  # both slots taken
        in_flight[0] = 1
        turns.wake()  # a call ended
        await anyio.wait_all_tasks_blocked()
        assert len(started) == 1 and repr(turns) == "<WarmTurns running=1/1 waiting=1>"
        turns.release()  # the first warm ended
        await anyio.wait_all_tasks_blocked()
        assert len(started) == 2 and turns.waiting == 0
    turns.release()
    assert turns.running == 0
    # no turn within the timeout: False, and not counted
    in_flight[0] = 2
    assert not await turns.acquire(lambda: in_flight[0], 2, 0.01)
    assert (turns.running, turns.waiting) == (0, 0)


def test_replicas_count_requests_per_model_within_a_bound() -> None:
    counts = RequestCounts(max_counted=4)
    for model_id in ["a", "a", "a", "b", "b", "c", "", "d"]:
        counts.count(model_id)
    assert counts.top(3) == {"a": 3, "b": 2, "c": 1}  # no id: not counted
    assert repr(counts) == "<RequestCounts ids=4/4>"
    counts.count("e")  # a fifth id: the less requested half goes
    assert counts.top() == {"a": 3, "b": 2}
    counts.count("c")  # a forgotten id counts from 0 again
    assert counts.top()["c"] == 1


def test_request_growth_is_what_a_replica_got_since_its_last_pong() -> None:
    seen: dict[str, int] = {}
    assert request_growth(seen, {"a": 5, "b": 1}) == {"a": 5, "b": 1}
    assert request_growth(seen, {"a": 8, "b": 1}) == {"a": 3}
    # "a" forgotten and counted again from 0; "b" no longer reported: kept
    assert request_growth(seen, {"a": 2, "c": 4}) == {"a": 2, "c": 4}
    assert seen == {"a": 2, "b": 1, "c": 4}


def test_a_batch_of_requests_scores_as_the_same_requests_one_by_one() -> None:
    batched, single = PopularitySketch(half_life=50), PopularitySketch(half_life=50)
    for model_id, n in [("a", 30), ("b", 7), ("a", 1), ("c", 120)]:
        batched.record(model_id, n)
        for _ in range(n):
            single.record(model_id)
    for model_id in "abc":
        assert batched.score(model_id) == pytest.approx(single.score(model_id), rel=1e-9)
    batched.record("d", 0)
    assert batched.score("d") == 0.0


def test_warming_ranks_by_the_higher_of_own_and_reported_counts() -> None:
    own, reported = PopularitySketch(), PopularitySketch()
    own.record("mine")
    assert warm_counts(own, None) is own
    assert warm_counts(own, reported) is own  # nothing reported yet
    # the pool's traffic, as the replicas count it, outranks this gateway's share
    reported.record("everyone's", 10)
    reported.record("mine", 2)
    counts = warm_counts(own, reported)
    assert [m for m, _ in counts.top(5)] == ["everyone's", "mine"]
    assert counts.score("mine") == reported.score("mine")
    # a model asked for since the replicas last reported still counts
    own.record("new since the last ping", 3)
    counts = warm_counts(own, reported)
    assert [m for m, _ in counts.top(5)] == ["everyone's", "new since the last ping", "mine"]
    assert [m for m, _ in counts.top(1)] == ["everyone's"]
    assert counts.score("new since the last ping") == own.score("new since the last ping")
    assert counts.score("never asked for") == 0.0
