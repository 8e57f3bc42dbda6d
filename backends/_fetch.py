"""Fetching one object to somewhere torch can read it from.

The decision of *how* (read a local file in place, read bytes from memory,
download through the disk cache, download to a temp file) is made from the
filesystem's capabilities and the configuration, never from URL prefixes.
Remote objects from ``parallel_threshold`` bytes up are downloaded with
concurrent ranged reads (:mod:`._transfer`); smaller ones with one request.
What a fetch yields and the strategy decision are :mod:`._artifact`, what it
does with the disk cache (fill it under a lock, serve it stale when the
remote cannot be reached) :mod:`._fetchcache`, and its span :mod:`._fetchspan`.

Per-call overhead matters for small local models (a 4 MB state dict loads in
about half a millisecond), so the hot path avoids repeated work: filesystem
instances are kept per (protocol, options) here, without fsspec's tokenising
or a deep copy of the options; local files are ``os.stat``ed directly; and a
local load is fetched and decoded in one worker-thread hop.
"""

from __future__ import annotations

import copy
import errno
import logging
import os
import stat
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import anyio
import anyio.to_thread
from fsspec import AbstractFileSystem
from fsspec.asyn import AsyncFileSystem
from fsspec.implementations.local import LocalFileSystem

from ._artifact import Artifact, Strategy, choose_strategy, source_of
from ._cache import DiskCache, version_token
from ._config import RetryPolicy, StorageConfig, resolve_config
from ._deadline import storage_deadline
from ._errors import (
    BackendError,
    ModelFormatError,
    ModelNotFoundError,
    StorageAccessDeniedError,
    StorageUnavailableError,
)
from ._fetchcache import fill_cache, in_thread, remove_file, stale_copy, storage_counters
from ._fetchspan import FetchSpan, record
from ._instances import freeze_options, instances
from ._registry import backend_spec, filesystem_class
from ._retry import denied_by, is_transient, with_retries
from ._transfer import ObjectChanged, plan_parts, ranged_download
from ._urls import redact_url, split_protocol

logger = logging.getLogger("muxgate.backends")

T = TypeVar("T")

# Restarts of a whole fetch because the object changed under it.
_MAX_VERSION_RESTARTS = 3


def translate_storage_error(exc: Exception, url: str) -> BackendError:
    """The :class:`BackendError` a storage library's exception means for ``url``."""
    if isinstance(exc, BackendError):
        return exc
    # Before "not found": fsspec's HTTP filesystem turns every failed stat,
    # a 401 or 403 too, into a FileNotFoundError raised from the response's.
    denied = denied_by(exc)
    if denied is not None:
        return StorageAccessDeniedError(url, reason=f"{type(denied).__name__}: {denied}")
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return ModelNotFoundError(url)
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        # A valid id (up to 256 characters) can be longer than a local file
        # system's name limit (255 bytes): no such model can be stored there.
        return ModelNotFoundError(url)
    return BackendError(f"storage error for {url}: {type(exc).__name__}: {exc}", url=url)


