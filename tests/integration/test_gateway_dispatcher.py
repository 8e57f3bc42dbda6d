"""Dispatcher logic with fake replicas injected at its ``targets`` seam
(no processes: these are unit tests of queueing, rerouting and errors)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from muxgate.gateway._connection import ReplicaDiedError, ReplicaUnavailableError
from muxgate.gateway._dispatch import Dispatcher, validate_model_id
from muxgate.gateway._errors import (
    BadModelIdError,
    DeadlineExceededError,
    DeploymentError,
    NoReplicaError,
    OverCapacityError,
    ReplicaFailedError,
)
from muxgate.gateway._router import Router
from muxgate.replicas._protocol import ErrorInfo, HttpRequest, ReplicaState, Reply

pytestmark = pytest.mark.anyio

HTTP = HttpRequest(method="GET", path="/", query="", headers=[], body=b"")


class FakeReplica:
    """A ``Target``: records calls; optionally blocks on a gate or fails."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[dict[str, Any]] = []
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None
        self.error: ErrorInfo | None = None

    async def call(self, **kwargs: Any) -> Reply:
        self.calls.append(kwargs)
        if self.fail is not None:
            raise self.fail
        if self.gate is not None:
            await self.gate.wait()
        return Reply(id=1, state=ReplicaState(), body=self.name.encode(), error=self.error)


class FakeMetrics:
    def __init__(self) -> None:
        self.queue: list[int] = []
        self.spills = 0

    def set_queue_length(self, deployment: str, n: int) -> None:
        self.queue.append(n)

    def count_spillover(self, deployment: str, model_id: str = "") -> None:
        self.spills += 1


def make(
    names: list[str], *, max_ongoing: int = 1, max_queued: int = 10, starting: bool = False
) -> tuple[Dispatcher, dict[str, FakeReplica], FakeMetrics]:
    router = Router(max_ongoing_requests=max_ongoing, rng=random.Random(0))
    targets = {n: FakeReplica(n) for n in names}
    for n in names:
        router.add_replica(n)
    metrics = FakeMetrics()
    d = Dispatcher(
        "D",
        router,
        targets,
        max_queued_requests=max_queued,
        starting=lambda: starting,
        metrics=metrics,
    )
    return d, targets, metrics


def deadline(seconds: float = 5.0) -> float:
    return asyncio.get_running_loop().time() + seconds


async def send(d: Dispatcher, model: str = "m", within_s: float = 5.0) -> tuple[Reply, str]:
    return await d.dispatch(request_id="r", model_id=model, http=HTTP, deadline=deadline(within_s))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_model_id_validation() -> None:
    assert validate_model_id(b"model-1/v2:~") == "model-1/v2:~"
    assert validate_model_id(b"x" * 256) == "x" * 256
    for bad in (b"", b"x" * 257, b"a b", b"a\tb", b"\x00", b"caf\xc3\xa9", b"\x7f"):
        with pytest.raises(BadModelIdError):
            validate_model_id(bad)


async def test_sends_call_fields_and_releases() -> None:
    d, targets, _ = make(["a"])
    reply, rid = await d.dispatch(
        request_id="req-1", model_id="m", http=HTTP, deadline=deadline(), traceparent="tp"
    )
    assert rid == "a" and reply.body == b"a"
    (call,) = targets["a"].calls
    assert call["request_id"] == "req-1"
    assert call["model_id"] == "m"
    assert call["traceparent"] == "tp"
    assert 4.0 < call["timeout_s"] <= 5.0
    assert d.router.total_in_flight == 0
    assert d.in_flight == 0


async def test_queue_is_fifo_and_bounded() -> None:
    d, targets, metrics = make(["a"], max_queued=2)
    targets["a"].gate = gate = asyncio.Event()
    first = asyncio.ensure_future(send(d, "m1"))
    await settle()
    second = asyncio.ensure_future(send(d, "m2"))
    third = asyncio.ensure_future(send(d, "m3"))
    await settle()
    assert d.queued == 2
    assert "queued=2" in repr(d)
    with pytest.raises(OverCapacityError) as info:
        await send(d, "m4")
    assert info.value.status == 503 and info.value.retry_after == 1
    gate.set()
    await asyncio.gather(first, second, third)
    assert [c["model_id"] for c in targets["a"].calls] == ["m1", "m2", "m3"]
    assert d.queued == 0
    assert metrics.queue[-1] == 0
    assert d.router.total_in_flight == 0


async def test_new_arrivals_do_not_overtake_waiters() -> None:
    d, targets, _ = make(["a"], max_queued=5)
    targets["a"].gate = gate = asyncio.Event()
    busy = asyncio.ensure_future(send(d, "m1"))
    await settle()
    waiting = asyncio.ensure_future(send(d, "m2"))
    await settle()
    gate.set()
    late = asyncio.ensure_future(send(d, "m3"))  # arrives as the slot frees
    await asyncio.gather(busy, waiting, late)
    assert [c["model_id"] for c in targets["a"].calls] == ["m1", "m2", "m3"]


