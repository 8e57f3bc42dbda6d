"""Model multiplexing: the ``multiplexed`` decorator and the per-replica model caches.

Two layers, so that the rules can be tested without an event loop:

* :class:`LRUState` is plain synchronous bookkeeping: which models are loaded
  (least recently used first), which are loading, which are pinned, and, for
  every change, which models to evict. It never awaits and never calls user code.
* :class:`ModelCache` wraps it with the asynchronous machinery: one shared load
  task per model id (single flight), a bound on concurrent loads, pins tied to
  request scopes, unload hooks, log lines, spans, process-wide counters and a
  bounded, numbered log of finished loads and unloads (:class:`EventLog`).

Capacity counts loaded *and* loading models, and evictions are unloaded before
the load that caused them starts, so memory peaks at the limit. A model handed
to a caller inside a :func:`~muxgate.replicas._context.request_scope` is pinned
until that request ends; eviction only takes unpinned models, and a cache that
is over its limit because everything was pinned shrinks as soon as pins release.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import contextvars
import functools
import inspect
import itertools
import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, Generic, TypeVar, overload

import anyio.to_thread
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from muxgate.replicas._context import current_replica, current_request
from muxgate.replicas._lru import MISSING, LRUState, _Missing
from muxgate.replicas._protocol import ModelEvent

__all__ = [
    "EVENT_LOG_SIZE",
    "MODEL_LOAD_BUCKETS",
    "EventLog",
    "LRUState",
    "ModelCache",
    "ModelCacheClosedError",
    "counters",
    "events_since",
    "load_bucket_key",
    "model_cache",
    "model_caches",
    "multiplexed",
    "replica_state_snapshot",
]

M = TypeVar("M")
_F = TypeVar("_F", bound=Callable[..., Any])

_log = logging.getLogger("muxgate.replicas")
# A proxy until the process installs a TracerProvider; it then follows the global one.
_tracer = trace.get_tracer("muxgate")

UNLOAD_REASONS = ("lru", "shutdown", "drain")
DEFAULT_MAX_CONCURRENT_LOADS = 4


class ModelCacheClosedError(RuntimeError):
    """The cache was closed (replica shutdown or drain) while a model was loading."""


# ---------------------------------------------------------------------------------------------
# Process-wide registry and counters (the replica server reports them to the gateway)

_CACHES: weakref.WeakValueDictionary[int, ModelCache[Any]] = weakref.WeakValueDictionary()
_cache_numbers = itertools.count()

#: Upper bounds (s) of the model load duration histogram: a small local
#: state dict loads in ~10 ms, a large remote one in minutes.
MODEL_LOAD_BUCKETS: Final[tuple[float, ...]] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip


def load_bucket_key(bound: float) -> str:
    """Counter key of the histogram bucket ``le=bound`` (loads that took at most ``bound`` s)."""
    return f"model_load_seconds_le_{bound:g}"


_BUCKET_KEYS: Final = tuple(load_bucket_key(bound) for bound in MODEL_LOAD_BUCKETS)
_COUNTERS: dict[str, float] = dict.fromkeys(
    (
        "model_loads",
        "model_load_failures",
        "model_unloads_lru",
        "model_unloads_shutdown",
        "model_unloads_drain",
        "cache_hits",
        "cache_misses",
        "model_load_seconds_sum",
        # cumulative, like Prometheus buckets; the +Inf bucket is model_loads
        *_BUCKET_KEYS,
    ),
    0.0,
)


def _count_load(seconds: float) -> None:
    _COUNTERS["model_loads"] += 1
    _COUNTERS["model_load_seconds_sum"] += seconds
    for key in _BUCKET_KEYS[bisect.bisect_left(MODEL_LOAD_BUCKETS, seconds) :]:
        _COUNTERS[key] += 1


class _IdentitySet:
    """Weakly held objects compared by identity (a WeakSet would use ``__eq__``)."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref[Any]] = {}

    def add(self, obj: object) -> bool:
        """Record ``obj``; False if it was already there. TypeError if not weak-referenceable."""
        key = id(obj)
        ref = self._refs.get(key)
        if ref is not None and ref() is obj:
            return False
        self._refs[key] = weakref.ref(obj, functools.partial(self._forget, key))
        return True

    def _forget(self, key: int, _ref: object) -> None:
        self._refs.pop(key, None)


