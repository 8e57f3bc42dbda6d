"""Drains a supervisor admitted: the replica side of drain fencing.

Where several gateways share a replica, only the one holding the
deployment's lease may drain it. A Ray replica actor (the replica's
supervisor, its parent process) checks a gateway's lease epoch with the
lease actor, as it does before a start or a stop, and only then writes a
one-time token on the replica's stdin pipe, ``DRAIN <token>`` on a line of
its own, and hands the token to that gateway, whose ``Drain`` carries it.
A replica whose spec says ``drain_fence`` obeys only a ``Drain`` with a token
it was given this way; any other is refused (logged, and the replica keeps
serving). Tokens are random (128 bits), used once, and only the newest
``MAX_TOKENS`` are kept.

The supervisor writes the token before it returns it, so the line is in the
pipe before the ``Drain`` can be sent; :meth:`DrainFence.admits` reads what
the pipe holds before deciding, whichever of the two the event loop saw first.
"""

from __future__ import annotations

import os
from collections import deque

__all__ = ["MAX_TOKENS", "DrainFence"]

#: admitted tokens kept (a gateway that was admitted and then died leaves one)
MAX_TOKENS = 64
#: longest line taken from the pipe; a longer one is dropped
_MAX_LINE = 256


class DrainFence:
    """The drain tokens a replica's supervisor wrote on ``fd`` (its stdin).

    Args:
        fd: the pipe, non-blocking reads; None: no supervisor, nothing is
            ever admitted (the spec asked for a fence no one can open).
    """

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self._tokens: deque[str] = deque(maxlen=MAX_TOKENS)
        self._partial = b""

    def __repr__(self) -> str:
        return f"<DrainFence fd={self.fd} tokens={len(self._tokens)}>"

    def feed(self, data: bytes) -> None:
        """Take bytes read from the pipe (the parent watcher reads it too)."""
        *lines, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > _MAX_LINE:
            self._partial = b""
        for line in lines:
            word, _, token = line.decode(errors="replace").strip().partition(" ")
            if word == "DRAIN" and token and len(line) <= _MAX_LINE:
                self._tokens.append(token)

    def poll(self) -> None:
        """Read whatever the pipe holds now, without waiting."""
        if self.fd is None:
            return
        while True:
            try:
                data = os.read(self.fd, 4096)
            except (BlockingIOError, OSError):
                return
            if not data:
                return  # end of file: the parent watcher sees it too
            self.feed(data)

    def admits(self, token: str | None) -> bool:
        """Whether a ``Drain`` carrying ``token`` may go ahead (using it up)."""
        self.poll()
        if token is None or token not in self._tokens:
            return False
        self._tokens.remove(token)
        return True
