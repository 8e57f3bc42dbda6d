"""Autoscaling policy: a pure function of (metrics window, config, state, now).

Field names and meanings follow Ray Serve's ``AutoscalingConfig``. The
autoscaler (gateway side) samples the deployment's load, calls :func:`decide`
every ``metrics_interval_s`` with an injected clock, and starts or drains
replicas to reach the returned target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import msgspec

__all__ = ["AutoscalingConfig", "PolicyState", "Sample", "decide", "desired_replicas"]

# Float error tolerated when rounding a replica count up (far below any real
# fractional load: loads are means of integer samples).
_ROUNDING_SLACK = 1e-9


class AutoscalingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Autoscaling settings of one deployment (Ray Serve's field names).

    Attributes:
        min_replicas: Lower bound; 0 allows scale to zero.
        max_replicas: Upper bound (>= 1).
        initial_replicas: Replicas at start; defaults to ``min_replicas``.
        target_ongoing_requests: Desired (in-flight + queued) requests per replica.
        upscale_delay_s: How long more replicas must be wanted before adding them.
        downscale_delay_s: How long fewer replicas must be wanted before removing them.
        downscale_to_zero_delay_s: How long the deployment must be idle before its
            last replica is removed; defaults to ``downscale_delay_s``.
        smoothing_factor: Default of both scaling factors below.
        upscaling_factor: Multiplier on each upscale step (smoothing); 1.0 jumps
            straight to the desired count. None: ``smoothing_factor``.
        downscaling_factor: Multiplier on each downscale step. None:
            ``smoothing_factor``.
        look_back_period_s: Window over which load samples are averaged.
        metrics_interval_s: How often the autoscaler samples and decides.
    """

    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    downscale_to_zero_delay_s: float | None = None
    smoothing_factor: float = 1.0
    upscaling_factor: float | None = None
    downscaling_factor: float | None = None
    look_back_period_s: float = 30.0
    metrics_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            raise ValueError(f"min_replicas must be >= 0, got {self.min_replicas}")
        if self.max_replicas < 1:
            raise ValueError(f"max_replicas must be >= 1, got {self.max_replicas}")
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError(
                f"initial_replicas ({self.initial_replicas}) must be between min_replicas "
                f"({self.min_replicas}) and max_replicas ({self.max_replicas})"
            )
        if not self.target_ongoing_requests > 0:
            raise ValueError(
                f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}"
            )
        for name in ("upscale_delay_s", "downscale_delay_s", "downscale_to_zero_delay_s"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name in ("smoothing_factor", "upscaling_factor", "downscaling_factor"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name in ("look_back_period_s", "metrics_interval_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")

    @property
    def start_replicas(self) -> int:
        """Replicas to start with: ``initial_replicas`` or ``min_replicas``."""
        return self.initial_replicas if self.initial_replicas is not None else self.min_replicas

    @property
    def zero_delay_s(self) -> float:
        """Effective ``downscale_to_zero_delay_s``."""
        if self.downscale_to_zero_delay_s is None:
            return self.downscale_delay_s
        return self.downscale_to_zero_delay_s

    @property
    def up_factor(self) -> float:
        """Effective ``upscaling_factor``."""
        if self.upscaling_factor is None:
            return self.smoothing_factor
        return self.upscaling_factor

    @property
    def down_factor(self) -> float:
        """Effective ``downscaling_factor``."""
        if self.downscaling_factor is None:
            return self.smoothing_factor
        return self.downscaling_factor


class Sample(NamedTuple):
    """One load sample of a deployment."""

    timestamp: float
    in_flight: int  # requests sent to replicas, not yet answered
    queued: int  # requests waiting in the gateway queue


class PolicyState(msgspec.Struct, frozen=True, kw_only=True):
    """What :func:`decide` remembers between calls.

    Attributes:
        target: Current target replica count.
        upscale_since: When more replicas started being wanted (continuously), or None.
        downscale_since: When fewer replicas started being wanted (continuously), or None.
        idle_since: Since when every decision saw zero load (continuously), or None.
    """

    target: int
    upscale_since: float | None = None
    downscale_since: float | None = None
    idle_since: float | None = None

    @classmethod
    def initial(cls, config: AutoscalingConfig) -> PolicyState:
        """The state at start: target = ``config.start_replicas``."""
        return cls(target=config.start_replicas)


def _ceil(x: float) -> int:
    """``ceil`` that ignores float rounding noise (``3.0000000000000004`` -> 3)."""
    return math.ceil(x - _ROUNDING_SLACK)


def desired_replicas(load: float, current: int, config: AutoscalingConfig) -> int:
    """Replicas wanted for an average ``load`` (in-flight + queued), clamped.

    Ray Serve's rule: from ``current`` replicas, ``error_ratio = load /
    (target_ongoing_requests * current)``; the factor is the effective
    ``upscaling_factor`` when ``error_ratio >= 1``, else the effective
    ``downscaling_factor``; ``desired = ceil(current * (1 + (error_ratio - 1) *
    factor))``. When a factor below 1 would hold a downscale at ``current``
    although ``ceil(load / target_ongoing_requests) < current``, desired is
    ``current - 1`` (so smoothing never blocks scaling down, to zero included).
    From 0 replicas, ``desired = ceil(load / target_ongoing_requests)``.
    The result is clamped to ``[min_replicas, max_replicas]``.

    The step is computed as ``current + factor * (raw - current)`` with ``raw =
    load / target_ongoing_requests`` (the same number) and rounded up ignoring
    float noise, so that e.g. load 1 on 9 replicas wants 1 replica, not 2.
    """
    raw = load / config.target_ongoing_requests
    wanted = _ceil(raw)
    if current > 0:
        factor = config.up_factor if raw >= current else config.down_factor
        stepped = _ceil(current + factor * (raw - current))
        if stepped == current and wanted < current:
            stepped -= 1
        wanted = stepped
    return max(config.min_replicas, min(config.max_replicas, wanted))


def decide(
    window: Sequence[Sample],
    config: AutoscalingConfig,
    state: PolicyState,
    now: float,
) -> tuple[int, PolicyState]:
    """Return the target replica count and the new state.

    Algorithm:

    1. Keep the samples with ``timestamp >= now - look_back_period_s``; with
       none, hold the current target (no information is not zero load).
    2. ``desired`` from ``mean(in_flight + queued)`` and the target by Ray
       Serve's rule, smoothed by the up/down scaling factors, clamped to
       ``[min_replicas, max_replicas]`` (see :func:`desired_replicas`).
    3. A target outside ``[min, max]`` (config changed) is clamped at once.
    4. From zero: if the newest sample has any request in flight or queued,
       go to ``max(1, desired)`` at once, with no delay (activator-style).
    5. Up: once ``desired > target`` has held continuously for
       ``upscale_delay_s``, target = desired.
    6. Down: once ``desired < target`` has held continuously for
       ``downscale_delay_s``, target = max(desired, 1). The last step, 1 -> 0,
       needs instead ``downscale_to_zero_delay_s`` of continuous zero load
       (every sample of every window 0) and ``min_replicas == 0``.
    7. Whenever desired agrees with the target, or flips direction, the other
       direction's timer resets.
    """
    target = max(config.min_replicas, min(config.max_replicas, state.target))
    if target != state.target:
        return target, PolicyState(target=target)

    start = now - config.look_back_period_s
    recent = [s for s in window if s.timestamp >= start and s.timestamp <= now]
    if not recent:
        return target, state
    load = sum(s.in_flight + s.queued for s in recent) / len(recent)
    desired = desired_replicas(load, target, config)

    newest = max(recent, key=lambda s: s.timestamp)
    if target == 0 and newest.in_flight + newest.queued > 0:
        return max(1, desired), PolicyState(target=max(1, desired))

    idle = state.idle_since if state.idle_since is not None else now
    idle_since = idle if load == 0 else None

    if desired > target:
        since = state.upscale_since if state.upscale_since is not None else now
        if now - since >= config.upscale_delay_s:
            return desired, PolicyState(target=desired)
        return target, PolicyState(target=target, upscale_since=since)

    if desired < target:
        since = state.downscale_since if state.downscale_since is not None else now
        if target == 1:
            # desired == 0: clamping allows it only when min_replicas == 0, and
            # load == 0 in every sample of the window.
            if idle_since is not None and now - idle_since >= config.zero_delay_s:
                return 0, PolicyState(target=0)
        elif now - since >= config.downscale_delay_s:
            new_target = max(desired, 1)
            return new_target, PolicyState(target=new_target, idle_since=idle_since)
        return target, PolicyState(target=target, downscale_since=since, idle_since=idle_since)

    return target, PolicyState(target=target, idle_since=idle_since)
