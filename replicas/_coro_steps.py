"""Driving an awaitable one step at a time, with a hook around each step.

A coroutine runs in *steps*: from one resumption to its next suspension
(an ``await`` that yields to the event loop). Two things in a replica want
to see them: the CPU a load's own code costs (:mod:`muxgate.replicas._load_cpu`)
and the load steps that calls may wait out (:mod:`muxgate.replicas._load_steps`).
Both wrap the loader's awaitable in a generator that forwards every value,
exception and cancellation to it; this is that generator, once.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

__all__ = ["drive_steps"]


def drive_steps(
    steps: Generator[Any, Any, Any],
    before: Callable[[], None],
    after: Callable[[bool], None],
) -> Generator[Any, Any, Any]:
    """Forward to ``steps`` (an awaitable's ``__await__()``), calling
    ``before()`` ahead of each step and ``after(last)`` behind it, ``last``
    true for the step that returned or raised. Use with ``yield from``."""
    value: Any = None
    error: BaseException | None = None
    while True:
        before()
        try:
            yielded = steps.send(value) if error is None else steps.throw(error)
        except StopIteration as done:
            after(True)
            return done.value
        except BaseException:
            after(True)
            raise
        after(False)
        try:
            value, error = (yield yielded), None
        except GeneratorExit:
            steps.close()
            raise
        except BaseException as exc:  # thrown in (a cancellation): pass it on
            value, error = None, exc
