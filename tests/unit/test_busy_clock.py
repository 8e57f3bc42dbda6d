"""The replica's call counters: calls finished and busy seconds."""

from __future__ import annotations

import pytest

from muxgate.replicas._busy import BusyClock
from muxgate.replicas._counters import (
    BUSY_SECONDS_KEY,
    CALLS_FINISHED_KEY,
    REPLICA_COUNTER_KEYS,
)
from tests.fake_clock import FakeClock


def test_busy_time_counts_overlapping_calls_once_and_idle_time_never() -> None:
    clock = FakeClock()
    busy = BusyClock(clock)
    busy.started()
    clock.now += 1.0
    busy.started()  # overlaps the first
    clock.now += 0.5
    busy.finished()
    clock.now += 0.5
    assert busy.busy_s() == pytest.approx(2.0)  # the open period counts so far
    busy.finished()
    clock.now += 10.0  # idle
    busy.started()
    clock.now += 0.25
    busy.finished()
    assert busy.counters() == {CALLS_FINISHED_KEY: 3.0, BUSY_SECONDS_KEY: pytest.approx(2.25)}
    assert repr(busy) == "<BusyClock in_flight=0 calls_finished=3 busy=2.250s>"


def test_an_unmatched_finish_counts_nothing() -> None:
    busy = BusyClock(FakeClock())
    busy.finished()
    assert busy.counters() == {CALLS_FINISHED_KEY: 0.0, BUSY_SECONDS_KEY: 0.0}


def test_call_counters_are_reported_counters() -> None:
    assert {CALLS_FINISHED_KEY, BUSY_SECONDS_KEY} <= set(REPLICA_COUNTER_KEYS)
