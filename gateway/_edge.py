"""Connection limits of the gateway's HTTP server (``http.limits``).

The server is uvicorn with its httptools parser. What uvicorn already
bounds is used as it is: the idle keep-alive timeout (``timeout_keep_alive``
<- ``keep_alive_timeout_s``) and request bodies held in memory (it stops
reading a connection while more than 64 KiB of body wait for the app). What
it does not bound is added here, in ``EdgeProtocol``, a subclass of its
``HttpToolsProtocol`` that the server builds per connection:

* **Header bytes and count**, counted while the request head arrives, before
  the parser buffers it: data beyond ``max_header_bytes`` that does not end
  the head is never fed to the parser, and the ``max_headers + 1``-th field
  stops it. Answer: 431 ``headers_too_large``. (httptools has no limit of
  its own, and uvicorn's ``h11_max_incomplete_event_size`` applies to its
  slower h11 parser only, answering a plain-text 400.)
* **Trailers** of a chunked body: the same limits, the bytes counted from
  the last progress of the parser (a body byte, a chunk, a trailer field),
  the fields apart from the head's. They are dropped: uvicorn appended
  them to the request's headers, so a trailer could add a header (a model
  id) that a proxy checking the head never saw.
* **Time to receive the head**, ``header_timeout_s`` from accepting the
  connection, or from the first byte of a later request on a kept-alive
  one: 408 ``request_timeout``, or a plain close when nothing came at all.
  (uvicorn has no such timer: a connection that never sends a request, or
  sends it a byte at a time, was held for ever.)
* **Pipelined requests**, ``max_pipelined`` queued behind the one in
  flight: the next is refused with 503 ``over_capacity``. uvicorn stops
  reading once one is queued but parses all it read: thousands of requests
  a few bytes long each from one read.
* A refusal of a request pipelined behind one still in flight (its head
  too large, too slow or malformed) is answered after the answers before
  it; the connection reads nothing more meanwhile. (Before, the refusal was
  written first and the answer in flight was lost, with an ERROR line in
  the log for each such connection.)
* **Open connections**, ``max_connections``. At the cap a new connection
  closes the one idle longest (kept alive between requests, or not yet done
  sending its head), so clients that hold connections without using them
  cannot lock out ones that do; when every connection has a request in
  flight, the new one is answered 503 ``over_capacity``. uvicorn's own
  ``limit_concurrency`` is not used: it answers plain text, counts requests
  in flight with connections, and never closes an idle connection, so idle
  clients would lock everyone else out.

The time to receive the body is the front end's (``_frontend``), as it is
bounded by the request's deadline too.

**Upgrade** (``Connection: upgrade`` with ``Upgrade: websocket``, ``h2c``
or anything else): the gateway speaks HTTP/1.1 only, so it ignores the
header, as RFC 9110 section 7.8 lets a server, and serves the request; the
connection stays HTTP/1.1. httptools treats everything after such a head as
the new protocol's bytes (the body too), and uvicorn dropped them and logged
two warnings per request, one advising to install a websocket library: a
client could flood the log, lost its body and any request pipelined behind.
Here the bytes after the head are parsed on: a body declared by
``content-length`` or ``transfer-encoding`` is read through a head made up
for it (``_continue_body``), whose callbacks are ignored. Nothing is logged.
``CONNECT`` (a proxy's tunnel: a 2xx would tell the client its tunnel is
open) is refused with 400 ``bad_request``.

``uvicorn_server`` runs the server on the caller's loop and stops it
gracefully: it stops accepting (the listening socket is closed), closes idle
connections, lets requests in flight run for the grace period
(``http.shutdown_grace_s``, by default ``request_timeout_s``), then has the
front end answer those still running 503 ``shutting_down``
(``_frontend.Shutdown``). uvicorn's own ``timeout_graceful_shutdown`` (which
cancels the tasks and answers a plain-text 500) is set beyond that, as a
backstop only.

A refused connection is answered in the JSON error contract with
``connection: close``; then the gateway lingers: it stops writing
(half-close), reads and drops what the client still sends, for at most
``LINGER_S`` and at most ``LINGER_BYTES`` (so the answer is not lost to a
reset, and a client cannot make it read more), and closes. Nothing it sends
after the refusal is kept.

**Answers sent before the request's body was read to its end** (413
``payload_too_large`` for a ``content-length`` over the limit, sent without
reading the body, or for a chunked body once it passes the limit; 408 for a
body too slow; any other answer given without reading the body: a 405, a
400 ...) carry ``connection: close``: a request's cycle is kept alive
only once the parser has seen the end of its body (``on_message_complete``,
at once for a request without one). uvicorn would then close the connection
at once, with the rest of the body unread: a reset that can destroy the
answer. Each request's cycle gets the connection through
``_CycleTransport``, whose ``close`` lingers as above instead whenever the
body is unread. (Before, such an answer kept the connection alive and
uvicorn read and dropped the whole announced body, 10 GB if the client said
so.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import AsyncIterator
from typing import Any, ClassVar, cast

import httptools
import uvicorn
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from muxgate.gateway._config import HttpConfig, HttpLimits
from muxgate.gateway._errors import error_body
from muxgate.gateway._frontend import Shutdown, new_request_id
from muxgate.replicas.contract import ErrorCode

__all__ = [
    "HTTP_LOGGER",
    "LINGER_BYTES",
    "LINGER_S",
    "Edge",
    "EdgeProtocol",
    "edge_protocol",
    "uvicorn_server",
]

_log = logging.getLogger("muxgate.gateway.edge")

#: how long a refused connection's further input is read and dropped, at most
LINGER_S = 1.0

#: how many bytes of a refused connection's further input are read and
#: dropped, at most; past them the connection is closed at once
LINGER_BYTES = 256 * 1024

#: the name uvicorn's server messages are logged under here
HTTP_LOGGER = "muxgate.gateway.http"


class _UvicornName(logging.Filter):
    """Logs uvicorn's server messages ("Shutting down", "Waiting for
    connections to close") as ``muxgate.gateway.http``: under uvicorn's own
    name, ``uvicorn.error``, every shutdown put "error" in an INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.name = HTTP_LOGGER
        return True


