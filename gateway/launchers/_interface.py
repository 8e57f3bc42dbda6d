"""The launcher interface: what a replica pool needs from wherever replicas run.

A pool follows the set of ready replicas its launcher reports. Each has a
stable ``name`` (the id the router's ring hashes: a replica restarted under
the same name keeps its place on the ring and so its models' traffic) and an
``address`` the gateway connects to (``unix:/path`` or ``tcp:host:port``).

Two kinds of launcher:

* one that can create replicas (``Launcher``: local processes; later Ray
  actors or Kubernetes pods) starts one from a ``ReplicaSpec``, stops one
  (gracefully, then forcibly) and reports its exit; the pool decides how
  many run;
* one that cannot (``ReplicaReporter``: a fixed list of addresses of
  replicas started elsewhere) only reports the ready replicas; the pool
  connects to those it is told about.

Both report the replicas already running when the gateway starts
(``ready_replicas``), which the pool adopts instead of starting new ones.

A pid is reported only where there is a local process (``None`` otherwise).

A launcher whose replicas outlive the gateway (Ray's detached actors) says
so with a class attribute ``replicas_outlive_gateway = True``: a pool that
closes then leaves its replicas running (closing its connections) for the
next gateway to adopt, instead of stopping them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from muxgate.replicas.contract import ReplicaSpec

__all__ = [
    "LaunchedReplica",
    "Launcher",
    "ReplicaReporter",
    "ReplicaStartError",
    "can_create",
]


class ReplicaStartError(Exception):
    """A replica did not become ready.

    Attributes:
        reason: one line saying why (the replica's ``FAILED`` line, its exit
            code, or a timeout).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LaunchedReplica(Protocol):
    """A replica a launcher reports ready to accept connections."""

    @property
    def name(self) -> str:
        """Stable identity within the deployment, kept across restarts; the
        pool's replica id and the name the ring hashes."""
        ...

    @property
    def deployment(self) -> str:
        """The deployment it serves."""
        ...

    @property
    def address(self) -> str:
        """Where it listens: ``unix:/path`` or ``tcp:host:port``."""
        ...

    @property
    def pid(self) -> int | None:
        """Its process id where it is a local process, else None."""
        ...


@runtime_checkable
class ReplicaReporter(Protocol):
    """Reports the ready replicas; all a launcher that cannot create them does."""

    async def ready_replicas(self, deployment: str) -> Sequence[LaunchedReplica]:
        """The deployment's replicas that are ready now (an empty sequence
        when none); a pool adopts them when it starts, and follows the set
        when its launcher cannot create replicas."""
        ...

    async def aclose(self) -> None:
        """Release what the launcher holds (the replicas it created stop)."""
        ...


@runtime_checkable
class Launcher(ReplicaReporter, Protocol):
    """A launcher that creates replicas, and stops them."""

    async def start(self, spec: ReplicaSpec) -> LaunchedReplica:
        """Start a replica from ``spec`` and wait until it is ready.

        Raises:
            ReplicaStartError: it failed, exited or timed out; nothing of it
                is left running.
        """
        ...

    async def stop(self, replica: LaunchedReplica, grace_s: float) -> int | None:
        """Stop it gracefully (it finishes its calls and unloads its
        models), forcibly after ``grace_s`` seconds; its exit code."""
        ...

    def kill(self, replica: LaunchedReplica) -> None:
        """Stop it forcibly, now. Synchronous: a caller that may itself be
        cancelled can still make sure nothing is left running."""
        ...

    async def wait_exit(self, replica: LaunchedReplica) -> int | None:
        """Wait until it has exited; its exit code (None: not known)."""
        ...


def can_create(launcher: ReplicaReporter) -> bool:
    """Whether ``launcher`` starts replicas itself (else it only reports them)."""
    return isinstance(launcher, Launcher)
