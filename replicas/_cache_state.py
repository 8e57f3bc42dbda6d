"""The pure bookkeeping of one model cache: which models are loaded, which are
loading, which are pinned, and what to evict when. No I/O and no awaiting:
:class:`muxgate.replicas._cache.ModelCache` wraps it with the async
single-flight loads and the unload hooks.

The guarantees every eviction policy gets from here, whatever it decides:

* a pinned model (in use by a request) is never evicted; a cache over its
  limit because everything was pinned sheds the excess as pins release;
* a model that just finished loading is not the victim of its own load;
* the load order: with ``evict_first`` the victim is evicted before the new
  load starts (memory peaks at the limit); otherwise it is evicted once the
  new model is built, so a failed load never costs a working model (memory
  peaks at the limit plus the models being built);
* a model the policy refuses to admit is still handed to the callers that
  asked for it, kept while they pin it, and then dropped ("transient");
* the byte budget (``max_bytes``): each held model's size is recorded when it
  is admitted, and victims are evicted until both the count and the bytes
  fit; a model that cannot fit at all (larger than the budget, or than what
  the kept models leave of it) is refused before it is admitted
  (:meth:`CacheState.room_error`), so resident bytes pass the budget only
  while models are being built;
* kept models (the deployment's ``pinned`` ids, and ids an operator loaded
  pinned) are never victims, and count against both limits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

from muxgate.replicas._eviction import EvictionPolicy
from muxgate.replicas._lru import LRU

__all__ = ["MISSING", "CacheState", "LRUState"]

M = TypeVar("M")


class _Missing:
    """Type of the sentinel for "not in the cache" (a loader may return ``None``)."""

    __slots__ = ()


MISSING = _Missing()


class CacheState(Generic[M]):
    """What one cache holds, and the eviction decisions; no I/O, no awaiting.

    Every mutator that can free room returns the evictions it decided as
    ``(model_id, model)`` pairs, already removed; the caller unloads them.

    Invariant kept where pins allow it: ``len(loaded) + reserved <= capacity``
    (``capacity == -1`` means no limit), where ``reserved`` counts loads that
    took their slot when they started (``evict_first``). Victims are the
    unpinned held ids in the policy's order.

    Args:
        capacity: models kept, ``-1`` for no limit.
        policy: the eviction policy (a fresh one per cache); default LRU.
        evict_first: evict before a load starts instead of once it succeeded.
    """

    __slots__ = (
        "_bytes",
        "_kept",
        "_loading",
        "_models",
        "_pins",
        "_reserved",
        "_sizes",
        "_transient",
        "capacity",
        "evict_first",
        "max_bytes",
        "policy",
    )

    def __init__(
        self,
        capacity: int,
        policy: EvictionPolicy | None = None,
        *,
        evict_first: bool = False,
        max_bytes: int = -1,
    ) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._sizes: dict[str, int] = {}  # held id -> bytes measured when admitted
        self._bytes = 0  # sum of _sizes
        self._kept: set[str] = set()  # never victims (config ``pinned``, admin loads)
        self.policy: EvictionPolicy = policy if policy is not None else LRU()
        self.evict_first = evict_first
        self._models: dict[str, M] = {}
        self._transient: dict[str, M] = {}  # built but not admitted: dropped once unpinned
        self._loading: dict[str, bool] = {}  # in start order; True: holds a slot
        self._reserved = 0  # loads holding a slot
        self._pins: dict[str, int] = {}

    def lookup(self, model_id: str) -> M | _Missing:
        """The model held for ``model_id`` (told to the policy as an access), or ``MISSING``."""
        self.policy.access(model_id)
        model = self._models.get(model_id, MISSING)
        if model is MISSING and self._transient:
            return self._transient.get(model_id, MISSING)
        return model

    def is_loading(self, model_id: str) -> bool:
        return model_id in self._loading

    def pin(self, model_id: str) -> None:
        """Protect ``model_id`` from eviction (counted; may precede its load)."""
        self._pins[model_id] = self._pins.get(model_id, 0) + 1

    def unpin(self, model_id: str) -> list[tuple[str, M]]:
        """Drop one pin; returns what can now be evicted."""
        count = self._pins.get(model_id, 0)
        if count <= 0:
            raise ValueError(f"model {model_id!r} is not pinned")
        if count > 1:
            self._pins[model_id] = count - 1
            return self._trim(None)
        del self._pins[model_id]
        evicted = self._trim(None)
        if model_id in self._transient:
            evicted.append((model_id, self._transient.pop(model_id)))
        return evicted

    def start_load(self, model_id: str) -> list[tuple[str, M]]:
        """Record a new load; returns what to evict *before* it starts (``evict_first`` only)."""
        if model_id in self._models or model_id in self._loading or model_id in self._transient:
            raise ValueError(f"model {model_id!r} is already loaded or loading")
        reserve = self.evict_first
        if reserve and not self._has_room():
            victim = self._first_victim(None)
            # Refused: it loads beside the full cache and goes once its callers are done.
            reserve = victim is None or self.policy.admit(model_id, victim)
        self._loading[model_id] = reserve
        if not reserve:
            return []
        self._reserved += 1
        return self._trim(None)

    def room_error(self, model_id: str, nbytes: int) -> str | None:
        """Why a model of ``nbytes`` can never be held here (None: it can).

        Only the kept models are counted: models pinned by requests leave when
        their requests end, so they only delay the eviction.
        """
        budget = self.max_bytes
        if budget < 0:
            return None
        if nbytes > budget:
            return (
                f"Model '{model_id}' needs {nbytes} bytes, more than the byte budget "
                f"(max_bytes_per_replica={budget})."
            )
        kept = sum(self._sizes.get(k, 0) for k in self._kept if k != model_id)
        if nbytes + kept > budget:
            return (
                f"Model '{model_id}' needs {nbytes} bytes; the byte budget of {budget} "
                f"leaves {budget - kept} beside the pinned models."
            )
        return None

    def has_room(self) -> bool:
        """Whether one more model may load without evicting: a free slot, and
        bytes left (the new model's size is known only once it is built)."""
        if self.max_bytes >= 0 and self._bytes >= self.max_bytes:
            return False
        return self._has_room()

    def start_warm(self, model_id: str) -> list[tuple[str, M]]:
        """Record a warming load: it takes no slot and evicts nothing (see ``finish_load``)."""
        if model_id in self._models or model_id in self._loading or model_id in self._transient:
            raise ValueError(f"model {model_id!r} is already loaded or loading")
        self._loading[model_id] = False
        return []

    def room_evicting(self, may_evict: Sequence[str]) -> bool:
        """Whether one more model may start a warming load if the ``may_evict``
        ids that may go now (see :meth:`finish_load`) were gone."""
        return self._victims_to_fit(None, -1, may_evict) is not None

    def finish_load(
        self,
        model_id: str,
        model: M,
        nbytes: int = 0,
        *,
        evict: bool = True,
        may_evict: Sequence[str] = (),
    ) -> list[tuple[str, M]]:
        """Record a successful load of ``nbytes``; returns what to evict now.

        Check :meth:`room_error` first: a model that cannot fit is not for here.
        With ``evict=False`` (warming) the model is admitted only if it fits
        without evicting anything, or by evicting the fewest of the
        ``may_evict`` ids, in their order, that are held, not pinned by a
        request, not kept and whose going makes it fit (none of them unless it
        fits then; never with ``evict_first``); otherwise it is dropped (or
        handed over as transient to callers that pinned it).
        """
        reserved = self._end_load(model_id)
        if reserved or self._has_room(nbytes):
            return self._admit(model_id, model, nbytes)
        if not evict and may_evict:
            victims = self._victims_to_fit(model_id, nbytes, may_evict)
            if victims is not None:
                evicted = [gone for victim in victims for gone in self.remove(victim)]
                return evicted + self._admit(model_id, model, nbytes)
        if evict and not self.evict_first:
            victim = self._first_victim(model_id)
            if victim is None or self.policy.admit(model_id, victim):
                return self._admit(model_id, model, nbytes)
        # Not admitted: the callers waiting for it still get it (they pinned it).
        if self._pins.get(model_id):
            self._transient[model_id] = model
            return []
        return [(model_id, model)]

    def fail_load(self, model_id: str) -> None:
        """Record a failed or abandoned load: nothing is cached, nothing was evicted for it
        unless ``evict_first``."""
        self._end_load(model_id)

    def remove_all(self) -> list[tuple[str, M]]:
        """Remove every held model (shutdown); pins and loads are left alone."""
        removed = [(model_id, self._models[model_id]) for model_id in self.policy.order()]
        for model_id, _ in removed:
            self.policy.remove(model_id)
        removed.extend(self._transient.items())
        self._models.clear()
        self._transient.clear()
        self._sizes.clear()
        self._bytes = 0
        return removed

    def remove(self, model_id: str) -> list[tuple[str, M]]:
        """Give up ``model_id`` (an operator's unload): no longer kept, no longer held.

        Returns it to unload now, or nothing when requests still use it: it is
        then dropped as soon as they are done (as a transient model).
        """
        self._kept.discard(model_id)
        model = self._models.pop(model_id, MISSING)
        if model is MISSING:
            return []
        self.policy.remove(model_id)
        self._bytes -= self._sizes.pop(model_id, 0)
        if self._pins.get(model_id):
            self._transient[model_id] = model  # type: ignore[assignment]
            return []
        return [(model_id, model)]  # type: ignore[list-item]

    def keep(self, model_id: str) -> None:
        """Never evict ``model_id`` (may precede its load; counts against the limits)."""
        self._kept.add(model_id)

    def unkeep(self, model_id: str) -> list[tuple[str, M]]:
        """Let ``model_id`` be evicted again; returns what can now be evicted."""
        self._kept.discard(model_id)
        return self._trim(None)

    def kept_ids(self) -> list[str]:
        """Kept (pinned by configuration or operator) ids, in held order first."""
        held = [m for m in self.policy.order() if m in self._kept]
        return held + sorted(self._kept.difference(held))

    def model_bytes(self) -> int:
        """Bytes of the held models, as measured when each was admitted."""
        return self._bytes

    def sizes(self) -> dict[str, int]:
        """Held id -> bytes, in the policy's order."""
        return {m: self._sizes.get(m, 0) for m in self.policy.order()}

    def loaded_ids(self) -> list[str]:
        """Held model ids in the policy's order (LRU: least recently used first)."""
        return list(self.policy.order())

    def loading_ids(self) -> list[str]:
        return list(self._loading)

    def pins(self) -> dict[str, int]:
        return dict(self._pins)

    def holds(self, model: object) -> bool:
        """Whether some entry still holds this very object (a loader may share one)."""
        return any(held is model for held in self._models.values()) or any(
            held is model for held in self._transient.values()
        )

    # -- internals ------------------------------------------------------------------------------

    def _end_load(self, model_id: str) -> bool:
        reserved = self._loading.pop(model_id)
        if reserved:
            self._reserved -= 1
        return reserved

    def _has_room(self, nbytes: int = 0) -> bool:
        if self.max_bytes >= 0 and self._bytes + nbytes > self.max_bytes:
            return False
        return self.capacity < 0 or len(self._models) + self._reserved < self.capacity

    def _victims_to_fit(
        self, model_id: str | None, nbytes: int, may_evict: Sequence[str]
    ) -> list[str] | None:
        """The fewest ``may_evict`` ids, in order, whose eviction makes room for
        ``model_id`` of ``nbytes`` (-1: not built yet, as :meth:`has_room`);
        None if evicting them all would not."""
        if self.evict_first:
            return None
        count, held = len(self._models) + self._reserved, self._bytes

        def fits() -> bool:
            bytes_full = held >= self.max_bytes if nbytes < 0 else held + nbytes > self.max_bytes
            if self.max_bytes >= 0 and bytes_full:
                return False
            return self.capacity < 0 or count < self.capacity

        chosen: list[str] = []
        for victim in dict.fromkeys(may_evict):
            if fits():
                break
            if (
                victim == model_id
                or victim not in self._models
                or self._pins.get(victim)
                or victim in self._kept
            ):
                continue
            chosen.append(victim)
            count -= 1
            held -= self._sizes.get(victim, 0)
        return chosen if fits() else None

    def _first_victim(self, spare: str | None) -> str | None:
        pins, kept = self._pins, self._kept
        for model_id in self.policy.order():
            if model_id != spare and model_id not in pins and model_id not in kept:
                return model_id
        return None

    def _admit(self, model_id: str, model: M, nbytes: int = 0) -> list[tuple[str, M]]:
        self._models[model_id] = model
        self._sizes[model_id] = nbytes
        self._bytes += nbytes
        self.policy.insert(model_id)
        return self._trim(model_id)

    def _trim(self, spare: str | None) -> list[tuple[str, M]]:
        count_excess = (
            len(self._models) + self._reserved - self.capacity if self.capacity >= 0 else 0
        )
        byte_excess = self._bytes - self.max_bytes if self.max_bytes >= 0 else 0
        if count_excess <= 0 and byte_excess <= 0:
            return []
        victims: list[str] = []
        pins, kept, sizes = self._pins, self._kept, self._sizes
        for model_id in self.policy.order():
            if count_excess <= 0 and byte_excess <= 0:
                break
            if model_id != spare and model_id not in pins and model_id not in kept:
                victims.append(model_id)
                count_excess -= 1
                byte_excess -= sizes.get(model_id, 0)
        for model_id in victims:
            self.policy.remove(model_id)
            self._bytes -= sizes.pop(model_id, 0)
        return [(model_id, self._models.pop(model_id)) for model_id in victims]

    def __len__(self) -> int:
        return len(self._models)

    def __repr__(self) -> str:
        limit = "unlimited" if self.capacity < 0 else str(self.capacity)
        extra = "" if self.policy.name == "lru" else f" policy={self.policy.name}"
        if self.max_bytes >= 0:
            extra += f" bytes={self._bytes}/{self.max_bytes}"
        if self._kept:
            extra += f" kept={self.kept_ids()}"
        if self._transient:
            extra += f" transient={list(self._transient)}"
        return (
            f"<{type(self).__name__} capacity={limit}{extra} loaded={self.loaded_ids()} "
            f"loading={self.loading_ids()} pinned={self._pins}>"
        )


class LRUState(CacheState[M]):
    """:class:`CacheState` with the LRU policy and evict-first loads (the first version's cache)."""

    __slots__ = ()

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity, LRU(), evict_first=True)
