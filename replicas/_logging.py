"""Replica log lines with who and what in the prefix.

``INFO 2026-11-25 12:00:00,123 Model Model#ab12 3f9c... _cache.py:412 - Loading model '1'.``

The deployment and replica id come from the replica context, the request id
from the request context variable, so concurrent requests on one loop (and the
worker threads they start) are told apart.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from muxgate.replicas._context import current_replica, current_request

__all__ = [
    "FORMAT",
    "OUTCOME",
    "OutcomeThrottle",
    "ReplicaContextFilter",
    "describe_exception",
    "install_replica_logging",
    "logged",
    "mark_outcome_logged",
    "mark_traceback_logged",
    "outcome_logged_for",
    "traceback_logged",
]

#: set on an exception whose traceback is already in the log
_LOGGED = "_muxgate_traceback_logged"
#: set on an outcome (an expected error) logged with its detail: the request id it was logged for
_OUTCOME_LOGGED = "_muxgate_outcome_logged_for"


def mark_traceback_logged(exc: BaseException) -> None:
    """Note that ``exc``'s traceback has been logged (e.g. by the failed
    model load every waiting request then fails with), so the requests
    that fail with it log one line each instead of the traceback again."""
    with contextlib.suppress(AttributeError, TypeError):  # a type without a __dict__
        setattr(exc, _LOGGED, True)


def traceback_logged(exc: BaseException) -> bool:
    """Whether ``mark_traceback_logged(exc)`` was called."""
    return getattr(exc, _LOGGED, False) is True


def mark_outcome_logged(exc: BaseException) -> None:
    """Note that ``exc``, an outcome (an expected error, such as a model
    not in storage), was logged with its detail in the current request's
    name (a failed model load's line), so that request logs nothing more
    for it: one line per failed request. Other requests failing with it
    (they waited for the same load) still log theirs."""
    request = current_request()
    with contextlib.suppress(AttributeError, TypeError):  # a type without a __dict__
        setattr(exc, _OUTCOME_LOGGED, request.request_id if request is not None else "")


def outcome_logged_for(exc: BaseException, request_id: str) -> bool:
    """Whether ``mark_outcome_logged(exc)`` was called in request ``request_id``."""
    return bool(request_id) and getattr(exc, _OUTCOME_LOGGED, None) == request_id


def logged(exc: BaseException) -> bool:
    """Whether ``exc`` is in the log already: its traceback, or its detail
    as an outcome (by a failed model load, whichever request it was for)."""
    return traceback_logged(exc) or getattr(exc, _OUTCOME_LOGGED, None) is not None


def describe_exception(exc: BaseException) -> str:
    """``Type: message``, or ``Type`` alone when the message is empty
    (``SystemExit()``, ``KeyboardInterrupt()``)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


FORMAT = (
    "%(levelname)s %(asctime)s %(deployment)s %(replica_id)s %(request_id)s "
    "%(filename)s:%(lineno)d - %(message)s"
)


class ReplicaContextFilter(logging.Filter):
    """Adds ``deployment``, ``replica_id`` and ``request_id`` to every record (``-`` if unset)."""

    def filter(self, record: logging.LogRecord) -> bool:
        replica = current_replica()
        request = current_request()
        record.deployment = replica.deployment or "-"
        record.replica_id = replica.replica_id or "-"
        record.request_id = (request.request_id if request is not None else "") or "-"
        return True


#: the ``extra=`` key of a record a client's request caused (its value: the
#: outcome, e.g. ``model_not_found``), which ``OutcomeThrottle`` bounds
OUTCOME = "muxgate_outcome"


class OutcomeThrottle(logging.Filter):
    """Bounds the lines clients can cause: of the records marked with an
    outcome (``extra={OUTCOME: "model_not_found"}``: an unknown model id, a
    body that is not JSON, storage down), ``burst`` per outcome pass in each
    ``interval_s``; the rest are counted, and the first one to pass after
    them says how many were left out. Unmarked records always pass.

    A client sending unknown ids or bad bodies as fast as it can makes at
    most ``burst`` warnings a minute per outcome, not one or two a request.
    """

    def __init__(
        self,
        burst: int = 10,
        interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.interval_s = interval_s
        self._clock = clock
        #: outcome -> [window start, passed in it, left out in it]
        self._windows: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        left_out = {k: int(w[2]) for k, w in self._windows.items() if w[2]}
        return f"<OutcomeThrottle {self.burst}/{self.interval_s:g}s left_out={left_out}>"

    def filter(self, record: logging.LogRecord) -> bool:
        outcome = getattr(record, OUTCOME, None)
        if not isinstance(outcome, str):
            return True
        with self._lock:  # loader threads log too
            now = self._clock()
            window = self._windows.get(outcome)
            if window is None or now - window[0] >= self.interval_s:
                self._windows[outcome] = [now, 1, 0]
                if window is None or not window[2]:
                    return True
                left_out, since = int(window[2]), now - window[0]
            elif window[1] < self.burst:
                window[1] += 1
                return True
            else:
                window[2] += 1
                return False
        record.msg = (
            f"{record.getMessage()} [{left_out} more {outcome} line(s) in the last"
            f" {since:.0f} s not logged]"
        )
        record.args = None
        return True


class _ReplicaHandler(logging.StreamHandler[TextIO]):
    """Marks the handler this module installed, so a second install replaces it."""


def install_replica_logging(
    level: int | str = "INFO", stream: TextIO | None = None
) -> logging.Handler:
    """Log to ``stream`` (stderr) from the root logger with the replica prefix.

    Idempotent: calling it again replaces the handler it installed before.

    Args:
        level: root logger level.
        stream: where to write; ``sys.stderr`` by default.

    Returns:
        The installed handler.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _ReplicaHandler):
            root.removeHandler(handler)
            handler.close()
    handler = _ReplicaHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(ReplicaContextFilter())
    handler.addFilter(OutcomeThrottle())
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    return handler
