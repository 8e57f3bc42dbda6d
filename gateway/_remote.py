"""The launchers of deployments whose replicas the gateway does not start.

``local`` deployments share the gateway's ``LocalLauncher``; every other
kind (``static`` today) gets its own launcher from its ``launcher:`` section,
and its replicas are connected to over the authenticated channel of the
config's ``cluster`` section (``ChannelClient``: the secret's proof and TLS).
"""

from __future__ import annotations

from typing import Any

from muxgate.gateway._config import AppConfig
from muxgate.gateway._connection import ChannelClient
from muxgate.gateway.launchers import get_launcher_class

__all__ = ["RemoteLaunchers"]


class RemoteLaunchers:
    """Launchers by deployment name, for the deployments that are not ``local``.

    Each remote launcher gets the config's ``cluster`` channel (secret, TLS)
    and is also its pool's connector: it knows how its replicas are reached.

    Raises:
        ChannelError: (at construction, only when some deployment is not
            local) the cluster secret or a TLS file cannot be used.
    """

    def __init__(self, config: AppConfig) -> None:
        remote = {
            d.name: config.launcher_for(d)
            for d in config.deployments
            if config.launcher_for(d).kind != "local"
        }
        self.channel = ChannelClient(config.cluster) if remote else None
        self.launchers: dict[str, Any] = {}
        for name, settings in remote.items():
            assert self.channel is not None
            cls: Any = get_launcher_class(settings.kind)
            self.launchers[name] = cls.from_config(settings, channel=self.channel)

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
