"""Model-aware request routing: consistent hashing with bounded loads.

Pure bookkeeping: no I/O, no asyncio, no clock. The gateway calls
:meth:`Router.choose` under its own lock, then :meth:`Router.acquire` when it
sends the request and :meth:`Router.release` when the reply arrives, and feeds
every replica report (Reply/Pong) to :meth:`Router.observe`.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = [
    "DEFAULT_BALANCE_FACTOR",
    "DEFAULT_VIRTUAL_NODES",
    "HashRing",
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
DEFAULT_VIRTUAL_NODES = 64


def default_min_capacity(max_ongoing_requests: int) -> int:
    """The capacity floor used when none is given: half of ``max_ongoing_requests``."""
    return max(1, (max_ongoing_requests + 1) // 2)


# Reasons carried by RouteDecision.reason.
REASON_HOME = "home"  # the home replica (first in the preference list)
REASON_CACHED = "cached"  # a later replica that already holds (or is loading) the model
REASON_SPILL = "spill"  # the first replica under capacity; it does not hold the model
REASON_NO_MODEL = "no_model"  # no model id: power of two choices

_PREFIX_LEN = 4  # preference-list prefix cached per model id
_DEFAULT_CACHE_SIZE = 131_072


def stable_hash(key: str) -> int:
    """Return a 64-bit hash of ``key`` that is the same in every process.

    Python's ``hash()`` is salted per process (PYTHONHASHSEED), so two gateways
    would disagree; blake2b is stable, fast and well mixed.
    """
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class HashRing:
    """A consistent-hash ring with ``virtual_nodes`` points per member.

    The ring depends only on the *set* of members, never on the order they were
    added: points are sorted by (hash, member id), so even a hash collision
    breaks the same way everywhere.
    """

    def __init__(self, *, virtual_nodes: int = DEFAULT_VIRTUAL_NODES) -> None:
        if virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be >= 1, got {virtual_nodes}")
        self.virtual_nodes = virtual_nodes
        self._members: set[str] = set()
        self._points: list[tuple[int, str]] = []
        self._hashes: list[int] = []
        self._dirty = False

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, member: object) -> bool:
        return member in self._members

    def __repr__(self) -> str:
        return f"HashRing(members={len(self._members)}, virtual_nodes={self.virtual_nodes})"

    @property
    def members(self) -> list[str]:
        """The members, sorted."""
        return sorted(self._members)

    def add(self, member: str) -> None:
        """Add ``member`` (no-op if present)."""
        if member in self._members:
            return
        self._members.add(member)
        self._points.extend(
            (stable_hash(f"{member}#{i}"), member) for i in range(self.virtual_nodes)
        )
        # Sorting is deferred to the next lookup so adding many members is O(P log P) once.
        self._dirty = True

    def remove(self, member: str) -> None:
        """Remove ``member`` (no-op if absent)."""
        if member not in self._members:
            return
        self._members.discard(member)
        self._points = [p for p in self._points if p[1] != member]
        self._hashes = [p[0] for p in self._points]

    def _ensure_sorted(self) -> None:
        if self._dirty:
            self._points.sort()
            self._hashes = [p[0] for p in self._points]
            self._dirty = False

    def walk(self, key: str) -> Iterator[str]:
        """Yield the distinct members clockwise from ``stable_hash(key)``.

        This is the key's preference list; the first member is its home.
        """
        self._ensure_sorted()
        points = self._points
        n_points = len(points)
        if not n_points:
            return
        n_members = len(self._members)
        start = bisect.bisect_left(self._hashes, stable_hash(key))
        seen: set[str] = set()
        for i in range(n_points):
            member = points[(start + i) % n_points][1]
            if member not in seen:
                seen.add(member)
                yield member
                if len(seen) == n_members:
                    return

    def preference_list(self, key: str, limit: int | None = None) -> list[str]:
        """Return the first ``limit`` members (all when None) of ``walk(key)``."""
        out: list[str] = []
        for member in self.walk(key):
            if limit is not None and len(out) >= limit:
                break
            out.append(member)
        return out


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where one request goes.

    Attributes:
        replica_id: The chosen replica.
        spillover: True when the chosen replica is not the model's home.
        home_replica_id: First replica of the model's preference list (for a
            request without a model id: the chosen replica).
        reason: ``"home"``, ``"cached"`` (a later replica already holding the
            model), ``"spill"`` (a later replica, model not there yet) or
            ``"no_model"`` (no model id, power of two choices).
    """

    replica_id: str
    spillover: bool
    home_replica_id: str
    reason: str


class _Replica:
    __slots__ = ("in_flight", "loading", "models", "optimistic")

    def __init__(self) -> None:
        self.in_flight = 0
        self.models: set[str] = set()  # reported loaded
        self.loading: set[str] = set()  # reported loading
        self.optimistic: set[str] = set()  # sent here, not yet reported

    def holds(self, model_id: str) -> bool:
        return model_id in self.models or model_id in self.loading or model_id in self.optimistic


