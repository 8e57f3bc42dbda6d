"""The gateway's side of the replica channel (the config's ``cluster``
section): connections to ``tcp:`` replicas carry the cluster secret's proof
and TLS; ``unix:`` replicas (the gateway's own children) get neither.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from muxgate.gateway._connection import ReplicaConnection
from muxgate.replicas.contract import (
    ChannelAuth,
    ChannelSettings,
    ReplicaState,
    client_ssl_context,
    load_secret,
)

__all__ = ["ChannelClient"]


class ChannelClient:
    """The gateway's side of the replica channel, from the config's ``cluster``
    section: the secret and TLS context for ``tcp:`` replicas (standalone
    ones); ``unix:`` replicas (the gateway's own children) get neither.

    Raises:
        ChannelError: the secret or a TLS file cannot be used (at construction).
    """

    def __init__(self, settings: ChannelSettings, environ: Mapping[str, str] | None = None) -> None:
        secret = load_secret(settings.secret_file, environ)
        self.auth = ChannelAuth(secret) if secret is not None else None
        self.ssl_context = client_ssl_context(settings.tls) if settings.tls is not None else None

    def __repr__(self) -> str:
        return f"<ChannelClient secret={self.auth is not None} tls={self.ssl_context is not None}>"

    async def connect(
        self,
        address: str,
        on_state: Callable[[ReplicaState], None] | None = None,
        *,
        server_hostname: str | None = None,
    ) -> ReplicaConnection:
        """``ReplicaConnection.connect`` with this channel's proof and TLS for
        ``tcp:`` (the certificate checked for ``server_hostname``, by default
        the address's host)."""
        if address.startswith("tcp:"):
            return await ReplicaConnection.connect(
                address,
                on_state=on_state,
                auth=self.auth,
                ssl_context=self.ssl_context,
                server_hostname=server_hostname,
            )
        return await ReplicaConnection.connect(address, on_state=on_state)
