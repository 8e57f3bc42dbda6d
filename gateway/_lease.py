"""The leader lease: which gateway may change a shared pool's size.

Where a launcher can create and stop replicas that several gateways share
(Ray's detached actors), one gateway at a time does it: the one holding the
deployment's lease. The others follow: they route over the replicas the
leader creates and never start, stop or replace one, nor resize the pool.

Two synchronous objects, no I/O, time from an injected clock:

``Lease``, the authority's rules (kept by one process everyone reaches; with
Ray, a named detached actor). A holder id asks to ``acquire``:

* a vacant or expired lease goes to the asker with the next **epoch** (a
  number that only grows, the holder's fencing token) for ``period_s``;
* its current holder's ask renews it (same epoch, ``period_s`` from now);
* anyone else is refused and told who holds it and for how long.

``release`` ends a lease early (a gateway that stops hands over at once);
``check(epoch)`` says whether an action stamped with ``epoch`` comes from
the current holder, so a stale leader's late action is refused (fencing).
An authority that restarts (its process or node died) cannot know whether
its predecessor's last lease still runs: restored with the last epoch it
granted, it grants nothing for one period (``blocked_for_s``), except to
the holder that epoch was granted to (``last_holder``): its ask takes the
lease back at once with the same epoch. No one else can hold that epoch's
lease, and every earlier one ended before it was granted, so this makes no
second leader; it only spares the leader a period without one.

``Tenure``, the holder's side. It counts its lease from the moment it
*sent* the ask, not from the answer, and ends it ``margin_s`` early::

    holder:    sent ------------------------ sent + ttl - margin | (stops acting)
    authority:     granted at t >= sent ------------------------- t + ttl | (may grant again)

The authority's expiry comes at least ``margin_s`` after the holder stopped
believing it leads, whatever the network delayed, so two gateways never
act as leader at once (both clocks are monotonic; their rates differ by far
less than a margin of a quarter period). A holder that cannot renew in time
(its process stalled, the authority unreachable) simply lapses.

Each ask also carries the asker's load (requests in flight and queued in
that gateway), and each answer the sum of the others' recent loads, so the
leader's autoscaler sizes the pool for every gateway's traffic.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import msgspec

__all__ = ["MARGIN_FRACTION", "Lease", "LeaseGrant", "Tenure"]

#: a holder stops acting this fraction of a period before the lease expires
MARGIN_FRACTION = 0.25


class LeaseGrant(msgspec.Struct, frozen=True):
    """The authority's answer to an ``acquire``.

    Attributes:
        granted: the asker holds the lease now.
        holder: who holds it (the asker when granted; None: vacant).
        epoch: the lease's epoch: the asker's fencing token when granted.
        ttl_s: seconds the holder's lease runs from this answer (0: vacant).
        others_in_flight: requests in flight in the other gateways (their
            last reports within two periods).
        others_queued: requests queued in the other gateways, likewise.
    """

    granted: bool
    holder: str | None
    epoch: int
    ttl_s: float
    others_in_flight: int = 0
    others_queued: int = 0


class Lease:
    """The lease rules on the authority's side.

    Args:
        clock: monotonic seconds of the authority.
        epoch: the last epoch granted (a restarted authority restores it;
            the next grant is ``epoch + 1``).
        blocked_for_s: grant nothing for this long from now (a restarted
            authority: its predecessor's holder may still act until then).
        last_holder: who ``epoch`` was granted to (a restarted authority):
            during the block, its ask renews that lease instead of waiting.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        epoch: int = 0,
        blocked_for_s: float = 0.0,
        last_holder: str | None = None,
    ) -> None:
        self._clock = clock
        self.epoch = epoch
        self.holder: str | None = None
        #: clock time the lease ends (the holder's, or the block after a restart)
        self.expires_at = clock() + blocked_for_s
        #: a restarted authority's last holder, who may take its lease back
        #: during the block (None: nobody may)
        self._restored = last_holder if epoch > 0 and blocked_for_s > 0 else None
        #: holder id -> (in_flight, queued, period_s, reported at)
        self._loads: dict[str, tuple[int, int, float, float]] = {}

    def __repr__(self) -> str:
        left = max(0.0, self.expires_at - self._clock())
        return f"<Lease epoch={self.epoch} holder={self.holder} ttl={left:.2f}s>"

    def acquire(
        self, holder: str, period_s: float, *, in_flight: int = 0, queued: int = 0
    ) -> LeaseGrant:
        """Grant, renew or refuse the lease for ``holder`` (see the module)."""
        if period_s <= 0:
            raise ValueError(f"period_s must be > 0, got {period_s}")
        now = self._clock()
        self._loads[holder] = (in_flight, queued, period_s, now)
        live = now < self.expires_at
        if self.holder == holder and live:
            self.expires_at = now + period_s  # renewed: same epoch
        elif self.holder is None and live and holder == self._restored:
            # A restarted authority's last holder: its own lease, renewed.
            self.holder, self._restored = holder, None
            self.expires_at = now + period_s
        elif not live:
            self.epoch += 1
            self.holder, self._restored = holder, None
            self.expires_at = now + period_s
        others = [
            (f, q)
            for h, (f, q, period, at) in self._loads.items()
            if h != holder and now - at <= 2 * period
        ]
        for h in [h for h, (_, _, period, at) in self._loads.items() if now - at > 2 * period]:
            del self._loads[h]  # gateways gone quiet: their load no longer counts
        named = self.holder
        if named is None and now < self.expires_at:
            named = self._restored  # during a restart's block: who may come back
        return LeaseGrant(
            granted=self.holder == holder,
            holder=named,
            epoch=self.epoch,
            ttl_s=max(0.0, self.expires_at - now) if self.holder is not None else 0.0,
            others_in_flight=sum(f for f, _ in others),
            others_queued=sum(q for _, q in others),
        )

    def release(self, holder: str, epoch: int) -> bool:
        """End ``holder``'s lease of ``epoch`` now (the next ``acquire`` by
        anyone gets the next epoch); false if it no longer held it."""
        self._loads.pop(holder, None)
        if self.holder is None and holder == self._restored and epoch == self.epoch:
            self._restored = None  # a restart's block for a holder that stops: over
            self.expires_at = min(self.expires_at, self._clock())
            return True
        if self.holder != holder or self.epoch != epoch or self._clock() >= self.expires_at:
            return False
        self.holder = None
        self.expires_at = self._clock()
        return True

    def check(self, epoch: int) -> bool:
        """Whether ``epoch`` is the lease of a current holder (fencing: an
        action stamped with an older epoch comes from a stale leader)."""
        return self.holder is not None and epoch == self.epoch and self._clock() < self.expires_at


