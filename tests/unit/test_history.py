"""The status page's history: counters -> samples -> bounded rings (pure, no sleeps)."""

from __future__ import annotations

import math

import pytest

from muxgate.gateway._history import (
    History,
    Totals,
    histogram_quantile,
    model_view,
    read_totals,
    sample_between,
)
from muxgate.gateway._metrics import GatewayMetrics

INF = math.inf


def test_histogram_quantile_is_linear_inside_a_bucket() -> None:
    buckets = {0.01: 50.0, 0.1: 90.0, 1.0: 100.0, INF: 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.01 + 0.09 * 0.5)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.1 + 0.9 * 0.9)
    assert histogram_quantile(0.5, {0.01: 0.0, INF: 0.0}) is None
    assert histogram_quantile(0.5, {}) is None
    # beyond the last finite bound: that bound
    assert histogram_quantile(0.99, {1.0: 10.0, INF: 100.0}) == 1.0


def test_a_sample_is_the_difference_of_two_readings() -> None:
    before = Totals(100, 1, hits=80, misses=20, loads=10, buckets={0.1: 100, INF: 100})
    now = Totals(300, 5, hits=230, misses=70, loads=30, buckets={0.1: 250, INF: 300})
    s = sample_between(before, now, 2.0, at=1000.0)
    assert s.time == 1000.0
    assert s.requests_per_s == 100.0
    assert s.errors_per_s == 2.0
    assert s.hit_ratio == pytest.approx(150 / 200)
    assert s.loads_per_s == 10.0
    assert s.p50_ms == pytest.approx(100 * 0.1 / 150 * 1000)  # rank 100 of 150 in [0, 0.1]
    assert s.p99_ms == pytest.approx(100.0)  # in +Inf: the last finite bound
    # nothing happened: no ratio, no latency; a counter that went down is no rate
    idle = sample_between(now, now, 2.0, at=1002.0)
    assert (idle.hit_ratio, idle.p50_ms, idle.requests_per_s) == (None, None, 0.0)
    assert sample_between(now, before, 2.0, at=1004.0).requests_per_s == 0.0


def test_history_keeps_a_bounded_ring_per_deployment() -> None:
    history = History(interval_s=2.0, keep_s=10.0)
    assert history.capacity == 5
    for i in range(9):
        history.record({"A": Totals(requests=10.0 * i), "B": Totals()}, now=100.0 + 2 * i)
    samples = history.samples("A")
    assert len(samples) == 5  # 8 intervals, the last 5 kept
    assert [s.time for s in samples] == [108.0, 110.0, 112.0, 114.0, 116.0]
    assert all(s.requests_per_s == 5.0 for s in samples)
    assert history.requests_since("A", 111.0) == pytest.approx(30.0)
    snap = history.snapshot()
    assert snap["interval_s"] == 2.0
    assert snap["deployments"]["A"]["time"] == [108.0, 110.0, 112.0, 114.0, 116.0]
    assert snap["deployments"]["A"]["requests_per_s"] == [5.0] * 5
    assert snap["deployments"]["B"]["hit_ratio"] == [None] * 5
    # a deployment not sampled yet has empty series
    assert history.snapshot(["C"])["deployments"]["C"]["time"] == []
    assert repr(history) == "<History every 2s, capacity 5, samples {'A': 5, 'B': 5}>"
    with pytest.raises(ValueError):
        History(interval_s=0)


def test_read_totals_takes_the_gateways_own_counters() -> None:
    metrics = GatewayMetrics()
    for status, seconds in ((200, 0.004), (200, 0.02), (503, 0.3)):
        metrics.observe_request("A", status, seconds)
    metrics.set_replica_counters(
        "A", "A#1", {"cache_hits": 7.0, "cache_misses": 3.0, "model_loads": 2.0}
    )
    totals = read_totals(metrics.registry)
    a = totals["A"]
    assert (a.requests, a.errors, a.hits, a.misses, a.loads) == (3.0, 1.0, 7.0, 3.0, 2.0)
    assert a.buckets[INF] == 3.0
    assert histogram_quantile(0.5, a.buckets) is not None


def test_model_view_ranks_by_popularity_with_holders_and_estimated_hits() -> None:
    snapshot = {
        "replicas": [
            {"id": "A#1", "models": ["cold", "hot"], "loading": []},
            {"id": "A#2", "models": ["hot"], "loading": ["new"]},
        ],
        "events": [
            {"time": 990.0, "kind": "load", "model": "hot", "replica": "A#1"},
            {"time": 995.0, "kind": "load", "model": "hot", "replica": "A#2"},
            {"time": 996.0, "kind": "load", "model": "cold", "replica": "A#1"},
            {"time": 500.0, "kind": "load", "model": "gone", "replica": "A#1"},  # before the window
            {"time": 997.0, "kind": "unload", "model": "old", "replica": "A#1"},
        ],
    }
    scores = {"hot": 75.0, "cold": 20.0, "new": 5.0}
    view = model_view(snapshot, lambda m: scores.get(m, 0.0), lambda since: 200.0, 1000.0, 300.0)
    assert [m["model_id"] for m in view] == ["hot", "cold", "new"]
    hot = view[0]
    assert hot == {
        "model_id": "hot",
        "share": 0.75,
        "requests": 150,
        "loads": 2,
        "hit_ratio": pytest.approx(1 - 2 / 150, abs=1e-4),
        "replicas": ["A#1", "A#2"],
        "loading_on": [],
    }
    assert view[2]["loading_on"] == ["A#2"] and view[2]["replicas"] == []
    assert (
        model_view(snapshot, lambda m: 1.0, lambda since: 0.0, 1000.0, 300.0, top=1)[0]["hit_ratio"]
        is None
    )
