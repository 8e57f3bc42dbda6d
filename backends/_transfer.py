"""The parallel ranged transfer: one remote object into one local file.

Remote objects from ``parallel_threshold`` bytes up are downloaded with
concurrent ranged reads, each written straight to its offset of the
destination file, so no full copy is held in memory; smaller ones with one
request. A range that comes back short means the object changed under the
download (:class:`ObjectChanged`); the caller restarts the fetch.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio


class ObjectChanged(Exception):
    """The object changed while it was being downloaded; the fetch restarts."""


class ShortRead(ObjectChanged):
    """A ranged read returned fewer bytes than asked: the object shrank."""


def plan_parts(
    size: int, part_size: int, parallel_threshold: int | None = None
) -> list[tuple[int, int]]:
    """Byte ranges ``[start, end)`` covering ``size`` bytes in ``part_size`` pieces.

    Below ``parallel_threshold`` (default: no threshold) the whole object is
    one range: one request (see ``StorageConfig.parallel_threshold``).
    """
    if parallel_threshold is not None and size < parallel_threshold:
        return [(0, size)] if size else []
    return [(start, min(start + part_size, size)) for start in range(0, size, part_size)]


def first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception of ``group`` (nested groups flattened) that is not
    a cancellation: the failure that cancelled the others."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return first_leaf(exc)
        if not isinstance(exc, anyio.get_cancelled_exc_class()):
            return exc
    return group.exceptions[0]


async def ranged_download(
    fs: Any,
    path: str,
    dest: Path,
    size: int,
    *,
    parts: list[tuple[int, int]],
    concurrency: int,
    call: Callable[..., Awaitable[None]],
) -> None:
    """Read ``parts`` of ``path`` on ``fs`` (at most ``concurrency`` at once),
    each written at its offset of ``dest`` (created ``size`` bytes long).

    ``call(func, *args)`` runs one blocking read in a worker thread (with the
    caller's retries and deadline). The first failing part cancels the
    others and is raised as itself.
    """
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        limiter = anyio.CapacityLimiter(concurrency)

        def read_part(start: int, end: int, **kwargs: Any) -> None:
            data = fs.cat_file(path, start=start, end=end, **kwargs)
            if len(data) != end - start:
                raise ShortRead(f"range {start}-{end} returned {len(data)} bytes")
            view = memoryview(data)
            offset = start
            while view:
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written

        async def one(start: int, end: int) -> None:
            async with limiter:
                await call(read_part, start, end)

        try:
            async with anyio.create_task_group() as tg:
                for start, end in parts:
                    tg.start_soon(one, start, end)
        except BaseExceptionGroup as group:
            # The first failing part cancels the others; report that failure.
            raise first_leaf(group) from None
    finally:
        os.close(fd)
