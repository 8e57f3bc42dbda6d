"""Dispatcher logic with fake replicas injected at its ``targets`` seam
(no processes: these are unit tests of queueing, rerouting and errors).

Every dispatcher here runs on a ``FakeClock``: queue waits, deadlines and the
affinity wait move only when a test moves the clock. The event loop's timers
(the call's timeout, the looks again at a waiter's deadline) stay real."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from fake_clock import FakeClock

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
    names: list[str],
    *,
    max_ongoing: int = 1,
    max_queued: int = 10,
    starting: bool = False,
    clock: FakeClock | None = None,
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
        clock=clock or FakeClock(),
    )
    return d, targets, metrics


def deadline(d: Dispatcher, seconds: float = 5.0) -> float:
    return d.clock() + seconds


async def send(d: Dispatcher, model: str = "m", within_s: float = 5.0) -> tuple[Reply, str]:
    return await d.dispatch(
        request_id="r", model_id=model, http=HTTP, deadline=deadline(d, within_s)
    )


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
        request_id="req-1", model_id="m", http=HTTP, deadline=deadline(d), traceparent="tp"
    )
    assert rid == "a" and reply.body == b"a"
    (call,) = targets["a"].calls
    assert call["request_id"] == "req-1"
    assert call["model_id"] == "m"
    assert call["traceparent"] == "tp"
    assert call["timeout_s"] == 5.0  # the clock stood still
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


async def test_a_waiter_rerouted_from_a_gone_replica_keeps_its_place() -> None:
    # The slot freed by the dying replica's last call goes to the oldest
    # waiter, whose call then finds the replica gone: it must not fall
    # behind the requests that queued after it.
    d, targets, _ = make(["a"], max_queued=2, starting=True)
    targets["a"].gate = gate = asyncio.Event()
    busy = asyncio.ensure_future(send(d, "m1"))
    await settle()
    second = asyncio.ensure_future(send(d, "m2"))
    await settle()
    third = asyncio.ensure_future(send(d, "m3"))
    await settle()
    assert d.queued == 2
    del targets["a"]  # the replica is gone; the router has not heard yet
    gate.set()
    await busy
    await settle()
    assert d.router.replica_ids == []
    assert d.queued == 2  # m2 back in line
    targets["b"] = FakeReplica("b")
    d.router.add_replica("b")
    d.wake()
    await asyncio.gather(second, third)
    assert [c["model_id"] for c in targets["b"].calls] == ["m2", "m3"]


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
    clock = FakeClock()
    d, targets, _ = make(["a"], clock=clock)
    targets["a"].gate = gate = asyncio.Event()
    busy = asyncio.ensure_future(send(d, "m1"))
    await settle()
    queued = asyncio.ensure_future(send(d, "m2", within_s=2.0))
    await settle()
    clock.now += 1.5
    d.wake()
    await settle()
    assert d.queued == 1 and not queued.done()  # half a second left by the clock
    clock.now += 0.5
    d.wake()
    with pytest.raises(DeadlineExceededError) as info:
        await queued
    assert "while it was queued" in info.value.message
    assert d.queued == 0
    gate.set()
    await busy
    assert d.router.total_in_flight == 0
    _, rid = await send(d, "m3")
    assert rid == "a"


async def test_the_loop_timer_expires_a_waiter_the_clock_says_is_late() -> None:
    # Nobody wakes the dispatcher: its own timer looks at the deadline.
    clock = FakeClock()
    d, targets, _ = make(["a"], clock=clock)
    targets["a"].gate = gate = asyncio.Event()
    busy = asyncio.ensure_future(send(d, "m1"))
    await settle()
    queued = asyncio.ensure_future(send(d, "m2", within_s=0.05))
    await settle()
    clock.now += 0.05
    async with asyncio.timeout(5):
        with pytest.raises(DeadlineExceededError):
            await queued
    assert d.queued == 0
    gate.set()
    await busy


async def test_a_loop_timer_ahead_of_the_clock_changes_nothing() -> None:
    clock = FakeClock()
    d, targets, _ = make(["a"], clock=clock)
    targets["a"].gate = gate = asyncio.Event()
    busy = asyncio.ensure_future(send(d, "m1"))
    await settle()
    queued = asyncio.ensure_future(send(d, "m2", within_s=0.01))
    await settle()
    # The loop runs its timers in time order: once this one has fired, so
    # has the waiter's (0.01 s), while the clock stood still.
    later = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, later.set)
    await later.wait()
    await settle()
    assert d.queued == 1 and not queued.done()
    clock.now += 0.01
    d.wake()
    with pytest.raises(DeadlineExceededError):
        await queued
    gate.set()
    await busy


async def test_a_deadline_already_past_fails_in_the_queue_at_once() -> None:
    clock = FakeClock()
    d, targets, _ = make(["a"], clock=clock)
    targets["a"].gate = gate = asyncio.Event()
    busy = asyncio.ensure_future(send(d, "m1"))
    await settle()
    with pytest.raises(DeadlineExceededError):
        await d.dispatch(request_id="r", model_id="m2", http=HTTP, deadline=clock.now)
    assert d.queued == 0
    gate.set()
    await busy


async def test_deadline_during_call_is_504() -> None:
    d, targets, _ = make(["a"])
    targets["a"].gate = asyncio.Event()  # never set
    with pytest.raises(DeadlineExceededError) as info:
        # The loop's timer stops the call (after 0.05 s of real time): a
        # replica's call runs on the event loop, not on the clock.
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
    d = Dispatcher("D", router, targets, starting=lambda: starting, clock=FakeClock())
    pending = asyncio.ensure_future(send(d))
    await settle()
    assert d.queued == 1
    targets["new"] = FakeReplica("new")
    router.add_replica("new")
    starting = False
    d.wake()
    _, rid = await pending
    assert rid == "new"


async def test_a_request_at_zero_replicas_activates_before_asking() -> None:
    router = Router(max_ongoing_requests=2)
    calls: list[str] = []
    target = 0
    gave_up = False

    # As the pool: activation raises a target of zero to one, no further;
    # a replica is starting while there is a target and the start goes on.
    def activate() -> None:
        nonlocal target
        calls.append("activate")
        target = max(target, 1)

    def starting() -> bool:
        calls.append("starting")
        return target > 0 and not gave_up

    d = Dispatcher("D", router, {}, starting=starting, activate=activate, clock=FakeClock())
    pending = asyncio.ensure_future(send(d))
    await settle()
    assert d.queued == 1 and calls[:2] == ["activate", "starting"]
    gave_up = True  # the start gave up
    d.wake()
    with pytest.raises(NoReplicaError) as info:
        await pending
    assert calls[-2:] == ["activate", "starting"]
    assert "is running" in info.value.message  # at once, not at the deadline


async def test_waiters_fail_when_the_last_start_fails() -> None:
    router = Router(max_ongoing_requests=2)
    starting = True
    d = Dispatcher("D", router, {}, starting=lambda: starting, clock=FakeClock())
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


# -- cache-affine queue ------------------------------------------------------


class GatedReplica:
    """A ``Target`` whose every call waits on its own event (``release(i)``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[dict[str, Any]] = []
        self.gates: list[asyncio.Event] = []
        self.called = asyncio.Event()

    async def call(self, **kwargs: Any) -> Reply:
        gate = asyncio.Event()
        self.calls.append(kwargs)
        self.gates.append(gate)
        self.called.set()
        await gate.wait()
        return Reply(id=1, state=ReplicaState(), body=self.name.encode())

    def release(self, i: int) -> None:
        self.gates[i].set()

    def ids(self) -> list[str]:
        return [c["request_id"] for c in self.calls]


def affine(
    names: list[str], *, max_ongoing: int, wait_s: float, clock: FakeClock | None = None
) -> tuple[Dispatcher, dict[str, GatedReplica], FakeMetrics]:
    router = Router(
        max_ongoing_requests=max_ongoing, min_capacity=max_ongoing, rng=random.Random(0)
    )
    targets = {n: GatedReplica(n) for n in names}
    for n in names:
        router.add_replica(n)
    metrics = FakeMetrics()
    d = Dispatcher(
        "D", router, targets, metrics=metrics, affinity_wait_s=wait_s, clock=clock or FakeClock()
    )
    return d, targets, metrics


def start(d: Dispatcher, request_id: str, model: str) -> asyncio.Future[tuple[Reply, str]]:
    return asyncio.ensure_future(
        d.dispatch(request_id=request_id, model_id=model, http=HTTP, deadline=deadline(d))
    )


async def test_freed_slot_goes_to_the_oldest_cache_hit_not_the_head() -> None:
    d, t, _ = affine(["a", "b"], max_ongoing=1, wait_s=60.0)
    d.router.observe("a", models=["ma"], loading=[])
    d.router.observe("b", models=["mb"], loading=[])
    busy = [start(d, "busy-a", "ma"), start(d, "busy-b", "mb")]
    await settle()
    assert t["a"].ids() == ["busy-a"] and t["b"].ids() == ["busy-b"]
    # Head: a request for mb (held by b); behind it one for ma (held by a).
    w1 = start(d, "w1-mb", "mb")
    await settle()
    w2 = start(d, "w2-ma", "ma")
    await settle()
    assert d.queued == 2
    t["a"].release(0)  # a slot frees on a: a strict FIFO would load mb there
    await settle()
    assert t["a"].ids() == ["busy-a", "w2-ma"]
    assert d.queued == 1
    t["b"].release(0)
    await settle()
    assert t["b"].ids() == ["busy-b", "w1-mb"]  # the head got its cache hit
    assert d.queued == 0
    t["a"].release(1)
    t["b"].release(1)
    await asyncio.gather(*busy, w1, w2)
    # Every request ran where its model already was: no model left its replica.
    assert d.router.holders("ma") == {"a"} and d.router.holders("mb") == {"b"}
    assert d.router.total_in_flight == 0


async def test_head_falls_back_to_a_miss_after_the_affinity_wait() -> None:
    clock = FakeClock()
    d, t, _ = affine(["a"], max_ongoing=2, wait_s=0.2, clock=clock)
    d.router.observe("a", models=["ma"], loading=[])
    busy = [start(d, "busy1", "ma"), start(d, "busy2", "ma")]
    await settle()
    queued_at = clock.now
    miss = start(d, "miss-mc", "mc")
    await settle()
    hits = [start(d, "hit1", "ma"), start(d, "hit2", "ma")]
    await settle()
    assert d.queued == 3
    t["a"].release(0)
    await settle()
    t["a"].release(1)
    await settle()
    # Cache hits overtook the (young) head, oldest first per model id.
    assert t["a"].ids() == ["busy1", "busy2", "hit1", "hit2"]
    t["a"].release(2)  # a slot frees, a is still busy: only a miss could use it
    await settle()
    assert d.queued == 1, "a young head must not take a miss slot at once"
    clock.now = queued_at + 0.19
    d.wake()
    await settle()
    assert d.queued == 1, "the head has not waited its affinity time yet"
    clock.now = queued_at + 0.2
    d.wake()
    await settle()
    assert t["a"].ids()[-1] == "miss-mc" and d.queued == 0
    for i in range(3, 5):
        t["a"].release(i)
    await asyncio.gather(*busy, miss, *hits)
    assert "affinity_wait_s=0.200" in repr(d)


async def test_head_takes_a_miss_at_once_when_a_slot_stays_free_for_hits() -> None:
    # A long affinity wait: only the free slot left for hits lets the miss go.
    d, t, _ = affine(["a"], max_ongoing=4, wait_s=60.0)
    d.router.observe("a", models=["ma"], loading=[])
    busy = [start(d, f"busy{i}", "ma") for i in range(4)]
    await settle()
    miss = start(d, "miss-mc", "mc")
    await settle()
    assert d.queued == 1
    t["a"].release(0)
    await settle()
    assert d.queued == 1, "with three in flight the miss would take the last free slot"
    t["a"].release(1)
    await settle()
    # Two in flight: after the miss, one slot is still free for a hit.
    assert t["a"].ids()[-1] == "miss-mc" and d.queued == 0
    for i in range(2, 5):
        t["a"].release(i)
    await asyncio.gather(*busy, miss)


async def test_head_takes_a_miss_when_nothing_else_is_in_flight() -> None:
    d, t, _ = affine(["a"], max_ongoing=1, wait_s=60.0)
    d.router.observe("a", models=["ma"], loading=[])
    busy = start(d, "busy", "ma")
    await settle()
    miss = start(d, "miss", "mc")
    await settle()
    t["a"].release(0)
    await settle()
    assert t["a"].ids() == ["busy", "miss"]  # nothing else would ever free a slot
    t["a"].release(1)
    await asyncio.gather(busy, miss)


async def test_cold_start_deadline_is_503_with_retry_after() -> None:
    router = Router(max_ongoing_requests=2)
    clock = FakeClock()
    d = Dispatcher(
        "D",
        router,
        {},
        starting=lambda: True,
        unavailable_reason=lambda: "last start failure: boom",
        clock=clock,
    )
    pending = asyncio.ensure_future(send(d, within_s=30.0))
    await settle()
    assert d.queued == 1
    clock.now += 30.0
    d.wake()
    with pytest.raises(NoReplicaError) as info:
        await pending
    assert info.value.status == 503 and info.value.retry_after is not None
    assert "became ready" in info.value.message and "boom" in info.value.message
    assert d.queued == 0


async def test_waiters_get_the_start_failure_reason() -> None:
    router = Router(max_ongoing_requests=2)
    starting = True
    d = Dispatcher(
        "D",
        router,
        {},
        starting=lambda: starting,
        unavailable_reason=lambda: (
            "last start failure: ImportError: no module x (at /srv/app/models.py:3 in <module>)"
        ),
        clock=FakeClock(),
    )
    pending = asyncio.ensure_future(send(d))
    await settle()
    starting = False
    d.wake()
    with pytest.raises(NoReplicaError) as info:
        await pending
    assert "ImportError: no module x" in info.value.message
    assert "/srv" not in info.value.message  # no server path for clients
    assert "(at <path>:3 in <module>)" in info.value.message


# -- muxgate.route span --------------------------------------------------------


async def test_route_span_is_the_replicas_parent() -> None:
    from otlp_receiver import OtlpReceiver

    from muxgate.replicas._tracing import configure_tracing, flush_tracing, shutdown_tracing

    d, targets, _ = make(["a", "b"], max_ongoing=4)
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with OtlpReceiver() as receiver:
        configure_tracing("otlp", receiver.endpoint, service_name="muxgate-test")
        try:
            _, rid = await d.dispatch(
                request_id="r", model_id="m1", http=HTTP, deadline=deadline(d), traceparent=incoming
            )
            assert flush_tracing()
            span = receiver.wait_for_span("muxgate.route")
        finally:
            shutdown_tracing()
    assert span.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert span.parent_span_id == "b7ad6b7169203331"
    assert span.attributes["muxgate.model_id"] == "m1"
    assert span.attributes["muxgate.replica_id"] == rid
    assert span.attributes["muxgate.deployment"] == "D"
    assert span.attributes["muxgate.spillover"] is False
    assert span.attributes["muxgate.route.reason"] == "home"
    assert span.attributes["muxgate.queued"] is False
    sent = targets[rid].calls[0]["traceparent"]
    assert sent == f"00-{span.trace_id}-{span.span_id}-01"


async def test_traceparent_passes_through_when_tracing_is_off() -> None:
    d, targets, _ = make(["a"])
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await d.dispatch(
        request_id="r", model_id="m", http=HTTP, deadline=deadline(d), traceparent=incoming
    )
    assert targets["a"].calls[0]["traceparent"] == incoming


async def test_a_new_idle_replica_takes_a_miss_at_once() -> None:
    d, t, _ = affine(["a"], max_ongoing=1, wait_s=60.0)
    d.router.observe("a", models=["ma"], loading=[])
    busy = start(d, "busy", "ma")
    await settle()
    miss = start(d, "miss", "mc")
    await settle()
    assert d.queued == 1
    # Scale-up: a replica joins; a load there delays nobody, so no affinity wait.
    t["b"] = GatedReplica("b")
    d.router.add_replica("b")
    d.wake()
    await settle()
    assert t["b"].ids() == ["miss"] and d.queued == 0
    t["a"].release(0)
    t["b"].release(0)
    await asyncio.gather(busy, miss)


async def test_an_old_head_is_not_starved_by_a_stream_of_hits() -> None:
    clock = FakeClock()
    d, t, _ = affine(["a"], max_ongoing=2, wait_s=0.1, clock=clock)
    d.router.observe("a", models=["ma"], loading=[])
    running = [start(d, "busy1", "ma"), start(d, "busy2", "ma")]
    await settle()
    cold_queued_at = clock.now
    cold = start(d, "cold", "mc")
    await settle()
    hits = [start(d, f"hit{i}", "ma") for i in range(6)]
    await settle()
    t["a"].release(0)
    await settle()
    assert t["a"].ids()[-1] == "hit0"  # young head: the hit goes first
    clock.now = cold_queued_at + 0.1
    t["a"].release(1)
    await settle()
    # Hits are still queued, but the head has waited its affinity time.
    assert t["a"].ids()[-1] == "cold"
    assert d.queued == 5
    for i in range(2, 9):
        t["a"].release(i)
        await settle()
    await asyncio.gather(*running, cold, *hits)
    assert t["a"].ids().index("cold") < t["a"].ids().index("hit1")


async def test_a_priced_spill_waits_for_the_holder_then_spills_once_waiting_costs_a_load() -> None:
    clock = FakeClock()
    d, targets, metrics = make(["a", "b"], clock=clock)
    d.router.spill_rule = "priced"
    d.router.load_s = 0.05  # a spill costs 50 ms (the other replica has a free slot)
    holder = d.router.preference_list("m")[0]
    other = "b" if holder == "a" else "a"
    targets[holder].gate = gate = asyncio.Event()
    first = asyncio.ensure_future(send(d, "m"))
    await settle()
    # The holder is full; waiting (~10 ms estimated) is cheaper than a 50 ms load.
    second = asyncio.ensure_future(send(d, "m"))
    await settle()
    assert d.queued == 1 and not targets[other].calls
    gate.set()  # the holder frees its slot before the wait costs a load: served there
    assert (await first)[1] == holder and (await second)[1] == holder
    assert metrics.spills == 0 and not targets[other].calls
    # Now the holder stays busy: the waiter spills once it has waited the price.
    targets[holder].gate = asyncio.Event()
    blocked = asyncio.ensure_future(send(d, "m"))
    await settle()
    queued_at = clock.now
    spilling = asyncio.ensure_future(send(d, "m"))
    await settle()
    clock.now = queued_at + 0.05
    d.wake()
    await settle()
    assert d.queued == 1 and not targets[other].calls, "a wait of one load's price may not spill"
    clock.now = queued_at + 0.06
    d.wake()
    _, replica = await spilling
    assert replica == other and metrics.spills == 1
    targets[holder].gate.set()
    await blocked


async def test_never_spill_waits_for_the_holder_past_any_price() -> None:
    clock = FakeClock()
    d, targets, metrics = make(["a", "b"], clock=clock)
    d.router.spill_rule = "never"
    holder = d.router.preference_list("m")[0]
    other = "b" if holder == "a" else "a"
    targets[holder].gate = gate = asyncio.Event()
    first = asyncio.ensure_future(send(d, "m", within_s=7200.0))
    await settle()
    waiting = [asyncio.ensure_future(send(d, "m", within_s=7200.0)) for _ in range(5)]
    await settle()
    clock.now += 3600.0  # far past any load's price (and before the deadline)
    d.wake()
    await settle()
    assert d.queued == 5 and not targets[other].calls
    gate.set()
    replies = await asyncio.gather(first, *waiting)
    assert {replica for _, replica in replies} == {holder}
    assert metrics.spills == 0 and not targets[other].calls


class SharedReplica(FakeReplica):
    """A replica other gateways share: while ``refusals`` last it refuses
    (``overloaded``) and reports their calls (``others``), as its replies do,
    to the router (what the pool's ``on_state`` does for a real one)."""

    def __init__(self, name: str, router: Router, refusals: int, others: int) -> None:
        super().__init__(name)
        self.router, self.refusals, self.others = router, refusals, others

    async def call(self, **kwargs: Any) -> Reply:
        if self.refusals <= 0:
            return await super().call(**kwargs)
        self.calls.append(kwargs)
        self.refusals -= 1
        self.router.observe(self.name, models=[], loading=[], in_flight=self.others, own=0)
        error = ErrorInfo(code="overloaded", message="full", status=503)
        return Reply(id=1, state=ReplicaState(in_flight=self.others), status=503, error=error)


async def test_refusals_of_full_shared_replicas_wait_for_room_and_are_not_failures() -> None:
    d, targets, _ = make(["a", "b"], max_ongoing=2)
    a = targets["a"] = SharedReplica("a", d.router, refusals=3, others=4)
    b = targets["b"] = SharedReplica("b", d.router, refusals=2, others=4)
    request = asyncio.ensure_future(send(d))
    # Refused by both (each reported full of other gateways' calls): it waits.
    await settle()
    assert (len(a.calls), len(b.calls)) == (1, 1)
    assert d.queued == 1 and not request.done()
    # Whichever replica reports room gets it again; three more refusals in
    # all, more than MAX_REROUTES, none of them a failure.
    for name in ["a", "b", "a", "b"]:
        d.router.observe(name, models=[], loading=[], in_flight=0, own=0)
        d.wake()
        await settle()
    reply, replica_id = await request
    assert replica_id == "b" and reply.error is None
    assert (len(a.calls), len(b.calls)) == (3, 3)
    assert d.router.own_in_flight("a") == d.router.own_in_flight("b") == 0


async def test_a_refusal_the_router_cannot_explain_counts_as_a_reroute() -> None:
    d, targets, _ = make(["a"], max_ongoing=2)
    # It refuses yet reports room (others=0): bounded by MAX_REROUTES.
    a = targets["a"] = SharedReplica("a", d.router, refusals=10, others=0)
    with pytest.raises(OverCapacityError, match="overloaded"):
        await send(d)
    assert len(a.calls) == 4
