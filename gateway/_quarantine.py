"""Poison model ids: ids that keep killing replicas are refused for a while.

A model whose load or call kills its replica process (``os._exit``, a
segfault in native code, the kernel's OOM killer) would otherwise be
replayed forever: every request for it takes a replica down, with the
unrelated requests in flight there. The pool tells a ``Quarantine`` of each
replica death and which model ids it suspects (``suspects``); an id blamed
for ``deaths`` deaths within ``window_s`` is refused with 503 ``quarantined``
until its back-off ends.

Rules (the defaults are ``QuarantineConfig``'s):

* **Blame.** The suspects of one death are the ids the replica was loading
  or running a call for when it died. When some of them were not loaded
  (a load was under way, or about to start for the call), only those are
  blamed: a model already serving on that replica is a bystander of a
  model being loaded. Otherwise every id in flight is blamed.
* **Quarantine.** An id blamed for ``deaths`` (2) deaths within
  ``window_s`` (300 s) is quarantined for ``backoff_s`` (30 s). One death
  is never enough: an id in flight beside the culprit once is not caught.
* **Repeats.** An id released from quarantine is on probation for
  ``window_s``: one more death then quarantines it again, for twice the
  previous back-off, up to ``max_backoff_s`` (900 s). After ``window_s``
  without a death it starts afresh.

Everything is decided here, synchronously, on an injected monotonic
``clock`` (and a ``wall_clock`` only to show when a quarantine ends), so the
rules are tested on a fake clock.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec

from muxgate.gateway._errors import QuarantinedError

__all__ = ["Quarantine", "QuarantineConfig", "suspects"]

_log = logging.getLogger("muxgate.gateway.quarantine")


class QuarantineConfig(msgspec.Struct, forbid_unknown_fields=True):
    """A deployment's ``quarantine`` section (every field optional)."""

    #: False: never refuse an id, whatever it kills
    enabled: bool = True
    #: replica deaths an id must be blamed for, within ``window_s``
    deaths: Annotated[int, msgspec.Meta(ge=1)] = 2
    window_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    #: first quarantine; each repeat doubles it, up to ``max_backoff_s``
    backoff_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    max_backoff_s: Annotated[float, msgspec.Meta(gt=0)] = 900.0


def suspects(in_flight: Iterable[str], loading: Iterable[str], loaded: Collection[str]) -> set[str]:
    """The model ids to blame for one replica death.

    Args:
        in_flight: model ids of the calls the replica was running.
        loading: ids it last reported as being loaded.
        loaded: ids it last reported as loaded.

    Returns:
        The ids being loaded (in ``loading``, or in flight and not in
        ``loaded``) if there are any, else every id in flight. Never ``""``
        (calls without a model id).
    """
    loading = set(loading)
    candidates = set(in_flight) | loading
    candidates.discard("")
    fresh = {m for m in candidates if m in loading or m not in loaded}
    return fresh or candidates


@dataclass
class _Record:
    #: monotonic times of the deaths blamed on the id since its last quarantine
    deaths: list[float] = field(default_factory=list)
    #: quarantines so far (the back-off doubles with each)
    strikes: int = 0
    #: end of the current or last quarantine (monotonic)
    until: float = 0.0
    #: deaths blamed on the id since it was first blamed (or last pruned)
    total: int = 0


