"""The autoscaler loop of one deployment: sample load, decide, set the target.

The decision is the pure :func:`muxgate.gateway._policy.decide`; this module
is the edge around it. Every ``sample_interval_s`` the loop

1. samples the pool's load (requests in flight on replicas plus requests
   queued in the gateway: a queued request is load the replicas could not
   take, so it counts),
2. drops samples older than ``look_back_period_s``,
3. calls ``decide(window, config, state, now)`` with the injected clock,
4. and hands the result to ``pool.set_target(n)`` when it changed.

The loop samples more often than Ray's ``metrics_interval_s`` suggests (at
most every 0.5 s): the load is read from the gateway's own counters, so a
sample costs nothing, and a short period lets a burst be seen in time. The
delays (``upscale_delay_s``, ``downscale_delay_s``) still govern how fast the
target moves.

The pool may move the target itself: its activator raises a deployment at
zero to one replica the moment a request arrives (no sample needed). The
autoscaler adopts a target it did not set as its new state, so the two never
fight: the activator's replica stays until the policy has seen
``downscale_to_zero_delay_s`` of zero load again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from muxgate.gateway._policy import AutoscalingConfig, PolicyState, Sample, decide

__all__ = ["MAX_SAMPLE_INTERVAL_S", "Autoscaler", "ScalablePool"]

_log = logging.getLogger("muxgate.gateway.autoscaler")

#: the loop samples at least this often, whatever ``metrics_interval_s`` says
MAX_SAMPLE_INTERVAL_S = 0.5


class ScalablePool(Protocol):
    """What the autoscaler needs of a pool (``ReplicaPool`` has it)."""

    @property
    def name(self) -> str: ...

    @property
    def target(self) -> int: ...

    def load(self) -> tuple[int, int]:
        """``(in_flight, queued)`` right now."""
        ...

    def set_target(self, n: int) -> None: ...


class Autoscaler:
    """Samples one pool's load and moves its target with the policy.

    Args:
        pool: the pool to scale.
        config: the deployment's autoscaling config.
        clock: seconds, monotonic (injected for tests).
        sample_interval_s: sampling and decision period; default
            ``min(metrics_interval_s, MAX_SAMPLE_INTERVAL_S)``.
    """

    def __init__(
        self,
        pool: ScalablePool,
        config: AutoscalingConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        sample_interval_s: float | None = None,
    ) -> None:
        self.pool = pool
        self.config = config
        self._clock = clock
        self.sample_interval_s = (
            sample_interval_s
            if sample_interval_s is not None
            else min(config.metrics_interval_s, MAX_SAMPLE_INTERVAL_S)
        )
        self.state = PolicyState(target=pool.target)
        self.window: deque[Sample] = deque()
        self.decisions = 0

    def __repr__(self) -> str:
        last = self.window[-1] if self.window else None
        load = f"{last.in_flight}+{last.queued}" if last is not None else "-"
        return (
            f"<Autoscaler {self.pool.name} target={self.state.target}"
            f" [{self.config.min_replicas}..{self.config.max_replicas}]"
            f" samples={len(self.window)} last_load={load}>"
        )

    def sample(self) -> Sample:
        """Record the pool's load now and drop samples outside the look-back window."""
        now = self._clock()
        in_flight, queued = self.pool.load()
        sample = Sample(now, in_flight, queued)
        self.window.append(sample)
        horizon = now - self.config.look_back_period_s
        while self.window and self.window[0].timestamp < horizon:
            self.window.popleft()
        return sample

    def step(self) -> int:
        """Sample, decide, and set the pool's target if it changed; return it."""
        self.sample()
        current = self.pool.target
        if current != self.state.target:
            # Someone else (the activator) moved the target: start from it,
            # with fresh timers, instead of undoing it.
            self.state = PolicyState(target=current)
        target, self.state = decide(self.window, self.config, self.state, self._clock())
        self.decisions += 1
        if target != current:
            _log.info(
                "autoscaling %s: %d -> %d replicas (load %.1f over %d samples)",
                self.pool.name,
                current,
                target,
                self.mean_load(),
                len(self.window),
            )
            self.pool.set_target(target)
        return target

    def mean_load(self) -> float:
        """Mean (in-flight + queued) over the window."""
        if not self.window:
            return 0.0
        return sum(s.in_flight + s.queued for s in self.window) / len(self.window)

    async def run(self) -> None:
        """Step every ``sample_interval_s`` until cancelled.

        A failing step is logged and the loop goes on: a bug in one decision
        must not freeze the deployment's size for good.
        """
        while True:
            try:
                self.step()
            except Exception:
                _log.exception("autoscaler step of %s failed", self.pool.name)
            await asyncio.sleep(self.sample_interval_s)
