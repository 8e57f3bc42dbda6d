"""The ``static`` launcher: replicas started elsewhere, only watched.

The replicas are ``muxgate replica`` processes someone else runs (a
StatefulSet, systemd units, a script). The launcher cannot start or stop
them; it reports which are ready, and the pool follows that set: a replica
that goes away leaves the ring when its connection closes, and joins again
under the same name when it answers again.

Where they are: a fixed list of ``tcp:HOST:PORT`` addresses, or one DNS name
with a port (``replicas.muxgate.svc:7100``; a Kubernetes headless Service
gives one address per ready pod), resolved again every
``resolve_interval_s``. Each report probes every address with a handshake
(the cluster secret and TLS of the config's ``cluster`` section): a replica
is ready when it answers, and its name is the one it gives in ``Welcome``
(its ``--name``), not its address, so a replica restarted on another address
keeps its place on the ring. Replicas of other deployments at those
addresses are left out.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Sequence

import anyio

from muxgate.gateway._channel_client import ChannelClient
from muxgate.gateway._config import LauncherConfig
from muxgate.gateway._connection import ReplicaConnection
from muxgate.replicas.contract import ChannelSettings, ReplicaState

__all__ = ["StaticLauncher", "StaticReplica"]

_log = logging.getLogger("muxgate.gateway.launcher")

#: Seconds one probe (connect and handshake) may take.
PROBE_TIMEOUT_S = 2.0
#: Reasons logged per unreachable address until it answers again.
MAX_LOGGED_REASONS = 8


class StaticReplica:
    """A replica that answered a probe: its name, deployment and address (no pid here)."""

    __slots__ = ("address", "deployment", "name")

    def __init__(self, name: str, deployment: str, address: str) -> None:
        self.name = name
        self.deployment = deployment
        self.address = address

    @property
    def pid(self) -> int | None:
        return None  # not a process of this host

    def __repr__(self) -> str:
        return f"<StaticReplica {self.deployment}/{self.name} {self.address}>"


class StaticLauncher:
    """Watches replicas at fixed addresses or behind one DNS name.

    Args:
        addresses: ``tcp:HOST:PORT`` of each replica.
        dns: ``HOST:PORT`` whose name resolves to the replicas (instead of
            ``addresses``).
        resolve_interval_s: how long a resolution of ``dns`` is used.
        channel: the secret and TLS to connect with (the config's
            ``cluster`` section); default: neither. In ``dns`` mode the
            replicas' certificates are checked for the DNS name, not for the
            addresses it resolves to.
        clock: monotonic seconds (a seam for tests).
    """

    def __init__(
        self,
        *,
        addresses: Sequence[str] = (),
        dns: str | None = None,
        resolve_interval_s: float = 10.0,
        channel: ChannelClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if bool(addresses) == bool(dns):
            raise ValueError("a static launcher takes addresses or dns, one of the two")
        self.addresses = list(addresses)
        self.dns = dns
        self.resolve_interval_s = resolve_interval_s
        self._channel = channel if channel is not None else ChannelClient(ChannelSettings(), {})
        self._server_hostname = dns.rpartition(":")[0] if dns else None
        self._clock = clock
        self._resolved: list[str] = []
        self._resolved_at: float | None = None
        #: address -> why its probes failed since it last answered (each
        #: reason logged once: an address whose probes fail by turns for
        #: two reasons, a timeout and a refusal, logged a line a probe)
        self._unreachable: dict[str, set[str]] = {}

    @classmethod
    def from_config(cls, config: LauncherConfig, *, channel: ChannelClient) -> StaticLauncher:
        """The launcher a deployment's ``launcher: {kind: static, ...}`` describes."""
        return cls(
            addresses=config.addresses,
            dns=config.dns,
            resolve_interval_s=config.resolve_interval_s,
            channel=channel,
        )

    def __repr__(self) -> str:
        where = self.dns if self.dns else ",".join(self.addresses)
        return f"<StaticLauncher {where} unreachable={len(self._unreachable)}>"

    async def ready_replicas(self, deployment: str) -> Sequence[StaticReplica]:
        """Probe every address; the replicas of ``deployment`` that answered."""
        addresses = await self._current_addresses()
        found: list[StaticReplica | None] = [None] * len(addresses)

        async def probe(i: int, address: str) -> None:
            found[i] = await self._probe(address)

        async with anyio.create_task_group() as tg:
            for i, address in enumerate(addresses):
                tg.start_soon(probe, i, address)
        return [r for r in found if r is not None and r.deployment == deployment]

    async def connect(
        self, address: str, on_state: Callable[[ReplicaState], None] | None = None
    ) -> ReplicaConnection:
        """Connect to a replica this launcher reported (the pool's connector)."""
        return await self._channel.connect(address, on_state, server_hostname=self._server_hostname)

    async def aclose(self) -> None:
        """Nothing to release: the replicas are not this launcher's."""

    async def _probe(self, address: str) -> StaticReplica | None:
        try:
            with anyio.fail_after(PROBE_TIMEOUT_S):
                conn = await self.connect(address)
        except Exception as exc:  # OSError, HandshakeError, ssl.SSLError, TimeoutError
            why = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, TimeoutError) and not str(exc):
                why = f"no answer within {PROBE_TIMEOUT_S:g} s"
            seen = self._unreachable.setdefault(address, set())
            if why not in seen and len(seen) < MAX_LOGGED_REASONS:
                seen.add(why)
                _log.warning("static replica at %s does not answer: %s", address, why)
            return None
        await conn.aclose()
        if self._unreachable.pop(address, None) is not None:
            _log.info("static replica at %s answers again (%s)", address, conn.replica_id)
        return StaticReplica(conn.replica_id, conn.deployment, address)

    async def _current_addresses(self) -> list[str]:
        if self.dns is None:
            return self.addresses
        now = self._clock()
        if self._resolved_at is None or now - self._resolved_at >= self.resolve_interval_s:
            host, _, port = self.dns.rpartition(":")
            try:
                infos = await anyio.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except OSError as exc:
                _log.warning("cannot resolve %s: %s; keeping the last addresses", self.dns, exc)
            else:
                ips = sorted({str(info[4][0]) for info in infos})
                self._resolved = [
                    f"tcp:[{ip}]:{port}" if ":" in ip else f"tcp:{ip}:{port}" for ip in ips
                ]
            self._resolved_at = now
        return self._resolved
