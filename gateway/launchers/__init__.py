"""Launchers: where replicas run, behind one interface (``Launcher``,
``ReplicaReporter``), registered by kind as fsspec keeps its filesystems.

Each kind maps to the dotted path of its class, imported only when asked
for, so a kind whose dependencies are missing costs nothing until used and
then fails with what to install. Built in:

=========  =====================================================
``local``  replicas as local processes, forked or spawned
           (``muxgate.gateway.launchers.local.LocalLauncher``)
``static`` ``muxgate replica`` servers started elsewhere, watched
           at fixed addresses or behind a DNS name
           (``muxgate.gateway.launchers.static.StaticLauncher``)
``ray``    Ray actors, each running a replica server
           (``muxgate.gateway.launchers.ray.RayLauncher``; needs
           ``muxgate[ray]``)
=========  =====================================================

A new kind is one module in this folder implementing the interface of
``muxgate.gateway.launchers._interface``, and one line in
``known_launchers`` (or ``register_launcher`` from outside).
"""

from __future__ import annotations

import importlib
from typing import Any

from muxgate.gateway.launchers._interface import (
    LaunchedReplica,
    Launcher,
    ReplicaReporter,
    ReplicaStartError,
    can_create,
)

__all__ = [
    "LaunchedReplica",
    "Launcher",
    "LauncherNotFoundError",
    "ReplicaReporter",
    "ReplicaStartError",
    "can_create",
    "get_launcher_class",
    "known_launchers",
    "register_launcher",
]

#: kind -> ``{"class": dotted path, "err": what to say when it cannot be imported}``
known_launchers: dict[str, dict[str, str]] = {
    "local": {"class": "muxgate.gateway.launchers.local.LocalLauncher"},
    "static": {"class": "muxgate.gateway.launchers.static.StaticLauncher"},
    "ray": {
        "class": "muxgate.gateway.launchers.ray.RayLauncher",
        "err": "Install muxgate[ray] (pip install 'muxgate[ray]') to run replicas as Ray actors",
    },
}

_registry: dict[str, type[Any]] = {}


class LauncherNotFoundError(ValueError):
    """No launcher of that kind is known, or its module cannot be imported."""


def register_launcher(kind: str, cls: str | type[Any], *, clobber: bool = False) -> None:
    """Make ``kind`` name a launcher class (or the dotted path of one).

    Raises:
        ValueError: ``kind`` is taken and ``clobber`` is False.
    """
    if not clobber and (kind in _registry or kind in known_launchers):
        raise ValueError(f"launcher kind {kind!r} is already registered")
    if isinstance(cls, str):
        known_launchers[kind] = {"class": cls}
        _registry.pop(kind, None)
    else:
        _registry[kind] = cls


def get_launcher_class(kind: str) -> type[Any]:
    """The launcher class registered as ``kind``, imported on first use.

    Raises:
        LauncherNotFoundError: unknown kind (the message lists the known
            ones), or its module failed to import (the message says what to
            install when the registration says it).
    """
    if kind in _registry:
        return _registry[kind]
    entry = known_launchers.get(kind)
    if entry is None:
        known = ", ".join(sorted({*known_launchers, *_registry}))
        raise LauncherNotFoundError(f"no launcher of kind {kind!r} (known: {known})")
    module_name, _, attr = entry["class"].rpartition(".")
    try:
        cls: type[Any] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        hint = entry.get("err") or f"cannot import {entry['class']}: {exc}"
        raise LauncherNotFoundError(f"launcher {kind!r}: {hint}") from exc
    _registry[kind] = cls
    return cls
