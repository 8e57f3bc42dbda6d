"""When a request should spill: the price of a new copy against the wait for one.

A spill sends a request for model *m* to a replica that does not hold it,
because every replica that does is at its bounded-load capacity. It buys a
copy: one model load now (the request waits for it, and the target replica
spends it), plus, when the target's cache is full, the future misses of the
model the load evicts there. Waiting for a holder costs the time until one of
them frees a slot for this request. So (pure functions, no clock):

    expected_wait = waiting * service_s / holders
    price         = load_s * (1 + victim_share)
    spill        <=> max(expected_wait, waited_s) > price

* ``waiting``: requests for *m* queued at the gateway, this one included: a
  copy serves all of them, and each holder slot that frees serves one.
* ``service_s``: the time between two slots freeing on a busy replica,
  learnt by :class:`ServiceTimeEstimate`: from the replicas' own counters
  where they report them (:func:`service_interval_s`: busy seconds over
  calls finished, loads taken out), else from the hits this gateway sent (a
  hit's duration divided by the requests it shared the replica with).
* ``holders``: replicas that hold *m* (loaded, loading, or a request for it
  in flight).
* ``load_s``: one model load, learnt from the replicas' own load counters.
* ``victim_share``: expected misses the eviction causes, in loads: 0 when
  the target has a free cache slot, else the victim's popularity relative to
  *m*'s, at most 1 (a victim as hot as *m* costs a full reload).
* ``waited_s``: how long the request has already waited: an estimate proven
  wrong by the clock never keeps a request waiting longer than a spill.

That is the ``priced`` rule (``routing.spill``, the default). The other two
are the ends it sits between: ``bounded_load`` spills whenever every holder
is at its bounded-load capacity, and ``never`` never loads a second copy of
a model while a holder is in the pool: its requests wait for a holder, and
a holder takes them up to ``max_ongoing_requests`` (:func:`holder_limit`),
since a wait for a slot the holder has free would buy nothing.
"""

from __future__ import annotations

import math
from typing import Literal

__all__ = [
    "INITIAL_SERVICE_TIME_S",
    "REPORTED_SERVICE_TIME_ALPHA",
    "SERVICE_TIME_ALPHA",
    "SPILL_RULES",
    "ServiceTimeEstimate",
    "SpillRule",
    "expected_wait_s",
    "holder_limit",
    "service_interval_s",
    "should_spill",
    "spill_now",
    "spill_price_s",
    "victim_share",
]

#: first guess of the interval between slots freeing on a busy replica (s)
INITIAL_SERVICE_TIME_S = 0.01
#: weight of a new sample in the moving service time estimate
SERVICE_TIME_ALPHA = 0.05
#: weight of a new replica report in it (a report sums a second of calls)
REPORTED_SERVICE_TIME_ALPHA = 0.3

#: ``routing.spill``: when a request whose model's holders are all full goes elsewhere
SpillRule = Literal["priced", "bounded_load", "never"]
SPILL_RULES: tuple[SpillRule, ...] = ("priced", "bounded_load", "never")


def expected_wait_s(waiting: int, holders: int, service_s: float) -> float:
    """Expected time until the last of ``waiting`` requests gets a holder's slot."""
    return max(1, waiting) * service_s / max(1, holders)


def service_interval_s(
    busy_s: float, calls: float, load_s: float = 0.0, loads: float = 0.0
) -> float | None:
    """The interval between two calls finishing on a busy replica, from what
    it reported between two reports: ``busy_s`` wall seconds with a call in
    flight, ``calls`` calls finished, of which ``loads`` loaded a model for
    ``load_s`` seconds in all. None when the report says nothing (no call
    finished without a load, or the loads took all the busy time).

    The loads are taken out: their price is the spill's side of the rule,
    and an interval that grew with every load would make each spill's load
    argue for the next spill (a storm feeding itself). With one CPU per
    replica the calls share its core, so the busy time left after the loads
    is what the hits took.
    """
    hits = calls - loads
    hit_s = busy_s - load_s
    if hits <= 0 or hit_s <= 0.0:
        return None
    return hit_s / hits


def victim_share(victim_score: float, model_score: float) -> float:
    """Future loads the eviction costs: 0 for a free slot (``victim_score < 0``),
    else the victim's popularity relative to the model's, at most 1."""
    if victim_score < 0.0:
        return 0.0
    if model_score <= 0.0:
        return 1.0
    return min(1.0, victim_score / model_score)