class Tenure:
    """The holder's side: whether this gateway may act as leader now.

    Args:
        clock: monotonic seconds of the holder.
        margin_s: stop acting this long before the authority's expiry.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, margin_s: float) -> None:
        self._clock = clock
        self.margin_s = margin_s
        #: this holder's epoch while it leads (None: following)
        self._epoch: int | None = None
        self._valid_until = -math.inf
        #: the holder the authority named last (None: vacant or never asked)
        self.leader: str | None = None

    def __repr__(self) -> str:
        if self.is_leader():
            left = self._valid_until - self._clock()
            return f"<Tenure leader epoch={self._epoch} for={left:.2f}s>"
        return f"<Tenure follower leader={self.leader}>"

    def answered(self, grant: LeaseGrant, sent_at: float) -> None:
        """Take the authority's answer to an ask sent at ``sent_at`` (this
        holder's clock, read before sending)."""
        self.leader = grant.holder
        if grant.granted:
            self._epoch = grant.epoch
            self._valid_until = sent_at + grant.ttl_s - self.margin_s
        else:
            self.lost()

    def lost(self) -> None:
        """Stop leading now (the lease was released or refused)."""
        self._epoch = None
        self._valid_until = -math.inf

    def is_leader(self) -> bool:
        """Whether this holder may act as leader now."""
        return self._epoch is not None and self._clock() < self._valid_until

    @property
    def epoch(self) -> int | None:
        """The fencing token to stamp actions with while leading; else None."""
        return self._epoch if self.is_leader() else None

    def seconds_left(self) -> float:
        """Seconds until this holder stops leading unless renewed (0: not leading)."""
        return max(0.0, self._valid_until - self._clock()) if self.is_leader() else 0.0
