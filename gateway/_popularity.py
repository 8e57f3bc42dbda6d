"""Decayed per-model request counts, for the router's placement choice."""

from __future__ import annotations

import heapq

__all__ = ["PopularitySketch"]


class PopularitySketch:
    """Exponentially decayed request counts per model id.

    Time is the number of requests recorded, not the wall clock: a model's
    score is ``sum(2 ** -(age / half_life))`` over its requests, ``age``
    counted in requests since each one. So the sketch is pure and
    deterministic (same requests, same scores), adapts to the request rate by
    itself, and ranks models by their share of the last few ``half_life``
    requests.

    Forward decay makes a record O(1): each request adds a weight that grows by
    ``2 ** (1 / half_life)`` per request, and a score is the stored sum divided
    by the current weight. The sums are rescaled before they overflow; ids whose
    score fell below 1/100 of a request are forgotten then, and when more than
    ``max_tracked`` ids are kept, the weaker half goes.
    """

    __slots__ = ("_max", "_scores", "_step", "_weight", "half_life")

    def __init__(self, *, half_life: float = 1000.0, max_tracked: int = 65_536) -> None:
        if not half_life > 0:
            raise ValueError(f"half_life must be > 0, got {half_life}")
        self.half_life = half_life
        self._max = max(16, max_tracked)
        self._step = 2.0 ** (1.0 / half_life)
        self._weight = 1.0
        self._scores: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._scores)

    def __repr__(self) -> str:
        return f"PopularitySketch(tracked={len(self._scores)}, half_life={self.half_life:g})"

    def record(self, model_id: str, n: int = 1) -> None:
        """Count one request for ``model_id`` (``n``: that many in a row)."""
        if n <= 0:
            return
        step = self._step
        if n == 1:
            self._weight *= step
            added = self._weight
        else:  # the weights of the next n requests: a geometric series
            added = self._weight * step * (step**n - 1.0) / (step - 1.0)
            self._weight *= step**n
        scores = self._scores
        scores[model_id] = scores.get(model_id, 0.0) + added
        if self._weight > 1e100:
            self._rescale()
        elif len(scores) > self._max:
            self._prune()

    def score(self, model_id: str) -> float:
        """Decayed request count of ``model_id`` (0.0 if never seen or forgotten)."""
        return self._scores.get(model_id, 0.0) / self._weight

    def top(self, n: int) -> list[tuple[str, float]]:
        """The ``n`` highest-scoring model ids with their scores, highest first
        (ties broken by id, so every copy agrees)."""
        w = self._weight
        ranked = heapq.nsmallest(max(0, n), self._scores.items(), key=lambda kv: (-kv[1], kv[0]))
        return [(m, v / w) for m, v in ranked]

    def _rescale(self) -> None:
        w = self._weight
        self._scores = {m: v / w for m, v in self._scores.items() if v / w >= 0.01}
        self._weight = 1.0
        if len(self._scores) > self._max:
            self._prune()

    def _prune(self) -> None:
        floor = 0.01 * self._weight
        kept = {m: v for m, v in self._scores.items() if v >= floor}
        if len(kept) > self._max * 3 // 4:
            # Keep the stronger half; ties broken by id so every copy agrees.
            ranked = sorted(kept.items(), key=lambda kv: (-kv[1], kv[0]))
            kept = dict(ranked[: self._max // 2])
        self._scores = kept
