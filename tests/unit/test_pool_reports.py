"""What a deployment takes from its replicas' pongs: the load time and the
service interval the spill price uses."""

from __future__ import annotations

import pytest

from muxgate.gateway._pool_reports import ReplicaReports
from muxgate.gateway._replica_set import Replica
from muxgate.replicas.contract import Pong, ReplicaState


def pong(calls: float, busy: float, loads: float = 0.0, load_s: float = 0.0) -> Pong:
    counters = {
        "calls_finished": calls,
        "busy_seconds": busy,
        "model_loads": loads,
        "model_load_seconds_sum": load_s,
    }
    return Pong(state=ReplicaState(), counters=counters)


def test_each_pong_gives_the_service_interval_since_the_last_one() -> None:
    reports, rep = ReplicaReports("d"), Replica(id="r1")
    # Since start: 100 calls in 0.5 s busy, 10 of them loads (0.2 s in all).
    assert reports.pong(rep, pong(100, 0.5, 10, 0.2)) == pytest.approx(0.3 / 90)
    # Then 200 more calls in 0.6 s busy, 20 loads taking 0.5 s: 0.1 s / 180 hits.
    assert reports.pong(rep, pong(300, 1.1, 30, 0.7)) == pytest.approx(0.1 / 180)
    assert rep.calls_seen == (300, 1.1)
    assert rep.loads_seen == (30, 0.7)
    assert reports.pong(rep, pong(300, 1.1, 30, 0.7)) is None  # idle since: nothing to learn
    # The load time comes from the same pongs (0.02 s, then 0.025 s a load).
    first = 0.5 + 0.3 * (0.02 - 0.5)
    assert reports.load_time.value == pytest.approx(first + 0.3 * (0.025 - first))


def test_a_replica_without_call_counters_or_with_counters_gone_back_gives_nothing() -> None:
    reports, rep = ReplicaReports("d"), Replica(id="r1")
    older = Pong(state=ReplicaState(), counters={"model_loads": 3.0, "model_load_seconds_sum": 0.1})
    assert reports.pong(rep, older) is None
    reports.pong(rep, pong(100, 1.0))
    assert reports.pong(rep, pong(5, 0.1)) is None  # restarted under the same id
    assert reports.pong(rep, pong(105, 0.2)) == pytest.approx(0.1 / 100)