async def test_unreachable_replica_is_rerouted() -> None:
    d, targets, _ = make(["a", "b"], max_ongoing=4)
    targets["a"].fail = ReplicaUnavailableError("closed")
    targets["b"].fail = None
    # Whichever is chosen first, the request ends on b and a leaves routing.
    for model in ("x", "y", "z"):
        _, rid = await send(d, model)
        assert rid == "b"
    assert d.router.replica_ids == ["b"]
    assert d.router.total_in_flight == 0


async def test_replica_missing_from_targets_is_rerouted() -> None:
    d, targets, _ = make(["a", "b"], max_ongoing=4)
    del targets["a"]
    for model in ("x", "y", "z"):
        _, rid = await send(d, model)
        assert rid == "b"


async def test_every_replica_unreachable_is_503() -> None:
    d, targets, _ = make(["a"])
    targets["a"].fail = ReplicaUnavailableError("closed")
    with pytest.raises((OverCapacityError, NoReplicaError)):
        await send(d)


async def test_replica_died_in_flight_is_502() -> None:
    d, targets, _ = make(["a"])
    targets["a"].fail = ReplicaDiedError("gone")
    with pytest.raises(ReplicaFailedError) as info:
        await send(d)
    assert info.value.status == 502
    assert info.value.replica_id == "a"
    assert d.router.total_in_flight == 0


async def test_reply_error_maps_to_gateway_error() -> None:
    d, targets, _ = make(["a"])
    targets["a"].error = ErrorInfo(code="user_error", message="ValueError: boom")
    with pytest.raises(DeploymentError) as info:
        await send(d)
    assert info.value.status == 500
    assert info.value.replica_id == "a"
    assert info.value.message == "ValueError: boom"


async def test_deadline_while_queued_is_504_and_frees_nothing_twice() -> None:
    d, targets, _ = make(["a"])
    targets["a"].gate = gate = asyncio.Event()
    busy = asyncio.ensure_future(send(d, "m1"))
    await settle()
    with pytest.raises(DeadlineExceededError):
        await send(d, "m2", within_s=0.05)
    assert d.queued == 0
    gate.set()
    await busy
    assert d.router.total_in_flight == 0
    _, rid = await send(d, "m3")
    assert rid == "a"


async def test_deadline_during_call_is_504() -> None:
    d, targets, _ = make(["a"])
    targets["a"].gate = asyncio.Event()  # never set
    with pytest.raises(DeadlineExceededError) as info:
        await send(d, within_s=0.05)
    assert info.value.status == 504 and info.value.replica_id == "a"
    assert d.router.total_in_flight == 0


async def test_cancelled_waiter_leaves_the_queue() -> None:
    d, targets, _ = make(["a"])
    targets["a"].gate = gate = asyncio.Event()
    busy = asyncio.ensure_future(send(d, "m1"))
    await settle()
    waiter = asyncio.ensure_future(send(d, "m2"))
    await settle()
    assert d.queued == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert d.queued == 0
    gate.set()
    await busy
    assert d.router.total_in_flight == 0


async def test_no_replica_and_none_starting_is_503() -> None:
    d, _, _ = make([])
    with pytest.raises(NoReplicaError) as info:
        await send(d)
    assert info.value.retry_after is not None


async def test_waits_for_a_starting_replica() -> None:
    router = Router(max_ongoing_requests=2)
    targets: dict[str, FakeReplica] = {}
    starting = True
    d = Dispatcher("D", router, targets, starting=lambda: starting)
    pending = asyncio.ensure_future(send(d))
    await settle()
    assert d.queued == 1
    targets["new"] = FakeReplica("new")
    router.add_replica("new")
    starting = False
    d.wake()
    _, rid = await pending
    assert rid == "new"


async def test_waiters_fail_when_the_last_start_fails() -> None:
    router = Router(max_ongoing_requests=2)
    starting = True
    d = Dispatcher("D", router, {}, starting=lambda: starting)
    pending = asyncio.ensure_future(send(d))
    await settle()
    starting = False
    d.wake()
    with pytest.raises(NoReplicaError):
        await pending
    assert d.queued == 0


async def test_spillover_is_counted() -> None:
    d, targets, metrics = make(["a", "b", "c"], max_ongoing=1)
    for t in targets.values():
        t.gate = asyncio.Event()
    tasks = [asyncio.ensure_future(send(d, "hot")) for _ in range(2)]
    await settle()
    assert metrics.spills == 1
    for t in targets.values():
        assert t.gate is not None
        t.gate.set()
    await asyncio.gather(*tasks)
