"""What a replica warms and in which order (pure functions), and the
popularity ranking they read."""

from __future__ import annotations

from muxgate.gateway._popularity import PopularitySketch
from muxgate.gateway._warming import after_zero


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
