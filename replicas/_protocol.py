"""The gateway <-> replica wire protocol.

One persistent stream per replica (a Unix socket locally, TCP across hosts)
carries *frames*: a 4-byte big-endian length, then one msgspec MessagePack
message. Messages are a tagged union (field ``t``). Many calls are in flight on
one connection at once; each carries an ``id`` chosen by the gateway and the
reply echoes it.

Session::

    gateway -> replica   Hello(version)
    replica -> gateway   Welcome(version, deployment, replica_id, pid, state)
                         or Refused(reason), then the replica closes
    gateway -> replica   Call(...)*, Cancel(id)*, Ping, Drain
    replica -> gateway   Reply(...)* (each with the replica's state), Pong, Drained,
                         StatePush* (only to a gateway whose Hello asked for it)

A replica that requires the cluster secret (``muxgate replica``, see
``muxgate.replicas._channel``) answers a ``Hello`` carrying a ``nonce`` with
``Challenge`` (its own nonce and its proof), waits for the gateway's
``Proof`` and only then sends ``Welcome`` (or ``Refused``); a ``Hello``
without a nonce is refused. Before ``Welcome`` a frame may be at most
``HANDSHAKE_MAX_FRAME_BYTES`` long, so a peer that has proven nothing cannot
make the replica buffer more than that. Peers without a secret send and
expect no nonce, so the plain session above is unchanged (and a gateway of
the previous release gets a ``Refused`` it understands from such a replica).

``Cancel(id)`` says the gateway gave up on a call it sent (client gone,
gateway-side deadline, caller cancelled): the replica cancels that call and
sends no reply for it (a ``Reply`` already on its way is dropped by the
gateway, which forgot the id). A ``Cancel`` for an unknown or finished id is
ignored: it may cross the reply on the wire.

A frame that does not decode, or a message tag this version does not know,
is a ``ProtocolError``: the receiving side logs it and closes that
connection only.

Every ``Reply`` and ``Pong`` carries ``ReplicaState`` (in-flight count, loaded
model ids in LRU order, ids being loaded), so the router's view of a replica
is as fresh as its last response.

``StatePush`` is the one frame a replica sends unasked: the moment its
residency changes (a load starts, a load ends or fails, a model is
unloaded) it sends its ``ReplicaState`` to every gateway whose ``Hello``
said ``push_state``, so gateways sharing a replica learn of each other's
loads within a round trip, not at their own next reply. It answers nothing
(it carries no id) and a gateway applies its state as it would a reply's.
Both are additions to version 3 with defaults: a gateway of an earlier
release sends no ``push_state`` and gets no ``StatePush`` (a frame it could
not decode), and a replica of an earlier release ignores the field and
never pushes.

``Pong`` also carries the replica process's resident memory (``rss_bytes``),
which the gateway shows and holds against the deployment's memory limit.

Model loads and unloads are numbered ``ModelEvent``s: ``Ping`` and ``Drain``
say the last sequence number the gateway has (``events_after``), ``Pong`` and
``Drained`` carry the events after it. Both fields have defaults (no events
asked, none sent), so peers without them still decode each other.

``ModelControl`` asks a replica to load (``load``, optionally pinned),
warm (load only if it fits without evicting) or unload one model outside
any request; the replica answers with a ``Reply`` of the same id (body: the
JSON of what it did, or ``error``). ``Pong`` carries the bytes of the loaded
models (``model_bytes``), the pinned ids and the calls per model id the
replica received (``model_requests``, from every gateway: the warm sets of
a shared pool are decided from them).

The version is checked at the handshake; bump ``PROTOCOL_VERSION`` on any
incompatible change.
"""

from __future__ import annotations

import struct
from typing import Any, Literal

import msgspec

from muxgate.replicas._codes import ErrorCode
from muxgate.replicas._deployment import DeploymentOptions