class _Fetcher:
    """One fetch of one URL (created per call; holds no state between calls)."""

    def __init__(
        self, url: str, config: StorageConfig, storage_options: Mapping[str, Any] | None
    ) -> None:
        self.url = url
        self.safe_url = redact_url(url)
        self.config = config
        self.protocol, _ = split_protocol(url)
        self.spec = backend_spec(self.protocol, url=self.safe_url)
        # Read-only view: copied only when a filesystem is constructed.
        self.options = config.merged_options(self.protocol, storage_options)
        self.cls = filesystem_class(self.protocol, url=self.safe_url)
        self.path = self.cls._strip_protocol(url)
        self.is_local = issubclass(self.cls, LocalFileSystem)
        # Async filesystems (s3fs, gcsfs, http) take a per-call ``timeout``
        # that cancels the request in their event loop; fsspec's sync().
        self._takes_timeout = issubclass(self.cls, AsyncFileSystem)
        #: time.monotonic() by which storage calls give up (None: no request deadline)
        self.deadline = storage_deadline()
        self._fs_key: Any = None
        self.fs: AbstractFileSystem | None = None
        if not self.is_local:
            with suppress(TypeError):  # unhashable options: a new instance each time
                self._fs_key = (self.protocol, self.cls, freeze_options(self.options))
                self.fs = instances.get(self._fs_key)

    async def _call(
        self,
        func: Callable[..., T],
        *args: Any,
        policy: RetryPolicy | None = None,
        deadline: float | None = None,
    ) -> T:
        """``func(*args)`` in a worker thread, retried by the policy; every
        attempt is bounded by the time left before the deadline (the
        fetch's unless given), passed to ``func`` as ``timeout=`` when the
        filesystem takes one."""

        def attempt(left: float | None) -> Awaitable[T]:
            if left is not None and self._takes_timeout:
                return in_thread(partial(func, *args, timeout=left))
            return in_thread(func, *args)

        return await with_retries(
            attempt,
            policy=policy or self.config.retry,
            url=self.safe_url,
            deadline=self.deadline if deadline is None else deadline,
        )

    def _filesystem(self) -> AbstractFileSystem:
        # Blocking (s3fs and gcsfs may start their loop thread): call in a worker.
        if self.fs is None:
            self.fs = self.cls(**copy.deepcopy(self.options))
            if self._fs_key is not None:
                instances.put(self._fs_key, self.fs)
        return self.fs

    def _stat(self, **kwargs: Any) -> dict[str, Any]:
        # One worker-thread hop for construction and stat.
        fs: Any = self._filesystem()
        with suppress(Exception):
            fs.invalidate_cache(self.path)  # never trust a cached listing for versions
        info: dict[str, Any] = fs.info(self.path, **kwargs)
        return info

    def _cat(self, **kwargs: Any) -> bytes:
        fs: Any = self.fs
        data: bytes = fs.cat_file(self.path, **kwargs)
        return data

    async def info(
        self, *, policy: RetryPolicy | None = None, deadline: float | None = None
    ) -> dict[str, Any]:
        info = await self._call(self._stat, policy=policy, deadline=deadline)
        if info.get("type") == "directory":
            raise ModelNotFoundError(self.safe_url)
        return info

    def identity(self) -> str:
        # The endpoint is part of an object's identity: the same bucket name
        # on two S3-compatible services holds different objects.
        endpoint = self.options.get("endpoint_url") or self.options.get("client_kwargs", {}).get(
            "endpoint_url", ""
        )
        return f"{self.protocol}://{self.path}@{endpoint}"

    async def download(self, dest: Path, size: int) -> None:
        """Ranged reads (concurrent from ``parallel_threshold`` up, else one),
        each written at its offset of ``dest`` (see :mod:`._transfer`)."""
        assert self.fs is not None
        parts = plan_parts(size, self.config.part_size, self.config.single_request_below())
        await ranged_download(
            self.fs,
            self.path,
            dest,
            size,
            parts=parts,
            concurrency=self.config.concurrency,
            call=self._call,
        )

    def _cache(self) -> DiskCache:
        return DiskCache(self.config.cache_dir(), self.config.cache.max_bytes)

    async def through_cache(self, info: Mapping[str, Any], size: int) -> tuple[str, bool]:
        return await fill_cache(
            self._cache(),
            self.identity(),
            info,
            size,
            download=partial(self.download_unchanged, info=info, size=size),
            fsync=self.config.cache.fsync,
            safe_url=self.safe_url,
        )

    def in_process(self) -> bool:
        """Whether the object is on local disk or in memory and not cached."""
        return not self.spec.remote and not self.config.cache.enabled_for(self.protocol)

    def fetch_in_process(self) -> Artifact:
        """Blocking fetch for in-process filesystems: one thread hop in all.

        Local disk and memory errors are not transient, so no retry loop.
        A local file is ``os.stat``ed directly (no filesystem object: the
        stat is all that is needed before torch opens the path).
        """
        if self.is_local:
            st = os.stat(self.path)
            if stat.S_ISDIR(st.st_mode):
                raise ModelNotFoundError(self.safe_url)
            return Artifact(
                self.safe_url,
                st.st_size,
                cache_hit=False,
                strategy=Strategy.LOCAL_FILE,
                path=self.path,
                mmap_safe=self.config.mmap_local_files,
            )
        info = self._stat()
        if info.get("type") == "directory":
            raise ModelNotFoundError(self.safe_url)
        size = int(info.get("size") or 0)
        fs: Any = self.fs
        data: bytes = fs.cat_file(self.path)
        return Artifact(self.safe_url, size, cache_hit=False, strategy=Strategy.BYTES, data=data)

    async def download_unchanged(self, dest: Path, info: Mapping[str, Any], size: int) -> None:
        """:meth:`download`, then make sure every part came from one version.

        A part can also fail outright because the object changed under the
        download (S3 answers 416 to a range past the end of a shrunken
        object); a failure is therefore checked against the current
        version, and a changed object restarts the fetch instead of failing.
        """
        try:
            await self.download(dest, size)
        except ObjectChanged:
            raise
        except Exception as exc:
            try:
                changed = version_token(await self.info()) != version_token(info)
            except Exception:
                changed = False  # e.g. deleted meanwhile: report the original error
            if changed:
                raise ObjectChanged(self.safe_url) from exc
            raise
        await self.check_unchanged(info)

    async def check_unchanged(self, before: Mapping[str, Any]) -> None:
        """Raise if the object's version changed since ``before`` (mixed parts)."""
        if version_token(await self.info()) != version_token(before):
            raise ObjectChanged(self.safe_url)

    async def fetch(self) -> Artifact:
        """Fetch within the request's deadline (see :mod:`._deadline`)."""
        if self.deadline is None:
            return await self._fetch_versions()
        started = time.monotonic()
        # Each storage call is bounded already; this bounds the rest (waiting
        # for another process's download, filesystems without timeouts).
        with anyio.move_on_after(self.deadline - started):
            return await self._fetch_versions()
        raise StorageUnavailableError(
            self.safe_url,
            attempts=0,
            elapsed=time.monotonic() - started,
            reason="storage did not answer before the request's deadline",
        )

    async def _fetch_versions(self) -> Artifact:
        """Fetch, restarting (bounded) if the object changes mid-download."""
        for _ in range(_MAX_VERSION_RESTARTS):
            try:
                return await self._fetch_once()
            except ObjectChanged:
                logger.info("%s changed during download; fetching it again.", self.safe_url)
        raise BackendError(
            f"{self.safe_url} kept changing during download ({_MAX_VERSION_RESTARTS} attempts)",
            url=self.safe_url,
        )

    async def _info_or_stale(self, cached: bool) -> dict[str, Any] | Artifact:
        """The object's info from the remote; or, when the remote cannot be
        reached and the disk cache holds the version the remote last
        confirmed, that file as a stale :class:`Artifact` (stale-if-error).

        Only "cannot reach" falls back: refused, reset, timed out, 5xx
        (:class:`StorageUnavailableError`). A remote that answers decides:
        not found is not found, and a new version is downloaded.

        With a copy held, the check makes one attempt within half the time
        left before the deadline, keeping the other half to load the copy.
        """
        if not cached:
            return await self.info()
        cache = self._cache()
        identity = self.identity()
        # One readlink on a local directory: not worth a worker-thread hop.
        if cache.confirmed_key(identity) is None:
            return await self.info()
        deadline = None
        if self.deadline is not None:
            now = time.monotonic()
            deadline = now + (self.deadline - now) / 2
        try:
            return await self.info(
                policy=replace(self.config.retry, max_attempts=1), deadline=deadline
            )
        except StorageUnavailableError as exc:
            stale = await stale_copy(cache, identity, self.safe_url, exc)
            if stale is None:
                raise
            return stale

    async def _fetch_once(self) -> Artifact:
        cached = self.config.cache.enabled_for(self.protocol)
        info = await self._info_or_stale(cached)
        if isinstance(info, Artifact):
            return info
        size = int(info.get("size") or 0)
        strategy = choose_strategy(
            is_local=self.is_local,
            cached=cached,
            size=size,
            part_size=self.config.part_size,
        )
        artifact = Artifact(
            self.safe_url,
            size,
            cache_hit=False,
            strategy=strategy,
            source=source_of(cache_hit=False, remote=self.spec.remote),
        )
        if strategy is Strategy.LOCAL_FILE:
            artifact.path = self.path
            artifact.mmap_safe = self.config.mmap_local_files
        elif strategy is Strategy.BYTES:
            assert self.fs is not None
            artifact.data = await self._call(self._cat)
        elif strategy is Strategy.CACHED:
            artifact.path, artifact.cache_hit = await self.through_cache(info, size)
            artifact.source = source_of(cache_hit=artifact.cache_hit, remote=self.spec.remote)
            artifact.mmap_safe = True
        else:
            fd, name = tempfile.mkstemp(prefix="muxgate-", suffix=".part")
            os.close(fd)
            artifact._cleanup.append(partial(remove_file, name))
            try:
                await self.download_unchanged(Path(name), info, size)
            except BaseException:
                remove_file(name)
                raise
            artifact.path = name
            artifact.mmap_safe = True  # private; unlinking keeps the mapping valid
        return artifact


