"""Keeping a leader lease: the gateway's loop around ``Tenure``.

A launcher whose replicas several gateways share, and which can create and
stop them (``ray``), has a ``leadership`` attribute: a ``Leadership``. The
pool runs its ``run()`` loop, acts as leader (reconciles, autoscales,
replaces, drains) only while ``is_leader()`` holds, and follows otherwise;
the launcher refuses to create or stop replicas when it does not hold the
lease and stamps the actions it takes with ``epoch`` (fencing).

The loop asks the authority (a ``LeaseClient``: the lease's keeper, e.g. a
Ray actor running ``muxgate.gateway._lease.Lease``) every quarter period:
the holder renews, the others try to acquire. It also wakes at the moment
its own tenure lapses, so the pool hears of a lost lease at once even when
no answer comes (the authority unreachable, the event loop stalled). Every
change of role sets ``changed``.

Handover: a leader that dies stops renewing; its lease expires at most one
period after its last renewal, and a follower's next ask (within a quarter
period) acquires it: scaling moves to another gateway within about 1.25
periods. A gateway that stops cleanly releases the lease: the next ask of
another takes it at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Protocol

from muxgate.gateway._lease import MARGIN_FRACTION, LeaseGrant, Tenure

__all__ = ["Leadership", "LeaseClient", "holder_id"]

_log = logging.getLogger("muxgate.gateway.lease")

#: the holder renews, and the others ask, this many times a period
ASKS_PER_PERIOD = 4


def holder_id() -> str:
    """A gateway's holder id: host, pid and a random part (a restarted
    gateway is a new holder)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class LeaseClient(Protocol):
    """The way to the lease's authority."""

    async def acquire(
        self, holder: str, period_s: float, in_flight: int, queued: int
    ) -> LeaseGrant:
        """``Lease.acquire`` at the authority."""
        ...

    async def release(self, holder: str, epoch: int) -> None:
        """``Lease.release`` at the authority."""
        ...


class Leadership:
    """Holds, or waits for, one deployment's leader lease.

    Args:
        client: the authority.
        period_s: the lease period (``launcher.lease_s``).
        holder: this gateway's holder id (default ``holder_id()``).
        clock: monotonic seconds (a seam for tests).
    """

    def __init__(
        self,
        client: LeaseClient,
        *,
        period_s: float,
        holder: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.period_s = period_s
        self.holder = holder or holder_id()
        self._clock = clock
        self.tenure = Tenure(clock=clock, margin_s=period_s * MARGIN_FRACTION)
        #: ``() -> (in_flight, queued)`` of this gateway's pool, sent with each ask
        self.load: Callable[[], tuple[int, int]] = lambda: (0, 0)
        #: the other gateways' load, from the last answer
        self.others_load: tuple[int, int] = (0, 0)
        #: set whenever this gateway starts or stops leading
        self.changed = asyncio.Event()
        self._was_leader = False
        self._answered = False
        #: answers received
        self.asks = 0

    def __repr__(self) -> str:
        return f"<Leadership {self.holder} asks={self.asks} {self.tenure!r}>"

    def is_leader(self) -> bool:
        """Whether this gateway may act as the deployment's leader now."""
        return self.tenure.is_leader()

    @property
    def epoch(self) -> int | None:
        """The fencing token for actions taken now (None: not leading)."""
        return self.tenure.epoch

    def snapshot(self) -> dict[str, object]:
        """The deployment's ``lease`` entry of ``GET /-/replicas``."""
        leading = self.is_leader()
        return {
            "role": "leader" if leading else "follower",
            "holder": self.holder,
            "leader": self.tenure.leader,
            "epoch": self.tenure.epoch,
            "lease_s": self.period_s,
        }

    async def wait_role(self, leader: bool) -> None:
        """Wait until this gateway leads (``leader``) or follows."""
        while self.is_leader() != leader:
            self.changed.clear()
            await self.changed.wait()

    async def run(self) -> None:
        """Ask every quarter period until cancelled (see the module)."""
        interval = self.period_s / ASKS_PER_PERIOD
        while True:
            # A slow answer is still good (the tenure counts from the send).
            await self.ask(timeout_s=self.period_s / 2)
            # Wake at the next ask, or when the tenure lapses if sooner.
            left = self.tenure.seconds_left()
            await asyncio.sleep(min(interval, left) if left > 0 else interval)
            self._note_role()

    async def ask(self, *, timeout_s: float) -> None:
        """One acquire-or-renew; an error or no answer within ``timeout_s``
        leaves the tenure to lapse on its own."""
        sent_at = self._clock()
        in_flight, queued = self.load()
        try:
            async with asyncio.timeout(timeout_s):
                grant = await self.client.acquire(self.holder, self.period_s, in_flight, queued)
        except Exception as exc:  # the authority unreachable, restarting, slow
            if self._answered:
                _log.warning("lease: no answer from the authority (%r)", exc)
            self._answered = False
        else:
            self._answered = True
            self.asks += 1
            self.tenure.answered(grant, sent_at)
            self.others_load = (grant.others_in_flight, grant.others_queued)
        self._note_role()

    async def release(self, timeout_s: float = 2.0) -> None:
        """Give the lease up now, if held (a gateway that stops)."""
        epoch = self.tenure.epoch
        self.tenure.lost()
        self._note_role()
        if epoch is None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self.client.release(self.holder, epoch)
        except Exception as exc:
            _log.warning("lease: release failed (%r); it expires on its own", exc)

    def _note_role(self) -> None:
        leading = self.is_leader()
        if leading != self._was_leader:
            self._was_leader = leading
            if leading:
                _log.info("lease: %s leads (epoch %s)", self.holder, self.tenure.epoch)
            else:
                _log.info("lease: %s follows (leader: %s)", self.holder, self.tenure.leader)
            self.changed.set()