class Router:
    """Routes requests to replicas by model id.

    Algorithm (DESIGN.md section 5), for a request with model id ``m``:

    1. Preference list: walk a consistent-hash ring (blake2b 64-bit,
       ``virtual_nodes`` points per replica) clockwise from hash(m), keeping
       distinct replicas. The first is m's *home*. Adding or removing one of n
       replicas changes the home of about 1/n of the models, and every gateway
       with the same replica set computes the same list.
    2. Bounded load (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with
       Bounded Loads"): with T requests in flight over n replicas,
       ``capacity = min(max_ongoing_requests,
       max(min_capacity, ceil(balance_factor * (T + 1) / n)))``.
       A replica is *under capacity* when its in-flight count is below it.
    3. Among replicas under capacity, in preference order: the first that
       already holds m (loaded, loading, or sent m and not yet reported), else
       the first. So a model stays on its home replica and only load beyond its
       share spills, always to the same next replicas: hot models gain copies,
       cold ones keep one. ``min_capacity`` keeps a lightly loaded deployment
       from spilling (and paying a model load) for a second concurrent request:
       a spill costs a model load (hundreds of ms), waiting costs a few
       service times. Defaults (c = 3, floor = max_ongoing_requests / 2) come
       from ``bench/bench_routing_sim.py``.
    4. No model id: power of two choices among replicas below
       ``max_ongoing_requests`` (the less loaded of two random ones).
    5. When every replica is at ``max_ongoing_requests``, :meth:`choose`
       returns None and the caller queues the request.

    Because capacity is at least ``ceil(balance_factor * (T + 1) / n)`` and
    ``balance_factor > 1``, some replica is always under capacity unless all are
    at ``max_ongoing_requests``.

    Cost per decision: one blake2b, one bisect (ring points are sorted once
    per membership change), and a walk that stops at the first holder under
    capacity, or the first replica under capacity when no holder is; the first
    few preference entries per model id are kept in a bounded LRU cache.
    """

    def __init__(
        self,
        *,
        balance_factor: float = DEFAULT_BALANCE_FACTOR,
        virtual_nodes: int = DEFAULT_VIRTUAL_NODES,
        max_ongoing_requests: int = 8,
        min_capacity: int | None = None,
        rng: random.Random | None = None,
        preference_cache_size: int = _DEFAULT_CACHE_SIZE,
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
        """
        if not balance_factor > 1.0:
            raise ValueError(f"balance_factor must be > 1, got {balance_factor}")
        if max_ongoing_requests < 1:
            raise ValueError(f"max_ongoing_requests must be >= 1, got {max_ongoing_requests}")
        if min_capacity is None:
            min_capacity = default_min_capacity(max_ongoing_requests)
        if min_capacity < 1:
            raise ValueError(f"min_capacity must be >= 1, got {min_capacity}")
        self.balance_factor = balance_factor
        self.max_ongoing_requests = max_ongoing_requests
        self.min_capacity = min_capacity
        self._rng = rng if rng is not None else random.Random()
        self._ring = HashRing(virtual_nodes=virtual_nodes)
        self._replicas: dict[str, _Replica] = {}
        self._ids: list[str] = []  # for random sampling
        self._holders: dict[str, set[str]] = {}  # model id -> replicas holding it
        self._total_in_flight = 0
        self._prefix_cache: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self._prefix_cache_size = max(0, preference_cache_size)

    # -- membership -------------------------------------------------------

    @property
    def virtual_nodes(self) -> int:
        """Ring points per replica."""
        return self._ring.virtual_nodes

    @property
    def replica_ids(self) -> list[str]:
        """Replica ids, sorted."""
        return sorted(self._replicas)

    def __len__(self) -> int:
        return len(self._replicas)

    def __contains__(self, replica_id: object) -> bool:
        return replica_id in self._replicas

    def add_replica(self, replica_id: str) -> None:
        """Add a ready replica to the ring (no-op if present)."""
        if replica_id in self._replicas:
            return
        self._replicas[replica_id] = _Replica()
        self._ids.append(replica_id)
        self._ring.add(replica_id)
        self._prefix_cache.clear()

    def remove_replica(self, replica_id: str) -> None:
        """Remove a replica (draining, dead); forgets its in-flight count and models."""
        rep = self._replicas.pop(replica_id, None)
        if rep is None:
            return
        self._ids.remove(replica_id)
        self._total_in_flight -= rep.in_flight
        for model_id in rep.models | rep.loading | rep.optimistic:
            self._unhold(model_id, replica_id)
        self._ring.remove(replica_id)
        self._prefix_cache.clear()

    # -- state updates ----------------------------------------------------

    def observe(self, replica_id: str, *, models: Iterable[str], loading: Iterable[str]) -> None:
        """Replace a replica's model view with what it reported.

        Optimistic marks from :meth:`acquire` are dropped too: the report is
        newer than the decision that made them, or the request is still on the
        wire and the next report will show the model loading.
        """
        rep = self._replicas.get(replica_id)
        if rep is None:
            return
        before = rep.models | rep.loading | rep.optimistic
        rep.models = set(models)
        rep.loading = set(loading)
        rep.optimistic = set()
        after = rep.models | rep.loading
        for model_id in before - after:
            self._unhold(model_id, replica_id)
        for model_id in after - before:
            self._holders.setdefault(model_id, set()).add(replica_id)

    def acquire(self, replica_id: str, model_id: str) -> None:
        """Record a request sent to ``replica_id`` for ``model_id`` ("" for none)."""
        rep = self._replicas.get(replica_id)
        if rep is None:
            return
        rep.in_flight += 1
        self._total_in_flight += 1
        if model_id and not rep.holds(model_id):
            rep.optimistic.add(model_id)
            self._holders.setdefault(model_id, set()).add(replica_id)

    def release(self, replica_id: str) -> None:
        """Record a reply (or failure) from ``replica_id``."""
        rep = self._replicas.get(replica_id)
        if rep is None or rep.in_flight == 0:
            return
        rep.in_flight -= 1
        self._total_in_flight -= 1

    def _unhold(self, model_id: str, replica_id: str) -> None:
        holders = self._holders.get(model_id)
        if holders is not None:
            holders.discard(replica_id)
            if not holders:
                del self._holders[model_id]

    # -- queries ----------------------------------------------------------

    @property
    def total_in_flight(self) -> int:
        """Requests in flight over all replicas."""
        return self._total_in_flight

    def in_flight(self, replica_id: str) -> int:
        """Requests in flight on one replica (0 if unknown)."""
        rep = self._replicas.get(replica_id)
        return rep.in_flight if rep is not None else 0

    def models(self, replica_id: str) -> set[str]:
        """Models the router believes ``replica_id`` holds (loaded, loading, just sent)."""
        rep = self._replicas.get(replica_id)
        if rep is None:
            return set()
        return rep.models | rep.loading | rep.optimistic

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

    def preference_list(self, model_id: str) -> list[str]:
        """The full preference list of ``model_id`` (home first)."""
        return self._ring.preference_list(model_id)

    def _walk(self, model_id: str) -> Iterator[str]:
        prefix = self._prefix_cache.get(model_id)
        if prefix is None:
            prefix = tuple(self._ring.preference_list(model_id, _PREFIX_LEN))
            if self._prefix_cache_size:
                self._prefix_cache[model_id] = prefix
                if len(self._prefix_cache) > self._prefix_cache_size:
                    self._prefix_cache.popitem(last=False)
        else:
            self._prefix_cache.move_to_end(model_id)
        yield from prefix
        if len(prefix) == _PREFIX_LEN and len(self._replicas) > _PREFIX_LEN:
            # Rare: the first few are all full. Continue the (deterministic) walk.
            walk = self._ring.walk(model_id)
            for _ in range(_PREFIX_LEN):
                next(walk)
            yield from walk

    # -- decisions --------------------------------------------------------

    def choose(self, model_id: str) -> RouteDecision | None:
        """Pick a replica for a request, or None when every replica is full.

        Does not change state: call :meth:`acquire` once the request is sent.
        """
        if not self._replicas:
            return None
        if not model_id:
            return self._choose_p2c()
        cap = self.capacity()
        replicas = self._replicas
        holders = self._holders.get(model_id, ())
        # Holders under capacity: if there are none, the first replica under
        # capacity wins and the walk can stop there.
        wanted = {r for r in holders if replicas[r].in_flight < cap}
        home: str | None = None
        first_free: str | None = None
        for replica_id in self._walk(model_id):
            if home is None:
                home = replica_id
            if replicas[replica_id].in_flight >= cap:
                continue
            if replica_id in wanted:
                reason = REASON_HOME if replica_id == home else REASON_CACHED
                return RouteDecision(replica_id, replica_id != home, home, reason)
            if first_free is None:
                first_free = replica_id
                if not wanted:
                    break
        if first_free is None or home is None:
            return None
        reason = REASON_HOME if first_free == home else REASON_SPILL
        return RouteDecision(first_free, first_free != home, home, reason)

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
        held = rep.models | rep.loading | rep.optimistic
        return sum(1 for m in held if len(self._holders.get(m, ())) <= 1)

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
            f"capacity={self.capacity()}, models_held={models}, "
            f"distinct_models={len(self._holders)}, balance_factor={self.balance_factor}, "
            f"min_capacity={self.min_capacity}, "
            f"max_ongoing_requests={self.max_ongoing_requests})"
        )
