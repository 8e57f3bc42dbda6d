"""The deadline of the request a storage call serves, and the share of it storage may use.

A replica runs each call under its request's deadline. Storage calls made
for that request (a model load's fetch) must give up early enough that the
replica can still answer before the gateway's own deadline passes: a 503
``storage_unavailable`` the client can retry, not a 504. The deadline
travels in the OpenTelemetry context under :data:`DEADLINE_KEY`, as an
absolute ``time.monotonic()`` value, so that neither ``muxgate.replicas``
nor ``muxgate.backends`` imports the other (the same channel as the fetch
log of a model load). The OpenTelemetry context is a context variable: a
load started by one request carries that request's deadline into the task
and worker threads that run it.
"""

from __future__ import annotations

import time
from typing import Final

from opentelemetry import context as otel_context

#: OpenTelemetry context key holding the ``time.monotonic()`` by which the
#: request being served must be answered (set by the replica for each call).
DEADLINE_KEY: Final = "muxgate.deadline"

#: At most this many seconds of a request's remaining time are kept back from storage.
_MAX_RESERVE_S: Final = 1.0
#: Share of the remaining time kept back when it is short.
_RESERVE_SHARE: Final = 0.25


def request_deadline() -> float | None:
    """The current request's deadline (``time.monotonic()``), or ``None`` outside one."""
    value = otel_context.get_value(DEADLINE_KEY)
    return value if isinstance(value, float) else None


def storage_budget(remaining: float) -> float:
    """Seconds storage may use of ``remaining`` seconds before a request's deadline.

    A quarter of the remaining time, at most one second, is kept back to
    answer: to send the 503 back, or to load a model from the disk cache
    when the remote could not be reached. ``10.0`` -> ``9.0``, ``2.0`` ->
    ``1.5``, ``0`` or less -> ``0``.
    """
    if remaining <= 0:
        return 0.0
    return remaining - min(_MAX_RESERVE_S, remaining * _RESERVE_SHARE)


def storage_deadline(clock_now: float | None = None) -> float | None:
    """The ``time.monotonic()`` by which storage calls of the current request must end.

    ``None`` outside a request with a deadline (no bound beyond the retry
    policy and the libraries' own timeouts).
    """
    deadline = request_deadline()
    if deadline is None:
        return None
    now = time.monotonic() if clock_now is None else clock_now
    return now + storage_budget(deadline - now)
