"""The model cache against a reference model, under random interleavings (hypothesis).

Each step is one rule: a caller asks for a model (inside a request or not), a
load finishes or fails, a request ends (releasing its pins), a waiting caller
is cancelled. The real cache runs on an event loop in a blocking portal; its
loader waits on a per-load event the rules set, and after every step the loop
is stepped until it is idle, so the interleaving is exactly the one hypothesis
chose. Then loaded/loading order, pins, loader calls, unloaded model objects
and what every caller got must match the reference.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from muxgate.replicas._context import request_scope
from muxgate.replicas._multiplex import ModelCache, model_cache, multiplexed

MODEL_IDS = ("a", "b", "c", "d")


class LoadFailed(Exception):
    pass


class TrackedModel:
    def __init__(self, model_id: str, n: int, unloaded: list[tuple[str, int]]) -> None:
        self.key = (model_id, n)  # n-th load of model_id
        self._unloaded = unloaded

    async def aclose(self) -> None:
        self._unloaded.append(self.key)


@dataclass
class Caller:
    n: int
    model_id: str
    scoped: bool
    state: str = "waiting"  # waiting | holding | done | failed | cancelled
    result: tuple[str, int] | None = None
    release: anyio.Event | None = None
    cancel_scope: anyio.CancelScope | None = None
    future: Future[None] | None = field(default=None, repr=False)


class CacheMachine(RuleBasedStateMachine):
    #: the cache's load order: evict before a load starts, or once it succeeded
    load_order = "evict_after"

    def __init__(self) -> None:
        super().__init__()
        self._portal_cm = start_blocking_portal("asyncio")
        self.portal: BlockingPortal = self._portal_cm.__enter__()
        self.callers: list[Caller] = []
        self.calls: Counter[str] = Counter()
        self.gates: dict[str, anyio.Event] = {}
        self.outcomes: dict[str, bool] = {}
        self.unloaded: list[tuple[str, int]] = []
        self.get_model: Any = None
        self.cache: ModelCache[Any] | None = None
        # the reference model
        self.capacity = 0
        self.ref_loaded: list[str] = []
        self.ref_loading: dict[str, list[Caller]] = {}
        self.ref_pins: Counter[str] = Counter()
        self.ref_calls: Counter[str] = Counter()
        self.ref_unloaded: list[tuple[str, int]] = []
        self.ref_model: dict[str, tuple[str, int]] = {}  # what each loaded id holds

    # -- driving the real cache ----------------------------------------------------------------

    async def _load(self, model_id: str) -> TrackedModel:
        self.calls[model_id] += 1
        n = self.calls[model_id]
        gate = self.gates[model_id] = anyio.Event()
        await gate.wait()
        if not self.outcomes.pop(model_id):
            raise LoadFailed(model_id)
        return TrackedModel(model_id, n, self.unloaded)

    async def _run(self, caller: Caller) -> None:
        caller.release = anyio.Event()
        caller.cancel_scope = anyio.CancelScope()
        scope = (
            request_scope(f"req-{caller.n}", caller.model_id)
            if caller.scoped
            else contextlib.nullcontext()
        )
        with scope, caller.cancel_scope:
            try:
                model = await self.get_model(caller.model_id)
            except LoadFailed:
                caller.state = "failed"
                return
            caller.result = model.key
            if caller.scoped:
                caller.state = "holding"
                await caller.release.wait()
            caller.state = "done"
        if caller.cancel_scope.cancelled_caught:
            caller.state = "cancelled"

    async def _settle(self) -> None:
        # Everything here is awaits on events and async hooks, no threads: a bounded number
        # of loop iterations reaches the point where every task is blocked.
        for _ in range(40):
            await anyio.lowlevel.checkpoint()

    def settle(self) -> None:
        self.portal.call(self._settle)

    # -- the reference -------------------------------------------------------------------------

    def ref_trim(self, spare: str | None = None) -> None:
        # Evict-first loads hold their slot from the start; evict-after ones once built.
        reserved = len(self.ref_loading) if self.load_order == "evict_first" else 0
        excess = len(self.ref_loaded) + reserved - self.capacity
        for model_id in list(self.ref_loaded):
            if excess <= 0:
                break
            if model_id != spare and self.ref_pins[model_id] == 0:
                self.ref_loaded.remove(model_id)
                self.ref_unloaded.append(self.ref_model.pop(model_id))
                excess -= 1

    def ref_unpin(self, model_id: str) -> None:
        self.ref_pins[model_id] -= 1
        self.ref_trim()

    # -- rules ---------------------------------------------------------------------------------

    @initialize(capacity=st.integers(min_value=1, max_value=3))
    def make_cache(self, capacity: int) -> None:
        self.capacity = capacity

        @multiplexed(
            max_num_models_per_replica=capacity,
            max_concurrent_loads=64,
            load_order=self.load_order,  # type: ignore[arg-type]
            load_on_loop=True,  # the loads wait on events set from the test's loop
        )
        async def get_model(model_id: str) -> TrackedModel:
            return await self._load(model_id)

        self.get_model = get_model
        self.cache = model_cache(get_model)

    @rule(model_id=st.sampled_from(MODEL_IDS), scoped=st.booleans())
    def call(self, model_id: str, scoped: bool) -> None:
        caller = Caller(n=len(self.callers), model_id=model_id, scoped=scoped)
        self.callers.append(caller)
        if model_id in self.ref_loaded:
            self.ref_loaded.remove(model_id)
            self.ref_loaded.append(model_id)
            caller.result = self.ref_model[model_id]
            expected = "holding" if scoped else "done"
        elif model_id in self.ref_loading:
            self.ref_loading[model_id].append(caller)
            expected = "waiting"
        else:
            self.ref_loading[model_id] = [caller]
            self.ref_calls[model_id] += 1
            if self.load_order == "evict_first":
                self.ref_trim()
            expected = "waiting"
        if scoped:
            self.ref_pins[model_id] += 1
        caller.future = self.portal.start_task_soon(self._run, caller)
        self.settle()
        assert caller.state == expected, (caller, expected)

    @precondition(lambda self: bool(self.ref_loading))
    @rule(data=st.data(), ok=st.booleans())
    def finish_load(self, data: st.DataObject, ok: bool) -> None:
        model_id = data.draw(st.sampled_from(sorted(self.ref_loading)))
        waiters = self.ref_loading.pop(model_id)
        if ok:
            key = (model_id, self.ref_calls[model_id])
            self.ref_model[model_id] = key
            self.ref_loaded.append(model_id)
            self.ref_trim(spare=model_id)
        for waiter in waiters:
            if waiter.state != "waiting":
                continue  # cancelled earlier
            if ok:
                waiter.result = self.ref_model[model_id]
            elif waiter.scoped:
                self.ref_unpin(model_id)
        self.outcomes[model_id] = ok
        self.portal.call(self.gates.pop(model_id).set)
        self.settle()
        for waiter in waiters:
            if waiter.state != "cancelled":
                expected = ("holding" if waiter.scoped else "done") if ok else "failed"
                assert waiter.state == expected, (waiter, expected)

    @precondition(lambda self: any(c.state == "holding" for c in self.callers))
    @rule(data=st.data())
    def end_request(self, data: st.DataObject) -> None:
        caller = data.draw(st.sampled_from([c for c in self.callers if c.state == "holding"]))
        self.ref_unpin(caller.model_id)
        assert caller.release is not None
        self.portal.call(caller.release.set)
        self.settle()
        assert caller.state == "done"

    @precondition(lambda self: any(c.state == "waiting" for c in self.callers))
    @rule(data=st.data())
    def cancel_waiter(self, data: st.DataObject) -> None:
        caller = data.draw(st.sampled_from([c for c in self.callers if c.state == "waiting"]))
        if caller.scoped:
            self.ref_unpin(caller.model_id)
        assert caller.cancel_scope is not None
        self.portal.call(caller.cancel_scope.cancel)
        self.settle()
        assert caller.state == "cancelled"

    # -- comparison ----------------------------------------------------------------------------

    @invariant()
    def matches_the_reference(self) -> None:
        if self.cache is None:
            return
        assert self.cache.loaded_ids() == self.ref_loaded
        assert self.cache.loading_ids() == list(self.ref_loading)
        assert self.cache.pins() == {k: v for k, v in self.ref_pins.items() if v}
        assert self.calls == self.ref_calls
        assert sorted(self.unloaded) == sorted(self.ref_unloaded)
        assert len(set(self.unloaded)) == len(self.unloaded)  # each hook at most once
        for caller in self.callers:
            if caller.state in ("holding", "done"):
                assert caller.result is not None

    def teardown(self) -> None:
        try:
            for caller in self.callers:
                if caller.state == "holding" and caller.release is not None:
                    self.portal.call(caller.release.set)
                elif caller.state == "waiting" and caller.cancel_scope is not None:
                    self.portal.call(caller.cancel_scope.cancel)
            self.settle()
            if self.cache is not None:
                self.portal.call(self.cache.aclose)
            for caller in self.callers:
                assert caller.future is not None
                caller.future.result(timeout=5)  # no caller died of an unexpected error
        finally:
            self._portal_cm.__exit__(None, None, None)


CacheMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestModelCacheAgainstReference = CacheMachine.TestCase


class EvictFirstCacheMachine(CacheMachine):
    load_order = "evict_first"


# The orders share every rule but where the trim happens: fewer examples for the second.
EvictFirstCacheMachine.TestCase.settings = settings(CacheMachine.TestCase.settings, max_examples=75)
TestEvictFirstModelCacheAgainstReference = EvictFirstCacheMachine.TestCase
