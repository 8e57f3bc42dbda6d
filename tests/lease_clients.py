"""A lease's keeper in this process, for the tests of the leader lease."""

from __future__ import annotations

from muxgate.gateway._lease import Lease, LeaseGrant

__all__ = ["InMemoryLeaseClient"]


class InMemoryLeaseClient:
    """A ``Lease`` behind the lease client interface; set ``reachable`` to
    False to cut this gateway's link to it."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.reachable = True

    async def acquire(
        self, holder: str, period_s: float, in_flight: int, queued: int
    ) -> LeaseGrant:
        if not self.reachable:
            raise ConnectionError("cannot reach the lease's keeper")
        return self.lease.acquire(holder, period_s, in_flight=in_flight, queued=queued)

    async def release(self, holder: str, epoch: int) -> None:
        self.lease.release(holder, epoch)
