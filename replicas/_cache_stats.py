"""What a process's model caches report to the gateway: the registry of live
caches, the cumulative counters, the numbered log of finished loads and
unloads, and the residency watchers (told when a load starts or ends or a
model is unloaded: the replica pushes its state to the gateways then).

Everything here is process-wide, because the replica server answers for the
process as a whole (``Pong`` and ``Drained`` carry :func:`counters` and
:func:`events_since`), however many decorated loaders and instances it holds.
The caches register themselves and bump the counters; nothing here knows how
a cache decides.
"""

from __future__ import annotations

import bisect
import itertools
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Protocol

from muxgate.replicas._counters import (
    CACHE_COUNTER_KEYS,
    MODEL_LOAD_BUCKETS,
    MODELS_LOADED_KEY,
    load_bucket_key,
)
from muxgate.replicas._protocol import ModelEvent

__all__ = [
    "COUNTERS",
    "EVENTS",
    "EVENT_LOG_SIZE",
    "EventLog",
    "count_load",
    "counters",
    "events_since",
    "register_cache",
    "registered_caches",
    "replica_state_snapshot",
    "residency_changed",
    "watch_residency",
]


class _ReportingCache(Protocol):
    @property
    def capacity(self) -> int: ...
    def loaded_ids(self) -> list[str]: ...
    def loading_ids(self) -> list[str]: ...


_CACHES: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_cache_numbers = itertools.count()


def register_cache(cache: _ReportingCache) -> None:
    """Count ``cache`` among this process's caches for as long as it lives."""
    _CACHES[next(_cache_numbers)] = cache


def registered_caches() -> list[Any]:
    """Every live registered cache, in creation order."""
    return list(_CACHES.values())


_BUCKET_KEYS: Final = tuple(load_bucket_key(bound) for bound in MODEL_LOAD_BUCKETS)

#: the cumulative counters, bumped in place by the caches
COUNTERS: dict[str, float] = dict.fromkeys(CACHE_COUNTER_KEYS, 0.0)


def count_load(seconds: float, cpu_seconds: float = 0.0) -> None:
    """Count one finished load that took ``seconds``, ``cpu_seconds`` of them
    on a CPU running the loader's code (see ``muxgate.replicas._load_cpu``)."""
    COUNTERS["model_loads"] += 1
    COUNTERS["model_load_seconds_sum"] += seconds
    COUNTERS["model_load_cpu_seconds_sum"] += cpu_seconds
    for key in _BUCKET_KEYS[bisect.bisect_left(MODEL_LOAD_BUCKETS, seconds) :]:
        COUNTERS[key] += 1


def counters() -> dict[str, float]:
    """Cumulative counters of this process, plus the ``models_loaded`` gauge."""
    result = dict(COUNTERS)
    result[MODELS_LOADED_KEY] = float(sum(len(c.loaded_ids()) for c in registered_caches()))
    return result


def replica_state_snapshot() -> tuple[list[str], list[str], int | None]:
    """``(loaded model ids least recently used first, loading model ids,
    cache limit)`` over all caches; the limit is the sum of their capacities,
    None when one has none or there is no cache."""
    loaded: dict[str, None] = {}
    loading: dict[str, None] = {}
    limit: int | None = None
    unlimited = False
    for cache in registered_caches():
        loaded.update(dict.fromkeys(cache.loaded_ids()))
        loading.update(dict.fromkeys(cache.loading_ids()))
        capacity = cache.capacity
        if capacity < 0:
            unlimited = True
        else:
            limit = (limit or 0) + capacity
    return list(loaded), list(loading), None if unlimited else limit


_WATCHERS: list[Callable[[], None]] = []


def watch_residency(watcher: Callable[[], None]) -> Callable[[], None]:
    """Call ``watcher`` (on the event loop, synchronously; it must not raise
    or block) whenever some cache's loaded or loading ids change; returns
    the function that stops it."""
    _WATCHERS.append(watcher)

    def stop() -> None:
        if watcher in _WATCHERS:
            _WATCHERS.remove(watcher)

    return stop


def residency_changed() -> None:
    """A cache started or ended a load or let go of a model: tell the watchers.

    Not on a hit (the LRU order changes on every call; only the ids held
    are pushed at once, the order travels with the next reply)."""
    for watcher in _WATCHERS:
        watcher()


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


#: this process's event log
EVENTS = EventLog()


def events_since(seq: int) -> list[ModelEvent]:
    """This process's model events numbered above ``seq`` (0: all kept), oldest first."""
    return EVENTS.since(seq)
