"""The pool's replica set on a fake clock: states, start backoff, liveness
(no processes, no sleeps)."""

from __future__ import annotations

import itertools

from fake_clock import FakeClock

from muxgate.gateway._replica_set import (
    BACKOFF_INITIAL_S,
    BACKOFF_MAX_S,
    DRAINING,
    PING_TIMEOUT_S,
    RUNNING,
    STARTING,
    ReplicaSet,
)


def make() -> tuple[ReplicaSet, FakeClock]:
    clock = FakeClock()
    return ReplicaSet("D", clock=clock), clock


def test_new_replicas_start_with_fresh_ids_and_are_counted_by_state() -> None:
    replicas, _ = make()
    a, b = replicas.add(), replicas.add("D#given")
    assert a.state == STARTING and a.id.startswith("D#") and a.id != b.id
    assert b.id == "D#given" and "D#given" in replicas and len(replicas) == 2
    replicas.running(a)
    assert replicas.counts() == {"starting": 1, "running": 1, "draining": 0, "stopping": 0}
    assert repr(replicas) == (
        "<ReplicaSet D starting=1 running=1 draining=0 stopping=0 failures=0>"
    )


def test_start_failures_back_off_doubling_up_to_the_cap() -> None:
    replicas, _ = make()
    assert replicas.missing(2) == 2 and replicas.is_starting(2, running=0)
    delays = [replicas.start_failed(replicas.add(), f"boom {i}") for i in range(8)]
    assert delays[:3] == [BACKOFF_INITIAL_S, 2 * BACKOFF_INITIAL_S, 4 * BACKOFF_INITIAL_S]
    assert all(b >= a for a, b in itertools.pairwise(delays))
    assert delays[-1] == BACKOFF_MAX_S
    assert len(replicas) == 0  # failed starts are forgotten
    assert replicas.last_failure == "boom 7"
    assert replicas.unavailable_reason() == "last start failure: boom 7"
    assert repr(replicas) == (
        "<ReplicaSet D starting=0 running=0 draining=0 stopping=0 failures=8 backoff=30.0s>"
    )


def test_nothing_starts_while_backing_off_and_starts_when_it_ends() -> None:
    replicas, clock = make()
    replicas.start_failed(replicas.add(), "boom")
    delay = replicas.start_failed(replicas.add(), "boom")
    assert delay == 2 * BACKOFF_INITIAL_S
    assert replicas.backoff_left() == delay
    assert replicas.missing(1) == 0
    assert not replicas.is_starting(1, running=0)  # requests fail fast meanwhile
    clock.now += delay - 0.01
    assert replicas.missing(1) == 0 and replicas.backoff_left() > 0
    assert "backoff=0.0s" in repr(replicas)
    clock.now += 0.01
    assert replicas.backoff_left() == 0 and replicas.missing(1) == 1
    assert replicas.is_starting(1, running=0)
    assert "backoff" not in repr(replicas)


def test_a_running_replica_resets_the_backoff_count() -> None:
    replicas, clock = make()
    replicas.start_failed(replicas.add(), "boom")
    clock.now += BACKOFF_INITIAL_S
    rep = replicas.add()
    assert replicas.is_starting(1, running=0)  # one is starting
    replicas.running(rep)
    assert replicas.failures == 0 and replicas.unavailable_reason() is None
    assert replicas.last_failure == "boom"  # still shown in /-/replicas
    assert replicas.start_failed(replicas.add(), "again") == BACKOFF_INITIAL_S


def test_a_running_replica_is_silent_after_the_ping_timeout() -> None:
    replicas, clock = make()
    rep = replicas.add()
    clock.now += 3 * PING_TIMEOUT_S
    assert not replicas.silent(rep)  # starting: no pings expected yet
    replicas.running(rep)
    clock.now += PING_TIMEOUT_S
    assert not replicas.silent(rep)
    clock.now += 0.01
    assert replicas.silent(rep)
    replicas.answered(rep)
    assert not replicas.silent(rep)
    clock.now += PING_TIMEOUT_S + 1
    rep.state = DRAINING
    assert not replicas.silent(rep)  # a drain is bounded by its own timeout


def test_scale_down_takes_starts_first_then_running_in_removal_order() -> None:
    replicas, _ = make()
    a, b, c = replicas.add("D#a"), replicas.add("D#b"), replicas.add("D#c")
    replicas.running(a)
    replicas.running(b)
    assert replicas.missing(2) == -1
    taken = replicas.scale_down(2, removal_order=["D#b", "D#a"])
    assert [(rep.id, was_running) for rep, was_running in taken] == [
        ("D#c", False),
        ("D#b", True),
    ]
    assert c.state == b.state == DRAINING and a.state == RUNNING
    assert replicas.missing(1) == 0
    assert repr(replicas) == (
        "<ReplicaSet D starting=0 running=1 draining=2 stopping=0 failures=0>"
    )