__all__ = [
    "HANDSHAKE_MAX_FRAME_BYTES",
    "MAX_BODY_BYTES",
    "MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "Call",
    "Cancel",
    "Challenge",
    "Drain",
    "Drained",
    "ErrorInfo",
    "FrameDecoder",
    "Hello",
    "HttpRequest",
    "Message",
    "ModelControl",
    "ModelEvent",
    "Ping",
    "Pong",
    "Proof",
    "ProtocolError",
    "Refused",
    "ReplicaState",
    "Reply",
    "StatePush",
    "Welcome",
    "encode_frame",
]

#: 2: ``Cancel``; the ``ErrorInfo`` code "overloaded".
#: 3: ``ModelControl``; ``Pong.model_bytes`` and ``Pong.pinned``. Later
#: additions with defaults, so version 3 still: ``Hello.push_state`` and
#: ``StatePush``; ``Pong.model_requests``; ``ReplicaState.cache_limit``.
PROTOCOL_VERSION = 3
#: Upper bound of one frame; a larger length prefix is a protocol error.
MAX_FRAME_BYTES = 1 << 30
#: Upper bound of a request or reply body (HTTP body, handle arguments or
#: result): the frame less room for the rest of the message (headers, the
#: replica's state). A reply over it would break the connection, and with it
#: every call on the replica, so the replica answers an error instead.
MAX_BODY_BYTES = MAX_FRAME_BYTES - (1 << 20)
#: Upper bound of one frame before the peer is welcomed (the handshake's
#: messages are a few hundred bytes).
HANDSHAKE_MAX_FRAME_BYTES = 1 << 12

_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame of this protocol."""


class ReplicaState(msgspec.Struct, frozen=True, array_like=True):
    """What a replica reports about itself with every reply.

    ``cache_limit``: how many models its caches hold at most together (the
    sum of their ``max_num_models_per_replica``); None when the count is
    unlimited or no cache exists yet. A peer of an earlier release neither
    sends nor reads it (a trailing element with a default)."""

    in_flight: int = 0
    models: list[str] = []  # loaded, least recently used first
    loading: list[str] = []
    cache_limit: int | None = None


class HttpRequest(msgspec.Struct, frozen=True, array_like=True):
    method: str
    path: str  # path below the deployment's route prefix, starting with "/"
    query: str  # raw query string, without "?"
    headers: list[tuple[str, str]]  # lower-case names
    body: bytes


class ErrorInfo(msgspec.Struct, frozen=True, array_like=True):
    """A failure of a call. ``code`` is an ``ErrorCode`` value (a plain string
    on the wire, so a code a newer replica sends still decodes)."""

    code: str
    message: str
    status: int = 500

    @classmethod
    def of(cls, code: ErrorCode, message: str) -> ErrorInfo:
        """The failure ``code`` with its own HTTP status."""
        return cls(code=code, message=message, status=code.status)


class Hello(msgspec.Struct, frozen=True, tag="hello", tag_field="t", omit_defaults=True):
    """The gateway's first message; ``nonce`` (random bytes) when it holds
    the cluster secret and expects the replica to prove it holds it too
    (without one, the frame is byte for byte the one earlier releases sent).
    ``push_state``: send me a ``StatePush`` whenever your residency changes
    (a replica of an earlier release ignores it)."""

    version: int
    nonce: bytes = b""
    push_state: bool = False


class Challenge(msgspec.Struct, frozen=True, tag="challenge", tag_field="t"):
    """A replica that requires the secret: its nonce and its proof for both
    nonces (``muxgate.replicas._channel.ChannelAuth``)."""

    nonce: bytes
    proof: bytes


class Proof(msgspec.Struct, frozen=True, tag="proof", tag_field="t"):
    """The gateway's proof for both nonces, answering ``Challenge``."""

    proof: bytes