def spill_price_s(load_s: float, victim: float) -> float:
    """What a spill costs in seconds of load: one load now plus ``victim`` future loads."""
    return load_s * (1.0 + victim)


def should_spill(
    *,
    waiting: int,
    holders: int,
    service_s: float,
    load_s: float,
    victim: float,
    waited_s: float = 0.0,
) -> bool:
    """Whether a request whose holders are all full should go to a non-holder now.

    Args:
        waiting: requests for the model queued at the gateway (this one included).
        holders: replicas holding the model.
        service_s: interval between slots freeing on a busy replica.
        load_s: one model load.
        victim: :func:`victim_share` of the model the load would evict.
        waited_s: how long this request has waited already.
    """
    wait = max(expected_wait_s(waiting, holders, service_s), waited_s)
    return wait > spill_price_s(load_s, victim)


def holder_limit(rule: SpillRule, capacity: int, max_ongoing_requests: int) -> int:
    """In-flight requests below which a holder of the model takes one more.

    The bounded-load ``capacity`` for ``priced`` and ``bounded_load`` (past
    it, the request may go elsewhere); ``max_ongoing_requests`` for
    ``never``, where the only other choice is to wait for this slot anyway.
    """
    return max_ongoing_requests if rule == "never" else capacity


def spill_now(
    rule: SpillRule,
    *,
    waiting: int,
    holders: int,
    service_s: float,
    load_s: float,
    victim: float,
    waited_s: float = 0.0,
) -> float | None:
    """The spill decision of ``rule`` for a request whose holders are all full.

    Returns None to spill now, else the wait (s) after which the request
    should be looked at again: the price of the spill (``priced``: it spills
    once it has waited that long), or ``math.inf`` (``never``: it waits for
    a holder, however long). Arguments as :func:`should_spill`.
    """
    if rule == "bounded_load":
        return None
    if rule == "never":
        return math.inf
    if should_spill(
        waiting=waiting,
        holders=holders,
        service_s=service_s,
        load_s=load_s,
        victim=victim,
        waited_s=waited_s,
    ):
        return None
    return spill_price_s(load_s, victim)


class ServiceTimeEstimate:
    """Exponential moving averages of the interval between slots freeing:
    one from the replicas' reports, one from what this gateway saw.

    ``value`` is the reported one once any replica reported (every gateway
    over a pool reads the same counters, so they price spills alike), else
    the local one, whose samples are this gateway's cache hits: a hit's
    duration at the replica divided by the requests in flight there when it
    was sent (with ``k`` requests sharing a replica, one finishes about
    every ``duration / k``). A replica that does not report its call counters
    (an older release) leaves the local estimate in charge.
    """

    __slots__ = ("_alpha", "_reported_alpha", "local", "reported")

    def __init__(
        self,
        initial_s: float = INITIAL_SERVICE_TIME_S,
        alpha: float = SERVICE_TIME_ALPHA,
        reported_alpha: float = REPORTED_SERVICE_TIME_ALPHA,
    ) -> None:
        self.local = initial_s
        self.reported: float | None = None
        self._alpha = alpha
        self._reported_alpha = reported_alpha

    @property
    def value(self) -> float:
        """The estimate in effect: the reported one, else the local one."""
        return self.local if self.reported is None else self.reported

    def observe(self, duration_s: float, in_flight: int) -> float:
        """Fold in one hit this gateway saw; returns the estimate in effect."""
        if duration_s >= 0.0:
            self.local += self._alpha * (duration_s / max(1, in_flight) - self.local)
        return self.value

    def report(self, interval_s: float | None) -> float:
        """Fold in one replica's :func:`service_interval_s`; returns the
        estimate in effect. The first report replaces the local value."""
        if interval_s is not None and interval_s > 0.0:
            if self.reported is None:
                self.reported = interval_s
            else:
                self.reported += self._reported_alpha * (interval_s - self.reported)
        return self.value

    def __repr__(self) -> str:
        reported = "-" if self.reported is None else f"{self.reported * 1e3:.3f} ms"
        return f"<ServiceTimeEstimate local={self.local * 1e3:.3f} ms reported={reported}>"
