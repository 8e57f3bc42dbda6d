"""Local disk cache of downloaded artifacts, shared by the processes of a host.

Layout under the cache directory::

    objects/ab/abcdef...      complete files, named by key (sha256)
    objects/ab/.abcdef...part in-progress downloads (same folder: atomic rename)
    locks/abcdef....lock      one file lock per key: one download at a time
    .evict.lock               one eviction at a time

Invariants: a file under its final name is complete (written to a temp name
then ``os.replace``d); a key names one version of one object (the version
token is part of the key), so a changed object gets a new key and is fetched
again; the least recently used files (by mtime, bumped on every hit) are
removed once the total passes ``max_bytes``. Removing a file another process
has memory-mapped is safe on POSIX: the mapping keeps the inode alive.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

_PART_SUFFIX = ".part"
# A temp file this old belongs to a process that died mid-download.
_STALE_PART_SECONDS = 3600.0


def version_token(info: Mapping[str, Any]) -> str:
    """A string that changes whenever the stored object changes.

    Prefers what the store guarantees (GCS generation, S3 version id or
    ETag), else modification time; the size is always part of it.
    """
    size = info.get("size")
    for field in ("generation", "VersionId", "ETag", "etag", "md5Hash"):
        value = info.get(field)
        if value:
            return f"{field}={value};size={size}"
    for field in ("mtime", "LastModified", "updated", "last_modified", "created"):
        value = info.get(field)
        if value:
            return f"{field}={value};size={size}"
    return f"size={size}"


def cache_key(identity: str, token: str) -> str:
    """Key of one version of one object: sha256 of its identity and version token."""
    return hashlib.sha256(f"{identity}\0{token}".encode()).hexdigest()


@dataclass(frozen=True)
class CachedFile:
    """A file in the cache, as seen by the eviction planner."""

    path: Path
    size: int
    mtime: float


def plan_eviction(files: Iterable[CachedFile], max_bytes: int, keep: Path | None) -> list[Path]:
    """Choose files to remove, least recently used first, to fit ``max_bytes``.

    ``keep`` (the file just added or used) is never chosen, so a single
    file larger than the bound stays until the next addition.
    """
    ordered = sorted(files, key=lambda f: (f.mtime, str(f.path)))
    total = sum(f.size for f in ordered)
    victims: list[Path] = []
    for f in ordered:
        if total <= max_bytes:
            break
        if keep is not None and f.path == keep:
            continue
        victims.append(f.path)
        total -= f.size
    return victims


class DiskCache:
    """The on-disk cache; cheap to construct, all state is in the directory.

    Methods do blocking file I/O: call them from a worker thread.
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._objects = directory / "objects"
        self._locks = directory / "locks"

    def __repr__(self) -> str:
        return f"DiskCache(directory={str(self.directory)!r}, max_bytes={self.max_bytes})"

    def path_for(self, key: str) -> Path:
        """Final path of ``key`` (may not exist)."""
        return self._objects / key[:2] / key

    def lookup(self, key: str, size: int | None = None) -> Path | None:
        """Return the cached file for ``key`` and mark it recently used, or None.

        A file of the wrong size (a different object, or damage) is removed.
        """
        path = self.path_for(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if size is not None and st.st_size != size:
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # LRU bookkeeping: mtime = last use
        except FileNotFoundError:  # evicted by another process just now
            return None
        return path

    def lock(self, key: str) -> FileLock:
        """The inter-process lock that serialises downloads of ``key``."""
        self._locks.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self._locks / f"{key}.lock"))

    def temp_path(self, key: str) -> Path:
        """A fresh temp path next to the final one (same filesystem)."""
        folder = self._objects / key[:2]
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f".{key}.{os.getpid()}.{secrets.token_hex(4)}{_PART_SUFFIX}"

    def commit(self, temp: Path, key: str) -> Path:
        """Atomically publish a complete temp file under ``key``."""
        final = self.path_for(key)
        os.replace(temp, final)
        return final

    def files(self) -> list[CachedFile]:
        """Complete files in the cache (removes stale temp files on the way)."""
        found: list[CachedFile] = []
        if not self._objects.is_dir():
            return found
        now = time.time()
        for folder in self._objects.iterdir():
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                if entry.name.endswith(_PART_SUFFIX):
                    if now - st.st_mtime > _STALE_PART_SECONDS:
                        Path(entry.path).unlink(missing_ok=True)
                    continue
                found.append(CachedFile(Path(entry.path), st.st_size, st.st_mtime))
        return found

    def total_bytes(self) -> int:
        """Bytes held by complete files."""
        return sum(f.size for f in self.files())

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove least recently used files beyond ``max_bytes``; returns them.

        Skipped (returns []) when another process is already evicting.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.directory / ".evict.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return []
        try:
            victims = plan_eviction(self.files(), self.max_bytes, keep)
            for victim in victims:
                victim.unlink(missing_ok=True)
            return victims
        finally:
            lock.release()
