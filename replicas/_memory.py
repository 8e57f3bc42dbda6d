"""A replica's resident memory, as it reports it in every ``Pong``.

Read from ``/proc/self/statm`` (resident pages times the page size): one
small read, no dependency, and the current value (``resource.getrusage``
only knows the peak). Elsewhere than Linux the size is unknown (None), and
a deployment's ``max_replica_rss_bytes`` then never triggers.
"""

from __future__ import annotations

import os

__all__ = ["rss_bytes"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """Resident set size of this process in bytes, or None when unknown."""
    try:
        # Opened each time: a forked child must not read its parent's file.
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
        return int(fields[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None