def _rename_uvicorn_logger() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _UvicornName) for f in logger.filters):
        logger.addFilter(_UvicornName())


class _TooManyHeaders(Exception):
    pass


class _Connect(Exception):
    pass


class _TooManyPipelined(Exception):
    pass


class _HeadTooLarge(Exception):
    pass


#: the method of a proxy tunnel, which the gateway does not serve
_CONNECT = b"CONNECT"


class Edge:
    """The connections of one server, shared by its ``EdgeProtocol`` instances.

    ``open``: connections counted against ``max_connections`` (refused ones
    are not). ``idle``: those without a request in flight, longest idle
    first, the ones closed at the cap. ``refused``: counts by reason.
    """

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        self.open: set[EdgeProtocol] = set()
        self.idle: dict[EdgeProtocol, None] = {}
        self.refused: dict[str, int] = {}

    def __repr__(self) -> str:
        return (
            f"<Edge open={len(self.open)}/{self.limits.max_connections} "
            f"idle={len(self.idle)} refused={self.refused}>"
        )

    def count(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def make_room(self) -> bool:
        """Below the cap, or room made by closing the longest-idle connection."""
        if len(self.open) < self.limits.max_connections:
            return True
        if not self.idle:
            return False
        victim = next(iter(self.idle))
        victim.close_idle()
        self.count("evicted_idle")
        return True


class _CycleTransport(asyncio.Transport):
    """The connection as one request's cycle (uvicorn's
    ``RequestResponseCycle``) sees it: the same, except that closing it while
    the request's body is unread lingers (``EdgeProtocol._linger``) instead
    of closing at once (see the module docstring)."""

    def __init__(self, protocol: EdgeProtocol, cycle: RequestResponseCycle) -> None:
        super().__init__()
        self._protocol = protocol
        self._cycle = cycle
        self._transport = protocol.transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._transport.write(data)

    def is_closing(self) -> bool:
        return self._protocol._discarding or self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def close(self) -> None:
        cycle = self._cycle
        if cycle.more_body and not cycle.disconnected and not self._protocol._discarding:
            self._protocol._linger()
        else:
            self._transport.close()


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the header, time and connection
    limits of ``Edge`` (see the module docstring)."""

    edge: ClassVar[Edge]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._in_head = True  # reading (or waiting for) a request head
        self._head_begun = False  # a byte of that head has come
        self._head_bytes = 0
        self._head_fields = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._discarding = False  # refused: input is dropped until the close
        self._dropped = 0  # bytes dropped since
        #: a refusal of a pipelined request, sent once the answers before it are
        self._deferred: tuple[int, str, str, int | None] | None = None
        #: the cycle whose keep-alive waits for the end of its request's body
        self._keep_alive_after_body: RequestResponseCycle | None = None
        self._made_up_head = False  # parsing _continue_body's head: no callbacks
        #: bytes of a body fed since the parser last made progress (body
        #: bytes, a chunk, a trailer field): bounds what it buffers of a
        #: trailer field or a chunk extension that never ends
        self._unparsed = 0
        self._progress = 0  # parser callbacks so far (see _unparsed)
        #: the head's bytes as parsed (target, fields): the bytes counted
        #: as they arrive miss the start of a head read with the end of
        #: the request before it (a pipelined head could pass the limit)
        self._head_size = 0

    # -- connections ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        edge = self.edge
        if not edge.make_room():
            edge.count("over_capacity")
            self._refuse(
                503,
                ErrorCode.OVER_CAPACITY,
                "the gateway has no free connection; try again",
                retry_after=1,
            )
            return
        edge.open.add(self)
        edge.idle[self] = None
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        super().connection_lost(exc)

    def close_idle(self) -> None:
        """Close this connection to make room (it has no request in flight)."""
        self._forget()
        if not self.transport.is_closing():
            self.transport.close()

    def _forget(self) -> None:
        self.edge.open.discard(self)
        self.edge.idle.pop(self, None)
        self._cancel_head_timer()

    # -- the head ----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._deferred is not None:  # refused, its answer waits: read no more
            self.flow.pause_reading()
            return
        if self._discarding:
            self._dropped += len(data)
            if self._dropped > LINGER_BYTES and not self.transport.is_closing():
                self.transport.close()
            return
        self._unset_keepalive_if_required()
        if self._in_head:
            room = self.edge.limits.max_header_bytes - self._head_bytes
            if len(data) > room:
                # Only what fits is parsed: the head must end inside it.
                if not self._feed(data[:room]):
                    return
                if self._in_head:
                    self.edge.count("header_bytes")
                    self._refuse(
                        431,
                        ErrorCode.HEADERS_TOO_LARGE,
                        f"request headers are over {self.edge.limits.max_header_bytes} bytes",
                    )
                    return
                data = data[room:]
            else:
                self._head_bytes += len(data)
        progress = self._progress
        if not self._feed(data) or self._in_head:
            return
        # Counted per read: the tail of a read after its last callback is
        # not, so at most one read more than the limit is buffered.
        self._unparsed = self._unparsed + len(data) if progress == self._progress else 0
        limit = self.edge.limits.max_header_bytes
        if self._unparsed > limit:
            # httptools buffers a trailer field until it ends (by repeated
            # concatenation): one that never ended grew the gateway by
            # hundreds of MB, unbounded by max_header_bytes, until the
            # body timeout.
            self.edge.count("trailer_bytes")
            self._refuse_request(
                431,
                ErrorCode.HEADERS_TOO_LARGE,
                f"request trailers or chunk extensions are over {limit} bytes",
            )

    def _feed(self, data: bytes) -> bool:
        """Parse ``data``; False when the connection was answered and is closing."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self.edge.count("header_bytes")
                self._refuse_request(
                    431,
                    ErrorCode.HEADERS_TOO_LARGE,
                    f"request headers are over {self.edge.limits.max_header_bytes} bytes",
                )
            elif isinstance(exc.__context__, _TooManyHeaders):
                self.edge.count("header_fields")
                what = "request headers" if self._in_head else "request trailer fields"
                self._refuse_request(
                    431,
                    ErrorCode.HEADERS_TOO_LARGE,
                    f"more than {self.edge.limits.max_headers} {what}",
                )
            elif isinstance(exc.__context__, _TooManyPipelined):
                self.edge.count("pipelined")
                self._refuse_request(
                    503,
                    ErrorCode.OVER_CAPACITY,
                    f"more than {self.edge.limits.max_pipelined} requests pipelined on one "
                    "connection; wait for answers or use more connections",
                    retry_after=1,
                )
            elif isinstance(exc.__context__, _Connect):
                self.edge.count("connect")
                self._refuse(
                    400,
                    ErrorCode.BAD_REQUEST,
                    "CONNECT is not served: the gateway is not a proxy",
                )
            else:
                self._bad_request()
            return False
        except httptools.HttpParserUpgrade as exc:
            # The upgrade is ignored: what follows the head is still HTTP/1.1.
            rest = data[exc.args[0] :]
            self._continue_body()
            return not rest or self._feed(rest)
        except httptools.HttpParserError:
            self._bad_request()
            return False
        return True

    def _continue_body(self) -> None:
        """Make the parser read the body of the request whose upgrade it
        skipped (it has called the request complete, with no body).

        The parser is ready for a new request; a head declaring the same
        body is fed to it with every callback ignored, so what comes next is
        parsed as the body of the request already under way."""
        framing = None
        for name, value in self.headers:
            if name == b"transfer-encoding":  # the parser checked it ends in chunked
                framing = b"transfer-encoding: chunked"
                break
            if name == b"content-length" and value.strip() not in (b"", b"0"):
                framing = b"content-length: " + value.strip()
        if framing is None:
            return
        self._made_up_head = True
        try:
            self.parser.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n\r\n")
        finally:
            self._made_up_head = False
        self._in_head = False
        cycle = self.cycle
        cycle.more_body = True
        cycle.message_event.clear()
        if cycle.keep_alive and not cycle.response_started:  # kept alive once the body is read
            cycle.keep_alive = False
            self._keep_alive_after_body = cycle

    def _bad_request(self) -> None:
        # In the JSON error contract with the ids every answer carries
        # (uvicorn answers plain text without them), logged as the other
        # refusals are (at debug: a hostile client cannot flood the log).
        self.edge.count("malformed")
        self._refuse_request(400, ErrorCode.BAD_REQUEST, "malformed HTTP request")

    def _refuse_request(
        self, status: int, code: str, message: str, *, retry_after: int | None = None
    ) -> None:
        """Refuse the request being parsed (``_refuse``), also once its head
        was read and its cycle runs.

        When its body (a chunk size that is not hex, a transfer-encoding
        other than chunked) or its trailers are refused, this answer is its
        answer: its cycle is told the client left, so it answers nothing
        and sends no call (it waited for the rest of its body, then answered
        the body timeout's 408); a cycle still pipelined is never started,
        and the refusal follows the answers before it."""
        cycle = self.cycle
        if not self._in_head and cycle is not None and not cycle.response_started:
            cycle.disconnected = True
            cycle.message_event.set()
            for entry in self.pipeline:
                if entry[0] is cycle:
                    self.pipeline.remove(entry)
                    self._cancel_head_timer()
                    self._deferred = (status, code, message, retry_after)
                    self.flow.pause_reading()
                    return
        self._refuse(status, code, message, retry_after=retry_after)

    def on_message_begin(self) -> None:
        if self._made_up_head:
            return
        super().on_message_begin()
        self._head_begun = True
        self._head_size = 0
        if self._head_timer is None:
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        if not self._made_up_head:
            self._head_size += len(url)
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._made_up_head:
            return
        self._head_fields += 1
        if self._head_fields > self.edge.limits.max_headers:
            raise _TooManyHeaders
        if not self._in_head:
            # A trailer field (after a chunked body): dropped. uvicorn
            # appended it to the request's headers, the very list the
            # request was given, so a trailer could add a model id (or any
            # header) that a proxy checking the head never saw.
            self._progress += 1
            return
        self._head_size += len(name) + len(value) + 3  # ":" and CRLF at least
        super().on_header(name, value)

    def on_body(self, body: bytes) -> None:
        self._progress += 1
        super().on_body(body)

    def on_chunk_header(self) -> None:
        self._progress += 1

    def on_chunk_complete(self) -> None:
        self._progress += 1

    def on_headers_complete(self) -> None:
        if self._made_up_head:
            return
        if self.parser.get_method() == _CONNECT:
            raise _Connect
        # the request line's method, spaces, version and CRLFs: 16 bytes at least
        if self._head_size + 16 > self.edge.limits.max_header_bytes:
            raise _HeadTooLarge
        running = self.cycle
        if (
            running is not None
            and not running.response_complete
            and len(self.pipeline) >= self.edge.limits.max_pipelined
        ):
            # uvicorn stops reading behind a pipelined request, but parses
            # the rest of what it read: a request a few bytes long each, one
            # read held thousands in memory (5 MB a connection).
            raise _TooManyPipelined
        self._cancel_head_timer()
        self._in_head = self._head_begun = False
        self._head_bytes = self._head_fields = self._unparsed = 0
        self._progress += 1
        self.edge.idle.pop(self, None)  # a request is in flight
        super().on_headers_complete()
        cycle = self.cycle  # its task has not run yet: nothing has used the transport
        cycle.transport = _CycleTransport(self, cycle)
        if cycle.keep_alive:
            # Kept alive only once the body has been read to its end
            # (on_message_complete, at once for a request without one): an
            # answer sent before says ``connection: close``, and the rest of
            # the body is never read.
            cycle.keep_alive = False
            self._keep_alive_after_body = cycle

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # what comes next is the next request's head
        self._head_fields = self._unparsed = 0  # trailer fields count for this one only
        cycle = self._keep_alive_after_body
        if cycle is not None and cycle is self.cycle:
            self._keep_alive_after_body = None
            if not cycle.response_started:
                cycle.keep_alive = True

    def shutdown(self) -> None:
        self._keep_alive_after_body = None  # the server is stopping: closed after the answer
        super().shutdown()

    def on_response_complete(self) -> None:
        if self._discarding:  # lingering: no keep-alive, nothing more is read
            self.server_state.total_requests += 1
            return
        if self._deferred is not None and not self.pipeline:
            self.server_state.total_requests += 1
            status, code, message, retry_after = self._deferred
            self._deferred = None
            self._refuse(status, code, message, retry_after=retry_after)
            return
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        if not pipelined and not self.transport.is_closing() and self in self.edge.open:
            self.edge.idle[self] = None  # idle from now: last in line to be closed

    # -- timers ------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(
            self.edge.limits.header_timeout_s, self._head_timed_out
        )

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_head_timer()  # a pipelined head behind a running request
        elif not self._head_begun:
            self.edge.count("idle_timeout")
            self.close_idle()  # nothing came: nobody to answer
        else:
            self.edge.count("header_timeout")
            self._refuse(
                408,
                ErrorCode.REQUEST_TIMEOUT,
                "the request headers did not arrive within "
                f"{self.edge.limits.header_timeout_s:g} s",
            )

    # -- refusing ----------------------------------------------------------------

    def _refuse(
        self, status: int, code: str, message: str, *, retry_after: int | None = None
    ) -> None:
        """Answer ``status`` (JSON, ``connection: close``), then linger and close.

        A request pipelined behind one still in flight is answered after
        the answers before it (``on_response_complete``); until then the
        connection reads no more."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.disconnected:
            _log.debug("refusing a pipelined request from %s: %s %s", self.client, status, code)
            self._cancel_head_timer()
            self._deferred = (status, code, message, retry_after)
            self.flow.pause_reading()
            return
        _log.debug("refused a connection from %s: %s %s", self.client, status, code)
        transport = self.transport
        if transport.is_closing():
            self._forget()
            self._discarding = True
            return
        request_id = new_request_id()
        body = error_body(code, message, request_id)
        lines = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            lines += [name, b": ", value, b"\r\n"]
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            (b"x-request-id", request_id.encode()),
            (b"x-muxgate-replica", b""),
        ]
        if retry_after is not None:
            headers.append((b"retry-after", str(retry_after).encode()))
        for name, value in headers:
            lines += [name, b": ", value, b"\r\n"]
        lines += [b"\r\n", body]
        transport.write(b"".join(lines))
        self._linger()

    def _linger(self) -> None:
        """The answer is written: stop writing (half-close), read and drop
        what the client still sends, at most ``LINGER_BYTES`` (in
        ``data_received``) for at most ``LINGER_S``, and close."""
        self._forget()
        self._discarding = True
        self._dropped = 0
        self._unset_keepalive_if_required()
        transport = self.transport
        if transport.is_closing():
            return
        self.flow.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(LINGER_S, transport.close)


def edge_protocol(edge: Edge) -> type[EdgeProtocol]:
    """The protocol class for one server: its instances share ``edge``."""
    return type("EdgeProtocol", (EdgeProtocol,), {"edge": edge})


#: how long uvicorn waits after our grace before it cancels what still runs
#: (the front end has answered every request by then; this is a backstop)
_BACKSTOP_S = 5


@contextlib.asynccontextmanager
async def uvicorn_server(
    app: Any, sock: socket.socket, http: HttpConfig, shutdown: Shutdown
) -> AsyncIterator[Edge]:
    """uvicorn (httptools, with ``http.limits``) on the running loop, serving
    ``sock``; stopped gracefully on exit (see the module docstring)."""
    edge = Edge(http.limits)
    grace_s = http.grace_s
    _rename_uvicorn_logger()
    uv_config = uvicorn.Config(
        app,
        http=edge_protocol(edge),
        lifespan="off",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        # No websockets: an upgrade is ignored whatever is installed.
        ws="none",
        # uvicorn types these as int; the loop's timers take any float.
        timeout_keep_alive=cast(int, http.limits.keep_alive_timeout_s),
        timeout_graceful_shutdown=math.ceil(grace_s) + _BACKSTOP_S,
        server_header=False,
    )
    uv_config.load()
    server = uvicorn.Server(uv_config)
    # Server.serve() would install signal handlers; drive its steps instead.
    server.lifespan = uv_config.lifespan_class(uv_config)
    try:
        await server.startup(sockets=[sock])
    except BaseException:
        sock.close()
        raise
    main_loop = asyncio.create_task(server.main_loop(), name="muxgate-http")
    try:
        yield edge
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await main_loop
        await _stop(server, sock, shutdown, grace_s)


async def _stop(
    server: uvicorn.Server, sock: socket.socket, shutdown: Shutdown, grace_s: float
) -> None:
    shutdown.begin()
    # Stops accepting, closes idle connections, waits for the rest.
    stopping = asyncio.ensure_future(server.shutdown(sockets=[sock]))
    try:
        done, _ = await asyncio.wait({stopping}, timeout=grace_s)
        if not done:
            cut = shutdown.cut_off()
            if cut:
                _log.warning(
                    "shutdown grace of %g s over: %d request(s) still running answered "
                    "503 shutting_down",
                    grace_s,
                    cut,
                )
        with contextlib.suppress(Exception):
            await stopping
    finally:
        if not stopping.done():  # we were cancelled: no more waiting
            shutdown.cut_off()
            stopping.cancel()
