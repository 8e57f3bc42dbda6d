"""A clock the test moves by hand, for the seams that take ``clock=``
(monotonic seconds): ``clock.now += 2.5`` is two and a half seconds later."""

from __future__ import annotations

__all__ = ["FakeClock"]


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
