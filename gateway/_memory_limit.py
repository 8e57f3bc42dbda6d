"""A deployment's memory limit (``max_replica_rss_bytes``): which replicas to
replace, decided from what they report.

Each replica reports its resident memory with every ``Pong`` (about once a
second). One above the limit is replaced (the pool drains it and starts
another) when it holds or is loading a model: those are what grew it, and a
fresh replica starts without them. One above the limit with no model would
be replaced by one as big, so it is left alone and logged once.

Synchronous and free of I/O; the pool does the draining.
"""

from __future__ import annotations

import logging

from muxgate.replicas.contract import ReplicaState

__all__ = ["MemoryLimit"]

_log = logging.getLogger("muxgate.gateway.pool")


class MemoryLimit:
    """Args: limit_bytes: the deployment's ``max_replica_rss_bytes`` (None: no limit)."""

    def __init__(self, limit_bytes: int | None) -> None:
        self.limit_bytes = limit_bytes
        #: replicas over the limit with no model, already logged
        self._logged: set[str] = set()

    def should_replace(self, replica_id: str, rss: int | None, state: ReplicaState) -> bool:
        """Whether the replica that reported ``rss`` and ``state`` is to be
        replaced now (logged with the reason)."""
        limit = self.limit_bytes
        if limit is None or rss is None or rss <= limit:
            return False
        if not state.models and not state.loading:
            if replica_id not in self._logged:
                self._logged.add(replica_id)
                _log.error(
                    "replica %s uses %d bytes with no model loaded, over"
                    " max_replica_rss_bytes=%d: not replaced; raise the limit",
                    replica_id,
                    rss,
                    limit,
                )
            return False
        _log.warning(
            "replica %s uses %d bytes of memory, over max_replica_rss_bytes=%d"
            " (models %s): draining it and starting a replacement",
            replica_id,
            rss,
            limit,
            list(state.models),
        )
        return True

    def forget(self, replica_id: str) -> None:
        """The replica is gone."""
        self._logged.discard(replica_id)

    def __repr__(self) -> str:
        return f"<MemoryLimit {self.limit_bytes} over_without_models={sorted(self._logged)}>"
