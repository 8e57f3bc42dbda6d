"""Where a model that no replica holds is loaded (the router's placement).

Of the first few replicas under capacity in preference order, those with the
fewest model loads in flight (a replica runs its loads one after another, so
there the load starts soonest); of these, the one where loading the model
evicts the least popular model: a replica with a free cache slot first, else
the lowest popularity of its victim (its least recently used reported model
that no request in flight pins); ties go to the earlier one. Pure functions
of the router's per-replica state (:class:`ReplicaLoad`, kept here with them)
and its popularity sketch.
"""

from __future__ import annotations

from muxgate.gateway._popularity import PopularitySketch

__all__ = ["ReplicaLoad", "loads_in_flight", "place", "victim_score"]


class ReplicaLoad:
    """What the router knows of one replica: requests in flight, the models
    it reported (loaded, loading, in LRU order, its cache size) and the
    requests it was sent and has not answered (which pin their models).

    ``in_flight`` is what routing counts: ``own`` (this gateway's requests
    there, exact) plus ``others`` (the other gateways' calls there, as of the
    replica's last report; 0 with one gateway).
    """

    __slots__ = (
        "cache_limit",
        "in_flight",
        "loading",
        "lru",
        "models",
        "others",
        "own",
        "pending",
        "pending_loads",
        "pending_total",
    )

    def __init__(self) -> None:
        self.in_flight = 0  # own + others
        self.own = 0
        self.others = 0
        self.models: set[str] = set()  # reported loaded
        self.lru: list[str] = []  # the same, least recently used first (as reported)
        self.loading: set[str] = set()  # reported loading
        # Requests sent here and not yet answered, per model id. They pin
        # their model on the replica, so each is a holder mark that only its
        # own release removes (a report may predate the request's arrival).
        self.pending: dict[str, int] = {}
        self.pending_total = 0
        #: models of ``pending`` that it reported neither loaded nor loading
        #: (each a load there), kept current by the methods below
        self.pending_loads = 0
        self.cache_limit: int | None = None  # models it can hold, when reported

    def holds(self, model_id: str) -> bool:
        return model_id in self.models or model_id in self.loading or model_id in self.pending

    def held(self) -> set[str]:
        return self.models | self.loading | self.pending.keys()

    def report(self, lru: list[str], loading: set[str]) -> None:
        """Take in the models it reported (loaded, least recently used first; loading)."""
        self.lru = lru
        models = self.models = set(lru)
        self.loading = loading
        self.pending_loads = sum(1 for m in self.pending if m not in models and m not in loading)

    def add_pending(self, model_id: str) -> None:
        """One more request sent here for ``model_id``."""
        count = self.pending.get(model_id, 0)
        self.pending[model_id] = count + 1
        self.pending_total += 1
        if not count and model_id not in self.models and model_id not in self.loading:
            self.pending_loads += 1

    def drop_pending(self, model_id: str) -> bool:
        """Remove one pending mark; True when it was the model's last one."""
        count = self.pending.get(model_id, 0)
        if not count:
            return False
        self.pending_total -= 1
        if count == 1:
            del self.pending[model_id]
            if model_id not in self.models and model_id not in self.loading:
                self.pending_loads -= 1
            return True
        self.pending[model_id] = count - 1
        return False


def loads_in_flight(rep: ReplicaLoad) -> int:
    """Model loads running or due on ``rep``: the models it reported loading,
    and those of the requests sent there for a model it did not report (each
    such model is one load, however many requests wait for it)."""
    return len(rep.loading) + rep.pending_loads


def victim_score(rep: ReplicaLoad, high_water: int, popularity: PopularitySketch) -> float:
    """Popularity of the model a new load on ``rep`` would evict.

    -1.0 when it has a free cache slot (nothing would be evicted): its
    reported cache size, else ``high_water`` (the most models any replica was
    seen holding), is not reached. The victim is the least recently used
    reported model that no request in flight pins there.
    """
    lru = rep.lru
    if not lru:
        return -1.0
    models, loading, pending = rep.models, rep.loading, rep.pending
    occupancy = len(models) + len(loading)
    for m in pending:
        if m not in models and m not in loading:
            occupancy += 1
    if occupancy < (rep.cache_limit or high_water):
        return -1.0
    for m in lru:
        if m not in pending:
            return popularity.score(m)
    return popularity.score(lru[0])


def place(
    free: list[str],
    replicas: dict[str, ReplicaLoad],
    high_water: int,
    popularity: PopularitySketch,
) -> str:
    """Of ``free`` (replicas under capacity, in preference order), among
    those with the fewest loads in flight, the one whose load evicts the
    least popular model (a free slot first; ties in preference order)."""
    best = free[0]
    best_rep = replicas[best]
    best_loads = loads_in_flight(best_rep)
    best_score: float | None = None  # the victim's, computed when a tie needs it
    if not best_loads:
        best_score = victim_score(best_rep, high_water, popularity)
        if best_score < 0.0:
            return best  # no load and a free slot: nothing beats it
    for replica_id in free[1:]:
        rep = replicas[replica_id]
        loads = loads_in_flight(rep)
        if loads > best_loads:
            continue
        if loads < best_loads:
            best, best_rep, best_loads, best_score = replica_id, rep, loads, None
            continue
        if best_score is None:
            best_score = victim_score(best_rep, high_water, popularity)
        if best_score < 0.0:
            continue  # a free slot: no victim beats it
        score = victim_score(rep, high_water, popularity)
        if score < best_score:
            best, best_rep, best_score = replica_id, rep, score
    return best
