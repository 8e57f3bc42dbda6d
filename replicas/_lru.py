"""Least recently used eviction: the default policy of the model cache, and
the meaning of Ray Serve's ``@serve.multiplexed``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

__all__ = ["LRU"]


class LRU:
    """Held ids in recency order; every candidate is admitted.

    A hit moves the id to the most recently used end; eviction takes from the
    least recently used end (the cache skips pinned ids). O(1) per operation.
    """

    __slots__ = ("_order",)

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()  # least recently used first

    def access(self, model_id: str) -> None:
        if model_id in self._order:
            self._order.move_to_end(model_id)

    def insert(self, model_id: str) -> None:
        self._order[model_id] = None

    def remove(self, model_id: str) -> None:
        del self._order[model_id]

    def order(self) -> Iterable[str]:
        return self._order.keys()

    def admit(self, candidate: str, victim: str) -> bool:
        return True

    def __repr__(self) -> str:
        return f"<LRU {list(self._order)}>"