def _translate_and_raise(exc: Exception, safe_url: str) -> NoReturn:
    translated = translate_storage_error(exc, safe_url)
    if translated is exc:
        raise exc
    raise translated from exc


@asynccontextmanager
async def fetch(
    url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    config: StorageConfig | None = None,
) -> AsyncIterator[Artifact]:
    """Fetch ``url`` and yield an :class:`Artifact` valid inside the block.

    Emits a ``muxgate.storage.fetch`` span (a child of the current span,
    e.g. the SDK's ``muxgate.model.load``, which cannot know these) with
    ``url.full`` (no credentials or query), ``muxgate.bytes``,
    ``muxgate.source`` (``cache`` | ``remote`` | ``local``),
    ``muxgate.cache_hit``, ``muxgate.storage.strategy``,
    ``muxgate.stale`` (served from the disk cache because the remote
    could not be reached) and ``muxgate.duration_ms``.

    Inside a replica call, storage gives up early enough for the replica
    to answer before the request's deadline (see :mod:`._deadline`).

    Raises:
        ModelNotFoundError: The object does not exist.
        StorageUnavailableError: Transient failures outlasted the retry policy.
        StorageAccessDeniedError: Credentials missing or refused.
        BackendError: Any other storage failure.
    """
    cfg = resolve_config(config)
    safe_url = redact_url(url)
    started = time.perf_counter()
    with FetchSpan(safe_url) as span:
        try:
            artifact = await _Fetcher(url, cfg, storage_options).fetch()
        except Exception as exc:
            _translate_and_raise(exc, safe_url)
        record(span, artifact, time.perf_counter() - started)
    try:
        yield artifact
    finally:
        for cleanup in artifact._cleanup:
            cleanup()


