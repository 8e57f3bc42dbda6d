"""The eviction-policy seam of the model cache, and the policies by name.

A policy is a plain synchronous object that sees model ids only: which ids
are held, which are asked for, in what order to give held ids up, and
whether a newly built model may take a held one's place. It never sees the
models, the pins or the loads: pinning, single flight, load order and the
unload hooks are the cache's (:class:`~muxgate.replicas._cache_state.CacheState`
and :class:`~muxgate.replicas._cache.ModelCache`), the same for every policy.

To add a policy: a class with the methods of :class:`EvictionPolicy` and a
no-argument constructor (or ``capacity=``), registered in
:data:`EVICTION_POLICIES` under the name the config and ``@multiplexed`` use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from muxgate.replicas._lru import LRU
from muxgate.replicas._tinylfu import TinyLFU

__all__ = ["EVICTION_POLICIES", "EvictionPolicy", "make_policy"]


class EvictionPolicy(Protocol):
    """What a model cache asks its eviction policy. Ids only, no I/O."""

    #: the name the config and ``@multiplexed(eviction_policy=...)`` use
    name: str

    def access(self, model_id: str) -> None:
        """A caller asked for ``model_id`` (held or not; hits, misses and joined loads)."""

    def insert(self, model_id: str) -> None:
        """``model_id`` is now held (it was just built)."""

    def remove(self, model_id: str) -> None:
        """``model_id`` is no longer held."""

    def order(self) -> Iterable[str]:
        """The held ids, the first to give up first (for LRU: least recently used first)."""
        ...

    def admit(self, candidate: str, victim: str) -> bool:
        """Whether ``candidate`` (not held) may take the place of ``victim`` (held).

        A refused candidate is still loaded and handed to the callers that
        asked for it, then dropped as soon as they are done with it.
        """
        ...


#: policy name -> factory taking the cache's capacity (``-1``: no limit)
EVICTION_POLICIES: dict[str, Callable[[int], EvictionPolicy]] = {
    "lru": lambda capacity: LRU(),
    "tinylfu": TinyLFU,
}


def make_policy(name: str, capacity: int) -> EvictionPolicy:
    """A fresh policy object for one cache of ``capacity`` models.

    Raises:
        ValueError: no policy has that name.
    """
    try:
        factory = EVICTION_POLICIES[name]
    except KeyError:
        known = ", ".join(repr(n) for n in sorted(EVICTION_POLICIES))
        raise ValueError(f"eviction_policy must be one of {known}, got {name!r}.") from None
    return factory(capacity)
