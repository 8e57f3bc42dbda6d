"""The authenticated replica channel: what both ends need to agree on.

A replica reachable over TCP runs its deployment's code for whoever connects,
so a replica started with ``ChannelSettings`` (``muxgate replica``) lets a
connection through only when the peer proves it holds the cluster's shared
secret, and may also require TLS (optionally mutual: client certificates
signed by the cluster's CA). Local replicas, on a Unix socket in a folder only
the gateway's user can reach, run without it.

Proof of the secret (both ways, in the handshake of
``muxgate.replicas._protocol``)::

    gateway -> replica   Hello(version, nonce=G)            G: 32 random bytes
    replica -> gateway   Challenge(nonce=R, proof=P_r)      R: 32 random bytes
    gateway -> replica   Proof(proof=P_g)
    replica -> gateway   Welcome | Refused, then closes

    P_r = HMAC-SHA256(secret, "muxgate-channel-1 replica" | G | R)
    P_g = HMAC-SHA256(secret, "muxgate-channel-1 gateway" | G | R)

Each side checks the other's proof with ``hmac.compare_digest`` (constant
time). Both nonces are fresh per connection, so a recorded handshake proves
nothing on another connection; the role in the message keeps one side's proof
from being replayed as the other's. The secret itself never crosses the wire
and is never logged (``ChannelAuth``'s ``repr`` does not show it).

The secret comes from a file (``secret_file``) or else the
``MUXGATE_CLUSTER_SECRET`` environment variable; surrounding whitespace (a
trailing newline) is ignored; it must be at least ``MIN_SECRET_BYTES`` long.

TLS uses the standard library's ``ssl``: the replica presents ``cert``/``key``
and, with ``mutual``, requires a client certificate signed by ``ca``; the
gateway verifies the replica's certificate against ``ca`` (host name
included) and, with ``mutual``, presents its own ``cert``/``key``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import ssl
from collections.abc import Mapping
from typing import Annotated

import msgspec

__all__ = [
    "MIN_SECRET_BYTES",
    "NONCE_BYTES",
    "SECRET_ENV",
    "ChannelAuth",
    "ChannelError",
    "ChannelSettings",
    "TlsSettings",
    "client_ssl_context",
    "is_loopback_host",
    "load_secret",
    "server_ssl_context",
]

#: Environment variable holding the cluster secret (when no file is named).
SECRET_ENV = "MUXGATE_CLUSTER_SECRET"
#: Length of each side's nonce.
NONCE_BYTES = 32
#: Shortest secret accepted (``openssl rand -hex 32`` gives 64 characters).
MIN_SECRET_BYTES = 16

_LABEL = b"muxgate-channel-1 "


class ChannelError(Exception):
    """The channel settings cannot be used (a missing or short secret, an
    unreadable certificate); the message says which and where."""


class TlsSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """TLS of the replica channel (paths to PEM files).

    Attributes:
        ca: CA certificate(s) the peer's certificate must chain to: the
            gateway checks replicas with it; with ``mutual``, replicas check
            gateways with it. None on the gateway: the system's CAs.
        cert: this process's certificate chain: a replica's server
            certificate, or (``mutual``) a gateway's client certificate.
        key: the private key of ``cert``.
        mutual: replicas require a client certificate signed by ``ca``.
    """

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    mutual: bool = False


class ChannelSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a replica secures its listener (and a gateway its connections).

    Attributes:
        secret_file: file holding the shared secret; None: the
            ``MUXGATE_CLUSTER_SECRET`` environment variable, if set.
        tls: TLS settings; None: plain TCP.
        handshake_timeout_s: a replica closes a connection that has not
            completed the handshake (TLS included) within this many seconds.
    """

    secret_file: str | None = None
    tls: TlsSettings | None = None
    handshake_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0


def load_secret(secret_file: str | None, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The cluster secret from ``secret_file``, else ``$MUXGATE_CLUSTER_SECRET``;
    None when neither is set.

    Raises:
        ChannelError: the file cannot be read, or the secret is shorter than
            ``MIN_SECRET_BYTES`` (the message never contains the secret).
    """
    env = os.environ if environ is None else environ
    if secret_file:
        try:
            with open(secret_file, "rb") as f:
                secret = f.read().strip()
        except OSError as exc:
            raise ChannelError(
                f"cannot read the cluster secret file {secret_file}: {exc.strerror}"
            ) from exc
        source = f"the cluster secret file {secret_file}"
    else:
        value = env.get(SECRET_ENV)
        if value is None:
            return None
        secret = value.strip().encode()
        source = f"${SECRET_ENV}"
    if len(secret) < MIN_SECRET_BYTES:
        raise ChannelError(
            f"{source} holds {len(secret)} bytes; a cluster secret needs at least "
            f"{MIN_SECRET_BYTES} (e.g. the output of `openssl rand -hex 32`)"
        )
    return secret


class ChannelAuth:
    """Proves and checks knowledge of the shared secret (see the module docstring)."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ChannelError(f"a cluster secret needs at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret

    def __repr__(self) -> str:
        return "<ChannelAuth secret=***>"

    @staticmethod
    def nonce() -> bytes:
        """A fresh random nonce."""
        return secrets.token_bytes(NONCE_BYTES)

    def proof(self, role: str, gateway_nonce: bytes, replica_nonce: bytes) -> bytes:
        """The proof ``role`` (``"gateway"`` or ``"replica"``) sends for these nonces."""
        message = _LABEL + role.encode() + b"\0" + gateway_nonce + replica_nonce
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def verify(self, role: str, gateway_nonce: bytes, replica_nonce: bytes, proof: bytes) -> bool:
        """Whether ``proof`` is what ``role`` must send; constant time."""
        if len(gateway_nonce) != NONCE_BYTES or len(replica_nonce) != NONCE_BYTES:
            return False
        return hmac.compare_digest(self.proof(role, gateway_nonce, replica_nonce), proof)


def _load_chain(context: ssl.SSLContext, tls: TlsSettings, who: str) -> None:
    if not tls.cert or not tls.key:
        raise ChannelError(f"cluster.tls needs both cert and key {who}")
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ChannelError(
            f"cannot load the TLS certificate {tls.cert} with key {tls.key}: {exc}"
        ) from exc


def _load_ca(context: ssl.SSLContext, ca: str) -> None:
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ChannelError(f"cannot load the TLS CA file {ca}: {exc}") from exc


def server_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """The replica's TLS context: its certificate, and with ``mutual`` the
    requirement of a client certificate signed by ``ca``.

    Raises:
        ChannelError: a file is missing or unreadable, or ``mutual`` without ``ca``.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, tls, "on a replica (its server certificate)")
    if tls.mutual:
        if not tls.ca:
            raise ChannelError("cluster.tls.mutual needs ca (to check the gateways' certificates)")
        _load_ca(context, tls.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """The gateway's TLS context: replicas' certificates checked against
    ``ca`` (the system's CAs without it), host names included; with
    ``mutual``, its own certificate presented.

    Raises:
        ChannelError: a file is missing or unreadable.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.ca:
        _load_ca(context, tls.ca)
    if tls.mutual:
        _load_chain(context, tls, "on a gateway with mutual TLS (its client certificate)")
    return context


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (an IP address or ``localhost``) is on the loopback
    interface only. Other names are not resolved: they count as not loopback."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
