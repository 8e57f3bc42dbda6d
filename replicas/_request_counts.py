"""Requests per model id that one replica received, for the gateways'
warming decisions (``Pong.model_requests``).

Where several gateways share a pool, each sees only its share of the
traffic; the replicas see all of it. Each replica counts the calls it gets
per model id since it started (cumulative, so a gateway that misses a pong
loses nothing: it takes the growth since the counts it saw last) and
reports the most requested ids with each ``Pong``.
"""

from __future__ import annotations

import heapq

__all__ = ["MAX_COUNTED", "MAX_REPORTED", "RequestCounts"]

#: model ids a replica counts; beyond it the less requested half is forgotten
MAX_COUNTED = 4096
#: model ids a ``Pong`` carries (the most requested)
MAX_REPORTED = 256


class RequestCounts:
    """Cumulative requests per model id, bounded to ``max_counted`` ids.

    A forgotten id counts from 0 again: a gateway sees its count fall below
    what it saw and takes the new count as the growth (see
    ``muxgate.gateway._pool_reports.request_growth``).
    """

    __slots__ = ("_counts", "max_counted")

    def __init__(self, max_counted: int = MAX_COUNTED) -> None:
        self.max_counted = max(2, max_counted)
        self._counts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._counts)

    def __repr__(self) -> str:
        return f"<RequestCounts ids={len(self._counts)}/{self.max_counted}>"

    def count(self, model_id: str) -> None:
        """One request for ``model_id`` (an empty id, no model, is not counted)."""
        if not model_id:
            return
        counts = self._counts
        counts[model_id] = counts.get(model_id, 0) + 1
        if len(counts) > self.max_counted:
            kept = heapq.nlargest(self.max_counted // 2, counts.items(), key=lambda kv: kv[1])
            self._counts = dict(kept)

    def top(self, n: int = MAX_REPORTED) -> dict[str, int]:
        """The ``n`` most requested ids and their counts (ties by id)."""
        ranked = heapq.nsmallest(max(0, n), self._counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return dict(ranked)
