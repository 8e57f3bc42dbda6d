"""The ``multiplexed`` decorator: a model loader turned into a cached one.

The decorator validates the loader and its options and finds the
:class:`~muxgate.replicas._cache.ModelCache` of each call (one per function,
one per instance for a method). The cache rules live in
:mod:`muxgate.replicas._cache` (async: single flight, pins, hooks) and
:mod:`muxgate.replicas._cache_state` (pure bookkeeping), eviction policies in
:mod:`muxgate.replicas._eviction`, and what a process reports to the gateway
in :mod:`muxgate.replicas._cache_stats`; the names are re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import difflib
import functools
import inspect
import weakref
from collections.abc import Callable
from typing import Any, TypeVar, overload

import anyio.to_thread

from muxgate.replicas._cache import ModelCache
from muxgate.replicas._cache_options import (
    DEFAULT_LOAD_ORDER,
    DEFAULT_MAX_CONCURRENT_LOADS,
    LoadOrder,
    ModelCacheClosedError,
    ModelTooLargeError,
    check_limit,
    check_load_order,
)
from muxgate.replicas._cache_state import MISSING, LRUState
from muxgate.replicas._cache_stats import (
    EVENT_LOG_SIZE,
    EventLog,
    counters,
    events_since,
    registered_caches,
    replica_state_snapshot,
)
from muxgate.replicas._eviction import make_policy
from muxgate.replicas._load_cpu import charged, thread_cpu_of
from muxgate.replicas._loader_thread import (
    LoaderLoopError,
    home_loop,
    in_a_load,
    is_async_callable,
    is_other_loop_error,
    loader_thread,
    run_on,
)
from muxgate.replicas._logging import describe_exception

__all__ = [
    "EVENT_LOG_SIZE",
    "EventLog",
    "LRUState",
    "LoaderExitError",
    "LoaderLoopError",
    "ModelCache",
    "ModelCacheClosedError",
    "ModelTooLargeError",
    "configure_model_caches",
    "counters",
    "events_since",
    "instance_caches",
    "model_cache",
    "model_caches",
    "multiplexed",
    "replica_state_snapshot",
]

_F = TypeVar("_F", bound=Callable[..., Any])


def model_caches() -> list[ModelCache[Any]]:
    """Every live model cache in this process, in creation order."""
    return [cache for cache in registered_caches() if isinstance(cache, ModelCache)]


# ---------------------------------------------------------------------------------------------
# The decorator


#: the deployment's settings from the app config (``configure_model_caches``);
#: they win over the decorator's arguments, which win over the defaults
_DEPLOYMENT_OPTIONS: dict[str, Any] = {}


def configure_model_caches(
    *,
    eviction_policy: str | None = None,
    load_order: str | None = None,
    max_bytes_per_replica: int | None = None,
    load_on_loop: bool | None = None,
) -> None:
    """Settings of this process's deployment for every model cache created from now on.

    The replica calls it from its spec before it imports the deployment's code.
    ``None`` leaves the decorator's argument (else the default) in force.

    Raises:
        ValueError: an unknown policy name or load order.
    """
    if eviction_policy is not None:
        make_policy(eviction_policy, 1)  # validates the name
    if load_order is not None:
        check_load_order(load_order)
    if max_bytes_per_replica is not None:
        check_limit("max_bytes_per_replica", max_bytes_per_replica, allow_unlimited=True)
    _DEPLOYMENT_OPTIONS.clear()
    if max_bytes_per_replica is not None:
        _DEPLOYMENT_OPTIONS["max_bytes"] = max_bytes_per_replica
    if eviction_policy is not None:
        _DEPLOYMENT_OPTIONS["eviction_policy"] = eviction_policy
    if load_order is not None:
        _DEPLOYMENT_OPTIONS["load_order"] = load_order
    if load_on_loop is not None:
        _DEPLOYMENT_OPTIONS["load_on_loop"] = load_on_loop


class _Loader:
    """What ``@multiplexed`` attached to one function: its options and its caches."""

    def __init__(
        self,
        func: Callable[..., Any],
        *,
        is_method: bool,
        max_models: int,
        max_loads: int,
        eviction_policy: str,
        load_order: LoadOrder,
        max_bytes: int = -1,
        sizeof: Callable[[Any], int] | None = None,
        load_on_loop: bool = False,
    ) -> None:
        self.func = func
        self.load_on_loop = load_on_loop
        self.max_bytes = max_bytes
        self.sizeof = sizeof
        self.is_method = is_method
        self.max_models = max_models
        self.max_loads = max_loads
        self.eviction_policy = eviction_policy
        self.load_order = load_order
        self.name = getattr(func, "__qualname__", repr(func))
        self.is_async = is_async_callable(func)  # also an object with an async __call__
        self.attr = f"__muxgate_cache_{id(self):x}"
        self.function_cache: ModelCache[Any] | None = None
        self.slotted_caches: dict[int, ModelCache[Any]] = {}

    def make_cache(self, instance: object) -> ModelCache[Any]:
        func = self.func
        args: tuple[object, ...] = (instance,) if self.is_method else ()
        on_loop = _DEPLOYMENT_OPTIONS.get("load_on_loop", self.load_on_loop)
        if self.is_async and on_loop:

            async def load(model_id: str) -> Any:
                return await _call_async(func, *args, model_id)

        elif self.is_async:
            loops, name = loader_thread(), self.name

            async def load(model_id: str) -> Any:
                # Off the replica's loop, so that blocking code in the loader's body
                # (torch) never holds the calls of other requests; see _loader_thread.
                try:
                    return await loops.run(functools.partial(_call_async, func, *args, model_id))
                except RuntimeError as exc:
                    if is_other_loop_error(exc):
                        raise _other_loop_error(name, model_id, exc) from exc
                    raise

        else:
            name = self.name

            async def load(model_id: str) -> Any:
                # Never on the loop; the copied context keeps get_multiplexed_model_id() working.
                context = contextvars.copy_context()
                model = await anyio.to_thread.run_sync(
                    functools.partial(context.run, _call_sync, func, *args, model_id)
                )
                if inspect.isawaitable(model):
                    # `return load_state_dict(...)` in a plain def: not a model.
                    if inspect.iscoroutine(model):
                        model.close()  # never awaited: no "never awaited" warning later
                    raise TypeError(
                        f"@multiplexed loader {name} returned an awaitable, not a model:"
                        " a loader that awaits (e.g. muxgate.backends.load_state_dict)"
                        " must be `async def` and await it"
                    )
                return model

        policy = _DEPLOYMENT_OPTIONS.get("eviction_policy", self.eviction_policy)
        return ModelCache(
            load,
            max_num_models=self.max_models,
            max_concurrent_loads=self.max_loads,
            name=self.name,
            policy=make_policy(policy, self.max_models),
            load_order=_DEPLOYMENT_OPTIONS.get("load_order", self.load_order),
            max_bytes=_DEPLOYMENT_OPTIONS.get("max_bytes", self.max_bytes),
            sizeof=self.sizeof,
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
    func: _F,
    *,
    max_num_models_per_replica: int = 3,
    max_concurrent_loads: int = ...,
    eviction_policy: str = ...,
    load_order: LoadOrder = ...,
    max_bytes_per_replica: int = ...,
    sizeof: Callable[[Any], int] | None = ...,
    load_on_loop: bool = ...,
) -> _F: ...


@overload
def multiplexed(
    func: None = None,
    *,
    max_num_models_per_replica: int = 3,
    max_concurrent_loads: int = ...,
    eviction_policy: str = ...,
    load_order: LoadOrder = ...,
    max_bytes_per_replica: int = ...,
    sizeof: Callable[[Any], int] | None = ...,
    load_on_loop: bool = ...,
) -> Callable[[_F], _F]: ...


def multiplexed(
    func: Callable[..., Any] | None = None,
    *,
    max_num_models_per_replica: int = 3,
    max_concurrent_loads: int = DEFAULT_MAX_CONCURRENT_LOADS,
    eviction_policy: str = "lru",
    load_order: LoadOrder = DEFAULT_LOAD_ORDER,
    max_bytes_per_replica: int = -1,
    sizeof: Callable[[Any], int] | None = None,
    load_on_loop: bool = False,
    **others: Any,
) -> Any:
    """Turn a model loader into a cached, multiplexed one.

    The loader takes ``model_id`` (after ``self`` for a method) and returns the
    model; the decorated version is always awaited, and keeps up to
    ``max_num_models_per_replica`` models per process (per instance for a
    method), evicting the least recently used unpinned one. Sync loaders run in
    a worker thread; async loaders on a loader thread's own event loop, in a
    copy of the caller's context (``get_multiplexed_model_id()`` and the
    caller's context variables work), so that blocking code in their body
    never holds the replica's event loop. A deployment's ``eviction_policy``,
    ``load_order``, ``max_bytes_per_replica`` and ``load_on_loop`` in the app
    config win over the arguments here.

    Args:
        func: the loader, when used bare as ``@multiplexed``.
        max_num_models_per_replica: cache capacity; ``-1`` for no limit.
        max_concurrent_loads: how many different models may load at once.
        eviction_policy: ``"lru"`` (the default), or a frequency-aware policy
            registered in ``muxgate.replicas._eviction.EVICTION_POLICIES``.
        load_order: ``"evict_after"`` (default): a model is evicted only once
            the one replacing it is built, so a failed load never costs a
            working model (memory peaks at the limit plus the models being
            built); ``"evict_first"``: evicted before the load starts
            (memory peaks at the limit).
        max_bytes_per_replica: byte budget beside the count, ``-1`` (the
            default) for none. Each model is measured once built (a module's
            or state dict's tensor bytes, de-duplicated by storage, on any
            device; else the model's ``__muxgate_nbytes__()``); eviction
            frees until it fits, and a model that can never fit fails with
            ``ModelTooLargeError`` (507 ``model_too_large``) and is not kept.
            The deployment's ``max_bytes_per_replica`` in the app config wins.
        sizeof: ``sizeof(model) -> int`` bytes, instead of the rules above.
        load_on_loop: run an async loader on the replica's event loop, as a
            coroutine of the caller, instead of on a loader thread: for a
            loader that awaits objects bound to the replica's loop (an
            ``asyncio.Event`` set by a request, a client session created
            there). Without it such a loader fails with ``LoaderLoopError``,
            which names this option. Its body must then never block.

    Raises:
        TypeError: ``func`` is a class, not callable, or has no ``model_id``
            argument; a limit is not an int.
        ValueError: a limit is out of range, an unknown policy or load order.
    """
    if others:
        option = next(iter(others))
        known = [
            p for p in inspect.signature(multiplexed).parameters if p not in ("func", "others")
        ]
        close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"it takes {', '.join(known)}."
        raise TypeError(f"@multiplexed() got an unexpected keyword argument {option!r}: {hint}")
    check_limit("max_num_models_per_replica", max_num_models_per_replica, allow_unlimited=True)
    check_limit("max_concurrent_loads", max_concurrent_loads, allow_unlimited=False)
    make_policy(eviction_policy, max_num_models_per_replica)  # validates the name
    check_load_order(load_order)
    check_limit("max_bytes_per_replica", max_bytes_per_replica, allow_unlimited=True)
    if sizeof is not None and not callable(sizeof):
        raise TypeError(f"sizeof must be callable, got {type(sizeof).__name__}.")
    if type(load_on_loop) is not bool:
        raise TypeError(f"load_on_loop must be a bool, got {type(load_on_loop).__name__}.")

    def decorate(loader_func: Callable[..., Any]) -> Callable[..., Any]:
        is_method = _loader_shape(loader_func)
        loader = _Loader(
            loader_func,
            is_method=is_method,
            max_models=max_num_models_per_replica,
            max_loads=max_concurrent_loads,
            eviction_policy=eviction_policy,
            load_order=load_order,
            max_bytes=max_bytes_per_replica,
            sizeof=sizeof,
            load_on_loop=load_on_loop,
        )
        wrapper: Callable[..., Any]
        # A hit may wait out a load step under way (hits_wait_for_loads; _load_steps).
        steps = loader_thread().steps
        if is_method:
            cache_for = loader.cache_for

            async def method_wrapper(self: object, model_id: str) -> Any:
                # Called from another loader's body on the loader thread: the
                # cache belongs to the replica's loop, so the call goes there.
                if (home := home_loop()) is not None:
                    return await run_on(home, method_wrapper(self, model_id))
                cache = cache_for(self)
                model = cache.get_loaded(model_id)
                if model is MISSING:
                    return await cache.load(model_id)
                if steps.enabled and steps.running and not in_a_load():
                    await steps.wait_for_step()
                return model

            wrapper = method_wrapper
        else:

            async def function_wrapper(model_id: str) -> Any:
                if (home := home_loop()) is not None:  # as in method_wrapper
                    return await run_on(home, function_wrapper(model_id))
                # Made on first use, so that the deployment's settings apply to it.
                cache = loader.function_cache or loader.cache_for(None)
                model = cache.get_loaded(model_id)
                if model is MISSING:
                    return await cache.load(model_id)
                if steps.enabled and steps.running and not in_a_load():
                    await steps.wait_for_step()
                return model

            wrapper = function_wrapper
        functools.update_wrapper(wrapper, loader_func)
        setattr(wrapper, "__muxgate_loader__", loader)  # noqa: B010 (a dunder on a function)
        return wrapper

    if func is None:
        return decorate
    return decorate(func)


class LoaderExitError(Exception):
    """A ``@multiplexed`` loader raised something that is not an ``Exception``
    (``SystemExit``, ``KeyboardInterrupt``, another ``BaseException``).

    It is the load's failure, as any exception of the loader is: every waiter
    gets this error (500 ``user_error``), nothing is cached and the next
    request tries again. Raised as it was, it would stop the event loop the
    loader ran on (asyncio re-raises ``SystemExit`` and ``KeyboardInterrupt``
    out of a task), leaving the load unanswered or the replica gone.
    """


def _exit_error(exc: BaseException, model_id: str) -> LoaderExitError:
    return LoaderExitError(f"The loader of model '{model_id}' raised {describe_exception(exc)}.")


async def _call_async(func: Callable[..., Any], *args: Any) -> Any:
    """``await func(*args)`` (``model_id`` last), with a ``BaseException``
    turned into a failed load; a cancellation stays one."""
    try:
        return await charged(func(*args))
    except (Exception, asyncio.CancelledError):
        raise
    except BaseException as exc:
        raise _exit_error(exc, args[-1]) from exc


def _call_sync(func: Callable[..., Any], *args: Any) -> Any:
    """``func(*args)`` in a worker thread, as :func:`_call_async`."""
    try:
        return thread_cpu_of(functools.partial(func, *args))
    except Exception:
        raise
    except BaseException as exc:
        raise _exit_error(exc, args[-1]) from exc


def _other_loop_error(name: str, model_id: str, exc: RuntimeError) -> LoaderLoopError:
    return LoaderLoopError(
        f"The loader {name} of model '{model_id}' awaited an object bound to another event"
        f" loop ({exc}). Async @multiplexed loaders run on a loader thread's own event loop"
        " by default; to run this one on the replica's event loop, pass"
        " @multiplexed(load_on_loop=True), or set load_on_loop: true for the deployment"
        " in the app config."
    )


def _loader_shape(func: object) -> bool:
    """Validate a loader; True if it is a method (``self`` before ``model_id``)."""
    if inspect.isclass(func):
        raise TypeError(
            f"@multiplexed decorates a function or method, not a class ({func.__qualname__})."
        )
    if not callable(func):
        # @multiplexed(3): a number where the loader goes
        hint = (
            " (its options are keywords: @multiplexed(max_num_models_per_replica=3))"
            if type(func) is int
            else ""
        )
        raise TypeError(
            f"@multiplexed decorates a function or method, not {type(func).__name__}{hint}."
        )
    name = getattr(func, "__qualname__", repr(func))
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError) as exc:
        raise TypeError(f"Cannot read the signature of {name}.") from exc
    names = [p.name for p in params]
    shaped = names == ["model_id"] or (len(names) == 2 and names[1] == "model_id")
    # The cache passes the id positionally: a keyword-only, *args or
    # **kwargs ``model_id`` would fail at the first load, not here.
    if shaped and all(p.kind in _POSITIONAL for p in params):
        return len(names) == 2
    raise TypeError(
        f"{name} must take a single 'model_id' argument (after 'self' for a method), "
        f"got ({_signature_text(params)})."
    )


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _signature_text(params: list[inspect.Parameter]) -> str:
    """The parameters as written, without annotations or defaults: ``self, *, model_id``."""
    parts: list[str] = []
    for i, p in enumerate(params):
        if p.kind is inspect.Parameter.KEYWORD_ONLY and (
            i == 0 or params[i - 1].kind not in (p.kind, inspect.Parameter.VAR_POSITIONAL)
        ):
            parts.append("*")
        stars = {"VAR_POSITIONAL": "*", "VAR_KEYWORD": "**"}.get(p.kind.name, "")
        parts.append(stars + p.name)
    return ", ".join(parts)


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


def instance_caches(instance: object, loader: str | None = None) -> list[ModelCache[Any]]:
    """The caches of the ``@multiplexed`` loaders of ``instance`` (a deployment object):
    one per decorated method (made now if never used) and per decorated function
    it holds as an attribute; only the one named ``loader`` when given.

    Raises:
        ValueError: ``loader`` is not the name of a ``@multiplexed`` loader.
    """
    found: list[ModelCache[Any]] = []
    cls = type(instance)
    names = [loader] if loader is not None else [n for n in dir(cls) if not n.startswith("__")]
    for name in names:
        attr = inspect.getattr_static(cls, name, None)
        spec = getattr(attr, "__muxgate_loader__", None)
        if isinstance(spec, _Loader):
            found.append(spec.cache_for(instance if spec.is_method else None))
    if loader is not None and not found:
        raise ValueError(f"{cls.__qualname__}.{loader} is not a @multiplexed loader.")
    return found
