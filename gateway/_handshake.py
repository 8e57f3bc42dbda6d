"""Opening a replica connection: the stream and the handshake.

``connect_stream`` opens the byte stream (``unix:`` or ``tcp:``, over TLS
when asked); ``handshake`` sends ``Hello`` and, with the cluster secret,
checks the replica's proof and sends the gateway's own, until the replica
answers ``Welcome`` in the gateway's protocol version. Everything after that
is ``gateway._connection``. A gateway that asks for ``StatePush`` frames may
find one right behind ``Welcome`` in the same read: ``handshake`` hands such
frames on with the stream instead of calling them a protocol error.
"""

from __future__ import annotations

import ssl

import anyio
import anyio.abc

from muxgate.replicas.contract import (
    HANDSHAKE_MAX_FRAME_BYTES,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Challenge,
    ChannelAuth,
    FrameDecoder,
    Hello,
    Message,
    Proof,
    ProtocolError,
    Refused,
    Welcome,
    encode_frame,
    guard_unix_streams,
)

__all__ = [
    "HandshakeError",
    "ReplicaConnectionError",
    "connect_stream",
    "handshake",
]

_READ_SIZE = 1 << 16


class ReplicaConnectionError(Exception):
    """Base class of the failures of a replica connection."""


class HandshakeError(ReplicaConnectionError):
    """The replica refused the connection or answered the handshake wrongly
    (a protocol version mismatch, an unexpected first message, no answer)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def connect_stream(
    address: str, ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None
) -> anyio.abc.ByteStream:
    """Open a byte stream to ``address`` (``unix:/path`` or ``tcp:host:port``),
    over TLS when ``ssl_context`` is given (TCP only; the replica's
    certificate must name ``server_hostname``, by default the address's host)."""
    scheme, _, rest = address.partition(":")
    if scheme == "unix" and rest and ssl_context is None:
        guard_unix_streams()  # see muxgate.replicas._unix_streams
        return await anyio.connect_unix(rest)
    if scheme == "tcp" and rest:
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if ssl_context is None:
            return await anyio.connect_tcp(host, int(port))
        return await anyio.connect_tcp(
            host,
            int(port),
            ssl_context=ssl_context,
            tls_standard_compatible=False,
            tls_hostname=server_hostname or host,
        )
    raise ValueError(f"unsupported replica address {address!r}")


async def handshake(
    address: str,
    *,
    connect_timeout: float,
    auth: ChannelAuth | None,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None,
    push_state: bool = False,
) -> tuple[anyio.abc.ByteStream, FrameDecoder, Welcome, list[Message]]:
    """Connect to ``address`` and do the handshake (connecting and the
    handshake within ``connect_timeout`` seconds): the open stream, its
    decoder, the replica's ``Welcome`` and the frames read behind it (with
    ``push_state``, a ``StatePush`` may follow at once).

    Raises:
        HandshakeError: refused, wrong version, a failed proof either way,
            or no proper answer.
        OSError: nothing listens at ``address``.
        ssl.SSLError: the TLS handshake failed.
    """
    with anyio.fail_after(connect_timeout):
        stream = await connect_stream(address, ssl_context, server_hostname)
        try:
            decoder = FrameDecoder()
            first, rest = await _hello(stream, decoder, address, auth, push_state)
        except BaseException:
            await anyio.aclose_forcefully(stream)
            raise
    if isinstance(first, Welcome) and first.version == PROTOCOL_VERSION:
        return stream, decoder, first, rest
    await anyio.aclose_forcefully(stream)
    if isinstance(first, Refused):
        raise HandshakeError(f"refused by replica at {address}: {first.reason}")
    if isinstance(first, Welcome):
        raise HandshakeError(
            f"replica at {address} speaks protocol {first.version}, "
            f"gateway speaks {PROTOCOL_VERSION}"
        )
    raise HandshakeError(f"unexpected {type(first).__name__} from {address} at handshake")


async def _hello(
    stream: anyio.abc.ByteStream,
    decoder: FrameDecoder,
    address: str,
    auth: ChannelAuth | None,
    push_state: bool,
) -> tuple[Message, list[Message]]:
    """Send ``Hello`` (and, with ``auth``, check the replica's proof and send
    ours); the replica's answer to it (``Welcome``, ``Refused``, ...) and the
    frames read behind that answer."""
    if auth is None:
        # A replica that requires the secret answers with Refused, saying so.
        await stream.send(encode_frame(Hello(version=PROTOCOL_VERSION, push_state=push_state)))
        return await _read_answer(stream, decoder)
    ours = auth.nonce()
    await stream.send(
        encode_frame(Hello(version=PROTOCOL_VERSION, nonce=ours, push_state=push_state))
    )
    # Until the peer proved the secret its frames are small, as the
    # replica's are: a length prefix of 1 GiB is refused at once instead of
    # being buffered (a peer that proved nothing made the gateway hold a
    # gigabyte, once per probe of a static address).
    decoder.max_frame = HANDSHAKE_MAX_FRAME_BYTES
    challenge, rest = await _read_answer(stream, decoder, unproven=True)
    if rest:
        raise HandshakeError(f"replica at {address} sent more than one message at handshake")
    if isinstance(challenge, Welcome):
        # A replica without the secret proves nothing: it may be anyone's.
        raise HandshakeError(f"replica at {address} did not prove the cluster secret")
    if not isinstance(challenge, Challenge):
        return challenge, []  # Refused or unexpected: the caller says which
    if not auth.verify("replica", ours, challenge.nonce, challenge.proof):
        raise HandshakeError(f"replica at {address} failed to prove the cluster secret")
    decoder.max_frame = MAX_FRAME_BYTES  # proven: its Welcome may carry a large state
    proof = auth.proof("gateway", ours, challenge.nonce)
    await stream.send(encode_frame(Proof(proof=proof)))
    return await _read_answer(stream, decoder)


async def _read_answer(
    stream: anyio.abc.ByteStream, decoder: FrameDecoder, *, unproven: bool = False
) -> tuple[Message, list[Message]]:
    """Read until a whole message is decoded (the handshake only): it, and
    any messages decoded from the same bytes behind it. ``unproven``: the
    answer to a ``Hello`` with the secret's nonce, held to 4 KiB."""
    while True:
        try:
            data = await stream.receive(_READ_SIZE)
        except anyio.EndOfStream:
            raise HandshakeError("replica closed the connection during the handshake") from None
        try:
            messages = decoder.feed(data)
        except ProtocolError as exc:
            # A replica without the secret answers at once with its Welcome,
            # whose state (the models it holds) can pass the 4 KiB.
            hint = (
                "; a replica without the cluster secret answers with its Welcome, which"
                " can be this large: give it the secret"
                if unproven and "exceeds the limit" in str(exc)
                else ""
            )
            raise HandshakeError(f"replica answered the handshake wrongly: {exc}{hint}") from None
        if messages:
            return messages[0], messages[1:]
