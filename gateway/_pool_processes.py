"""The pool's side of the launcher: replica specs, starting, stopping and
killing replica processes (``muxgate.gateway.launchers``).

A launcher that only reports replicas (``ReplicaReporter``) is followed,
never asked to start or stop one: ``creator`` is None and the stops here
only close connections. The same holds while a launcher with a leader
lease (``leadership``) is held by another gateway: ``may_act`` is false.
A launcher whose replicas obey only fenced drains (``drain_token``, Ray's)
issues the token a ``Drain`` carries (``admit_drain``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

import msgspec

from muxgate.gateway._config import DeploymentConfig
from muxgate.gateway._leadership import Leadership
from muxgate.gateway._replica_set import Replica
from muxgate.gateway.launchers import LaunchedReplica, Launcher, ReplicaReporter
from muxgate.replicas import DeploymentOptions
from muxgate.replicas.contract import ReplicaSpec

__all__ = ["DRAIN_MARGIN_S", "EXIT_GRACE_S", "ReplicaProcesses", "SpecFactory", "how_it_ended"]

#: seconds a process gets to exit after its connection closed, before SIGKILL
EXIT_GRACE_S = 5.0
#: the pool waits for ``Drained`` this much longer than the replica's own
#: graceful timeout (models unload after the in-flight calls finish)
DRAIN_MARGIN_S = 5.0

SpecFactory = Callable[[DeploymentConfig, str], ReplicaSpec]

_log = logging.getLogger("muxgate.gateway.pool")


def how_it_ended(code: int) -> str:
    """A replica's exit code in words: ``exited with code 7``, ``was
    killed by SIGABRT (signal 6)``."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "signal"
    hint = (
        " (kill -9, the kernel when memory ran out, or this gateway when it stopped answering)"
        if -code == 9
        else ""
    )
    return f"was killed by {name} (signal {-code}){hint}"


class ReplicaProcesses:
    """Starts, stops and kills the replicas of ``config`` through ``launcher``.

    ``drain_timeout_s`` is how long the pool waits for a drain; each spec's
    graceful timeout is that minus ``DRAIN_MARGIN_S``.
    """

    def __init__(
        self,
        config: DeploymentConfig,
        launcher: ReplicaReporter,
        make_spec: SpecFactory,
        *,
        drain_timeout_s: float,
    ) -> None:
        self.config = config
        self.launcher = launcher
        #: the launcher, when it creates replicas (None: it only reports them)
        self.creator: Launcher | None = launcher if isinstance(launcher, Launcher) else None
        #: the creator's leader lease, where gateways share its replicas
        self.leadership: Leadership | None = (
            getattr(launcher, "leadership", None) if self.creator is not None else None
        )
        self._make_spec = make_spec
        self._drain_timeout = drain_timeout_s
        #: the class's ``@deployment`` options, once a replica told them
        self.class_options: DeploymentOptions | None = None
        #: the class's ``@deployment(num_cpus=...)``, once a replica told it
        self.class_num_cpus: float | None = None

    def learn_class_options(self, options: DeploymentOptions) -> bool:
        """Take the class's ``@deployment`` options from a replica's handshake
        (the gateway never imports user code); true the first time only."""
        if self.class_options is not None:
            return False
        self.class_options, self.class_num_cpus = options, options.num_cpus
        config = self.config
        _log.info(
            "%s: @deployment options %s (config overrides: %s)",
            config.name,
            msgspec.structs.asdict(options),
            {
                k: v
                for k in ("max_ongoing_requests", "max_queued_requests", "num_replicas", "num_cpus")
                if (v := getattr(config, k)) is not None
            },
        )
        return True

    @property
    def may_act(self) -> bool:
        """Whether this gateway may start, stop and kill replicas now: the
        launcher creates them and, where it has a lease, this gateway holds it."""
        if self.creator is None:
            return False
        return self.leadership is None or self.leadership.is_leader()

    @property
    def outlive_gateway(self) -> bool:
        """Whether replicas are left running when the gateway stops (to be adopted)."""
        return bool(getattr(self.creator, "replicas_outlive_gateway", False))

    def spec(self, replica_id: str, *, defer: bool = False) -> ReplicaSpec:
        """The spec of a new replica; ``defer`` leaves its ``preload`` and
        ``pinned`` ids out (warmed after the waking requests instead)."""
        spec = self._make_spec(self.config, replica_id)
        if defer and (spec.preload or spec.pinned):
            spec = msgspec.structs.replace(spec, preload=[], pinned=[])
        # A drain must be able to wait for the longest request (the
        # gateway's request timeout); the pool waits DRAIN_MARGIN_S more.
        graceful = max(1.0, self._drain_timeout - DRAIN_MARGIN_S)
        if spec.graceful_shutdown_timeout_s != graceful:
            spec = msgspec.structs.replace(spec, graceful_shutdown_timeout_s=graceful)
        if spec.num_cpus is None and self.class_num_cpus is not None:
            # The launcher counts budgets against the host's cores.
            spec = msgspec.structs.replace(spec, num_cpus=self.class_num_cpus)
        return spec

    async def start(self, replica_id: str, *, defer: bool = False) -> LaunchedReplica:
        assert self.creator is not None  # only a creating launcher starts
        return await self.creator.start(self.spec(replica_id, defer=defer))

    async def release(self, rep: Replica) -> None:
        """Close the connection and leave the replica running; one still
        starting is killed (no one would know of it)."""
        if rep.conn is not None:
            with contextlib.suppress(Exception):
                await rep.conn.aclose()
        elif rep.process is not None:
            self.kill(rep.process)

    async def stop(self, rep: Replica) -> int | None:
        """Close the connection and make sure the process is gone; its exit
        code (``-N``: killed by signal N), None where unknown or not ours."""
        if rep.conn is not None:
            with contextlib.suppress(Exception):
                await rep.conn.aclose()
        proc, creator = rep.process, self.creator
        if proc is None or creator is None or not self.may_act:
            return None  # not the pool's to stop: another starts and stops replicas
        if rep.conn is None:
            # Never connected (start abandoned): nothing to finish, no grace.
            self.kill(proc)
        try:
            async with asyncio.timeout(EXIT_GRACE_S):
                return await creator.wait_exit(proc)
        except TimeoutError:
            self.kill(proc)
            with contextlib.suppress(Exception):
                return await creator.wait_exit(proc)
        return None

    async def admit_drain(self, rep: Replica) -> tuple[bool, str | None]:
        """Whether this gateway may drain ``rep`` now, and the token its
        ``Drain`` carries: from the launcher's ``drain_token(replica)`` where
        it has one (it checks the lease epoch at the replica's side and
        returns None to refuse), else None."""
        if not self.may_act:
            return False, None
        issue = getattr(self.creator, "drain_token", None)
        if issue is None or rep.process is None:
            return True, None
        token: str | None = await issue(rep.process)
        return token is not None, token

    def kill(self, replica: LaunchedReplica) -> None:
        """Forcibly, now (synchronous: a cancelled task still leaves no orphan)."""
        if self.creator is not None and self.may_act:
            with contextlib.suppress(ProcessLookupError):
                self.creator.kill(replica)