class Welcome(msgspec.Struct, frozen=True, tag="welcome", tag_field="t"):
    """The replica's answer to ``Hello``.

    ``options`` are the deployment class's ``@deployment`` options (defaults
    when undecorated); the gateway adopts those its config leaves unset.
    """

    version: int
    deployment: str
    replica_id: str
    pid: int
    state: ReplicaState
    options: DeploymentOptions | None = None


class Refused(msgspec.Struct, frozen=True, tag="refused", tag_field="t"):
    reason: str


class Call(msgspec.Struct, frozen=True, tag="call", tag_field="t"):
    """Run one request on the replica.

    ``http`` is set for HTTP ingress (``__call__`` gets a ``Request``);
    otherwise ``method`` is called with ``args``/``kwargs``, which are
    MessagePack-encoded values (handle calls). ``timeout_s`` is the time left
    before the request's deadline when the gateway sent it (relative, so
    clocks need not agree).
    """

    id: int
    request_id: str
    model_id: str = ""
    timeout_s: float | None = None
    traceparent: str | None = None
    tracestate: str | None = None
    http: HttpRequest | None = None
    method: str = "__call__"
    args: bytes = b""  # msgpack list
    kwargs: bytes = b""  # msgpack map


class Cancel(msgspec.Struct, frozen=True, tag="cancel", tag_field="t"):
    """The gateway abandoned call ``id``: stop it, send no reply for it."""

    id: int


class Reply(msgspec.Struct, frozen=True, tag="reply", tag_field="t"):
    """The outcome of a ``Call``.

    For HTTP calls ``status``/``headers``/``body`` form the response; for
    handle calls ``body`` is the MessagePack-encoded return value. On failure
    ``error`` is set and the others are defaults.
    """

    id: int
    state: ReplicaState
    status: int = 200
    headers: list[tuple[str, str]] = []
    body: bytes = b""
    error: ErrorInfo | None = None


class StatePush(msgspec.Struct, frozen=True, tag="state_push", tag_field="t"):
    """The replica's state, unasked: its residency just changed (see the
    module docstring). Sent only to a gateway whose ``Hello`` asked for it."""

    state: ReplicaState


class ModelEvent(msgspec.Struct, frozen=True, array_like=True):
    """A finished model load or unload in a replica process.

    ``seq`` counts up from 1 per process; ``time`` is wall-clock Unix seconds
    when it finished. ``kind`` is ``"load"``, ``"load_failed"`` (``reason``:
    the exception's class name) or ``"unload"`` (``reason``: ``"lru"``,
    ``"shutdown"``, ``"drain"`` or ``"admin"``, an operator's unload; no
    ``duration_ms`` when no hook ran because the object is still cached
    under another id).
    """

    seq: int
    time: float
    kind: str
    model: str
    duration_ms: float | None = None
    reason: str | None = None


class Ping(msgspec.Struct, frozen=True, tag="ping", tag_field="t"):
    """Ask for a ``Pong``; with ``events_after``, for the events after that ``seq`` too."""

    events_after: int | None = None


class Pong(msgspec.Struct, frozen=True, tag="pong", tag_field="t"):
    """Answer to ``Ping``; also carries the replica's cumulative counters
    (model loads, unloads by reason, cache hits/misses, load seconds, calls
    finished and busy seconds; keys in ``muxgate.replicas._counters``), which
    the gateway aggregates into its metrics, the model events the ping
    asked for (oldest first; those older than the replica's bounded log are
    gone) and the process's resident memory in bytes (None: unknown)."""

    state: ReplicaState
    counters: dict[str, float] = {}
    events: list[ModelEvent] = []
    rss_bytes: int | None = None
    #: bytes of the loaded models over every model cache, as each measured
    #: once built (see ``max_bytes_per_replica``)
    model_bytes: int = 0
    #: model ids never evicted (the deployment's ``pinned``, pinned admin loads)
    pinned: list[str] = []
    #: calls per model id since the replica started, the most requested ids
    #: (cumulative; see ``muxgate.replicas._request_counts``)
    model_requests: dict[str, int] = {}


