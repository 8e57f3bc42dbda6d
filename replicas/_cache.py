"""The asynchronous model cache behind one decorated loader.

:class:`ModelCache` wraps the pure bookkeeping of
:class:`~muxgate.replicas._cache_state.CacheState` (and, through it, an
eviction policy) with what needs an event loop: one shared load task per
model id (single flight), a bound on concurrent loads, pins tied to request
scopes, unload hooks, log lines, spans and the process-wide counters and
event log of :mod:`muxgate.replicas._cache_stats`.

A model handed to a caller inside a
:func:`~muxgate.replicas._context.request_scope` is pinned until that request
ends; eviction only takes unpinned models, and a cache that is over its limit
because everything was pinned shrinks as soon as pins release.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Final, Generic, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from muxgate.replicas._cache_options import (
    DEFAULT_LOAD_ORDER,
    DEFAULT_MAX_CONCURRENT_LOADS,
    LOAD_ORDERS,
    LoadOrder,
    ModelCacheClosedError,
    ModelTooLargeError,
    check_limit,
    check_load_order,
    check_model_id,
)
from muxgate.replicas._cache_state import MISSING, CacheState, _Missing
from muxgate.replicas._cache_stats import (
    COUNTERS,
    EVENTS,
    count_load,
    register_cache,
    residency_changed,
)
from muxgate.replicas._codes import BACKEND_ERROR_CODES
from muxgate.replicas._context import current_replica, current_request
from muxgate.replicas._eviction import EvictionPolicy
from muxgate.replicas._load_cpu import charging
from muxgate.replicas._logging import (
    OUTCOME,
    describe_exception,
    mark_outcome_logged,
    mark_traceback_logged,
)
from muxgate.replicas._lru import LRU
from muxgate.replicas._model_size import model_nbytes, release_device_memory
from muxgate.replicas._unload_hooks import run_unload_hook

__all__ = [
    "DEFAULT_LOAD_ORDER",
    "DEFAULT_MAX_CONCURRENT_LOADS",
    "LOAD_ORDERS",
    "LoadOrder",
    "ModelCache",
    "ModelCacheClosedError",
    "ModelTooLargeError",
    "check_limit",
    "check_load_order",
    "check_model_id",
]

M = TypeVar("M")

_log = logging.getLogger("muxgate.replicas")


def _outcome_of(exc: BaseException) -> str | None:
    """The error code of a muxgate.backends error that is an outcome rather
    than a bug, matched by name (the package is optional in a replica and
    not imported here); None for anything else."""
    for cls in type(exc).__mro__:
        code = BACKEND_ERROR_CODES.get(cls.__name__)
        if code is not None:
            return str(code)
    return None


# A proxy until the process installs a TracerProvider; it then follows the global one.
_tracer = trace.get_tracer("muxgate")


class _Flight(Generic[M]):
    """One shared load of one model id; every caller for that id waits on ``done``.

    ``evict``: False for a warming load, which is kept only if it fits
    without evicting anything but (some of) the ``may_evict`` ids.
    """

    __slots__ = ("done", "error", "evict", "may_evict", "model", "task")

    def __init__(self, *, evict: bool = True, may_evict: tuple[str, ...] = ()) -> None:
        self.evict = evict
        self.may_evict = may_evict
        self.done = asyncio.Event()
        self.model: M | _Missing = MISSING
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] | None = None


class ModelCache(Generic[M]):
    """The models one decorated loader holds in this process (one per instance for methods).

    Args:
        load: awaitable loader ``load(model_id) -> model``.
        max_num_models: capacity, ``-1`` for no limit.
        max_concurrent_loads: how many loads of different ids may run at once.
        name: shown in ``repr`` (the loader's qualified name).
        policy: the eviction policy object, one per cache (default: a fresh LRU).
        load_order: ``"evict_after"`` (default): a victim is evicted once the
            new model is built, so a failed load never costs a working model
            and memory peaks at the limit plus the models being built;
            ``"evict_first"``: evicted before the load starts, so memory peaks
            at the limit (for memory-tight hosts).
        max_bytes: byte budget of the held models, ``-1`` for none; each
            model is measured once built (``muxgate.replicas._model_size``).
        sizeof: measures a model in bytes instead of the default rules.

    A cache belongs to one event loop at a time; a cache first used on a loop
    that has since gone away forgets the loads that loop was running.
    """

    def __init__(
        self,
        load: Callable[[str], Awaitable[M]],
        *,
        max_num_models: int = 3,
        max_concurrent_loads: int = DEFAULT_MAX_CONCURRENT_LOADS,
        name: str = "",
        policy: EvictionPolicy | None = None,
        load_order: LoadOrder = DEFAULT_LOAD_ORDER,
        max_bytes: int = -1,
        sizeof: Callable[[M], int] | None = None,
    ) -> None:
        check_limit("max_num_models_per_replica", max_num_models, allow_unlimited=True)
        check_limit("max_concurrent_loads", max_concurrent_loads, allow_unlimited=False)
        check_limit("max_bytes_per_replica", max_bytes, allow_unlimited=True)
        check_load_order(load_order)
        self.name = name
        self._load = load
        self._sizeof = sizeof
        self._state: CacheState[M] = CacheState(
            max_num_models,
            policy if policy is not None else LRU(),
            evict_first=load_order == "evict_first",
            max_bytes=max_bytes,
        )
        self._max_concurrent_loads = max_concurrent_loads
        self._flights: dict[str, _Flight[M]] = {}
        #: model id -> span attributes of what its load read from storage
        self._sources: dict[str, dict[str, str | int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._load_slots: asyncio.Semaphore | None = None
        register_cache(self)

    # -- queries ------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._state.capacity

    @property
    def max_bytes(self) -> int:
        """Byte budget of the held models, ``-1`` for none."""
        return self._state.max_bytes

    @property
    def load_order(self) -> LoadOrder:
        """When a victim is evicted: ``"evict_after"`` or ``"evict_first"`` the new load."""
        return "evict_first" if self._state.evict_first else "evict_after"

    @property
    def policy(self) -> EvictionPolicy:
        """The eviction policy object this cache asks."""
        return self._state.policy

    def loaded_ids(self) -> list[str]:
        """Loaded model ids, least recently used first."""
        return self._state.loaded_ids()

    def loading_ids(self) -> list[str]:
        """Model ids whose load is queued or running."""
        return self._state.loading_ids()

    def pins(self) -> dict[str, int]:
        """Pin count per model id (requests holding it)."""
        return self._state.pins()

    def kept_ids(self) -> list[str]:
        """Model ids never evicted (the deployment's ``pinned``, operator loads with pin)."""
        return self._state.kept_ids()

    def model_bytes(self) -> int:
        """Bytes of the loaded models, each measured once built."""
        return self._state.model_bytes()

    def sizes(self) -> dict[str, int]:
        """Loaded model id -> bytes, least recently used first."""
        return self._state.sizes()

    def __repr__(self) -> str:
        limit = "unlimited" if self.capacity < 0 else str(self.capacity)
        policy = "" if self.policy.name == "lru" else f" policy={self.policy.name}"
        if self.max_bytes >= 0:
            policy += f" bytes={self.model_bytes()}/{self.max_bytes}"
        if self._state.evict_first:
            policy += " load_order=evict_first"
        return (
            f"<ModelCache {self.name!r} capacity={limit}{policy} loaded={self.loaded_ids()} "
            f"loading={self.loading_ids()} pinned={self.pins()}>"
        )

    # -- getting models -------------------------------------------------------------------------

    async def get(self, model_id: str) -> M:
        """The model for ``model_id``, loading it (once, however many callers) if needed."""
        model = self.get_loaded(model_id)
        if model is MISSING:
            return await self.load(model_id)
        return model  # type: ignore[return-value]

    def get_loaded(self, model_id: str) -> M | _Missing:
        """The hit path, synchronous: the model (counted, touched, pinned) or ``MISSING``."""
        model = self._state.lookup(model_id)
        if model is MISSING:
            return model
        COUNTERS["cache_hits"] += 1
        request = current_request()
        if request is not None:
            self._state.pin(model_id)
            request.on_release(self._unpinner(model_id))
        return model

    async def load(self, model_id: str) -> M:
        """The miss path: join the flight for ``model_id`` or start one."""
        check_model_id(model_id)
        COUNTERS["cache_misses"] += 1
        self._bind_loop()
        flight = self._flights.get(model_id)
        if flight is None:
            flight = self._start_flight(model_id)
        else:
            flight.evict = True  # a caller wants it: no longer a mere warming
        request = current_request()
        if request is not None:
            # Pinned while waiting, so that nothing can evict it between the end of the
            # load and this caller resuming.
            self._state.pin(model_id)
        try:
            await flight.done.wait()
        except BaseException:
            if request is not None:
                self._unpin(model_id)
            raise
        if flight.error is not None:
            if request is not None:
                self._unpin(model_id)
            raise flight.error
        if request is not None:
            request.on_release(self._unpinner(model_id))
        return flight.model  # type: ignore[return-value]

    # -- explicit control (preload, pinned ids, the admin API, warming) -------------------------

    async def preload(self, model_id: str, *, pin: bool = False) -> None:
        """Load ``model_id`` now, outside any request (kept forever with ``pin``).

        A model already loaded counts as a hit (and is kept with ``pin``).

        Raises:
            Exception: whatever the load raised (:class:`ModelTooLargeError`...);
                a failed load is not cached and leaves the ``pin`` undone.
        """
        check_model_id(model_id)
        if pin:
            self._state.keep(model_id)
        try:
            await self.get(model_id)
        except BaseException:
            if pin:
                self._spawn_unloads(self._state.unkeep(model_id))
            raise

    async def warm(self, model_id: str, may_evict: Sequence[str] = ()) -> bool:
        """Load ``model_id`` if it fits without evicting anything; whether it is loaded now.

        Warming never costs a working model: the fit is checked before the
        load starts and again once the model is built (its size is known only
        then); a model that no longer fits is unloaded again (False), and so
        is one larger than the byte budget can ever hold. Any other failed
        load raises what it raised, as it does to a request's caller: a
        failure is not "does not fit" (the gateway's warming stops at the
        first model that does not fit, and skips one that failed).

        ``may_evict``: ids the caller gives up (spare copies held elsewhere
        too): once the model is built, the fewest of them, in order, that
        make it fit are evicted, if they are still not pinned (not with
        ``evict_first``: see ``CacheState.finish_load``).
        """
        check_model_id(model_id)
        self._bind_loop()
        if self._state.lookup(model_id) is not MISSING:
            return True
        flight = self._flights.get(model_id)
        if flight is None:
            if not self._state.has_room() and not self._state.room_evicting(may_evict):
                return False
            flight = self._start_flight(model_id, evict=False, may_evict=tuple(may_evict))
        await flight.done.wait()
        if flight.error is not None and not isinstance(flight.error, ModelTooLargeError):
            raise flight.error
        return flight.error is None and model_id in self._state.loaded_ids()

    def unload(self, model_id: str) -> bool:
        """Drop ``model_id`` (and its pin) now, or once the requests using it end.

        Returns whether it was loaded. The unload hook runs in the background
        (reason ``admin``).
        """
        held = model_id in self._state.loaded_ids()
        self._spawn_unloads(self._state.remove(model_id), reason="admin")
        return held

    # -- shutdown -----------------------------------------------------------------------------

    async def aclose(self, reason: str = "shutdown") -> None:
        """Unload every model with ``reason`` (``"shutdown"`` or ``"drain"``).

        Loads still running are cancelled (their waiters get
        :class:`ModelCacheClosedError`); unloads already under way finish first.
        """
        if reason not in ("shutdown", "drain"):
            raise ValueError(f"reason must be 'shutdown' or 'drain', got {reason!r}")
        self._bind_loop()
        for flight in list(self._flights.values()):
            if flight.task is not None:
                flight.task.cancel()
        # asyncio.wait, unlike gather, does not cancel the tasks if this caller is cancelled.
        while pending := [task for task in self._tasks if not task.done()]:
            await asyncio.wait(pending)
        removed = self._state.remove_all()
        residency_changed()
        while removed:
            model_id, model = removed.pop(0)
            await self._unload(model_id, model, reason)
            del model  # so that its device memory can go back below
        release_device_memory()

    # -- internals ------------------------------------------------------------------------------

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            if self._loop is not None:
                self._forget_loop()
            self._loop = loop
            self._load_slots = asyncio.Semaphore(self._max_concurrent_loads)
        return loop

    def _forget_loop(self) -> None:
        # Tasks of another loop can never finish here; their loads did not happen.
        for model_id in list(self._flights):
            self._state.fail_load(model_id)
        if self._flights:
            residency_changed()
        self._flights.clear()
        self._tasks.clear()
        self._loop = None

    def _start_flight(
        self, model_id: str, *, evict: bool = True, may_evict: tuple[str, ...] = ()
    ) -> _Flight[M]:
        evicted = self._state.start_load(model_id) if evict else self._state.start_warm(model_id)
        flight: _Flight[M] = _Flight(evict=evict, may_evict=may_evict)
        self._flights[model_id] = flight
        residency_changed()
        # The load runs in a task of its own, owned by the cache rather than by the caller
        # that happened to start it: cancelling that caller must not cancel the load the
        # others wait for. create_task copies the caller's context, so the load span is a
        # child of the caller's span and get_multiplexed_model_id() works in the loader.
        flight.task = self._spawn(self._run_flight(model_id, flight, evicted))
        return flight

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run_flight(
        self, model_id: str, flight: _Flight[M], evicted: list[tuple[str, M]]
    ) -> None:
        try:
            for victim_id, victim in evicted:
                await self._unload(victim_id, victim, "lru")
            assert self._load_slots is not None
            if flight.evict:
                async with self._load_slots:
                    model = await self._timed_load(model_id)
            else:
                # A warm takes no load slot: a request's load never waits
                # behind one (the replicas bound warms by themselves).
                model = await self._timed_load(model_id)
            nbytes = await self._measure(model_id, model)
        except Exception as exc:
            flight.error = exc
        except BaseException:
            flight.error = ModelCacheClosedError(
                f"The model cache was closed while loading model '{model_id}'."
            )
            raise
        else:
            flight.model = model
        finally:
            # A flight this cache forgot (its loop went away) no longer owns the state.
            if self._flights.get(model_id) is flight:
                del self._flights[model_id]
                if flight.error is None:
                    self._spawn_unloads(
                        self._state.finish_load(
                            model_id,
                            model,
                            nbytes,
                            evict=flight.evict,
                            may_evict=() if flight.evict else flight.may_evict,
                        )
                    )
                else:
                    self._state.fail_load(model_id)
                residency_changed()
            # No await between the loader's outcome and here: the waiters are
            # made ready before the hits its last step held (``LoaderThread.run``).
            flight.done.set()

    async def _measure(self, model_id: str, model: M) -> int:
        """The model's size in bytes; a model that can never fit is unloaded and refused."""
        try:
            nbytes = model_nbytes(model, self._sizeof)
            problem = self._state.room_error(model_id, nbytes)
        except Exception:
            await self._drop(model_id, model)
            raise
        if problem is None:
            return nbytes
        _log.warning("%s It is not kept.", problem)
        await self._drop(model_id, model)
        raise ModelTooLargeError(
            problem, model_id=model_id, nbytes=nbytes, max_bytes=self._state.max_bytes
        )

    async def _drop(self, model_id: str, model: M) -> None:
        """Let go of a model that was built but is not cached (its hook runs now)."""
        try:
            await run_unload_hook(model)
        except Exception:
            _log.exception("Unload hook of model '%s' failed; dropped anyway.", model_id)
        finally:
            release_device_memory()

    async def _timed_load(self, model_id: str) -> M:
        _log.info("Loading model '%s'.", model_id)
        start = time.perf_counter()
        fetched: list[tuple[str, int]] = []
        with _tracer.start_as_current_span(
            "muxgate.model.load", attributes=_attrs(model_id)
        ) as span:
            # muxgate.backends fetches inside the loader report here (see FETCH_LOG_KEY)
            token = otel_context.attach(otel_context.set_value(_FETCH_LOG_KEY, fetched))
            try:
                with charging() as cpu:
                    model = await self._load(model_id)
            except Exception as exc:
                failed_after = time.perf_counter() - start
                COUNTERS["model_load_failures"] += 1
                EVENTS.record("load_failed", model_id, failed_after, type(exc).__name__)
                # An outcome (not found, refused id, storage down or
                # refusing) is logged here with its detail, without a
                # traceback; anything else keeps its traceback here.
                outcome = _outcome_of(exc)
                if outcome == "bad_model_id":
                    COUNTERS["model_load_refused_ids"] += 1
                elif outcome == "model_not_found":
                    COUNTERS["model_load_not_found"] += 1
                if outcome is None:
                    _log.warning(
                        "Failed to load model '%s' after %.1fms.",
                        model_id,
                        failed_after * 1e3,
                        exc_info=True,
                    )
                    mark_traceback_logged(exc)
                else:
                    # The detail, once, without a traceback; the request
                    # whose load this was adds no line of its own.
                    _log.warning(
                        "Failed to load model '%s' after %.1fms: %s",
                        model_id,
                        failed_after * 1e3,
                        describe_exception(exc),
                        extra={OUTCOME: outcome},
                    )
                    mark_outcome_logged(exc)
                raise
            finally:
                otel_context.detach(token)
            if fetched:
                self._sources[model_id] = sources = _source_attrs(fetched)
                span.set_attributes(sources)
            span.set_attribute("muxgate.load.cpu_seconds", cpu.seconds)
        seconds = time.perf_counter() - start
        count_load(seconds, cpu.seconds)
        EVENTS.record("load", model_id, seconds)
        _log.info("Loaded model '%s' in %.1fms.", model_id, seconds * 1e3)
        return model

    def _unpinner(self, model_id: str) -> Callable[[], None]:
        loop = self._bind_loop()

        def release() -> None:
            # Request scopes normally end on the loop; from a worker thread, hop over to it.
            try:
                running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop or loop.is_closed():
                self._unpin(model_id)
            else:
                loop.call_soon_threadsafe(self._unpin, model_id)

        return release

    def _unpin(self, model_id: str) -> None:
        self._spawn_unloads(self._state.unpin(model_id))

    def _spawn_unloads(self, evicted: list[tuple[str, M]], reason: str = "lru") -> None:
        if not evicted:
            return
        residency_changed()
        if self._loop is None or self._loop.is_closed():
            _log.warning("No event loop left to unload models %s.", [m for m, _ in evicted])
            return
        for model_id, model in evicted:
            task = self._spawn(self._unload(model_id, model, reason))
            # Once the task is done, nothing here refers to the model any more.
            task.add_done_callback(_release_device_memory)

    async def _unload(self, model_id: str, model: M, reason: str) -> None:
        """Run the model's unload hook; a failing hook is logged, never raised."""
        COUNTERS[f"model_unloads_{reason}"] += 1
        if self._state.holds(model):
            EVENTS.record("unload", model_id, None, reason)
            return  # the same object is still cached under another id
        _log.info("Unloading model '%s'.", model_id)
        start = time.perf_counter()
        attributes = {
            **_attrs(model_id),
            **self._sources.pop(model_id, {}),
            "muxgate.unload_reason": reason,
        }
        try:
            with _tracer.start_as_current_span(
                "muxgate.model.unload",
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    await run_unload_hook(model)
                except Exception as exc:
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                    _log.exception("Unload hook of model '%s' failed; dropped anyway.", model_id)
                    return
        finally:
            # The cache let go of the model whatever the hook did (failed, cancelled).
            EVENTS.record("unload", model_id, time.perf_counter() - start, reason)
        _log.info("Unloaded model '%s' in %.1fms.", model_id, (time.perf_counter() - start) * 1e3)


def _release_device_memory(_task: asyncio.Task[None]) -> None:
    release_device_memory()


_FETCH_LOG_KEY: Final = "muxgate.fetch_log"  # muxgate.backends._fetchspan.FETCH_LOG_KEY


def _source_attrs(fetched: list[tuple[str, int]]) -> dict[str, str | int]:
    """``muxgate.bytes`` (all fetches) and ``muxgate.source_url`` (the largest)."""
    return {
        "muxgate.bytes": sum(size for _, size in fetched),
        "muxgate.source_url": max(fetched, key=lambda f: f[1])[0],
    }


def _attrs(model_id: str) -> dict[str, str]:
    replica = current_replica()
    return {
        "muxgate.model_id": model_id,
        "muxgate.replica_id": replica.replica_id,
        "muxgate.deployment": replica.deployment,
    }