# Objects whose unload hook already ran, across every cache: a hook runs at most once per object.
_UNLOADED = _IdentitySet()


#: finished loads and unloads a process keeps until its gateways ask for them
EVENT_LOG_SIZE: Final = 256


class EventLog:
    """The last ``maxlen`` finished model loads and unloads, numbered 1, 2, ...

    Recording is an append to a bounded deque, done only when a load or an
    unload finishes (never on a cache hit). A reader that falls more than
    ``maxlen`` events behind misses the oldest. Records happen on the event
    loop (loads and unloads are coroutines there), so numbering needs no lock.

    Args:
        maxlen: how many events to keep.
        clock: wall-clock Unix seconds (a seam for tests).
    """

    def __init__(self, maxlen: int = EVENT_LOG_SIZE, *, clock: Callable[[], float] = time.time):
        self._events: deque[ModelEvent] = deque(maxlen=maxlen)
        self._clock = clock
        self.last_seq = 0

    def record(
        self, kind: str, model_id: str, seconds: float | None = None, reason: str | None = None
    ) -> ModelEvent:
        """Append one event (``kind`` as in :class:`ModelEvent`) and return it."""
        self.last_seq += 1
        event = ModelEvent(
            seq=self.last_seq,
            time=self._clock(),
            kind=kind,
            model=model_id,
            duration_ms=None if seconds is None else round(seconds * 1e3, 3),
            reason=reason,
        )
        self._events.append(event)
        return event

    def since(self, seq: int) -> list[ModelEvent]:
        """The kept events numbered above ``seq``, oldest first."""
        events = self._events
        if seq >= self.last_seq or not events:
            return []
        # Numbers are consecutive, so the first wanted event sits at a known index.
        start = max(0, seq + 1 - events[0].seq)
        return list(itertools.islice(events, start, None))

    def __repr__(self) -> str:
        return f"<EventLog last_seq={self.last_seq} kept={len(self._events)}/{self._events.maxlen}>"


_EVENTS = EventLog()


def events_since(seq: int) -> list[ModelEvent]:
    """This process's model events numbered above ``seq`` (0: all kept), oldest first."""
    return _EVENTS.since(seq)


def model_caches() -> list[ModelCache[Any]]:
    """Every live model cache in this process, in creation order."""
    return list(_CACHES.values())


def replica_state_snapshot() -> tuple[list[str], list[str]]:
    """``(loaded model ids least recently used first, loading model ids)`` over all caches."""
    loaded: dict[str, None] = {}
    loading: dict[str, None] = {}
    for cache in model_caches():
        loaded.update(dict.fromkeys(cache.loaded_ids()))
        loading.update(dict.fromkeys(cache.loading_ids()))
    return list(loaded), list(loading)


def counters() -> dict[str, float]:
    """Cumulative counters of this process, plus the ``models_loaded`` gauge."""
    result = dict(_COUNTERS)
    result["models_loaded"] = float(sum(len(cache.loaded_ids()) for cache in model_caches()))
    return result


# ---------------------------------------------------------------------------------------------
# The asynchronous cache


