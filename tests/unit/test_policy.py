"""Autoscaling policy: pure function of (window, config, state, now), fake clock."""

from __future__ import annotations

import math
from collections import deque
from fractions import Fraction

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
    assert c.smoothing_factor == 1.0
    assert c.upscaling_factor is None and c.downscaling_factor is None
    assert c.up_factor == c.down_factor == 1.0
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
        ({"downscaling_factor": -0.5}, "downscaling_factor must be > 0"),
        ({"smoothing_factor": 0}, "smoothing_factor must be > 0"),
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
    with pytest.raises(msgspec.ValidationError, match="downscaling_factor must be > 0"):
        msgspec.json.decode(b'{"downscaling_factor": 0}', type=AutoscalingConfig)


def test_scaling_factors_default_to_smoothing_factor() -> None:
    c = msgspec.json.decode(
        b'{"smoothing_factor": 0.5, "upscaling_factor": null, "downscaling_factor": null}',
        type=AutoscalingConfig,
    )
    assert c.upscaling_factor is None and c.downscaling_factor is None
    assert c.up_factor == c.down_factor == 0.5
    c = cfg(smoothing_factor=0.5, upscaling_factor=2)
    assert (c.up_factor, c.down_factor) == (2.0, 0.5)
    c = cfg(downscaling_factor=0.25)
    assert (c.up_factor, c.down_factor) == (1.0, 0.25)


def test_desired_replicas() -> None:
    c = cfg()
    assert desired_replicas(0, 3, c) == 1  # clamped to min
    assert desired_replicas(7, 3, c) == 4  # ceil(7 / 2)
    assert desired_replicas(1000, 3, c) == 10  # clamped to max
    smooth = cfg(upscaling_factor=0.5, downscaling_factor=0.5)
    assert desired_replicas(20, 2, smooth) == 6  # ceil(2 * (1 + (5 - 1) * 0.5))
    assert desired_replicas(2.0, 9, smooth) == 5  # ceil(9 * (1 + (1/9 - 1) * 0.5))
    assert desired_replicas(2.0, 2, smooth) == 1  # ceil(1.5) = 2 is stuck: one step down
    assert desired_replicas(0, 0, cfg(min_replicas=0)) == 0
    assert desired_replicas(5, 0, cfg(min_replicas=0)) == 3  # from zero: ceil(5 / 2)


def ray_cfg(**kwargs: object) -> AutoscalingConfig:
    """target_ongoing_requests=1, so the load is the unsmoothed replica count."""
    return cfg(target_ongoing_requests=1, max_replicas=30, **kwargs)


@pytest.mark.parametrize(
    ("load", "current", "kwargs", "expected"),
    [
        # Down: ceil(current * (1 + (load / current - 1) * factor)).
        (6, 10, {"downscaling_factor": 1.5}, 4),  # ceil(10 * 0.4); overshoots ceil(6)
        (2, 10, {"downscaling_factor": 0.5}, 6),  # ceil(10 * 0.6)
        (3, 10, {"downscaling_factor": 0.5}, 7),  # ceil(10 * 0.65) = ceil(6.5), not floor
        (9, 10, {"downscaling_factor": 0.5}, 9),  # ceil(9.5) = 10 is stuck: 10 - 1
        (9.5, 10, {"downscaling_factor": 0.5}, 10),  # ceil(9.5) = 10 replicas are wanted
        (0, 10, {"downscaling_factor": 2}, 1),  # ceil(10 * -1), clamped to min_replicas
        (0, 1, {"downscaling_factor": 0.5, "min_replicas": 0}, 0),  # stuck at 1: to 0
        (2, 10, {"smoothing_factor": 0.5}, 6),  # None falls back to smoothing_factor
        (2, 10, {"smoothing_factor": 0.5, "downscaling_factor": 1}, 2),
        (2, 10, {"smoothing_factor": 0.5, "upscaling_factor": 1}, 6),
        # Up: same formula with upscaling_factor.
        (12, 4, {"upscaling_factor": 0.5}, 8),  # ceil(4 * (1 + 2 * 0.5))
        (12, 4, {"upscaling_factor": 0.3}, 7),  # ceil(4 * 1.6) = ceil(6.4)
        (12, 4, {"upscaling_factor": 2}, 20),  # ceil(4 * 5)
        (12, 4, {"upscaling_factor": 3}, 28),  # ceil(4 * 7): overshoots ceil(12)
        (12, 4, {"smoothing_factor": 0.5}, 8),
        (12, 4, {"smoothing_factor": 0.5, "downscaling_factor": 1}, 8),
        (12, 4, {"smoothing_factor": 0.5, "upscaling_factor": 1}, 12),
        (4.5, 4, {"upscaling_factor": 0.1}, 5),  # ceil(4.05): any demand adds one
        (100, 4, {"upscaling_factor": 0.5}, 30),  # ceil(52), clamped to max_replicas
        # Factor 1: straight to ceil(load / target), without float noise.
        (1, 9, {}, 1),  # 9 * (1 + (1/9 - 1)) == 1.0000000000000004 in floats
        (29, 7, {}, 29),
        (7.5, 3, {}, 8),
    ],
)
def test_desired_replicas_ray_formula(
    load: float, current: int, kwargs: dict[str, object], expected: int
) -> None:
    assert desired_replicas(load, current, ray_cfg(**kwargs)) == expected


