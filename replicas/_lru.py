"""The pure bookkeeping of one model cache: which models are loaded (in LRU
order), which are loading, which are pinned, and what to evict. No I/O and no
awaiting: :class:`muxgate.replicas._multiplex.ModelCache` wraps it with the
async single-flight loads and the unload hooks."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

__all__ = ["MISSING", "LRUState"]

M = TypeVar("M")


class _Missing:
    """Type of the sentinel for "not in the cache" (a loader may return ``None``)."""

    __slots__ = ()


MISSING = _Missing()


class LRUState(Generic[M]):
    """What one cache holds, and the eviction decisions; no I/O, no awaiting.

    Every mutator that can free room returns the evictions it decided as
    ``(model_id, model)`` pairs, already removed; the caller unloads them.

    Invariant kept where pins allow it: ``len(loaded) + len(loading) <= capacity``
    (``capacity == -1`` means no limit). Eviction always takes the least recently
    used unpinned model; a model that just finished loading is spared by the
    trim that follows its own load (it is about to be handed out).
    """

    __slots__ = ("_loading", "_models", "_pins", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._models: OrderedDict[str, M] = OrderedDict()  # least recently used first
        self._loading: dict[str, None] = {}  # an ordered set, in start order
        self._pins: dict[str, int] = {}

    def lookup(self, model_id: str) -> M | _Missing:
        """The loaded model (and mark it most recently used), or ``MISSING``."""
        model = self._models.get(model_id, MISSING)
        if model is not MISSING:
            self._models.move_to_end(model_id)
        return model

    def is_loading(self, model_id: str) -> bool:
        return model_id in self._loading

    def pin(self, model_id: str) -> None:
        """Protect ``model_id`` from eviction (counted; may precede its load)."""
        self._pins[model_id] = self._pins.get(model_id, 0) + 1

    def unpin(self, model_id: str) -> list[tuple[str, M]]:
        """Drop one pin; returns the excess that can now be evicted."""
        count = self._pins.get(model_id, 0)
        if count <= 0:
            raise ValueError(f"model {model_id!r} is not pinned")
        if count == 1:
            del self._pins[model_id]
        else:
            self._pins[model_id] = count - 1
        return self._trim(None)

    def start_load(self, model_id: str) -> list[tuple[str, M]]:
        """Record a new load; returns what to evict *before* it starts."""
        if model_id in self._models or model_id in self._loading:
            raise ValueError(f"model {model_id!r} is already loaded or loading")
        self._loading[model_id] = None
        return self._trim(None)

    def finish_load(self, model_id: str, model: M) -> list[tuple[str, M]]:
        """Record a successful load (most recently used); returns any excess to evict."""
        del self._loading[model_id]
        self._models[model_id] = model
        return self._trim(model_id)

    def fail_load(self, model_id: str) -> None:
        """Record a failed or abandoned load: nothing is cached."""
        del self._loading[model_id]

    def remove_all(self) -> list[tuple[str, M]]:
        """Remove every loaded model (shutdown); pins and loads are left alone."""
        removed = list(self._models.items())
        self._models.clear()
        return removed

    def loaded_ids(self) -> list[str]:
        return list(self._models)

    def loading_ids(self) -> list[str]:
        return list(self._loading)

    def pins(self) -> dict[str, int]:
        return dict(self._pins)

    def holds(self, model: object) -> bool:
        """Whether some entry still holds this very object (a loader may share one)."""
        return any(held is model for held in self._models.values())

    def _trim(self, spare: str | None) -> list[tuple[str, M]]:
        if self.capacity < 0:
            return []
        excess = len(self._models) + len(self._loading) - self.capacity
        if excess <= 0:
            return []
        victims: list[str] = []
        for model_id in self._models:
            if model_id != spare and model_id not in self._pins:
                victims.append(model_id)
                if len(victims) == excess:
                    break
        return [(model_id, self._models.pop(model_id)) for model_id in victims]

    def __len__(self) -> int:
        return len(self._models)

    def __repr__(self) -> str:
        limit = "unlimited" if self.capacity < 0 else str(self.capacity)
        return (
            f"<LRUState capacity={limit} loaded={list(self._models)} "
            f"loading={list(self._loading)} pinned={self._pins}>"
        )
