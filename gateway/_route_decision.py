"""What the router answers for one request: :class:`RouteDecision`, and the
reasons it gives for its choice."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "REASON_CACHED",
    "REASON_HOME",
    "REASON_NO_MODEL",
    "REASON_PLACED",
    "REASON_SPILL",
    "RouteDecision",
]

# Reasons carried by RouteDecision.reason.
REASON_HOME = "home"  # the home replica (first in the preference list)
REASON_CACHED = "cached"  # a later replica that already holds (or is loading) the model
REASON_SPILL = "spill"  # the first replica under capacity; it does not hold the model
REASON_NO_MODEL = "no_model"  # no model id: power of two choices
REASON_PLACED = "placed"  # a later replica chosen because a load there evicts a colder model


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where one request goes.

    Attributes:
        replica_id: The chosen replica.
        spillover: True when load pushed the model onto a new replica: every
            replica holding it (or its home, when none does) was at capacity,
            so this request starts a load elsewhere (``reason == "spill"``).
            Following an existing copy (``"cached"``) or placing a model held
            nowhere by popularity (``"placed"``) is not a spill.
        home_replica_id: First replica of the model's preference list (for a
            request without a model id: the chosen replica).
        reason: ``"home"``, ``"cached"`` (a later replica already holding the
            model), ``"spill"`` (a later replica, model not there yet),
            ``"placed"`` (a later replica picked for a model no replica holds,
            because loading it there evicts a less popular model) or
            ``"no_model"`` (no model id, power of two choices).
        hit: the chosen replica had reported the model loaded (its duration
            is a sample of the service time).
    """

    replica_id: str
    spillover: bool
    home_replica_id: str
    reason: str
    hit: bool = field(default=False, compare=False)
