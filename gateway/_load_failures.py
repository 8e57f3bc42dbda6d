"""The model ids whose last load failed, which warming leaves out (pure, no I/O).

A request for a model that does not load (not in storage, storage refusing
or down, the loader raising) gets its error; without this, the pool's
warming, ranking models by their request counts, would load that id again
right after (the first replica after a scale from zero warms the hottest
ids it does not hold, and the failed one is among them), and fail again.
Warming volunteers only models whose last load did not fail: a failure
counts against the id until a request for it succeeds (its model loaded
then) or newer failures push it out of the bounded set.
"""

from __future__ import annotations

from muxgate.replicas.contract import ErrorCode, ErrorInfo, ReplicaState

__all__ = ["DEFAULT_MAX_IDS", "FailedLoads"]

#: the most model ids remembered; the oldest failure goes first
DEFAULT_MAX_IDS = 4096

#: codes of calls that did not run to their end on the replica (refused,
#: stopped, cut off): they say nothing about the model's load
_NOT_RUN = frozenset(
    {
        ErrorCode.OVERLOADED,
        ErrorCode.DRAINING,
        ErrorCode.OVER_CAPACITY,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.CANCELLED,
        ErrorCode.DEADLINE,
    }
)


class FailedLoads:
    """Model ids whose last load in the pool failed, oldest failure first.

    A call for a model that ended with an error while the replica that
    answered holds the model neither loaded nor loading (its reply's state
    says so) is a failed load of that model: see :meth:`replied`. (A
    deployment that fails a request before it loads the model counts too;
    that costs the id one warming, never a request.) A call for it that
    succeeds clears it (:meth:`loaded`).

    Args:
        max_ids: the most ids kept; past it the oldest failure is forgotten.
    """

    __slots__ = ("_ids", "_max")

    def __init__(self, *, max_ids: int = DEFAULT_MAX_IDS) -> None:
        if max_ids < 1:
            raise ValueError(f"max_ids must be >= 1, got {max_ids}")
        self._max = max_ids
        # insertion order: the oldest failure first
        self._ids: dict[str, None] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._ids

    def __repr__(self) -> str:
        newest = list(self._ids)[-3:]
        return f"FailedLoads(ids={len(self._ids)}, max_ids={self._max}, newest={newest})"

    def failed(self, model_id: str) -> None:
        """A load of ``model_id`` failed (it becomes the newest)."""
        ids = self._ids
        ids.pop(model_id, None)
        ids[model_id] = None
        if len(ids) > self._max:
            del ids[next(iter(ids))]

    def loaded(self, model_id: str) -> None:
        """A call for ``model_id`` succeeded: its model loaded."""
        self._ids.pop(model_id, None)

    def replied(self, model_id: str, error: ErrorInfo, state: ReplicaState) -> bool:
        """A call for ``model_id`` ended with ``error``, the replica then in
        ``state``: record a failed load if it was one; whether it was."""
        if not model_id or error.code in _NOT_RUN:
            return False
        if model_id in state.models or model_id in state.loading:
            return False  # loaded (the deployment's code failed after) or still loading
        self.failed(model_id)
        return True
