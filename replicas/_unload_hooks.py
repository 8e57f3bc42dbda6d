"""Running a model's unload hook: ``aclose()``, else ``close()``, else ``__del__``,
at most once per model object however many caches or ids held it."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import weakref
from typing import Any

import anyio.to_thread

from muxgate.replicas._logging import describe_exception

__all__ = ["UnloadHookExitError", "run_unload_hook"]

_log = logging.getLogger("muxgate.replicas")


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


class UnloadHookExitError(Exception):
    """A model's unload hook raised something that is not an ``Exception``
    (``SystemExit``, ``KeyboardInterrupt``...): logged as a failing hook is.
    Raised as it was, it would stop the replica's event loop."""


async def run_unload_hook(model: object) -> None:
    """``aclose()``, else ``close()``, else ``__del__``: at most once per object.

    Raises:
        Exception: what the hook raised; :class:`UnloadHookExitError` for
            what is not an ``Exception`` (a cancellation stays one).
    """
    try:
        if not _UNLOADED.add(model):
            return
    except TypeError:
        pass  # not weak-referenceable: cannot be tracked
    try:
        await _run_hook(model)
    except (Exception, asyncio.CancelledError):
        raise
    except BaseException as exc:
        raise UnloadHookExitError(
            f"The unload hook of {type(model).__qualname__} raised {describe_exception(exc)}."
        ) from exc


async def _run_hook(model: object) -> None:
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