class Quarantine:
    """The poison-id bookkeeping of one deployment.

    Args:
        config: the rule's parameters.
        name: the deployment's name, for log lines.
        clock: monotonic seconds.
        wall_clock: Unix seconds, only for ``snapshot()``'s ``until``.
        on_refusal: called for each request ``check`` refuses (a metric).
    """

    def __init__(
        self,
        config: QuarantineConfig | None = None,
        *,
        name: str = "",
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        on_refusal: Callable[[], None] | None = None,
    ) -> None:
        self.config = config if config is not None else QuarantineConfig()
        self.name = name
        self._on_refusal = on_refusal
        self._clock = clock
        self._wall = wall_clock
        self._records: dict[str, _Record] = {}
        #: ids quarantined now -> end (monotonic); the request path reads only this
        self._until: dict[str, float] = {}

    def replica_died(
        self,
        replica_id: str,
        reason: str | None,
        in_flight: Iterable[str],
        loading: Iterable[str],
        loaded: Collection[str],
    ) -> list[str]:
        """Log a replica's death, blame its ``suspects`` and log the ids it
        puts in quarantine (returned). Arguments as in ``suspects``."""
        blamed = suspects(in_flight, loading, loaded)
        _log.warning(
            "replica %s died: %s (suspected model ids: %s)",
            replica_id,
            reason,
            sorted(blamed) or "none",
        )
        newly = self.record_death(blamed)
        for model_id in newly:
            _log.error(
                "%s: model id %r quarantined for %.0f s: it was loading or in flight"
                " in repeated replica deaths",
                self.name,
                model_id,
                self.retry_after(model_id) or 0.0,
            )
        return newly

    def record_death(self, blamed: Iterable[str]) -> list[str]:
        """A replica died with ``blamed`` (see ``suspects``) loading or in
        flight; return the ids this death puts in quarantine."""
        config = self.config
        now = self._clock()
        self._prune(now)
        newly: list[str] = []
        for model_id in sorted(blamed):
            rec = self._records.setdefault(model_id, _Record())
            if rec.until > now:
                continue  # quarantined already: a call sent before it was
            rec.deaths = [t for t in rec.deaths if t > now - config.window_s]
            rec.deaths.append(now)
            rec.total += 1
            on_probation = rec.strikes > 0 and now - rec.until <= config.window_s
            if config.enabled and (len(rec.deaths) >= config.deaths or on_probation):
                rec.strikes += 1
                backoff = config.backoff_s * 2 ** min(rec.strikes - 1, 62)
                rec.until = now + min(config.max_backoff_s, backoff)
                rec.deaths = []
                self._until[model_id] = rec.until
                newly.append(model_id)
        return newly

    def suspected(self, model_id: str) -> bool:
        """Whether ``model_id`` was blamed for a replica death within
        ``window_s``, or is quarantined now: no replica loads it unasked
        (warming), though one death alone does not refuse its requests."""
        if self.retry_after(model_id) is not None:
            return True
        rec = self._records.get(model_id)
        if rec is None:
            return False
        now = self._clock()
        recent = now - self.config.window_s
        return any(t > recent for t in rec.deaths) or (
            rec.strikes > 0 and now - rec.until <= self.config.window_s
        )

    def retry_after(self, model_id: str) -> float | None:
        """Seconds until ``model_id`` may be tried again, or None if it may now.

        The only method on the request path: a dict lookup when no id is
        quarantined.
        """
        until = self._until.get(model_id)
        if until is None:
            return None
        left = until - self._clock()
        if left > 0:
            return left
        del self._until[model_id]
        return None

    def check(self, model_id: str) -> None:
        """Refuse a quarantined id (the dispatcher calls this before routing).

        Raises:
            QuarantinedError: 503 with ``Retry-After`` for the time left.
        """
        if model_id not in self._until:
            return  # the request path: one lookup
        left = self.retry_after(model_id)
        if left is None:
            return
        if self._on_refusal is not None:
            self._on_refusal()
        retry_after = max(1, math.ceil(left))
        raise QuarantinedError(
            "this model id is quarantined: replicas died while it was loading or in"
            f" flight; retry in {retry_after} s",
            retry_after=retry_after,
        )

    def clear(self, model_id: str | None = None) -> list[str]:
        """Forget ``model_id`` (or every id): released at once, strikes and
        deaths forgotten. Returns the ids that were quarantined."""
        now = self._clock()
        ids = list(self._records) if model_id is None else [model_id]
        released = []
        for mid in ids:
            rec = self._records.pop(mid, None)
            self._until.pop(mid, None)
            if rec is not None and rec.until > now:
                released.append(mid)
        return sorted(released)

    def active(self) -> int:
        """How many ids are quarantined now."""
        now = self._clock()
        return sum(1 for until in list(self._until.values()) if until > now)

    def snapshot(self) -> list[dict[str, Any]]:
        """The ids quarantined now, for ``/-/replicas``, soonest release first.

        Each: ``model_id``, ``until`` (Unix seconds), ``retry_after_s``,
        ``deaths`` (replica deaths blamed on it so far) and ``strikes``
        (quarantines so far, this one included).
        """
        now = self._clock()
        wall = self._wall()
        out = []
        for model_id, until in sorted(self._until.items(), key=lambda kv: kv[1]):
            if until <= now:
                continue
            rec = self._records[model_id]
            out.append(
                {
                    "model_id": model_id,
                    "until": round(wall + (until - now), 3),
                    "retry_after_s": math.ceil(until - now),
                    "deaths": rec.total,
                    "strikes": rec.strikes,
                }
            )
        return out

    def _prune(self, now: float) -> None:
        """Drop what no longer matters: ids with no death in the window, not
        quarantined, and past their probation (memory stays bounded by the
        deaths of one window)."""
        window = self.config.window_s
        for model_id in [
            mid
            for mid, rec in self._records.items()
            if rec.until <= now
            and (rec.strikes == 0 or now - rec.until > window)
            and not any(t > now - window for t in rec.deaths)
        ]:
            del self._records[model_id]
            self._until.pop(model_id, None)

    def __len__(self) -> int:
        return self.active()

    def __repr__(self) -> str:
        now = self._clock()
        active = sorted(mid for mid, until in self._until.items() if until > now)
        return f"<Quarantine quarantined={active} watched={len(self._records)}>"
