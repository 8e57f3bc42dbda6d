"""What a replica warms, and in which order: pure functions, no I/O.

*Warming* loads a model on a replica before any request asks for it there,
so that the request finds it loaded. A warming load never evicts anything
(the replica keeps it only if it fits beside what it holds) and waits until
the replica has no request in flight (see ``muxgate.replicas._model_control``);
the pool sends one at a time per replica and stops at the first model that
does not fit. What to warm is decided here from the router's popularity
counts (``muxgate.gateway._popularity``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

__all__ = ["DEFAULT_WARM_LIMIT", "after_zero"]

#: at most this many models are warmed on one replica after a scale from zero
DEFAULT_WARM_LIMIT = 64


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