class _Flight(Generic[M]):
    """One shared load of one model id; every caller for that id waits on ``done``."""

    __slots__ = ("done", "error", "model", "task")

    def __init__(self) -> None:
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
    ) -> None:
        _check_limit("max_num_models_per_replica", max_num_models, allow_unlimited=True)
        _check_limit("max_concurrent_loads", max_concurrent_loads, allow_unlimited=False)
        self.name = name
        self._load = load
        self._state: LRUState[M] = LRUState(max_num_models)
        self._max_concurrent_loads = max_concurrent_loads
        self._flights: dict[str, _Flight[M]] = {}
        #: model id -> span attributes of what its load read from storage
        self._sources: dict[str, dict[str, str | int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._load_slots: asyncio.Semaphore | None = None
        _CACHES[next(_cache_numbers)] = self

    # -- queries ------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._state.capacity

    def loaded_ids(self) -> list[str]:
        """Loaded model ids, least recently used first."""
        return self._state.loaded_ids()

    def loading_ids(self) -> list[str]:
        """Model ids whose load is queued or running."""
        return self._state.loading_ids()

    def pins(self) -> dict[str, int]:
        """Pin count per model id (requests holding it)."""
        return self._state.pins()

    def __repr__(self) -> str:
        limit = "unlimited" if self.capacity < 0 else str(self.capacity)
        return (
            f"<ModelCache {self.name!r} capacity={limit} loaded={self.loaded_ids()} "
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
        _COUNTERS["cache_hits"] += 1
        request = current_request()
        if request is not None:
            self._state.pin(model_id)
            request.on_release(self._unpinner(model_id))
        return model

    async def load(self, model_id: str) -> M:
        """The miss path: join the flight for ``model_id`` or start one."""
        _check_model_id(model_id)
        _COUNTERS["cache_misses"] += 1
        self._bind_loop()
        flight = self._flights.get(model_id)
        if flight is None:
            flight = self._start_flight(model_id)
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
        for model_id, model in self._state.remove_all():
            await self._unload(model_id, model, reason)

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
        self._flights.clear()
        self._tasks.clear()
        self._loop = None

    def _start_flight(self, model_id: str) -> _Flight[M]:
        evicted = self._state.start_load(model_id)
        flight: _Flight[M] = _Flight()
        self._flights[model_id] = flight
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
            async with self._load_slots:
                model = await self._timed_load(model_id)
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
                    self._spawn_unloads(self._state.finish_load(model_id, model))
                else:
                    self._state.fail_load(model_id)
            flight.done.set()

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
                model = await self._load(model_id)
            except Exception as exc:
                failed_after = time.perf_counter() - start
                _COUNTERS["model_load_failures"] += 1
                _EVENTS.record("load_failed", model_id, failed_after, type(exc).__name__)
                _log.warning(
                    "Failed to load model '%s' after %.1fms.",
                    model_id,
                    failed_after * 1e3,
                    exc_info=True,
                )
                raise
            finally:
                otel_context.detach(token)
            if fetched:
                self._sources[model_id] = sources = _source_attrs(fetched)
                span.set_attributes(sources)
        seconds = time.perf_counter() - start
        _count_load(seconds)
        _EVENTS.record("load", model_id, seconds)
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

    def _spawn_unloads(self, evicted: list[tuple[str, M]]) -> None:
        if not evicted:
            return
        if self._loop is None or self._loop.is_closed():
            _log.warning("No event loop left to unload models %s.", [m for m, _ in evicted])
            return
        for model_id, model in evicted:
            self._spawn(self._unload(model_id, model, "lru"))

    async def _unload(self, model_id: str, model: M, reason: str) -> None:
        """Run the model's unload hook; a failing hook is logged, never raised."""
        _COUNTERS[f"model_unloads_{reason}"] += 1
        if self._state.holds(model):
            _EVENTS.record("unload", model_id, None, reason)
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
                    await _run_unload_hook(model)
                except Exception as exc:
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                    _log.exception("Unload hook of model '%s' failed; dropped anyway.", model_id)
                    return
        finally:
            # The cache let go of the model whatever the hook did (failed, cancelled).
            _EVENTS.record("unload", model_id, time.perf_counter() - start, reason)
        _log.info("Unloaded model '%s' in %.1fms.", model_id, (time.perf_counter() - start) * 1e3)


_FETCH_LOG_KEY: Final = "muxgate.fetch_log"  # muxgate.backends._fetch.FETCH_LOG_KEY


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


async def _run_unload_hook(model: object) -> None:
    """``aclose()``, else ``close()``, else ``__del__``: at most once per object."""
    try:
        if not _UNLOADED.add(model):
            return
    except TypeError:
        pass  # not weak-referenceable: cannot be tracked
    aclose = getattr(model, "aclose", None)
    if callable(aclose):
        result = aclose()
        if inspect.isawaitable(result):
            await result
        return
    close = getattr(model, "close", None)
    if callable(close):
        if inspect.iscoroutinefunction(close):
            await close()
        else:
            await anyio.to_thread.run_sync(close)
        return
    if getattr(type(model), "__del__", None) is not None:
        # Ray Serve calls __del__ explicitly on eviction, and users rely on it. The
        # interpreter would call it a second time when the object is collected, so the
        # object's class is swapped for a subclass whose __del__ does nothing.
        finalizer = model.__del__  # type: ignore[attr-defined]
        if inspect.iscoroutinefunction(finalizer):
            await finalizer()
        else:
            await anyio.to_thread.run_sync(finalizer)
        _disarm_finalizer(model)


_QUIET_CLASSES: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()


def _disarm_finalizer(model: object) -> None:
    cls = type(model)
    try:
        quiet = _QUIET_CLASSES.get(cls)
        if quiet is None:
            namespace = {
                "__del__": lambda self: None,
                "__slots__": (),
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
            }
            quiet = type(cls.__name__, (cls,), namespace)
            _QUIET_CLASSES[cls] = quiet
        model.__class__ = quiet
    except Exception:  # builtins, incompatible layouts, __init_subclass__ refusing: leave it
        _log.debug("Could not disarm __del__ of %r", cls, exc_info=True)


# ---------------------------------------------------------------------------------------------
# The decorator


def _check_limit(name: str, value: object, *, allow_unlimited: bool) -> None:
    if type(value) is not int:  # bool is an int subclass, and is refused too
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if allow_unlimited and (value == 0 or value < -1):
        raise ValueError(f"{name} must be -1 (no limit) or at least 1, got {value}.")
    if not allow_unlimited and value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}.")


def _check_model_id(model_id: object) -> None:
    if type(model_id) is not str:
        raise TypeError(f"The model ID must be a str, got {type(model_id).__name__}.")
    if not model_id:
        raise ValueError("The model ID cannot be empty.")


class _Loader:
    """What ``@multiplexed`` attached to one function: its options and its caches."""

    def __init__(
        self, func: Callable[..., Any], *, is_method: bool, max_models: int, max_loads: int
    ) -> None:
        self.func = func
        self.is_method = is_method
        self.max_models = max_models
        self.max_loads = max_loads
        self.name = getattr(func, "__qualname__", repr(func))
        self.is_async = inspect.iscoroutinefunction(func)
        self.attr = f"__muxgate_cache_{id(self):x}"
        self.function_cache: ModelCache[Any] | None = None
        self.slotted_caches: dict[int, ModelCache[Any]] = {}

    def make_cache(self, instance: object) -> ModelCache[Any]:
        func = self.func
        args: tuple[object, ...] = (instance,) if self.is_method else ()
        if self.is_async:

            async def load(model_id: str) -> Any:
                return await func(*args, model_id)

        else:

            async def load(model_id: str) -> Any:
                # Never on the loop; the copied context keeps get_multiplexed_model_id() working.
                context = contextvars.copy_context()
                return await anyio.to_thread.run_sync(
                    functools.partial(context.run, func, *args, model_id)
                )

        return ModelCache(
            load,
            max_num_models=self.max_models,
            max_concurrent_loads=self.max_loads,
            name=self.name,
        )

    def cache_for(self, instance: object = None) -> ModelCache[Any]:
        if not self.is_method:
            if self.function_cache is None:
                self.function_cache = self.make_cache(None)
            return self.function_cache
        try:
            namespace = vars(instance)
        except TypeError:  # __slots__ without __dict__: keep it here, keyed by identity
            key = id(instance)
            cache = self.slotted_caches.get(key)
            if cache is None:
                cache = self.slotted_caches[key] = self.make_cache(instance)
                # Not weak-referenceable either: the cache lives as long as the process.
                with contextlib.suppress(TypeError):
                    weakref.finalize(instance, self.slotted_caches.pop, key, None)
            return cache
        cache = namespace.get(self.attr)
        if cache is None:
            cache = namespace[self.attr] = self.make_cache(instance)
        return cache


@overload
def multiplexed(
    func: _F, *, max_num_models_per_replica: int = 3, max_concurrent_loads: int = ...
) -> _F: ...


@overload
def multiplexed(
    func: None = None, *, max_num_models_per_replica: int = 3, max_concurrent_loads: int = ...
) -> Callable[[_F], _F]: ...


def multiplexed(
    func: Callable[..., Any] | None = None,
    *,
    max_num_models_per_replica: int = 3,
    max_concurrent_loads: int = DEFAULT_MAX_CONCURRENT_LOADS,
) -> Any:
    """Turn a model loader into a cached, multiplexed one.

    The loader takes ``model_id`` (after ``self`` for a method) and returns the
    model; the decorated version is always awaited, and keeps up to
    ``max_num_models_per_replica`` models per process (per instance for a
    method), evicting the least recently used unpinned one. Sync loaders run in
    a worker thread.

    Args:
        func: the loader, when used bare as ``@multiplexed``.
        max_num_models_per_replica: cache capacity; ``-1`` for no limit.
        max_concurrent_loads: how many different models may load at once.

    Raises:
        TypeError: ``func`` is a class, not callable, or has no ``model_id``
            argument; a limit is not an int.
        ValueError: a limit is out of range.
    """
    _check_limit("max_num_models_per_replica", max_num_models_per_replica, allow_unlimited=True)
    _check_limit("max_concurrent_loads", max_concurrent_loads, allow_unlimited=False)

    def decorate(loader_func: Callable[..., Any]) -> Callable[..., Any]:
        is_method = _loader_shape(loader_func)
        loader = _Loader(
            loader_func,
            is_method=is_method,
            max_models=max_num_models_per_replica,
            max_loads=max_concurrent_loads,
        )
        wrapper: Callable[..., Any]
        if is_method:
            cache_for = loader.cache_for

            async def method_wrapper(self: object, model_id: str) -> Any:
                cache = cache_for(self)
                model = cache.get_loaded(model_id)
                if model is MISSING:
                    return await cache.load(model_id)
                return model

            wrapper = method_wrapper
        else:
            cache = loader.cache_for(None)

            async def function_wrapper(model_id: str) -> Any:
                model = cache.get_loaded(model_id)
                if model is MISSING:
                    return await cache.load(model_id)
                return model

            wrapper = function_wrapper
        functools.update_wrapper(wrapper, loader_func)
        setattr(wrapper, "__muxgate_loader__", loader)  # noqa: B010 (a dunder on a function)
        return wrapper

    if func is None:
        return decorate
    return decorate(func)


def _loader_shape(func: object) -> bool:
    """Validate a loader; True if it is a method (``self`` before ``model_id``)."""
    if inspect.isclass(func):
        raise TypeError(
            f"@multiplexed decorates a function or method, not a class ({func.__qualname__})."
        )
    if not callable(func):
        raise TypeError(f"@multiplexed decorates a function or method, not {type(func).__name__}.")
    name = getattr(func, "__qualname__", repr(func))
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError) as exc:
        raise TypeError(f"Cannot read the signature of {name}.") from exc
    names = [p.name for p in params]
    if names == ["model_id"] or (len(names) == 2 and names[1] == "model_id"):
        return len(names) == 2
    raise TypeError(
        f"{name} must take a single 'model_id' argument (after 'self' for a method), "
        f"got ({', '.join(names)})."
    )


def model_cache(loader: Callable[..., Any]) -> ModelCache[Any]:
    """The cache behind a decorated function, or behind a bound decorated method.

    ``model_cache(load_model)`` or ``model_cache(instance.get_model)``.
    """
    instance = getattr(loader, "__self__", None)
    func = getattr(loader, "__func__", loader)
    spec = getattr(func, "__muxgate_loader__", None)
    if not isinstance(spec, _Loader):
        raise TypeError(f"{loader!r} is not decorated with @multiplexed.")
    if spec.is_method and instance is None:
        raise TypeError("Pass a bound method (instance.get_model) to get its cache.")
    return spec.cache_for(instance)