def ray_desired(load: int, current: int, target: Fraction, up: Fraction, down: Fraction) -> int:
    """Ray Serve's rule in exact arithmetic, with min_replicas=0 and max_replicas=1000."""
    error_ratio = load / (target * current)
    factor = up if error_ratio >= 1 else down
    desired = math.ceil(current * (1 + (error_ratio - 1) * factor))
    if math.ceil(current * error_ratio) < current and desired == current:
        desired -= 1
    return max(0, min(1000, desired))


FACTORS = ["0.1", "0.3", "0.5", "0.7", "1", "1.5", "2"]


@settings(max_examples=300, deadline=None)
@given(
    load=st.integers(0, 500),
    current=st.integers(1, 100),
    target=st.sampled_from(["0.5", "1", "1.5", "2", "2.5", "3", "10"]),
    up=st.sampled_from(FACTORS),
    down=st.sampled_from(FACTORS),
)
def test_desired_replicas_matches_ray_exactly(
    load: int, current: int, target: str, up: str, down: str
) -> None:
    c = cfg(
        min_replicas=0,
        max_replicas=1000,
        target_ongoing_requests=float(target),
        upscaling_factor=float(up),
        downscaling_factor=float(down),
    )
    expected = ray_desired(load, current, Fraction(target), Fraction(up), Fraction(down))
    assert desired_replicas(load, current, c) == expected


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


def test_smoothed_downscale_steps() -> None:
    c = cfg(downscale_delay_s=0, downscaling_factor=0.5, initial_replicas=8, look_back_period_s=0.5)
    d = Driver(c)
    d.run(4, in_flight=0)
    assert [target for _, target in d.history] == [4, 2, 1, 1]


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
    up_factor=st.sampled_from([None, 0.5, 2.0]),
    down_factor=st.sampled_from([None, 0.3, 1.5]),
    loads=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 10)), min_size=1, max_size=80),
)
def test_policy_invariants(
    min_replicas: int,
    extra: int,
    upscale_delay: int,
    downscale_delay: int,
    zero_delay: int | None,
    up_factor: float | None,
    down_factor: float | None,
    loads: list[tuple[int, int]],
) -> None:
    c = cfg(
        min_replicas=min_replicas,
        max_replicas=max(1, min_replicas + extra),
        upscale_delay_s=upscale_delay,
        downscale_delay_s=downscale_delay,
        downscale_to_zero_delay_s=zero_delay,
        upscaling_factor=up_factor,
        downscaling_factor=down_factor,
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
                down_since = before_state.downscale_since
                if downscale_delay:
                    assert down_since is not None and d.now - down_since >= downscale_delay
        if target != previous:
            last_change = d.now
        previous = target
    assert last_change <= d.now
