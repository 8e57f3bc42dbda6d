"""gcsfs without its own retry loop.

gcsfs retries each request up to six times with sleeps of 1 s, 2 s, 4 s...
(about half a minute against a host that is down) before muxgate's bounded
:class:`~muxgate.backends.RetryPolicy` sees the error. This subclass calls
the undecorated request method so muxgate's policy is the only one. If a
future gcsfs drops ``__wrapped__``, it falls back to gcsfs's loop: slower to
give up, still correct. gcsfs.core (not the package root) is used because
the root may swap in an experimental class that probes gRPC first.
"""

from __future__ import annotations

from typing import Any

from gcsfs.core import GCSFileSystem as _BaseGCSFileSystem

_request_once: Any = getattr(_BaseGCSFileSystem._request, "__wrapped__", None)


class GCSFileSystem(_BaseGCSFileSystem):  # type: ignore[misc]
    """``gcsfs.core.GCSFileSystem`` making one attempt per request."""

    if _request_once is not None:
        _request = _request_once
