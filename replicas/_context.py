"""Per-process and per-request context for code running inside a replica.

Two scopes matter to user code and to the model caches:

* the **replica** (deployment name, replica id): set once when a replica
  process starts; it prefixes log lines and labels spans;
* the **request** (request id, multiplexed model id, pins): a context variable,
  so concurrent requests on one event loop, and the worker threads they start,
  never see each other's values.

A request scope also collects *release callbacks*: a model cache pins a model
for the request that asked for it and registers the unpin here; the scope runs
the callbacks when the request finishes, whatever way it finishes.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

__all__ = [
    "ReplicaContext",
    "RequestContext",
    "current_replica",
    "current_request",
    "get_multiplexed_model_id",
    "request_scope",
    "set_replica_context",
]

_log = logging.getLogger("muxgate.replicas")


@dataclass(frozen=True, slots=True)
class ReplicaContext:
    """Identity of the process running user code."""

    deployment: str = ""
    replica_id: str = ""


@dataclass(slots=True)
class RequestContext:
    """State of one request while user code runs for it."""

    request_id: str = ""
    multiplexed_model_id: str = ""
    _releases: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def on_release(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the request finishes (used to unpin models)."""
        self._releases.append(callback)


_replica = ReplicaContext()
_request: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "muxgate_request", default=None
)


def set_replica_context(deployment: str, replica_id: str) -> None:
    """Record who this process is; called once by the replica entry point."""
    global _replica
    _replica = ReplicaContext(deployment=deployment, replica_id=replica_id)


def current_replica() -> ReplicaContext:
    return _replica


def current_request() -> RequestContext | None:
    """The request being served in this task or thread, or ``None``."""
    return _request.get()


def get_multiplexed_model_id() -> str:
    """The model id of the request being served.

    Returns ``""`` outside a request or when the request carried no model id,
    as Ray Serve's ``serve.get_multiplexed_model_id`` does.
    """
    ctx = _request.get()
    return ctx.multiplexed_model_id if ctx is not None else ""


@contextlib.contextmanager
def request_scope(request_id: str = "", multiplexed_model_id: str = "") -> Iterator[RequestContext]:
    """Run the body as one request: sets the context variable, and on exit
    runs every release callback registered during the request (in reverse
    order; a failing callback is logged and the rest still run)."""
    ctx = RequestContext(request_id=request_id, multiplexed_model_id=multiplexed_model_id)
    token = _request.set(ctx)
    try:
        yield ctx
    finally:
        _request.reset(token)
        while ctx._releases:
            callback = ctx._releases.pop()
            try:
                callback()
            except Exception:
                _log.exception("release callback failed for request %s", request_id)
