"""Where handle calls from sync code run (muxgate.replicas._handle_loops), in process.

The calls themselves, through a gateway and replicas, are in
``tests/integration/test_handles_sync.py``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from waiting import wait_until_sync

from muxgate.replicas._handle_loops import (
    SyncCalls,
    loop_for_sync_caller,
    running_loop,
    sync_calls,
)


class Waited:
    """A response as SyncCalls sees it: something to cancel."""

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_abandon_cancels_what_the_thread_waits_for(loop: asyncio.AbstractEventLoop) -> None:
    calls = SyncCalls(loop)
    waited, other = Waited(), Waited()
    calls.waiting.add(waited)
    assert repr(calls) == "<SyncCalls waiting=1>"
    calls.abandon()
    assert (waited.cancelled, other.cancelled) == (True, False)
    assert repr(calls) == "<SyncCalls waiting=1 abandoned>"


def test_bound_calls_run_on_their_loop(loop: asyncio.AbstractEventLoop) -> None:
    calls = SyncCalls(loop)
    assert sync_calls() is None
    with calls.bound():
        assert sync_calls() is calls
        assert loop_for_sync_caller() is loop
    assert sync_calls() is None
    assert loop_for_sync_caller() is not loop


def test_background_loop_is_one_daemon_thread_shared_by_threads() -> None:
    found: list[asyncio.AbstractEventLoop] = []
    threads = [
        threading.Thread(target=lambda: found.append(loop_for_sync_caller())) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    found.append(loop_for_sync_caller())
    assert len({id(loop) for loop in found}) == 1
    wait_until_sync(found[0].is_running, what="the background loop to run")
    (thread,) = [t for t in threading.enumerate() if t.name == "muxgate-handles"]
    assert thread.daemon
    assert running_loop() is None  # this thread runs none


@pytest.mark.anyio
async def test_running_loop_is_the_callers() -> None:
    assert running_loop() is asyncio.get_running_loop()
