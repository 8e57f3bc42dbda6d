"""The ``ray`` launcher: replicas as Ray actors on a Ray cluster.

Each replica is one named, detached Ray actor (``ReplicaActor``) in the
launcher's namespace. The actor is a supervisor: it starts the standalone
replica server (``python -m muxgate.replicas._server``, what ``muxgate
replica`` runs) as its child process, listening on the node's address and a
port the system picks, and reports that ``tcp:`` address. The gateway then
connects to the replica directly over the authenticated channel; requests
never pass through Ray.

* The deployment's ``num_cpus`` is the actor's resource request; actors are
  spread over the nodes (scheduling strategy ``SPREAD``).
* The child reads its spec on a stdin pipe held by the actor: when the actor
  dies (killed, or its node gone) the pipe closes and the replica exits; its
  gateway connection closes and the pool starts a replacement, which Ray
  places on a live node.
* The actors are detached: they outlive the gateway. A gateway that stops
  leaves them running (``replicas_outlive_gateway``), and the next one adopts
  them (``ready_replicas`` finds them by name in the namespace). When a
  replica exits (drained on scale-down, or it died) its actor is killed, so
  it frees its CPUs. ``remove_absent`` kills the actors of deployments the
  config no longer has.
* Several gateways may serve one deployment: one at a time leads, holding
  the deployment's lease (``_ray_lease``: a named detached actor keeps it).
  Only the leader creates, stops, kills and replaces actors; the others
  adopt what it creates and route over it. ``start`` and ``stop`` carry the
  leader's lease epoch, and the replica actor checks it with the lease
  actor first, so a stale leader's late action is refused (fencing). So
  does a drain: the actor checks the epoch, then writes a one-time token on
  its replica's stdin pipe and returns it (``drain_token``); the replica
  (spec ``drain_fence``) obeys only a ``Drain`` carrying such a token.
* The channel uses the cluster secret; when the config names none, one is
  generated per namespace and kept in the Ray cluster's key-value store, so
  the next gateway (which must adopt the actors) finds the same one. Anyone
  who can connect to the Ray cluster can run code on it anyway; the secret
  keeps the replicas' ports closed to those who can only reach the network.

This module imports ``ray``; the launcher registry imports it only when a
config asks for ``kind: ray`` (install ``muxgate[ray]``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import msgspec
import ray
import ray.exceptions
import ray.util
from ray.experimental import internal_kv

from muxgate.gateway._channel_client import ChannelClient
from muxgate.gateway._config import LauncherConfig
from muxgate.gateway._connection import ReplicaConnection
from muxgate.gateway._leadership import Leadership, holder_id
from muxgate.gateway.launchers._interface import LaunchedReplica, ReplicaStartError
from muxgate.gateway.launchers._ray_lease import (
    LEASE_PREFIX,
    RayLeaseClient,
    check_epoch,
    take_lease,
)
from muxgate.replicas.contract import (
    DEFAULT_NUM_CPUS,
    SECRET_ENV,
    ChannelSettings,
    ReplicaSpec,
    ReplicaState,
    cpu_budget_env,
)

__all__ = [
    "ACTOR_PREFIX",
    "DEFAULT_LEASE_S",
    "RayLauncher",
    "RayReplica",
    "ReplicaActor",
    "app_secret",
    "connect_ray",
]

_log = logging.getLogger("muxgate.gateway.launcher")

#: Every replica actor's name is this plus the replica id (``deployment#hex``).
ACTOR_PREFIX = "muxgate:"
#: Key of the generated cluster secret in the Ray key-value store (per namespace).
_SECRET_KEY = b"muxgate:cluster-secret"
#: Seconds an adopted actor may take to say its address.
_ASK_TIMEOUT_S = 10.0
#: The lease period when the config sets none (``launcher.lease_s``).
DEFAULT_LEASE_S = 10.0
Connect = Callable[[str, Callable[[ReplicaState], None]], Awaitable[ReplicaConnection]]

#: Concurrent calls on one actor (``wait`` blocks while ``stop`` or ``address`` run).
_ACTOR_CONCURRENCY = 4


class ReplicaActor:
    """Runs on a Ray worker: one replica server as a child process.

    Args:
        spec_json: the replica's spec (msgspec JSON); its ``listen`` is set
            here to the node's address.
        secret: the cluster secret, handed to the child in its environment
            (never on its command line).
        namespace: the actor's namespace, where its deployment's lease actor is.
    """

    def __init__(self, spec_json: bytes, secret: str, namespace: str) -> None:
        self._spec = msgspec.json.decode(spec_json, type=ReplicaSpec)
        self._secret = secret
        self._namespace = namespace
        self._proc: subprocess.Popen[bytes] | None = None
        self._address: str | None = None

    def start(self, epoch: int | None = None) -> str:
        """Start the replica server; its ``tcp:`` address once it is ready.

        ``epoch``: the starting leader's lease epoch, checked first.

        Raises:
            RuntimeError: a stale epoch, or the replica printed ``FAILED``
                or exited first.
        """
        if epoch is not None:
            check_epoch(self._spec.deployment, self._namespace, epoch)
        host: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        listen = f"tcp:[{host}]:0" if ":" in host else f"tcp:{host}:0"
        spec = msgspec.structs.replace(self._spec, listen=listen)
        num_cpus = spec.num_cpus if spec.num_cpus is not None else DEFAULT_NUM_CPUS
        env = {**os.environ, **cpu_budget_env(num_cpus), SECRET_ENV: self._secret}
        proc = subprocess.Popen(
            [sys.executable, "-m", "muxgate.replicas._server", "--spec", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert proc.stdin is not None and proc.stdout is not None
        self._proc = proc
        # The pipe stays open: it closes when this actor's process dies, and
        # the replica then exits.
        proc.stdin.write(msgspec.json.encode(spec) + b"\n")
        proc.stdin.flush()
        line = proc.stdout.readline().decode(errors="replace").strip()
        if line.startswith("READY "):
            self._address = line[len("READY ") :]
            return self._address
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        code = proc.wait()
        if line.startswith("FAILED"):
            raise RuntimeError(line[len("FAILED") :].strip() or "failed to start")
        raise RuntimeError(f"replica exited with code {code} before it was ready")

    def status(self) -> tuple[str, str | None]:
        """``("starting", None)``, ``("running", address)`` or ``("exited", None)``."""
        if self._proc is not None and self._proc.poll() is not None:
            return "exited", None
        if self._address is None:
            return "starting", None
        return "running", self._address

    def node_id(self) -> str:
        """The id of the Ray node this actor runs on."""
        return str(ray.get_runtime_context().get_node_id())

    def wait(self) -> int | None:
        """Block until the replica exited; its exit code."""
        return None if self._proc is None else self._proc.wait()

    def allow_drain(self, epoch: int | None = None) -> str:
        """A one-time token for one ``Drain`` of the replica, issued to the
        leader of ``epoch`` (checked first), written on the replica's stdin
        pipe before it is returned (``muxgate.replicas._drain_fence``).

        Raises:
            RuntimeError: a stale epoch, or no replica running.
        """
        if epoch is not None:
            check_epoch(self._spec.deployment, self._namespace, epoch)
        proc = self._proc
        if proc is None or proc.stdin is None or proc.poll() is not None:
            raise RuntimeError("no replica running")
        token = secrets.token_hex(16)
        # One write of a short line: atomic on a pipe, whatever other
        # actor threads do.
        os.write(proc.stdin.fileno(), f"DRAIN {token}\n".encode())
        return token

    def stop(self, grace_s: float, epoch: int | None = None) -> int | None:
        """SIGTERM (it finishes its calls and unloads), SIGKILL after ``grace_s``.

        Raises:
            RuntimeError: ``epoch`` is not the current leader's (nothing done).
        """
        if epoch is not None:
            check_epoch(self._spec.deployment, self._namespace, epoch)
        if self._proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGTERM)
        try:
            return self._proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            return self._proc.wait()


class RayReplica:
    """A replica actor: its name (the replica id), deployment, address and handle."""

    __slots__ = ("actor", "address", "deployment", "name")

    def __init__(self, name: str, deployment: str, address: str, actor: Any) -> None:
        self.name = name
        self.deployment = deployment
        self.address = address
        self.actor = actor

    @property
    def pid(self) -> int | None:
        return None  # a process of some Ray node, not of this host

    def __repr__(self) -> str:
        return f"<RayReplica {self.name} {self.address}>"


def connect_ray(address: str, namespace: str) -> None:
    """Connect this process to the Ray cluster at ``address`` unless it is
    connected (a process has one Ray connection: the first address wins).

    Raises:
        ConnectionError: no Ray cluster answers there.
    """
    if ray.is_initialized():
        return
    try:
        ray.init(
            address=address,
            namespace=namespace,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    except ConnectionError as exc:
        raise ConnectionError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from exc


def app_secret(namespace: str) -> str:
    """The cluster secret generated for ``namespace``: the one a previous
    gateway stored in the Ray key-value store, else a new one stored there."""
    stored = internal_kv._internal_kv_get(_SECRET_KEY, namespace=namespace)
    if stored is None:
        new = secrets.token_urlsafe(32).encode()
        # overwrite=False: of two gateways storing at once, one secret wins.
        internal_kv._internal_kv_put(_SECRET_KEY, new, overwrite=False, namespace=namespace)
        stored = internal_kv._internal_kv_get(_SECRET_KEY, namespace=namespace)
    assert stored is not None
    return bytes(stored).decode()


class RayLauncher:
    """Starts replicas as named, detached Ray actors in ``namespace``.

    Args:
        secret: the cluster secret the replicas require (passed to each actor
            in its constructor, which Ray keeps in its control store).
        namespace: the Ray namespace of the actors; gateways of one app
            share it, and adopt each other's actors.
        channel: the config's ``cluster`` section; its TLS settings (files
            at the same paths on every node) and handshake timeout go to
            the replicas, its secret file does not (the secret travels in
            the actor's constructor).
        connect: ``(address, on_state) -> ReplicaConnection`` for the pool
            (the gateway passes its ``ChannelClient``'s, proving the secret).
        start_timeout: seconds an actor may take to be placed and to have
            its replica ready (an actor no node can fit waits that long).
        deployment: the one deployment this launcher serves; given, the
            launcher acts only while this gateway holds the deployment's
            lease (``leadership``), else it serves as before, alone.
        lease_s: the lease period.

    Call ``connect_ray`` first (``from_config`` does).
    """

    #: Stopping the gateway leaves the actors running for the next one.
    replicas_outlive_gateway = True

    def __init__(
        self,
        *,
        secret: str,
        connect: Connect,
        namespace: str = "muxgate",
        channel: ChannelSettings | None = None,
        start_timeout: float = 120.0,
        deployment: str | None = None,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        self.namespace = namespace
        #: who may create and stop replicas (None: this launcher alone)
        self.leadership: Leadership | None = (
            Leadership(RayLeaseClient(deployment, namespace, lease_s), period_s=lease_s)
            if deployment is not None
            else None
        )
        self.start_timeout = start_timeout
        self._secret = secret
        channel = channel or ChannelSettings()
        self._channel = msgspec.structs.replace(channel, secret_file=None)
        self._actor_class: Any = ray.remote(ReplicaActor)
        #: names of the actors this launcher is starting (waiting for a node,
        #: or for their replica): ``ready_replicas`` leaves them to ``start``
        self._starting: set[str] = set()
        #: how the pool reaches the replicas (the gateway's ``ChannelClient``)
        self.connect = connect

    @classmethod
    def from_config(
        cls,
        config: LauncherConfig,
        *,
        channel: ChannelClient,
        cluster: ChannelSettings,
        secret: bytes,
        deployment: str | None = None,
    ) -> RayLauncher:
        """The launcher ``launcher: {kind: ray, address, namespace, lease_s}``
        describes for ``deployment``; connects to Ray. ``channel`` reaches
        the replicas (it proves ``secret``); ``cluster`` is the config's
        section of that name.

        Raises:
            ConnectionError: no Ray cluster answers at the address.
        """
        namespace = config.namespace or "muxgate"
        connect_ray(config.address or "auto", namespace)
        return cls(
            secret=os.fsdecode(secret),
            connect=channel.connect,
            namespace=namespace,
            channel=cluster,
            deployment=deployment,
            lease_s=config.lease_s if config.lease_s is not None else DEFAULT_LEASE_S,
        )

    @staticmethod
    def generated_secret(config: LauncherConfig) -> bytes:
        """The cluster secret generated for the namespace of ``config``
        (connects to Ray; see ``app_secret``).

        Raises:
            ConnectionError: no Ray cluster answers at the address.
        """
        namespace = config.namespace or "muxgate"
        connect_ray(config.address or "auto", namespace)
        return app_secret(namespace).encode()

    def __repr__(self) -> str:
        return f"<RayLauncher namespace={self.namespace!r}>"

    def _acting(self) -> tuple[bool, int | None]:
        """``(may act, epoch to stamp the action with)`` now."""
        if self.leadership is None:
            return True, None
        epoch = self.leadership.epoch
        return epoch is not None, epoch

    async def start(self, spec: ReplicaSpec) -> RayReplica:
        """Create the actor and wait until its replica serves.

        Raises:
            ReplicaStartError: this gateway does not hold the lease (or lost
                it: the actor refused the stale epoch), or the replica
                failed, died or was not ready within ``start_timeout`` (no
                node could fit it); the actor is gone.
        """
        may, epoch = self._acting()
        if not may:
            raise ReplicaStartError("not started: this gateway does not hold the lease")
        spec = msgspec.structs.replace(
            spec, standalone=True, channel=self._channel, drain_fence=True
        )
        num_cpus = spec.num_cpus if spec.num_cpus is not None else DEFAULT_NUM_CPUS
        name = ACTOR_PREFIX + spec.replica_id
        self._starting.add(name)
        try:
            return await self._start(spec, name, num_cpus, epoch)
        finally:
            self._starting.discard(name)

    async def _start(
        self, spec: ReplicaSpec, name: str, num_cpus: float, epoch: int | None
    ) -> RayReplica:
        actor = self._actor_class.options(
            name=name,
            namespace=self.namespace,
            lifetime="detached",
            num_cpus=num_cpus,
            scheduling_strategy="SPREAD",
            max_restarts=0,
            max_concurrency=_ACTOR_CONCURRENCY,
        ).remote(msgspec.json.encode(spec), self._secret, self.namespace)
        try:
            async with asyncio.timeout(self.start_timeout):
                address = await actor.start.remote(epoch)
        except TimeoutError:
            ray.kill(actor)
            raise ReplicaStartError(
                f"replica {spec.replica_id} not ready within {self.start_timeout:g}s"
                f" (no Ray node with {num_cpus:g} CPUs free?)"
            ) from None
        except ray.exceptions.RayTaskError as exc:
            ray.kill(actor)
            raise ReplicaStartError(str(exc.cause)) from None
        except ray.exceptions.RayActorError as exc:
            ray.kill(actor)
            raise ReplicaStartError(f"actor of {spec.replica_id} died: {exc}") from None
        except BaseException:
            ray.kill(actor)
            raise
        return RayReplica(spec.replica_id, spec.deployment, str(address), actor)

    async def ready_replicas(self, deployment: str) -> list[RayReplica]:
        """The actors of ``deployment`` in the namespace whose replica runs
        (left by an earlier gateway, started by the leader, or here). The
        leader kills those that do not answer or whose replica exited;
        a follower only leaves them out."""
        prefix = f"{ACTOR_PREFIX}{deployment}#"
        names = [
            n
            for n in await asyncio.to_thread(self._actor_names)
            if n.startswith(prefix) and n not in self._starting
        ]
        found: list[RayReplica] = []
        for name in names:
            with contextlib.suppress(ValueError):  # gone meanwhile
                actor = await asyncio.to_thread(ray.get_actor, name, namespace=self.namespace)
                try:
                    async with asyncio.timeout(_ASK_TIMEOUT_S):
                        status, address = await actor.status.remote()
                except (TimeoutError, ray.exceptions.RayError) as exc:
                    if self._acting()[0]:
                        _log.warning("replica actor %s does not answer (%s); killing it", name, exc)
                        ray.kill(actor)
                    continue
                if status == "exited" and self._acting()[0]:
                    ray.kill(actor)  # its replica exited: the actor is of no use
                if address is None:  # still starting (its leader waits for it), or exited
                    continue
                found.append(RayReplica(name[len(ACTOR_PREFIX) :], deployment, address, actor))
        return found

    def remove_absent(self, deployments: Collection[str]) -> list[str]:
        """Kill the replica and lease actors in the namespace of deployments
        not in ``deployments`` (removed from the config); their names.

        A deployment whose lease another gateway holds is served there (that
        gateway's config still has it): its actors are left alone. Else this
        gateway takes its lease first, so none can lead it meanwhile.
        """
        by_deployment: dict[str, list[str]] = {}
        for name in self._actor_names():
            if name.startswith(ACTOR_PREFIX):
                deployment = name[len(ACTOR_PREFIX) :].rpartition("#")[0]
            elif name.startswith(LEASE_PREFIX):
                deployment = name[len(LEASE_PREFIX) :]
            else:
                continue
            if deployment not in deployments:
                by_deployment.setdefault(deployment, []).append(name)
        removed = []
        period = self.leadership.period_s if self.leadership is not None else DEFAULT_LEASE_S
        for deployment, names in sorted(by_deployment.items()):
            leader = take_lease(deployment, self.namespace, holder_id(), period)
            if leader is not None:
                _log.info(
                    "deployment %s is not in this config but %s leads it: its actors stay",
                    deployment,
                    leader,
                )
                continue
            for name in names:
                with contextlib.suppress(ValueError):
                    ray.kill(ray.get_actor(name, namespace=self.namespace))
                    removed.append(name)
        if removed:
            _log.info("killed the actors of removed deployments: %s", ", ".join(removed))
        return removed

    async def stop(self, replica: LaunchedReplica, grace_s: float) -> int | None:
        """SIGTERM to the replica, SIGKILL after ``grace_s``; then the actor
        goes. Nothing happens unless this gateway leads (None then), and the
        actor refuses a stale leader's epoch."""
        actor = _actor(replica)
        may, epoch = self._acting()
        if not may:
            return None
        try:
            code: int | None = await actor.stop.remote(grace_s, epoch)
        except ray.exceptions.RayTaskError as exc:
            _log.warning("replica %s not stopped: %s", replica.name, exc.cause)
            return None  # refused: the lease moved on meanwhile
        except ray.exceptions.RayError:
            code = None
        self.kill(replica)
        return code

    async def drain_token(self, replica: LaunchedReplica) -> str | None:
        """The token of one ``Drain`` of ``replica``, from its actor once it
        has checked this gateway's lease epoch; None when this gateway does
        not lead or the actor refused (the lease moved on meanwhile)."""
        actor = _actor(replica)
        may, epoch = self._acting()
        if not may:
            return None
        try:
            token: str = await actor.allow_drain.remote(epoch)
        except ray.exceptions.RayTaskError as exc:
            _log.warning("replica %s not drained: %s", replica.name, exc.cause)
            return None
        except ray.exceptions.RayError:
            return None  # the actor (and so its replica) is gone
        return token

    def kill(self, replica: LaunchedReplica) -> None:
        """Kill the actor now, if this gateway leads; its replica exits as
        its stdin pipe closes."""
        if self._acting()[0]:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.kill(_actor(replica))

    async def wait_exit(self, replica: LaunchedReplica) -> int | None:
        """Wait until the replica exited (None: its actor or node died first);
        the actor is killed then (by the leader), freeing its CPUs."""
        actor = _actor(replica)
        try:
            code: int | None = await actor.wait.remote()
        except ray.exceptions.RayError:
            code = None
        self.kill(replica)
        return code

    async def aclose(self) -> None:
        """Give the lease up (another gateway takes over at once); the actors
        stay for the next leader, and the process's Ray connection ends with it."""
        if self.leadership is not None:
            await self.leadership.release()

    def _actor_names(self) -> list[str]:
        return [
            str(entry["name"])
            for entry in ray.util.list_named_actors(all_namespaces=True)
            if isinstance(entry, dict) and entry.get("namespace") == self.namespace
        ]


def _actor(replica: LaunchedReplica) -> Any:
    if not isinstance(replica, RayReplica):
        raise TypeError(f"{replica!r} was not started by a RayLauncher")
    return replica.actor
