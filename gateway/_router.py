"""Model-aware request routing: consistent hashing with bounded loads.

Pure bookkeeping: no I/O, no asyncio, no clock. The gateway calls it from
its event loop only, and no method awaits, so each call sees and leaves a
consistent state without a lock: :meth:`Router.choose` picks a replica,
:meth:`Router.acquire` records the request when it is sent and
:meth:`Router.release` when the reply arrives, and every replica report
(Reply/Pong) goes to :meth:`Router.observe`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Iterable
from typing import Literal

from muxgate.gateway._placement import ReplicaLoad, place, victim_score
from muxgate.gateway._popularity import PopularitySketch
from muxgate.gateway._ring import (
    DEFAULT_PREFIX_CACHE_SIZE,
    DEFAULT_VIRTUAL_NODES,
    CachedRing,
    HashRing,
    stable_hash,
)
from muxgate.gateway._route_decision import (
    REASON_CACHED,
    REASON_HOME,
    REASON_NO_MODEL,
    REASON_PLACED,
    REASON_SPILL,
    RouteDecision,
)
from muxgate.gateway._shared_load import others_in_flight
from muxgate.gateway._spill import (
    INITIAL_SERVICE_TIME_S,
    SPILL_RULES,
    SpillRule,
    holder_limit,
    spill_now,
    victim_share,
)

__all__ = [
    "DEFAULT_BALANCE_FACTOR",
    "DEFAULT_PLACEMENT_CHOICES",
    "DEFAULT_POPULARITY_HALF_LIFE",
    "DEFAULT_VIRTUAL_NODES",
    "HashRing",
    "PopularitySketch",
    "RouteDecision",
    "Router",
    "default_min_capacity",
    "stable_hash",
]

# Chosen from bench/bench_routing_sim.py: with a model load ~50x a request's
# service time, a spill costs far more than waiting behind a few requests, and
# the tight bounds of the paper (c = 1.1 .. 2) spill so often that loads, not
# queueing, dominate p99 (and under overload the extra loads feed on
# themselves). c = 3 with a floor of half of max_ongoing_requests was at or near
# the best p99 and hit rate in every simulated regime.
DEFAULT_BALANCE_FACTOR = 3.0
# Also from bench/bench_routing_sim.py: 4 candidates for a model no replica
# holds raised the "wide" hit rate the most without costing the hot regimes
# (2: less gain; 8: more loads under shifting popularity).
DEFAULT_PLACEMENT_CHOICES = 4
DEFAULT_POPULARITY_HALF_LIFE = 1000.0  # requests; 300 and 3000 measured the same


def default_min_capacity(max_ongoing_requests: int) -> int:
    """The capacity floor used when none is given: half of ``max_ongoing_requests``."""
    return max(1, (max_ongoing_requests + 1) // 2)


class Router:
    """Routes requests to replicas by model id.

    Algorithm (docs/routing.md), for a request with model id ``m``:

    1. Preference list: walk a consistent-hash ring (blake2b 64-bit,
       ``virtual_nodes`` points per replica) clockwise from hash(m), keeping
       distinct replicas. The first is m's *home*. Adding or removing one of n
       replicas changes the home of about 1/n of the models, and every gateway
       with the same replica set computes the same list.
    2. Bounded load (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with
       Bounded Loads"): with T requests in flight over n replicas (every
       gateway's: this router's own, plus the other gateways' calls the
       replicas reported, see :mod:`muxgate.gateway._shared_load`),
       ``capacity = min(max_ongoing_requests,
       max(min_capacity, ceil(balance_factor * (T + 1) / n)))``.
       A replica is *under capacity* when its in-flight count is below it.
    3. Holders first: if replicas under capacity hold m (loaded, loading, or
       a request for m in flight there), the one with the fewest requests in
       flight wins, ties in preference order (``holder_choice="first"``: the
       first in preference order). Spreading over the copies a hot model
       already has costs no load and halves queueing in the simulation.
    4. Else, if some replica holds m but all of them are full, m spills to the
       first replica under capacity in preference order: load beyond a
       model's share always goes to the same next replicas, so hot models gain
       copies in a stable order and cold ones keep one.
    5. Else m is held nowhere (a cold miss): of the first
       ``placement_choices`` replicas under capacity in preference order, the
       one where loading m evicts the least popular model: a replica with a
       free cache slot first, else the lowest popularity of its victim (its
       least recently used reported model that no in-flight request pins);
       ties go to the earlier one, so with no information m goes home. This
       keeps a one-off request from evicting a hot model, and evens out the
       hot models that consistent hashing happens to give the same home.
       Popularity is a :class:`PopularitySketch` of the requests this router
       sent (decayed per request, no clock). The cache size is the one a
       replica reported (``observe(cache_limit=...)``), else the most models
       any replica was seen holding.
    6. No model id: power of two choices among replicas below
       ``max_ongoing_requests`` (the less loaded of two random ones).
    7. When every replica is at ``max_ongoing_requests``, :meth:`choose`
       returns None and the caller queues the request.
    8. With ``spill_rule="priced"`` a spill (4, or a load of m elsewhere
       while its holders are full) happens only when it pays:
       :func:`muxgate.gateway._spill.should_spill` weighs the expected wait
       for a holder (``waiting`` requests for m, ``service_s``) against one
       load (``load_s``) plus the future misses of the model it evicts on the
       target. Otherwise :meth:`choose` returns None and the request waits
       for a holder. ``"bounded_load"`` spills whenever the holders are full.
       ``"never"`` never spills: a holder takes requests for m up to
       ``max_ongoing_requests`` (not the bounded-load capacity: the request
       has nowhere else to go) and past that they wait for one; a model held
       nowhere (every holder gone: dead, drained) is placed as in 5.

    ``min_capacity`` keeps a lightly loaded deployment from spilling (and
    paying a model load) for a second concurrent request: a spill costs a model
    load (hundreds of ms), waiting costs a few service times. The defaults
    (c = 3, floor = max_ongoing_requests / 2, least-loaded holder, 4 placement
    choices) come from ``bench/bench_routing_sim.py``.

    Guarantees: a choice never exceeds capacity (some replica is always under
    it unless all are at ``max_ongoing_requests``, since capacity is at least
    ``ceil(balance_factor * (T + 1) / n)`` with ``balance_factor > 1``); a
    model held by a replica under capacity is always sent to a holder; and the
    choice is a pure function of the replica set, the reported and in-flight
    state and the requests recorded, so gateways that saw the same agree.
    Placement (5) only picks where a model with no copy is loaded; once loaded
    there, every gateway sees the copy in the replica's reports and follows it.

    Cost per decision: one blake2b, one bisect (ring points are sorted once
    per membership change), and a walk that stops once every holder under
    capacity was seen, or at the first ``placement_choices`` replicas under
    capacity when none is; the first few preference entries per model id are
    kept in a bounded LRU cache. A cold miss also reads the LRU end of up to
    ``placement_choices`` replicas' model lists. :meth:`acquire` adds one
    dictionary update to the popularity sketch.
    """

    def __init__(
        self,
        *,
        balance_factor: float = DEFAULT_BALANCE_FACTOR,
        virtual_nodes: int = DEFAULT_VIRTUAL_NODES,
        max_ongoing_requests: int = 8,
        min_capacity: int | None = None,
        rng: random.Random | None = None,
        preference_cache_size: int = DEFAULT_PREFIX_CACHE_SIZE,
        holder_choice: Literal["least_loaded", "first"] = "least_loaded",
        placement_choices: int = DEFAULT_PLACEMENT_CHOICES,
        popularity_half_life: float = DEFAULT_POPULARITY_HALF_LIFE,
        spill_rule: SpillRule = "bounded_load",
    ) -> None:
        """Create an empty router.

        Args:
            balance_factor: c > 1 in the bounded-load rule; a replica takes at
                most about c times the average in-flight load.
            virtual_nodes: Ring points per replica.
            max_ongoing_requests: Hard per-replica limit.
            min_capacity: Floor on the bounded-load capacity (still capped by
                ``max_ongoing_requests``); None for
                :func:`default_min_capacity` (half of ``max_ongoing_requests``).
            rng: Randomness for requests without a model id (injected for tests).
            preference_cache_size: Model ids whose preference prefix is cached.
            holder_choice: Among holders under capacity, ``"least_loaded"``
                (fewest in flight) or ``"first"`` (in preference order).
            placement_choices: Candidates for a model no replica holds (1: its
                first replica under capacity, as for a spill).
            popularity_half_life: Half-life of the popularity sketch, in requests.
            spill_rule: ``"priced"``: spill only when waiting for a holder is
                expected to cost more than the load (see step 8);
                ``"bounded_load"``: whenever every holder is at capacity;
                ``"never"``: never while a replica holds the model.
        """
        if not balance_factor > 1.0:
            raise ValueError(f"balance_factor must be > 1, got {balance_factor}")
        if max_ongoing_requests < 1:
            raise ValueError(f"max_ongoing_requests must be >= 1, got {max_ongoing_requests}")
        self._default_floor = min_capacity is None
        if min_capacity is None:
            min_capacity = default_min_capacity(max_ongoing_requests)
        if min_capacity < 1:
            raise ValueError(f"min_capacity must be >= 1, got {min_capacity}")
        self.balance_factor = balance_factor
        self.max_ongoing_requests = max_ongoing_requests
        self.min_capacity = min_capacity
        self._rng = rng if rng is not None else random.Random()
        self._ring = CachedRing(virtual_nodes=virtual_nodes, cache_size=preference_cache_size)
        self._replicas: dict[str, ReplicaLoad] = {}
        self._ids: list[str] = []  # for random sampling
        self._holders: dict[str, set[str]] = {}  # model id -> replicas holding it
        self._total_in_flight = 0
        if placement_choices < 1:
            raise ValueError(f"placement_choices must be >= 1, got {placement_choices}")
        if holder_choice not in ("first", "least_loaded"):
            raise ValueError(
                f"holder_choice must be 'first' or 'least_loaded', got {holder_choice!r}"
            )
        self.placement_choices = placement_choices
        self.holder_choice = holder_choice
        self.popularity = PopularitySketch(half_life=popularity_half_life)
        self._high_water = 0  # most models any replica was seen holding
        if spill_rule not in SPILL_RULES:
            raise ValueError(f"spill_rule must be one of {SPILL_RULES}, got {spill_rule!r}")
        self.spill_rule = spill_rule
        #: one model load (s); the pool keeps it current from the replicas' counters
        self.load_s = 0.5
        #: interval between slots freeing on a busy replica (s); the dispatcher learns it
        self.service_s = INITIAL_SERVICE_TIME_S
        #: the price of the last spill :meth:`choose` refused (s): the request
        #: that waits spills once it has waited that long (``math.inf``
        #: under ``spill_rule="never"``: it waits for a holder)
        self.refused_spill_price_s = 0.0

    # -- membership -------------------------------------------------------

    @property
    def virtual_nodes(self) -> int:
        """Ring points per replica."""
        return self._ring.ring.virtual_nodes

    @property
    def replica_ids(self) -> list[str]:
        """Replica ids, sorted."""
        return sorted(self._replicas)

    def __len__(self) -> int:
        return len(self._replicas)

    def __contains__(self, replica_id: object) -> bool:
        return replica_id in self._replicas

    def set_max_ongoing_requests(self, max_ongoing_requests: int) -> None:
        """Change the per-replica limit (and the capacity floor, if it was the default)."""
        if max_ongoing_requests < 1:
            raise ValueError(f"max_ongoing_requests must be >= 1, got {max_ongoing_requests}")
        self.max_ongoing_requests = max_ongoing_requests
        if self._default_floor:
            self.min_capacity = default_min_capacity(max_ongoing_requests)

    def add_replica(self, replica_id: str) -> None:
        """Add a ready replica to the ring (no-op if present)."""
        if replica_id in self._replicas:
            return
        self._replicas[replica_id] = ReplicaLoad()
        self._ids.append(replica_id)
        self._ring.add(replica_id)

    def remove_replica(self, replica_id: str) -> None:
        """Remove a replica (draining, dead); forgets its in-flight count and models."""
        rep = self._replicas.pop(replica_id, None)
        if rep is None:
            return
        self._ids.remove(replica_id)
        self._total_in_flight -= rep.in_flight
        for model_id in rep.held():
            self._unhold(model_id, replica_id)
        self._ring.remove(replica_id)

    # -- state updates ----------------------------------------------------

    def observe(
        self,
        replica_id: str,
        *,
        models: Iterable[str],
        loading: Iterable[str],
        cache_limit: int | None = None,
        in_flight: int | None = None,
        own: int | None = None,
    ) -> None:
        """Replace a replica's model view (and its calls from other gateways)
        with what it reported.

        Marks of requests still in flight there (see :meth:`acquire`) stay: a
        report can predate a request's arrival, and the request pins its model.

        Args:
            replica_id: The reporting replica.
            models: Loaded model ids, least recently used first.
            loading: Model ids being loaded.
            cache_limit: How many models the replica can hold, if it says.
            in_flight: The replica's own count of its calls (every gateway's),
                when it reported; None leaves the other gateways' share as it was.
            own: How many of this gateway's calls the replica had not answered
                when it reported (the connection's count); None: this router's
                count now. The rest of ``in_flight`` came from other gateways
                (:func:`~muxgate.gateway._shared_load.others_in_flight`).
        """
        rep = self._replicas.get(replica_id)
        if rep is None:
            return
        if in_flight is not None:
            others = others_in_flight(in_flight, rep.own if own is None else own)
            self._total_in_flight += others - rep.others
            rep.in_flight += others - rep.others
            rep.others = others
        before = rep.held()
        rep.report(list(dict.fromkeys(models)), set(loading))
        if cache_limit is not None:
            rep.cache_limit = cache_limit
        # Every replica of a deployment runs the same code, so the most models
        # any of them was seen holding estimates the cache size of all.
        self._high_water = max(self._high_water, len(rep.models))
        after = rep.held()
        for model_id in before - after:
            self._unhold(model_id, replica_id)
        for model_id in after - before:
            self._holders.setdefault(model_id, set()).add(replica_id)

    def acquire(self, replica_id: str, model_id: str) -> None:
        """Record a request sent to ``replica_id`` for ``model_id`` ("" for none).

        The replica counts as holding the model until the matching
        :meth:`release`, whatever it reports meanwhile.
        """
        rep = self._replicas.get(replica_id)
        if rep is None:
            return
        rep.own += 1
        rep.in_flight += 1
        self._total_in_flight += 1
        if model_id:
            self.popularity.record(model_id)
            if not rep.holds(model_id):
                self._holders.setdefault(model_id, set()).add(replica_id)
            rep.add_pending(model_id)

    def release(self, replica_id: str, model_id: str) -> None:
        """Record a reply (or failure) from ``replica_id``.

        Args:
            replica_id: Where the request went.
            model_id: The request's model id, as given to :meth:`acquire`.
        """
        rep = self._replicas.get(replica_id)
        if rep is None or rep.own == 0:
            return
        rep.own -= 1
        rep.in_flight -= 1
        self._total_in_flight -= 1
        if rep.drop_pending(model_id) and not (model_id in rep.models or model_id in rep.loading):
            self._unhold(model_id, replica_id)

    def _unhold(self, model_id: str, replica_id: str) -> None:
        holders = self._holders.get(model_id)
        if holders is not None:
            holders.discard(replica_id)
            if not holders:
                del self._holders[model_id]

    # -- queries ----------------------------------------------------------

    @property
    def total_in_flight(self) -> int:
        """Requests in flight over all replicas (this gateway's and, as last
        reported, the other gateways')."""
        return self._total_in_flight

    def in_flight(self, replica_id: str) -> int:
        """Requests in flight on one replica, every gateway's (0 if unknown)."""
        rep = self._replicas.get(replica_id)
        return rep.in_flight if rep is not None else 0

    def own_in_flight(self, replica_id: str) -> int:
        """This gateway's requests in flight on one replica (0 if unknown)."""
        rep = self._replicas.get(replica_id)
        return rep.own if rep is not None else 0

    def models(self, replica_id: str) -> set[str]:
        """Models the router believes ``replica_id`` holds (loaded, loading, just sent)."""
        rep = self._replicas.get(replica_id)
        if rep is None:
            return set()
        return rep.held()

    def holders(self, model_id: str) -> set[str]:
        """Replicas the router believes hold ``model_id``."""
        return set(self._holders.get(model_id, ()))

    def capacity(self) -> int:
        """The bounded-load capacity for the next request (0 with no replicas)."""
        n = len(self._replicas)
        if n == 0:
            return 0
        bound = math.ceil(self.balance_factor * (self._total_in_flight + 1) / n)
        return min(self.max_ongoing_requests, max(self.min_capacity, bound))

    def holder_capacity(self) -> int:
        """In-flight requests below which a holder takes a request for its
        model: :meth:`capacity`, or ``max_ongoing_requests`` under
        ``spill_rule="never"`` (:func:`~muxgate.gateway._spill.holder_limit`)."""
        return holder_limit(self.spill_rule, self.capacity(), self.max_ongoing_requests)

    def preference_list(self, model_id: str) -> list[str]:
        """The full preference list of ``model_id`` (home first)."""
        return self._ring.ring.preference_list(model_id)

    # -- decisions --------------------------------------------------------

    def choose(
        self, model_id: str, waiting: int = 1, waited_s: float = 0.0
    ) -> RouteDecision | None:
        """Pick a replica for a request, or None when it should wait.

        None when every replica is full, or when the model's holders are
        full and the spill rule says wait (``"priced"``: a spill would cost
        more than waiting; ``"never"``: always).
        Does not change state: call :meth:`acquire` once the request is sent.

        Args:
            model_id: the request's model id ("" for none).
            waiting: requests for ``model_id`` waiting at the gateway, this one included.
            waited_s: how long this request has waited already.
        """
        if not self._replicas:
            return None
        if not model_id:
            return self._choose_p2c()
        cap = self.capacity()
        replicas = self._replicas
        holders = self._holders.get(model_id, ())
        limit = holder_limit(self.spill_rule, cap, self.max_ongoing_requests)
        wanted = {r for r in holders if replicas[r].in_flight < limit}
        if wanted:
            return self._choose_holder(model_id, wanted)
        return self._choose_elsewhere(model_id, holders, cap, waiting, waited_s)

    def _choose_holder(self, model_id: str, wanted: set[str]) -> RouteDecision | None:
        """Step 3: one of ``wanted``, the holders of ``model_id`` under capacity.

        The walk stops at the first of them (``holder_choice="first"``, or a
        single holder) or once it has seen them all (the least loaded wins,
        ties in preference order). Consumes ``wanted``.
        """
        replicas = self._replicas
        home: str | None = None
        best: str | None = None
        if self.holder_choice == "least_loaded" and len(wanted) > 1:
            for replica_id in self._ring.walk(model_id):
                if home is None:
                    home = replica_id
                if replica_id in wanted:
                    if best is None or replicas[replica_id].in_flight < replicas[best].in_flight:
                        best = replica_id
                    wanted.discard(replica_id)
                    if not wanted:
                        break
        else:
            for replica_id in self._ring.walk(model_id):
                if home is None:
                    home = replica_id
                if replica_id in wanted:
                    best = replica_id
                    break
        if best is None or home is None:
            return None  # not reached: every holder is on the ring, which the walk covers
        reason = REASON_HOME if best == home else REASON_CACHED
        return RouteDecision(best, False, home, reason, model_id in replicas[best].models)

    def _choose_elsewhere(
        self, model_id: str, holders: Collection[str], cap: int, waiting: int, waited_s: float
    ) -> RouteDecision | None:
        """Steps 4, 5 and 8: no holder of ``model_id`` is under capacity.

        A spill (some replica holds it, all of them full) takes the first
        replica under capacity in preference order, if the spill rule lets
        it; a model held nowhere is placed among the first
        ``placement_choices`` of them.
        """
        replicas = self._replicas
        n_free = 1 if holders else self.placement_choices
        home: str | None = None
        free: list[str] = []  # the first n_free replicas under capacity
        for replica_id in self._ring.walk(model_id):
            if home is None:
                home = replica_id
            if replicas[replica_id].in_flight < cap:
                free.append(replica_id)
                if len(free) == n_free:
                    break
        if not free or home is None:
            return None
        target = free[0]
        if len(free) > 1:  # only a model held nowhere looks past the first
            target = place(free, replicas, self._high_water, self.popularity)
        elif (
            holders
            and self.spill_rule != "bounded_load"
            and not self._spill_pays(model_id, target, len(holders), waiting, waited_s)
        ):
            return None
        if target == home:
            return RouteDecision(target, False, home, REASON_HOME)
        if target == free[0]:
            return RouteDecision(target, True, home, REASON_SPILL)
        return RouteDecision(target, False, home, REASON_PLACED)

    def _spill_pays(
        self, model_id: str, target: str, holders: int, waiting: int, waited_s: float
    ) -> bool:
        """Step 8: whether loading ``model_id`` on ``target`` beats waiting for
        one of its ``holders`` (all full). When it does not, records the price
        at which the waiting request's spill will pay (ski rental; never, for
        ``spill_rule="never"``)."""
        victim = 0.0
        if self.spill_rule == "priced":
            victim = victim_share(
                victim_score(self._replicas[target], self._high_water, self.popularity),
                self.popularity.score(model_id),
            )
        due = spill_now(
            self.spill_rule,
            waiting=waiting,
            holders=holders,
            service_s=self.service_s,
            load_s=self.load_s,
            victim=victim,
            waited_s=waited_s,
        )
        if due is None:
            return True
        self.refused_spill_price_s = due
        return False

    def _choose_p2c(self) -> RouteDecision | None:
        limit = self.max_ongoing_requests
        replicas = self._replicas
        ids = self._ids
        picks: list[str] = []
        # Rejection sampling is O(1) unless nearly every replica is full; then scan.
        for _ in range(2 * len(ids) if len(ids) < 8 else 16):
            candidate = ids[self._rng.randrange(len(ids))]
            if replicas[candidate].in_flight < limit and candidate not in picks:
                picks.append(candidate)
                if len(picks) == 2:
                    break
        if len(picks) < 2:
            free = [r for r in ids if replicas[r].in_flight < limit and r not in picks]
            if free:
                picks.append(free[self._rng.randrange(len(free))])
        if not picks:
            return None
        best = min(picks, key=lambda r: replicas[r].in_flight)
        return RouteDecision(best, False, best, REASON_NO_MODEL)

    # -- scale-down support -----------------------------------------------

    def removal_cost(self, replica_id: str) -> int:
        """Cached models that removing ``replica_id`` would lose.

        A model also held by another replica costs nothing: its traffic moves
        to a replica that already has it.
        """
        rep = self._replicas.get(replica_id)
        if rep is None:
            return 0
        return sum(1 for m in rep.held() if len(self._holders.get(m, ())) <= 1)

    def removal_order(self) -> list[str]:
        """Replica ids, cheapest to remove first.

        Ordered by (models only it holds, in-flight requests, id): the
        autoscaler drains from the front to move the fewest cached models.
        """
        return sorted(
            self._replicas,
            key=lambda r: (self.removal_cost(r), self._replicas[r].in_flight, r),
        )

    def __repr__(self) -> str:
        models = sum(len(r.models) for r in self._replicas.values())
        return (
            f"Router(replicas={len(self._replicas)}, in_flight={self._total_in_flight}, "
            f"others={sum(r.others for r in self._replicas.values())}, "
            f"capacity={self.capacity()}, models_held={models}, "
            f"distinct_models={len(self._holders)}, balance_factor={self.balance_factor}, "
            f"min_capacity={self.min_capacity}, "
            f"max_ongoing_requests={self.max_ongoing_requests}, "
            f"holder_choice={self.holder_choice}, placement_choices={self.placement_choices}, "
            f"spill_rule={self.spill_rule}, "
            f"popular_models={len(self.popularity)})"
        )
