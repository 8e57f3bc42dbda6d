"""The leader lease of a ``ray`` deployment, kept by a Ray actor.

The authority is one named, detached actor per deployment,
``muxgate-lease-<deployment>`` in the launcher's namespace (``LeaseActor``):
a thin wrapper around ``muxgate.gateway._lease.Lease``. Ray runs its calls
one at a time, so each acquire, release and check is atomic. It needs no
CPU (``num_cpus=0``) and Ray restarts it if its node dies
(``max_restarts=-1``).

Its epochs survive it: each new epoch, with the holder it goes to, is
written to the Ray cluster's key-value store before it is granted, and an
actor that starts again reads them back and grants nothing for one period
(its predecessor's holder may still act until then), except to that holder,
whose next ask takes its lease back with the same epoch: a restart costs
the leader nothing. Epochs therefore only grow.

``check_epoch`` is the fence on the replicas' side: a replica actor asked
to start or stop with an epoch asks the lease actor whether that epoch is
still the current holder's, and refuses if not (a stale leader's late
action).

This module imports ``ray``; only ``muxgate.gateway.launchers.ray`` imports it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
import ray
import ray.exceptions
from ray.experimental import internal_kv

from muxgate.gateway._lease import Lease, LeaseGrant

__all__ = ["LEASE_PREFIX", "LeaseActor", "RayLeaseClient", "check_epoch", "take_lease"]

_log = logging.getLogger("muxgate.gateway.lease")

#: Each deployment's lease actor is named this plus the deployment's name.
LEASE_PREFIX = "muxgate-lease-"
#: Seconds a replica actor waits for the lease actor's answer to a check.
_CHECK_TIMEOUT_S = 10.0


def _epoch_key(deployment: str) -> bytes:
    return f"muxgate:lease-epoch:{deployment}".encode()


class _LastGrant(msgspec.Struct, frozen=True):
    """What the key-value store keeps of a deployment's lease."""

    epoch: int
    holder: str | None = None


def _decode_last_grant(stored: bytes | None) -> _LastGrant:
    """The stored last grant; a bare number (an earlier release's) is an
    epoch whose holder is unknown."""
    if not stored:
        return _LastGrant(0)
    if stored.strip().isdigit():
        return _LastGrant(int(stored))
    return msgspec.json.decode(stored, type=_LastGrant)


class LeaseActor:
    """Runs as the lease's authority (see the module).

    Args:
        deployment: the deployment it leases.
        namespace: its namespace (where the epoch is kept).
        period_s: how long it refuses every asker after a restart.
    """

    def __init__(self, deployment: str, namespace: str, period_s: float) -> None:
        self._key = _epoch_key(deployment)
        self._namespace = namespace
        last = _decode_last_grant(internal_kv._internal_kv_get(self._key, namespace=namespace))
        # Epoch 0: no lease was ever granted, so nobody can hold one.
        self._lease = Lease(
            epoch=last.epoch,
            blocked_for_s=period_s if last.epoch else 0.0,
            last_holder=last.holder,
        )

    def acquire(self, holder: str, period_s: float, in_flight: int, queued: int) -> LeaseGrant:
        before = self._lease.epoch
        grant = self._lease.acquire(holder, period_s, in_flight=in_flight, queued=queued)
        if self._lease.epoch != before:
            # Kept before anyone acts on it: a restarted actor never reuses it.
            internal_kv._internal_kv_put(
                self._key,
                msgspec.json.encode(_LastGrant(self._lease.epoch, self._lease.holder)),
                overwrite=True,
                namespace=self._namespace,
            )
        return grant

    def release(self, holder: str, epoch: int) -> bool:
        return self._lease.release(holder, epoch)

    def check(self, epoch: int) -> bool:
        return self._lease.check(epoch)

    def state(self) -> tuple[str | None, int]:
        """``(holder, epoch)`` now (for tests and for people debugging)."""
        return self._lease.holder, self._lease.epoch


class RayLeaseClient:
    """A gateway's way to the lease actor of ``deployment`` in ``namespace``;
    creates it if it does not exist yet (or no more)."""

    def __init__(self, deployment: str, namespace: str, period_s: float) -> None:
        self.name = LEASE_PREFIX + deployment
        self.namespace = namespace
        self._args = (deployment, namespace, period_s)
        self._actor_class: Any = ray.remote(LeaseActor)
        self._actor: Any = None

    def __repr__(self) -> str:
        return f"<RayLeaseClient {self.namespace}/{self.name}>"

    def _get(self) -> Any:
        if self._actor is None:
            self._actor = self._actor_class.options(
                name=self.name,
                namespace=self.namespace,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                max_restarts=-1,
                max_concurrency=1,  # one call at a time: each is atomic
            ).remote(*self._args)
        return self._actor

    async def acquire(
        self, holder: str, period_s: float, in_flight: int, queued: int
    ) -> LeaseGrant:
        actor = await asyncio.to_thread(self._get)
        try:
            grant: LeaseGrant = await actor.acquire.remote(holder, period_s, in_flight, queued)
        except ray.exceptions.RayActorError:
            self._actor = None  # killed or gone: found again (or recreated) next time
            raise
        return grant

    async def release(self, holder: str, epoch: int) -> None:
        actor = await asyncio.to_thread(self._get)
        await actor.release.remote(holder, epoch)


def check_epoch(deployment: str, namespace: str, epoch: int) -> None:
    """Inside a replica actor: refuse an action stamped with ``epoch`` unless
    it is the current holder's (synchronous: actor methods are).

    Raises:
        RuntimeError: a stale epoch, or the lease actor cannot say.
    """
    try:
        lease = ray.get_actor(LEASE_PREFIX + deployment, namespace=namespace)
        current = bool(ray.get(lease.check.remote(epoch), timeout=_CHECK_TIMEOUT_S))
    except (ValueError, ray.exceptions.RayError) as exc:
        raise RuntimeError(f"refused: cannot check the lease epoch {epoch} ({exc})") from exc
    if not current:
        raise RuntimeError(f"refused: lease epoch {epoch} is not the current leader's")


def take_lease(deployment: str, namespace: str, holder: str, period_s: float) -> str | None:
    """Take ``deployment``'s lease for ``holder`` if no gateway holds it
    (before removing the actors of a deployment a config no longer has);
    None when taken (or it has no lease actor), else who holds it (``"?"``:
    a restarted lease actor that does not know yet, or one that does not
    answer)."""
    try:
        lease = ray.get_actor(LEASE_PREFIX + deployment, namespace=namespace)
    except ValueError:
        return None  # never led by a gateway with a lease
    try:
        answer: Any = ray.get(
            lease.acquire.remote(holder, period_s, 0, 0), timeout=_CHECK_TIMEOUT_S
        )
        grant: LeaseGrant = answer
    except ray.exceptions.RayError:
        return "?"
    if grant.granted:
        return None
    return grant.holder or "?"
