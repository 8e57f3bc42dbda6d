"""A fetch's use of the disk cache: filling it under a per-key lock, and
serving the copy the remote last confirmed when the remote cannot be
reached (stale-if-error).

The cache itself (keys, locks, eviction, the confirmed-version links) is
:mod:`._cache`; this module is what one fetch does with it, apart from how
the bytes are downloaded (the caller's ``download``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from ._artifact import Artifact, Strategy
from ._cache import DiskCache, LockTimeout, cache_key, version_token

__all__ = ["fill_cache", "in_thread", "remove_file", "stale_copy", "storage_counters"]

logger = logging.getLogger("muxgate.backends")

T = TypeVar("T")

# How long a process waits for another one's download of the same object.
_LOCK_WAIT_SECONDS = 900.0
_LOCK_POLL_SECONDS = 0.5

#: Cumulative counters of this process (a replica reports them to the gateway
#: with its own): ``storage_stale_serves`` counts fetches answered from the
#: disk cache because the remote could not be reached.
_COUNTERS: dict[str, float] = {"storage_stale_serves": 0.0}


def storage_counters() -> dict[str, float]:
    """A copy of this process's storage counters."""
    return dict(_COUNTERS)


async def in_thread(func: Callable[..., T], *args: Any) -> T:
    """``func(*args)`` in a worker thread (blocking storage and cache calls)."""
    return await anyio.to_thread.run_sync(partial(func, *args))


def remove_file(path: str | Path) -> None:
    """Unlink ``path`` if it still exists."""
    with suppress(FileNotFoundError):
        os.unlink(path)


async def _acquire(lock: Any) -> None:
    # Poll in short blocking slices so a cancelled caller stops waiting
    # within _LOCK_POLL_SECONDS and never leaves the lock held by a thread.
    deadline = time.monotonic() + _LOCK_WAIT_SECONDS
    while True:
        try:
            await anyio.to_thread.run_sync(partial(lock.acquire, _LOCK_POLL_SECONDS))
            return
        except LockTimeout:
            if time.monotonic() > deadline:
                raise
        await anyio.lowlevel.checkpoint()


async def fill_cache(
    cache: DiskCache,
    identity: str,
    info: Mapping[str, Any],
    size: int,
    *,
    download: Callable[[Path], Awaitable[None]],
    fsync: bool,
    safe_url: str,
) -> tuple[str, bool]:
    """The cached file of the version ``info`` names, and whether it was a
    hit; on a miss ``download`` fills it, once per host: processes fetching
    the same version wait for the first one's download under its lock."""
    key = cache_key(identity, version_token(info))

    def lookup_and_confirm() -> Path | None:
        # One thread hop: the remote just named this version current.
        found = cache.lookup(key, size)
        if found is not None:
            cache.confirm(identity, key)
        return found

    hit = await in_thread(lookup_and_confirm)
    if hit is not None:
        return str(hit), True
    lock = await in_thread(cache.lock, key)
    await _acquire(lock)
    try:
        # Another process may have finished the download while we waited.
        hit = await in_thread(lookup_and_confirm)
        if hit is not None:
            return str(hit), True
        temp = await in_thread(cache.temp_path, key)
        try:
            logger.info("Downloading %s (%d bytes) into the cache.", safe_url, size)
            await download(temp)
            final = await in_thread(partial(cache.commit, temp, key, fsync=fsync))
            await in_thread(cache.confirm, identity, key)
        except BaseException:
            remove_file(temp)
            raise
    finally:
        lock.release()
    await in_thread(cache.evict, final)
    return str(final), False


async def stale_copy(
    cache: DiskCache, identity: str, safe_url: str, error: Exception
) -> Artifact | None:
    """The cached copy the remote last confirmed, as a stale :class:`Artifact`
    served because of ``error``; None when the cache holds none."""

    def held_copy() -> tuple[Path, int] | None:
        path = cache.last_confirmed(identity)
        try:
            return None if path is None else (path, path.stat().st_size)
        except FileNotFoundError:  # evicted by another process just now
            return None

    held = await in_thread(held_copy)
    if held is None:
        return None
    path, size = held
    _COUNTERS["storage_stale_serves"] += 1
    logger.warning(
        "Storage unreachable for %s; serving the cached copy the remote last "
        "confirmed (stale-if-error): %s",
        safe_url,
        error,
    )
    return Artifact(
        safe_url,
        size,
        cache_hit=True,
        strategy=Strategy.CACHED,
        path=str(path),
        mmap_safe=True,
        source="cache",
        stale=True,
    )