#: disk-cache files that were downloaded and did not decode (the remote's
#: own content, not damage): a cache hit on one is not downloaded again.
#: Bounded; a path names one version of one object.
_UNDECODABLE_DOWNLOADS: OrderedDict[str, None] = OrderedDict()
_UNDECODABLE_DOWNLOADS_MAX = 1024


def _remember_undecodable(path: str) -> None:
    _UNDECODABLE_DOWNLOADS[path] = None
    _UNDECODABLE_DOWNLOADS.move_to_end(path)
    while len(_UNDECODABLE_DOWNLOADS) > _UNDECODABLE_DOWNLOADS_MAX:
        _UNDECODABLE_DOWNLOADS.popitem(last=False)


async def fetch_and_decode(
    url: str,
    decode: Callable[[Artifact], T],
    *,
    storage_options: Mapping[str, Any] | None = None,
    config: StorageConfig | None = None,
) -> T:
    """Fetch ``url`` and run ``decode`` on it in a worker thread.

    Same span and errors as :func:`fetch`. Local disk and memory objects
    are fetched and decoded in a single worker-thread hop. Measured
    (``bench/bench_storage.py``, 2 vCPUs): a 4 MB state dict loads at
    0.91-0.94x the rate of ``torch.load`` in a worker thread (~55-75 us
    more per call) and ~0.8x of ``torch.load`` on the calling thread, the
    hop itself costing most of the difference; 64 and 256 MB loads at
    0.86-0.94x of the calling thread.

    A copy from the disk cache that ``decode`` refuses (``ModelFormatError``)
    is removed and the object fetched again, once: the remote may hold it
    whole where the cache's copy was damaged (same size, other bytes, which
    the size check cannot tell; it failed every load until evicted, and
    its hits kept it from being evicted). A download that does not decode
    is the remote's own content: a cache hit on it is not fetched again
    (per process, for the last 1024 such files), so a bad model costs no
    download per request.
    """
    return await _fetch_and_decode(url, decode, storage_options, config, recheck=True)


