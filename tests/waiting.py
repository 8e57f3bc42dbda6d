"""The tests' one way to wait until something is true.

For state that no event announces (a pool snapshot, a scrape, a process
that is not our child): the condition is re-checked every ``interval_s``
until it holds or the deadline passes. Where an event exists (the pool's
``wait_for``, an ``anyio.Event``), tests wait on it instead.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

__all__ = ["wait_until", "wait_until_sync"]


async def wait_until(
    check: Callable[[], Any | Awaitable[Any]],
    *,
    within_s: float = 10.0,
    what: str = "the condition",
    interval_s: float = 0.02,
) -> Any:
    """Re-check ``check()`` (sync or async) until it is truthy; its value.

    Raises:
        AssertionError: not true within ``within_s`` seconds (naming ``what``).
    """
    deadline = time.monotonic() + within_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s:g} s waiting for {what}")
        await anyio.sleep(interval_s)  # poll interval, not synchronisation


def wait_until_sync(
    check: Callable[[], Any],
    *,
    within_s: float = 10.0,
    what: str = "the condition",
    interval_s: float = 0.02,
) -> Any:
    """``wait_until`` for code outside an event loop (fixtures, threads)."""
    deadline = time.monotonic() + within_s
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s:g} s waiting for {what}")
        time.sleep(interval_s)
    return result
