"""Autoscaling policy: pure function of (window, config, state, now), fake clock."""

from __future__ import annotations

from collections import deque

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from muxgate.gateway._policy import (
    AutoscalingConfig,
    PolicyState,
    Sample,
    decide,
    desired_replicas,
)


class Driver:
    """Feeds one sample per tick through decide(), like the autoscaler loop."""

    def __init__(self, config: AutoscalingConfig, *, tick: float = 1.0) -> None:
        self.config = config
        self.state = PolicyState.initial(config)
        self.now = 0.0
        self.tick = tick
        self.window: deque[Sample] = deque()
        self.history: list[tuple[float, int]] = []

    @property
    def target(self) -> int:
        return self.state.target

    def step(self, in_flight: int, queued: int = 0) -> int:
        self.now += self.tick
        self.window.append(Sample(self.now, in_flight, queued))
        while self.window and self.window[0].timestamp < self.now - self.config.look_back_period_s:
            self.window.popleft()
        target, self.state = decide(list(self.window), self.config, self.state, self.now)
        assert target == self.state.target
        self.history.append((self.now, target))
        return target

    def run(self, seconds: float, in_flight: int, queued: int = 0) -> int:
        target = self.state.target
        for _ in range(round(seconds / self.tick)):
            target = self.step(in_flight, queued)
        return target


def cfg(**kwargs: object) -> AutoscalingConfig:
    base: dict[str, object] = {
        "min_replicas": 1,
        "max_replicas": 10,
        "target_ongoing_requests": 2,
        "upscale_delay_s": 5,
        "downscale_delay_s": 20,
        "look_back_period_s": 3,
    }
    base.update(kwargs)
    return msgspec.convert(base, AutoscalingConfig)


def test_defaults_match_ray_serve() -> None:
    c = AutoscalingConfig()
    assert c.target_ongoing_requests == 2
    assert c.upscale_delay_s == 30
    assert c.downscale_delay_s == 600
    assert c.look_back_period_s == 30
    assert c.downscale_to_zero_delay_s is None
    assert c.zero_delay_s == 600
    assert c.start_replicas == 1
    assert AutoscalingConfig(min_replicas=0, max_replicas=3, initial_replicas=2).start_replicas == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_replicas": -1}, "min_replicas must be >= 0"),
        ({"max_replicas": 0, "min_replicas": 0}, "max_replicas must be >= 1"),
        ({"min_replicas": 5, "max_replicas": 2}, r"min_replicas \(5\) must be <= max_replicas"),
        ({"initial_replicas": 11}, "initial_replicas"),
        ({"initial_replicas": 0}, "initial_replicas"),
        ({"target_ongoing_requests": 0}, "target_ongoing_requests must be > 0"),
        ({"upscale_delay_s": -1}, "upscale_delay_s must be >= 0"),
        ({"downscale_delay_s": -0.5}, "downscale_delay_s must be >= 0"),
        ({"downscale_to_zero_delay_s": -3}, "downscale_to_zero_delay_s must be >= 0"),
        ({"upscaling_factor": 0}, "upscaling_factor must be > 0"),
        ({"look_back_period_s": 0}, "look_back_period_s must be > 0"),
    ],
)
def test_config_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cfg(**kwargs)


def test_config_validation_through_msgspec_decode() -> None:
    with pytest.raises(msgspec.ValidationError, match="min_replicas"):
        msgspec.json.decode(b'{"min_replicas": 3, "max_replicas": 2}', type=AutoscalingConfig)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.json.decode(b'{"max_replicas": 2, "bogus": 1}', type=AutoscalingConfig)


def test_desired_replicas() -> None:
    c = cfg()
    assert desired_replicas(0, 3, c) == 1  # clamped to min
    assert desired_replicas(7, 3, c) == 4  # ceil(7 / 2)
    assert desired_replicas(1000, 3, c) == 10  # clamped to max
    smooth = cfg(upscaling_factor=0.5, downscaling_factor=0.5)
    assert desired_replicas(20, 2, smooth) == 6  # 2 + 0.5 * (10 - 2)
    assert desired_replicas(2.0, 9, smooth) == 5  # floor(9 - 0.5 * 8)
    assert desired_replicas(2.0, 2, smooth) == 1  # a small step still moves by one
    assert desired_replicas(0, 0, cfg(min_replicas=0)) == 0


def test_upscale_waits_for_sustained_demand() -> None:
    # Demand is first seen at t=1 (first tick), so it has lasted 5 s at t=6.
    d = Driver(cfg(upscale_delay_s=5, look_back_period_s=0.5))
    assert d.target == 1
    d.run(5, in_flight=8)
    assert d.target == 1
    d.step(in_flight=8)
    assert d.target == 4


def test_upscale_timer_resets_when_demand_stops() -> None:
    d = Driver(cfg(upscale_delay_s=5, look_back_period_s=0.5))
    d.run(5, in_flight=8)
    d.step(in_flight=2)  # agrees with the target again
    d.run(5, in_flight=8)
    assert d.target == 1
    d.step(in_flight=8)
    assert d.target == 4


