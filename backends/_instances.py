"""Filesystem instances kept per (protocol, class, options) for the fetch hot path."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from fsspec import AbstractFileSystem


def freeze_options(value: Any) -> Any:
    """A hashable stand-in for storage options, equal when the options are.

    Raises:
        TypeError: An option value is neither hashable nor a container of
            hashables (such options are not cached; see ``_Fetcher``).
    """
    if isinstance(value, Mapping):
        return tuple(
            sorted(((str(k), freeze_options(v)) for k, v in value.items()), key=lambda kv: kv[0])
        )
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(freeze_options(v) for v in value))
    if isinstance(value, (set, frozenset)):
        return frozenset(freeze_options(v) for v in value)
    hash(value)  # objects hashed by identity are kept alive by the key itself
    return value


class FilesystemInstances:
    """Filesystem instances per (protocol, class, options), bounded LRU.

    fsspec caches instances too, but finds them by tokenising the options
    on every construction, and the options must be deep-copied before each
    (botocore's Config mutates nested dicts in place). Here a hit costs one
    hash of the frozen options and nothing is copied; only a miss copies and
    constructs. Cleared in a forked child: async filesystems (s3fs, gcsfs)
    are bound to their parent's event-loop thread.
    """

    def __init__(self, max_size: int = 64) -> None:
        self._lock = threading.Lock()
        self._items: OrderedDict[Any, AbstractFileSystem] = OrderedDict()
        self._max_size = max_size

    def __repr__(self) -> str:
        return f"FilesystemInstances(size={len(self._items)}, max_size={self._max_size})"

    def get(self, key: Any) -> AbstractFileSystem | None:
        with self._lock:
            fs = self._items.get(key)
            if fs is not None:
                self._items.move_to_end(key)
            return fs

    def put(self, key: Any, fs: AbstractFileSystem) -> None:
        with self._lock:
            self._items[key] = fs
            self._items.move_to_end(key)
            while len(self._items) > self._max_size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


instances = FilesystemInstances()
os.register_at_fork(after_in_child=instances.clear)
