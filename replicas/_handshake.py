"""The replica's side of the handshake: TLS, ``Hello``, the secret, ``Welcome``.

``HandshakeGate.accept`` takes a freshly accepted stream and returns it
(TLS-wrapped when the channel has TLS) with its decoder once the peer is
welcomed, or None once it has been refused; the caller then closes the
socket. Whatever a peer does, only its own connection is affected:

* the whole handshake (TLS included) has one deadline, so a slow peer is cut
  off after ``timeout_s``;
* until ``Welcome`` a frame may be at most ``HANDSHAKE_MAX_FRAME_BYTES`` and
  at most ``max_pending`` handshakes run at once, so unauthenticated peers
  hold a bounded amount of memory. A connection past the cap closes the
  oldest handshake under way: closing the newcomer instead let 64 silent
  connections, renewed every ``timeout_s``, lock every gateway out (a
  gateway's handshake takes a round trip or two, a silent peer's the whole
  deadline, so the silent ones are the oldest);
* a frame that does not decode, a message out of order, a wrong proof or a
  failed TLS handshake close the connection (with ``Refused`` when the
  stream still works).

Refusals are logged at most once per ``_NOTE_INTERVAL_S`` with a count of
those not logged, so a flood of bad peers does not flood the log. Nothing
about the secret is ever logged.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable

import anyio
import anyio.abc
from anyio.streams.tls import TLSStream

from muxgate.replicas._channel import NONCE_BYTES, ChannelAuth
from muxgate.replicas._protocol import (
    HANDSHAKE_MAX_FRAME_BYTES,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Challenge,
    FrameDecoder,
    Hello,
    Message,
    Proof,
    ProtocolError,
    Refused,
    Welcome,
    encode_frame,
)

__all__ = ["Accepted", "HandshakeGate"]

_log = logging.getLogger("muxgate.replica")

#: Seconds between two log lines about refused peers.
_NOTE_INTERVAL_S = 10.0


class Accepted:
    """A welcomed connection: its stream (TLS when on), the decoder holding
    any bytes read past the handshake, the messages already decoded, and
    whether the gateway asked for ``StatePush`` frames (``Hello.push_state``)."""

    __slots__ = ("decoder", "push_state", "rest", "stream")

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        decoder: FrameDecoder,
        rest: list[Message],
        push_state: bool = False,
    ) -> None:
        self.stream = stream
        self.decoder = decoder
        self.rest = rest
        self.push_state = push_state


class _Refuse(Exception):
    """Internal: end the handshake; ``reply`` is sent to the peer when set."""

    def __init__(self, why: str, reply: str | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.reply = reply


class HandshakeGate:
    """Admits gateway connections (see the module docstring).

    Args:
        auth: require proof of the cluster secret; None: no secret.
        ssl_context: wrap connections in TLS first; None: plain.
        timeout_s: deadline of the whole handshake.
        max_pending: handshakes allowed at once.
    """

    def __init__(
        self,
        *,
        auth: ChannelAuth | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout_s: float = 10.0,
        max_pending: int = 64,
    ) -> None:
        self.auth = auth
        self.ssl_context = ssl_context
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        #: the handshakes under way, oldest first (a dict as an ordered set)
        self._pending: dict[anyio.CancelScope, None] = {}
        self.refused = 0
        self._unlogged = 0
        self._last_note = -_NOTE_INTERVAL_S

    @property
    def pending(self) -> int:
        """Handshakes under way."""
        return len(self._pending)

    def __repr__(self) -> str:
        return (
            f"<HandshakeGate secret={self.auth is not None} tls={self.ssl_context is not None} "
            f"pending={self.pending}/{self.max_pending} refused={self.refused}>"
        )

    async def accept(
        self, raw: anyio.abc.SocketStream, welcome: Callable[[], Welcome | Refused]
    ) -> Accepted | None:
        """Run the handshake on ``raw``; ``welcome`` makes the final answer.

        None: the peer was refused (the caller closes ``raw``)."""
        peer = _peer(raw)
        if len(self._pending) >= self.max_pending:
            next(iter(self._pending)).cancel()  # the oldest makes room
        scope = anyio.CancelScope(deadline=anyio.current_time() + self.timeout_s)
        self._pending[scope] = None
        try:
            with scope:
                return await self._handshake(raw, peer, welcome)
            if anyio.current_time() < scope.deadline:
                why = f"closed to make room: {self.max_pending} handshakes under way"
            else:
                why = f"no handshake within {self.timeout_s:g}s"
            self._note(peer, why)
            return None
        finally:
            del self._pending[scope]

    async def _handshake(
        self, raw: anyio.abc.SocketStream, peer: str, welcome: Callable[[], Welcome | Refused]
    ) -> Accepted | None:
        stream: anyio.abc.ByteStream = raw
        try:
            if self.ssl_context is not None:
                stream = await TLSStream.wrap(
                    raw, server_side=True, ssl_context=self.ssl_context, standard_compatible=False
                )
            decoder = FrameDecoder(max_frame=HANDSHAKE_MAX_FRAME_BYTES)
            messages = await _read(stream, decoder)
            try:
                hello, rest = await self._hello(stream, decoder, messages)
            except _Refuse as refusal:
                self._note(peer, refusal.why)
                if refusal.reply is not None:
                    await stream.send(encode_frame(Refused(reason=refusal.reply)))
                return None
            answer = welcome()
            await stream.send(encode_frame(answer))
            if isinstance(answer, Refused):
                return None
        except (ProtocolError, ssl.SSLError) as exc:
            self._note(peer, str(exc))
            return None
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return None  # the peer left or broke the stream: nothing to say
        decoder.max_frame = MAX_FRAME_BYTES  # a welcomed gateway is trusted
        return Accepted(stream, decoder, rest, hello.push_state)

    async def _hello(
        self, stream: anyio.abc.ByteStream, decoder: FrameDecoder, messages: list[Message]
    ) -> tuple[Hello, list[Message]]:
        """Check ``Hello`` (and the secret); it, and the messages that followed it."""
        hello, rest = messages[0], messages[1:]
        if not isinstance(hello, Hello):
            raise _Refuse(f"expected Hello, got {type(hello).__name__}", "expected Hello")
        if hello.version != PROTOCOL_VERSION:
            reason = (
                f"protocol version {hello.version} not supported; "
                f"this replica speaks {PROTOCOL_VERSION}"
            )
            raise _Refuse(reason, reason)
        auth = self.auth
        if auth is None:
            return hello, rest
        if len(hello.nonce) != NONCE_BYTES:
            raise _Refuse(
                "Hello without the cluster secret",
                "this replica requires the cluster secret (cluster.secret_file or "
                "MUXGATE_CLUSTER_SECRET on the gateway)",
            )
        if rest:
            raise _Refuse("messages before the proof", "authentication failed")
        nonce = auth.nonce()
        await stream.send(
            encode_frame(Challenge(nonce=nonce, proof=auth.proof("replica", hello.nonce, nonce)))
        )
        proof, *rest = await _read(stream, decoder)
        if not isinstance(proof, Proof) or not auth.verify(
            "gateway", hello.nonce, nonce, proof.proof
        ):
            raise _Refuse("wrong proof of the cluster secret", "authentication failed")
        return hello, rest

    def _note(self, peer: str, why: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_note < _NOTE_INTERVAL_S:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more refused since the last report)" if self._unlogged else ""
        _log.warning("Refused a connection from %s: %s%s.", peer, why, more)
        self._last_note, self._unlogged = now, 0


async def _read(stream: anyio.abc.ByteStream, decoder: FrameDecoder) -> list[Message]:
    """Read until at least one message is decoded (reads are small: a
    handshake frame is at most ``HANDSHAKE_MAX_FRAME_BYTES``)."""
    while True:
        messages = decoder.feed(await stream.receive(HANDSHAKE_MAX_FRAME_BYTES))
        if messages:
            return messages


def _peer(stream: anyio.abc.SocketStream) -> str:
    try:
        address = stream.extra(anyio.abc.SocketAttribute.remote_address)
    except Exception:
        return "?"
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return str(address) or "a Unix socket peer"