def test_window_average_smooths_spikes() -> None:
    d = Driver(cfg(upscale_delay_s=0, look_back_period_s=10))
    d.run(9, in_flight=0)
    d.step(in_flight=10)  # mean over 10 samples = 1 -> 1 replica
    assert d.target == 1


def test_downscale_waits_for_delay() -> None:
    d = Driver(cfg(upscale_delay_s=0, downscale_delay_s=20, look_back_period_s=0.5))
    d.step(in_flight=16)
    assert d.target == 8
    d.run(20, in_flight=2)  # fewer wanted since t=2; 19 s at t=21
    assert d.target == 8
    d.step(in_flight=2)
    assert d.target == 1


@pytest.mark.parametrize("min_replicas", [2, 1], ids=["two", "one-never-zero"])
def test_never_below_min_replicas(min_replicas: int) -> None:
    d = Driver(cfg(min_replicas=min_replicas, downscale_delay_s=0, downscale_to_zero_delay_s=0))
    d.run(100, in_flight=0)
    assert d.target == min_replicas


def test_scale_to_zero_after_zero_delay() -> None:
    c = cfg(
        min_replicas=0,
        initial_replicas=3,
        upscale_delay_s=0,
        downscale_delay_s=10,
        downscale_to_zero_delay_s=30,
        look_back_period_s=0.5,
    )
    d = Driver(c)
    d.run(11, in_flight=0)
    assert d.target == 1  # downscale_delay_s brings it to 1, not 0
    d.run(19, in_flight=0)
    assert d.target == 1  # idle since t=1, now t=30
    d.step(in_flight=0)
    assert d.target == 0  # 30 s idle


def test_zero_needs_continuous_idleness() -> None:
    c = cfg(
        min_replicas=0,
        initial_replicas=1,
        downscale_delay_s=1,
        downscale_to_zero_delay_s=10,
        look_back_period_s=0.5,
    )
    d = Driver(c)
    d.run(9, in_flight=0)
    d.step(in_flight=1)  # one request at t=10: the idle clock restarts at t=11
    d.run(10, in_flight=0)
    assert d.target == 1
    d.step(in_flight=0)
    assert d.target == 0


def test_scale_from_zero_is_immediate_when_queued() -> None:
    c = cfg(min_replicas=0, upscale_delay_s=60, look_back_period_s=30)
    d = Driver(c)
    d.run(40, in_flight=0)
    assert d.target == 0
    d.step(in_flight=0, queued=1)
    assert d.target == 1  # no upscale delay from zero
    d.run(5, in_flight=0, queued=20)
    assert d.target == 1  # further steps obey upscale_delay_s


def test_target_clamped_when_config_changes() -> None:
    state = PolicyState(target=12)
    target, new = decide([Sample(0.0, 0, 0)], cfg(max_replicas=5), state, 0.0)
    assert target == 5 and new.target == 5


def test_empty_window_holds() -> None:
    state = PolicyState(target=3, downscale_since=1.0)
    assert decide([], cfg(), state, 10.0) == (3, state)
    # Samples older than the look-back period do not count.
    assert decide([Sample(0.0, 100, 0)], cfg(look_back_period_s=3), state, 10.0) == (3, state)


@settings(max_examples=60, deadline=None)
@given(
    min_replicas=st.integers(0, 3),
    extra=st.integers(0, 6),
    upscale_delay=st.sampled_from([0, 2, 5]),
    downscale_delay=st.sampled_from([0, 3, 10]),
    zero_delay=st.sampled_from([None, 0, 4, 15]),
    loads=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 10)), min_size=1, max_size=80),
)
def test_policy_invariants(
    min_replicas: int,
    extra: int,
    upscale_delay: int,
    downscale_delay: int,
    zero_delay: int | None,
    loads: list[tuple[int, int]],
) -> None:
    c = cfg(
        min_replicas=min_replicas,
        max_replicas=max(1, min_replicas + extra),
        upscale_delay_s=upscale_delay,
        downscale_delay_s=downscale_delay,
        downscale_to_zero_delay_s=zero_delay,
        look_back_period_s=2,
    )
    d = Driver(c)
    last_change = 0.0
    previous = d.target
    idle_since: float | None = 0.0
    for in_flight, queued in loads:
        before_state = d.state
        target = d.step(in_flight, queued)
        load = in_flight + queued
        if load:
            idle_since = None
        elif idle_since is None:
            idle_since = d.now
        assert c.min_replicas <= target <= c.max_replicas
        if target > previous:
            if previous == 0:
                assert queued + in_flight > 0 or upscale_delay == 0 or d.now >= upscale_delay
            else:
                # Demand must have been sustained for upscale_delay_s.
                assert before_state.upscale_since is not None or upscale_delay == 0
                since = before_state.upscale_since if before_state.upscale_since else d.now
                assert d.now - since >= upscale_delay
        elif target < previous:
            if target == 0:
                assert c.min_replicas == 0
                assert previous == 1
                assert load == 0 and idle_since is not None
                assert d.now - idle_since >= c.zero_delay_s - 1e-9 - d.tick
            else:
                since = before_state.downscale_since
                if downscale_delay:
                    assert since is not None and d.now - since >= downscale_delay
        if target != previous:
            last_change = d.now
        previous = target
    assert last_change <= d.now