async def _fetch_and_decode(
    url: str,
    decode: Callable[[Artifact], T],
    storage_options: Mapping[str, Any] | None,
    config: StorageConfig | None,
    *,
    recheck: bool,
) -> T:
    """``fetch_and_decode``; ``recheck``: fetch again a cached copy that
    does not decode."""
    cfg = resolve_config(config)
    safe_url = redact_url(url)
    started = time.perf_counter()
    outcome_fn: Callable[[], T] | None = None
    with FetchSpan(safe_url) as span:
        try:
            fetcher = _Fetcher(url, cfg, storage_options)
            if fetcher.in_process():

                def fetch_then_decode() -> tuple[Artifact, float, Callable[[], T]]:
                    artifact = fetcher.fetch_in_process()
                    fetched = time.perf_counter() - started
                    try:
                        result = decode(artifact)
                    except Exception as exc:
                        # Raised after the span: a bad file is not a fetch failure.
                        return artifact, fetched, partial(_reraise, exc)
                    return artifact, fetched, partial(_identity, result)

                artifact, fetched, outcome_fn = await anyio.to_thread.run_sync(fetch_then_decode)
                record(span, artifact, fetched)
            else:
                artifact = await fetcher.fetch()
                record(span, artifact, time.perf_counter() - started)
        except Exception as exc:
            _translate_and_raise(exc, safe_url)
    if outcome_fn is not None:
        return outcome_fn()
    try:
        return await anyio.to_thread.run_sync(decode, artifact)
    except ModelFormatError as exc:
        path = artifact.path
        if path is None or artifact.source not in ("cache", "remote"):
            raise
        if artifact.source == "remote" or path in _UNDECODABLE_DOWNLOADS or not recheck:
            _remember_undecodable(path)
            raise
        logger.warning(
            "The disk cache's copy of %s does not decode (%s): removed, fetching it again",
            safe_url,
            exc.reason,
        )
        remove_file(path)
    finally:
        for cleanup in artifact._cleanup:
            cleanup()
    return await _fetch_and_decode(url, decode, storage_options, config, recheck=False)


def _reraise(exc: Exception) -> NoReturn:
    raise exc


def _identity(value: T) -> T:
    return value


__all__ = [
    "Artifact",
    "Strategy",
    "choose_strategy",
    "fetch",
    "fetch_and_decode",
    "is_transient",
    "plan_parts",
    "source_of",
    "storage_counters",
    "translate_storage_error",
]
