"""What a fetch hands the loader: the :class:`Artifact`, and the pure
decisions of how it is fetched (:class:`Strategy`) and where its bytes came
from (:func:`source_of`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Artifact", "Strategy", "choose_strategy", "source_of"]


class Strategy(enum.Enum):
    """How an object reaches the loader."""

    LOCAL_FILE = "local_file"  # read in place (file://, plain paths)
    BYTES = "bytes"  # one read into memory (memory://, small uncached objects)
    CACHED = "cached"  # ranged download into the shared disk cache
    TEMP_FILE = "temp_file"  # ranged download into a temp file, removed after use


def choose_strategy(*, is_local: bool, cached: bool, size: int, part_size: int) -> Strategy:
    """Pure decision of how to fetch an object (see :class:`Strategy`)."""
    if cached:
        return Strategy.CACHED
    if is_local:
        return Strategy.LOCAL_FILE
    if size <= part_size:
        return Strategy.BYTES
    return Strategy.TEMP_FILE


def source_of(*, cache_hit: bool, remote: bool) -> str:
    """The ``muxgate.source`` span attribute: ``cache``, ``remote`` or ``local``."""
    if cache_hit:
        return "cache"
    return "remote" if remote else "local"


@dataclass
class Artifact:
    """A fetched object, readable by torch.

    Attributes:
        url: The object's URL without credentials.
        size: Size in bytes.
        cache_hit: Whether it came from the disk cache without a download.
        path: A local file (``None`` when ``data`` holds the bytes).
        data: The bytes, for objects read into memory.
        strategy: How it was fetched.
        stale: Served from the disk cache without the remote's word that
            it is current: the remote could not be reached (stale-if-error).
        mmap_safe: Whether ``path`` may be memory-mapped: nobody rewrites
            it in place (cache files are only ever replaced atomically; a
            file a user overwrites with ``torch.save`` is truncated under
            the mapping, which crashes the reader with SIGBUS).
        source: Where the bytes came from: ``"cache"`` (the disk cache,
            no download), ``"remote"`` (downloaded) or ``"local"`` (a
            local file or memory).
    """

    url: str
    size: int
    cache_hit: bool
    strategy: Strategy
    path: str | None = None
    data: bytes | None = None
    mmap_safe: bool = False
    source: str = "local"
    stale: bool = False
    _cleanup: list[Callable[[], None]] = field(default_factory=list, repr=False)
