"""The launchers of deployments whose replicas the gateway does not start.

``local`` deployments share the gateway's ``LocalLauncher``; every other
kind (``static``, ``ray``) gets its own launcher from its ``launcher:`` section,
and its replicas are connected to over the authenticated channel of the
config's ``cluster`` section (``ChannelClient``: the secret's proof and TLS).
"""

from __future__ import annotations

import os
from typing import Any

from muxgate.gateway._channel_client import ChannelClient
from muxgate.gateway._config import AppConfig
from muxgate.gateway.launchers import get_launcher_class
from muxgate.replicas.contract import SECRET_ENV, ChannelError, is_loopback_host, load_secret

__all__ = ["RemoteLaunchers"]


class RemoteLaunchers:
    """Launchers by deployment name, for the deployments that are not ``local``.

    Each remote launcher gets the config's ``cluster`` channel (secret, TLS)
    and is also its pool's connector: it knows how its replicas are reached.

    ``check_only``: validate the secret, the TLS files and that each kind's
    launcher can be imported, and build no launcher (no connection to Ray,
    nothing generated or removed there): what ``muxgate check`` does.

    Raises:
        ChannelError: (at construction, only when some deployment is not
            local) the cluster secret or a TLS file cannot be used.
        LauncherNotFoundError: a kind's launcher cannot be imported
            (``ray`` without ``muxgate[ray]``).
        ConnectionError: a ``ray`` launcher's cluster does not answer.
    """

    def __init__(self, config: AppConfig, *, check_only: bool = False) -> None:
        remote = {
            d.name: config.launcher_for(d)
            for d in config.deployments
            if config.launcher_for(d).kind != "local"
        }
        self.channel: ChannelClient | None = None
        self.launchers: dict[str, Any] = {}
        if not remote:
            return
        secret = load_secret(config.cluster.secret_file)
        ray_kinds = [s for s in remote.values() if s.kind == "ray"]
        if check_only:
            self.channel = ChannelClient(config.cluster)
            _refuse_unauthenticated(remote, self.channel)
            for settings in remote.values():
                get_launcher_class(settings.kind)
            return
        if ray_kinds and secret is None:
            # None configured: the one generated for the Ray namespace, kept
            # in the Ray cluster (the next gateway must prove the same one).
            secret = get_launcher_class("ray").generated_secret(ray_kinds[0])
        environ = None if secret is None else {**os.environ, SECRET_ENV: os.fsdecode(secret)}
        self.channel = ChannelClient(config.cluster, environ)
        _refuse_unauthenticated(remote, self.channel)
        cleaned: set[str] = set()
        for name, settings in remote.items():
            cls: Any = get_launcher_class(settings.kind)
            if settings.kind != "ray":
                self.launchers[name] = cls.from_config(settings, channel=self.channel)
                continue
            assert secret is not None
            launcher = cls.from_config(
                settings,
                channel=self.channel,
                cluster=config.cluster,
                secret=secret,
                deployment=name,
            )
            self.launchers[name] = launcher
            if launcher.namespace not in cleaned:
                cleaned.add(launcher.namespace)
                # Actors of deployments this config no longer has in the namespace.
                launcher.remove_absent(
                    {
                        n
                        for n, s in remote.items()
                        if s.kind == "ray" and (s.namespace or "muxgate") == launcher.namespace
                    }
                )

    def __repr__(self) -> str:
        return f"<RemoteLaunchers {sorted(self.launchers)} {self.channel!r}>"

    def pool_options(self, deployment: str) -> dict[str, Any]:
        """``ReplicaPool`` keyword arguments for ``deployment`` (none when local)."""
        launcher = self.launchers.get(deployment)
        if launcher is None:
            return {}
        # The launcher knows how its replicas are reached (secret, TLS, names).
        return {"launcher": launcher, "connect": launcher.connect}

    async def aclose(self) -> None:
        for launcher in self.launchers.values():
            await launcher.aclose()


def _refuse_unauthenticated(remote: dict[str, Any], channel: ChannelClient) -> None:
    """A ``static`` launcher whose replicas are on other hosts needs the
    cluster secret or TLS: without either, whatever answers at an address
    would be taken for a replica and sent the clients' requests (a replica
    itself refuses to listen there without them, so only an impostor could
    answer). As ``muxgate replica`` refuses to listen so.

    Raises:
        ChannelError: such a launcher, with neither.
    """
    if channel.auth is not None or channel.ssl_context is not None:
        return
    for settings in remote.values():
        if settings.kind != "static":
            continue
        where = [settings.dns] if settings.dns else list(settings.addresses)
        for address in where:
            host = address.removeprefix("tcp:").rpartition(":")[0]
            if not is_loopback_host(host):
                raise ChannelError(
                    f"refusing to connect to replicas at {address} without the cluster secret "
                    "or TLS: anything that answers there would be taken for a replica (set "
                    "cluster.secret_file or MUXGATE_CLUSTER_SECRET, or cluster.tls)"
                )