class ModelControl(msgspec.Struct, frozen=True, tag="model_control", tag_field="t"):
    """Load, warm or unload one model outside any request; answered by a ``Reply``.

    ``action``: ``"load"`` (``pin``: never evict it), ``"warm"`` (load only
    if it fits without evicting anything but the ``may_evict`` ids) or
    ``"unload"`` (also drops its pin). ``loader``: the ``@multiplexed``
    method to use; ``""``: every loader of the deployment. ``after_calls``:
    start only once the replica has no call in flight (warming yields to
    requests); within ``timeout_s``, else the answer is ``loaded: false``.
    ``after_slot`` (wins over ``after_calls``; a replica without it falls
    back to ``after_calls``): start once a call slot is free (fewer calls in
    flight than ``max_ongoing_requests``) and no other such load runs on the
    replica; the load holds no slot, so calls that arrive meanwhile run
    beside it (see ``muxgate.replicas._model_control.warm_may_start``).
    ``may_evict`` (``warm`` only): ids the replica may evict, in order, only
    as many as the model needs to fit once built and only those not pinned;
    the gateway lists spare copies (held by another replica that stays), so
    a warm still never costs a model its last copy. A replica of a release
    before it ignores it (a plain warm).
    """

    id: int
    action: Literal["load", "warm", "unload"]
    model_id: str
    pin: bool = False
    loader: str = ""
    timeout_s: float | None = None
    after_calls: bool = False
    after_slot: bool = False
    may_evict: list[str] = []


class Drain(msgspec.Struct, frozen=True, tag="drain", tag_field="t"):
    """Stop taking calls, finish those in flight, unload every model, exit.
    ``events_after`` as in ``Ping``, for ``Drained``. ``token``: the drain
    token the replica's supervisor issued to the lease holder, which a
    replica with ``ReplicaSpec.drain_fence`` requires (else it refuses)."""

    events_after: int | None = None
    token: str | None = None


class Drained(msgspec.Struct, frozen=True, tag="drained", tag_field="t"):
    """The replica finished its calls and unloaded its models; it exits next.
    Carries its final counters and the model events ``Drain`` asked for (the
    drain's unloads happen after the last ``Pong``, so only this message can
    report them)."""

    counters: dict[str, float] = {}
    events: list[ModelEvent] = []


Message = (
    Hello
    | Challenge
    | Proof
    | Welcome
    | Refused
    | Call
    | Cancel
    | Reply
    | StatePush
    | Ping
    | Pong
    | Drain
    | Drained
    | ModelControl
)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(Message)


def encode_frame(message: Message) -> bytes:
    """One frame: length prefix plus the encoded message."""
    payload = _encoder.encode(message)
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, get whole messages out.

    A length prefix above ``max_frame`` is a ``ProtocolError`` as soon as it
    arrives, before the frame's bytes are buffered; raise ``max_frame`` once
    the peer is trusted (the replica does at ``Welcome``).
    """

    __slots__ = ("_buffer", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[Message]:
        self._buffer += data
        messages: list[Message] = []
        buf = self._buffer
        offset = 0
        while len(buf) - offset >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf, offset)
            if size > self.max_frame:
                raise ProtocolError(f"frame of {size} bytes exceeds the limit")
            end = offset + _HEADER.size + size
            if len(buf) < end:
                break
            try:
                messages.append(_decoder.decode(memoryview(buf)[offset + _HEADER.size : end]))
            except msgspec.DecodeError as exc:
                raise ProtocolError(f"undecodable frame: {exc}") from exc
            except RecursionError as exc:
                # msgspec's depth limit (even skipping an unknown field): a
                # frame like any other that does not decode, not a crash of
                # whoever reads it (it ended the replica, before any proof)
                raise ProtocolError("undecodable frame: nested too deeply") from exc
            offset = end
        if offset:
            del buf[:offset]
        return messages

    def __repr__(self) -> str:
        return f"<FrameDecoder buffered={len(self._buffer)}>"
