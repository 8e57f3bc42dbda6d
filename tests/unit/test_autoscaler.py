"""The autoscaler loop with a fake clock and a fake pool (no processes, no
sleeps as synchronisation), and autoscaling config validation at load."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fake_clock import FakeClock

from muxgate.gateway._autoscaler import MAX_SAMPLE_INTERVAL_S, Autoscaler
from muxgate.gateway._config import parse_config
from muxgate.gateway._errors import ConfigError
from muxgate.gateway._policy import AutoscalingConfig


class FakePool:
    name = "D"

    def __init__(self, target: int) -> None:
        self.target = target
        self.in_flight = 0
        self.queued = 0
        self.targets: list[int] = []

    def load(self) -> tuple[int, int]:
        return self.in_flight, self.queued

    def set_target(self, n: int) -> None:
        self.targets.append(n)
        self.target = n


def config(**kw: Any) -> AutoscalingConfig:
    base: dict[str, Any] = {
        "min_replicas": 0,
        "max_replicas": 4,
        "target_ongoing_requests": 2,
        "upscale_delay_s": 1.0,
        "downscale_delay_s": 3.0,
        "downscale_to_zero_delay_s": 5.0,
        "look_back_period_s": 2.0,
        "metrics_interval_s": 0.5,
    }
    base.update(kw)
    return AutoscalingConfig(**base)


def run_for(scaler: Autoscaler, clock: FakeClock, seconds: float) -> None:
    """Step the loop as its run() would, on the fake clock."""
    end = clock.now + seconds
    while clock.now < end - 1e-9:
        clock.now += scaler.sample_interval_s
        scaler.step()


def test_scales_up_after_the_delay_and_down_to_min() -> None:
    clock = FakeClock()
    pool = FakePool(target=1)
    scaler = Autoscaler(pool, config(min_replicas=1), clock=clock)
    assert scaler.sample_interval_s == 0.5
    pool.in_flight, pool.queued = 4, 4  # load 8 -> 4 replicas wanted
    run_for(scaler, clock, 0.5)
    assert pool.target == 1  # not before upscale_delay_s
    run_for(scaler, clock, 1.5)
    assert pool.target == 4
    assert pool.targets == [4]
    pool.in_flight, pool.queued = 0, 0
    run_for(scaler, clock, 2.0)
    assert pool.target == 4  # the window still holds the burst, then the delay runs
    run_for(scaler, clock, 5.0)
    assert pool.target == 1  # min_replicas, never below
    assert "target=1" in repr(scaler) and "[1..4]" in repr(scaler)


def test_queued_requests_count_as_load() -> None:
    clock = FakeClock()
    pool = FakePool(target=1)
    scaler = Autoscaler(pool, config(upscale_delay_s=0.0), clock=clock)
    pool.queued = 6  # nothing in flight: replicas are busy loading, say
    run_for(scaler, clock, 0.5)
    assert pool.target == 3


def test_scale_to_zero_waits_for_the_zero_delay() -> None:
    clock = FakeClock()
    pool = FakePool(target=1)
    scaler = Autoscaler(pool, config(), clock=clock)
    run_for(scaler, clock, 4.5)
    assert pool.target == 1
    run_for(scaler, clock, 1.0)
    assert pool.target == 0


def test_from_zero_a_queued_request_scales_at_once() -> None:
    clock = FakeClock()
    pool = FakePool(target=0)
    scaler = Autoscaler(pool, config(upscale_delay_s=60.0), clock=clock)
    run_for(scaler, clock, 2.0)
    assert pool.targets == []
    pool.queued = 1
    run_for(scaler, clock, 0.5)
    assert pool.target == 1  # no upscale delay from zero


def test_adopts_the_activators_target() -> None:
    clock = FakeClock()
    pool = FakePool(target=0)
    scaler = Autoscaler(pool, config(), clock=clock)
    run_for(scaler, clock, 1.0)
    # The pool's activator raised the target between two samples; the
    # request it was raised for has already been served (load 0 again).
    pool.target = 1
    run_for(scaler, clock, 4.5)
    assert pool.target == 1  # kept for the zero delay, counted from adoption
    assert scaler.state.target == 1
    run_for(scaler, clock, 1.0)
    assert pool.targets == [0]


def test_sample_window_is_bounded_by_look_back() -> None:
    clock = FakeClock()
    pool = FakePool(target=1)
    scaler = Autoscaler(pool, config(min_replicas=1, look_back_period_s=2.0), clock=clock)
    run_for(scaler, clock, 30.0)
    assert len(scaler.window) <= 2.0 / scaler.sample_interval_s + 1
    assert scaler.decisions == 60


def test_sample_interval_is_short_even_for_a_long_metrics_interval() -> None:
    pool = FakePool(target=1)
    scaler = Autoscaler(pool, config(metrics_interval_s=10.0))
    assert scaler.sample_interval_s == MAX_SAMPLE_INTERVAL_S
    fast = Autoscaler(pool, config(metrics_interval_s=0.1))
    assert fast.sample_interval_s == 0.1


@pytest.mark.anyio
async def test_run_loop_survives_a_failing_step() -> None:
    scaled = asyncio.Event()

    class Flaky(FakePool):
        calls = 0

        def set_target(self, n: int) -> None:
            super().set_target(n)
            scaled.set()

        def load(self) -> tuple[int, int]:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("boom")
            return 8, 0

    pool = Flaky(target=1)
    scaler = Autoscaler(pool, config(upscale_delay_s=0.0), sample_interval_s=0.001)
    task = asyncio.ensure_future(scaler.run())
    try:
        async with asyncio.timeout(5):
            await scaled.wait()
        assert pool.target == 4
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert pool.calls >= 2


@pytest.mark.parametrize(
    ("autoscaling", "where", "what"),
    [
        ({"min_replicas": 3, "max_replicas": 1}, "autoscaling", "must be <= max_replicas"),
        (
            {"min_replicas": 0, "max_replicas": 2, "initial_replicas": 3},
            "autoscaling",
            "initial_replicas (3) must be between",
        ),
        ({"max_replicas": 0}, "autoscaling", "max_replicas must be >= 1"),
        ({"target_ongoing_requests": 0}, "autoscaling", "target_ongoing_requests"),
        ({"max_replicas": "x"}, "autoscaling.max_replicas", "Expected `int`"),
        ({"bogus": 1}, "autoscaling", "unknown field `bogus`"),
    ],
)
def test_invalid_autoscaling_config_names_the_field(
    autoscaling: dict[str, Any], where: str, what: str
) -> None:
    data = {"deployments": [{"name": "A", "import_path": "m:A", "autoscaling": autoscaling}]}
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="app.yaml")
    message = str(info.value)
    assert message.startswith("app.yaml: ")
    assert f"$.deployments[0].{where}" in message
    assert what in message


def test_routing_defaults_come_from_the_simulation() -> None:
    dep: dict[str, Any] = {"name": "A", "import_path": "m:A"}
    routing = parse_config({"deployments": [dep]}).deployments[0].routing
    assert routing.balance_factor == 3.0
    assert routing.min_capacity is None
    assert routing.queue_affinity_wait_s is None
    with pytest.raises(ConfigError, match=r"routing\.min_capacity"):
        parse_config({"deployments": [{**dep, "routing": {"min_capacity": 0}}]})
