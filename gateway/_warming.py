"""What a replica warms, and in which order: pure functions, no I/O.

*Warming* loads a model on a replica before any request asks for it there,
so that the request finds it loaded. A warming load never evicts anything
(the replica keeps it only if it fits beside what it holds) and starts only
while one of the replica's call slots is free, one at a time per replica,
holding no slot (see ``muxgate.replicas._model_control.warm_may_start``);
the pool sends one at a time per replica and stops at the first model that
does not fit. What to warm is decided here from the router's popularity
counts (``muxgate.gateway._popularity``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

from muxgate.gateway._popularity import PopularitySketch

__all__ = [
    "DEFAULT_WARM_LIMIT",
    "MAX_HANDOVER_S",
    "WarmCounts",
    "after_zero",
    "handed_over",
    "handover_bound_s",
    "moved_home",
    "spare_copies",
    "warm_counts",
]

#: at most this many models are warmed on one replica after a scale from zero
DEFAULT_WARM_LIMIT = 64
#: the longest a scale-down waits for the next homes to warm the leaving
#: replica's models (it serves meanwhile)
MAX_HANDOVER_S = 30.0


def after_zero(
    ranked: Iterable[tuple[str, float]],
    held: Collection[str],
    *,
    deferred: Iterable[str] = (),
    limit: int = DEFAULT_WARM_LIMIT,
    refused: Collection[str] = (),
) -> list[str]:
    """The models the first replica after a scale from zero warms, in order.

    Args:
        ranked: ``(model id, score)`` hottest first (the deployment's warm
            set: its decayed request counts, which survive the scale to zero).
        held: ids the replica holds or is loading already (the waking
            request's model): skipped, unless deferred.
        deferred: the config's ``pinned`` and ``preload`` ids, which a waking
            replica loads after its first request instead of before it is
            ready: first, in their order.
        limit: the most models returned.
        refused: ids not to warm (quarantined).

    Returns:
        Distinct ids, ``deferred`` first, then by score (only ids asked for
        at least once: a score above 0).
    """
    out: list[str] = []
    seen = set(refused)
    for model_id in deferred:  # even if held: a pinned id must be pinned
        if model_id not in seen:
            seen.add(model_id)
            out.append(model_id)
    seen.update(held)
    for model_id, score in ranked:
        if len(out) >= limit:
            break
        if score > 0 and model_id not in seen:
            seen.add(model_id)
            out.append(model_id)
    return out[:limit]


def moved_home(
    ranked: Iterable[tuple[str, float]],
    joined: str,
    preference: Callable[[str], Sequence[str]],
    holds: Callable[[str, str], bool],
    *,
    limit: int = DEFAULT_WARM_LIMIT,
    refused: Callable[[str], bool] = lambda model_id: False,
) -> list[str]:
    """The models a replica that just joined the ring warms, hottest first.

    Those asked for recently (``ranked``: ``(model id, score)`` hottest first,
    score above 0) whose home (first in ``preference(model)``, the ring with
    ``joined`` on it) is now ``joined`` and that it does not hold yet
    (``holds(replica, model)``). Their old holders keep serving them meanwhile;
    once ``joined`` holds one, the router prefers it (a holder, and home).
    Ids ``refused`` (suspected of killing replicas) are left out: a replica
    that joins to replace one a model killed must not load it unasked.
    """
    out: list[str] = []
    for model_id, score in ranked:
        if len(out) >= limit:
            break
        if score <= 0 or refused(model_id):
            continue
        prefs = preference(model_id)
        if prefs and prefs[0] == joined and not holds(joined, model_id):
            out.append(model_id)
    return out


def handed_over(
    held: Iterable[str],
    leaving: str,
    score: Callable[[str], float],
    preference: Callable[[str], Sequence[str]],
    holds: Callable[[str, str], bool],
    *,
    limit: int = DEFAULT_WARM_LIMIT,
    refused: Callable[[str], bool] = lambda model_id: False,
) -> dict[str, list[str]]:
    """What the other replicas warm before ``leaving`` drains: next home -> models.

    The models ``leaving`` holds that were asked for recently (``score`` above
    0), each to its next home (the first replica after ``leaving`` in its
    preference list) unless that one holds it already; per replica hottest
    first (ties by id), at most ``limit`` in all; none ``refused``.
    """
    recent = sorted(((score(m), m) for m in held if not refused(m)), key=lambda sm: (-sm[0], sm[1]))
    plan: dict[str, list[str]] = {}
    count = 0
    for s, model_id in recent:
        if s <= 0 or count >= limit:
            break
        nxt = next((r for r in preference(model_id) if r != leaving), None)
        if nxt is None or holds(nxt, model_id):
            continue
        plan.setdefault(nxt, []).append(model_id)
        count += 1
    return plan


def spare_copies(
    plan: Mapping[str, Sequence[str]],
    staying: Collection[str],
    held: Callable[[str], Iterable[str]],
    score: Callable[[str], float],
    preference: Callable[[str], Sequence[str]],
    holds: Callable[[str, str], bool],
    *,
    pinned: Collection[str] = (),
) -> dict[str, list[str]]:
    """What each next home of a hand-over may evict to make room: home -> ids, coldest first.

    ``plan``: from :func:`handed_over`; ``staying``: the replicas that stay in
    the pool (not the leaving one); ``held(replica)``: the ids it holds.
    A home may give up a model it holds only if that is a *spare copy*: not
    in ``pinned``, not one it is to warm, and held by another staying replica
    that keeps it, its *keeper* (the first staying holder in the model's
    preference list; the keeper's copy is on no list), so that no eviction
    ever costs a model its last copy in the pool. Ties by id. The replica
    evicts only as many as it needs, and only those still not pinned.
    """
    out: dict[str, list[str]] = {}
    for home, warming in plan.items():
        if home not in staying:
            continue
        spares: list[tuple[float, str]] = []
        for model_id in dict.fromkeys(held(home)):
            if model_id in pinned or model_id in warming:
                continue
            keeper = next(
                (r for r in preference(model_id) if r in staying and holds(r, model_id)), None
            )
            if keeper is not None and keeper != home:
                spares.append((score(model_id), model_id))
        if spares:
            out[home] = [m for _, m in sorted(spares)]
    return out


def handover_bound_s(load_s: float, plan: dict[str, list[str]]) -> float:
    """How long a scale-down lets the next homes warm (``plan`` from :func:`handed_over`).

    Twice the loads of the longest per-replica list at the learnt load time
    ``load_s``, plus a second; at most :data:`MAX_HANDOVER_S`; 0 for nothing to warm.
    """
    longest = max((len(models) for models in plan.values()), default=0)
    if not longest:
        return 0.0
    return min(MAX_HANDOVER_S, 1.0 + 2.0 * max(load_s, 0.0) * longest)


class WarmCounts:
    """Two request-count sketches read as one: each model's higher score.

    What :func:`warm_counts` gives warming: ``top`` and ``score`` as a
    :class:`PopularitySketch` has them.
    """

    __slots__ = ("_a", "_b")

    def __init__(self, a: PopularitySketch, b: PopularitySketch) -> None:
        self._a, self._b = a, b

    def score(self, model_id: str) -> float:
        return max(self._a.score(model_id), self._b.score(model_id))

    def top(self, n: int) -> list[tuple[str, float]]:
        # A model in the merged top n is in the top n of the sketch that gives
        # it its score, so the union of both tops holds the answer.
        ids = {m for m, _ in self._a.top(n)} | {m for m, _ in self._b.top(n)}
        ranked = sorted(((m, self.score(m)) for m in ids), key=lambda kv: (-kv[1], kv[0]))
        return ranked[: max(0, n)]


def warm_counts(
    own: PopularitySketch, reported: PopularitySketch | None
) -> PopularitySketch | WarmCounts:
    """The request counts warming ranks models by.

    ``reported``: the calls per model id the replicas reported, which count
    every gateway's requests (``Pong.model_requests``); ``own``: the ones
    this gateway routed. Each model scores the higher of the two: where
    several gateways share a pool, one gateway's share of the traffic is not
    the pool's, and the replicas' counts lag a ping behind, so a model first
    asked for since the last ping is known only to ``own`` (a replica that
    joins right after a burst of new models must still warm them).
    """
    if reported is None or not len(reported):
        return own
    return WarmCounts(own, reported)
