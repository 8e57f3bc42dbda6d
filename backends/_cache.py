"""Local disk cache of downloaded artifacts, shared by the processes of a host.

Layout under the cache directory::

    objects/ab/abcdef...      complete files, named by key (sha256)
    objects/ab/.abcdef...part in-progress downloads (same folder: atomic rename)
    locks/abcdef....lock      one file lock per key: one download at a time
    confirmed/0123...         symlink per object (sha256 of its identity) to the
                              file of the version the remote last confirmed current
    .evict.lock               the cache-wide lock held by a cleanup

Invariants: a file under its final name is complete (written to a temp name,
fsynced, then ``os.replace``d); a key names one version of one object (the
version token is part of the key), so a changed object gets a new key and is
fetched again; the least recently used files (by mtime, bumped on every hit)
are removed once the total passes ``max_bytes``. Removing a file another
process has memory-mapped or open is safe on POSIX: the inode lives on.

Cleanups run one at a time under the cache-wide lock, and every process
runs one after each download (waiting for a running one rather than
skipping it), so a file published while another process was scanning is
counted by the next scan: the bound holds across processes up to the
downloads in progress (temp files are not counted).

Lock files: a cleanup also removes the lock file of every key whose cache
file is gone, but only while holding that lock (taken without blocking; a
lock in use is left alone). A process that opened the lock file before the
removal then holds a lock on an unlinked inode, so :class:`KeyLock` checks,
after locking, that the path still names the inode it locked, and starts
over if not: two processes never both believe they hold one key's lock.
Locks are ``flock`` locks (POSIX), released by the kernel when their
holder dies.

Stale-if-error: a file is found by its key, and its key needs the object's
current version from the remote. When the remote cannot be reached, the
``confirmed/`` link of the object names the version the remote last said
was current, and that file is served if the cache still holds it. A link
is replaced (atomically, ``os.replace`` of a fresh symlink) each time the
remote confirms another version, and a cleanup removes links whose file is
gone. Losing a link (a cleanup racing a re-download) costs only a stale
serve, never a wrong one: a link only ever names a complete file of that
object.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_PART_SUFFIX = ".part"
_LOCK_SUFFIX = ".lock"
# A temp file this old belongs to a process that died mid-download.
_STALE_PART_SECONDS = 3600.0
# Polling interval of a lock wait: flock has no timeout of its own.
_LOCK_POLL_SECONDS = 0.02
# A cleanup is a directory scan; waiting longer than this for one means a
# stuck process, and the next download's cleanup will catch up.
_EVICT_WAIT_SECONDS = 30.0


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


class LockTimeout(TimeoutError):
    """A :class:`KeyLock` was not acquired within the timeout."""


class KeyLock:
    """An exclusive inter-process lock on a lock file (``flock``), safe
    against the file being removed by a cleanup (see the module docstring).

    Not reentrant; one holder per instance. Blocking: call it from a
    worker thread.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __repr__(self) -> str:
        return f"KeyLock(path={str(self.path)!r}, held={self._fd is not None})"

    @property
    def is_locked(self) -> bool:
        """Whether this instance holds the lock."""
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; never blocks."""
        assert self._fd is None, "KeyLock is not reentrant"
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    return False
                raise
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = -1
            if current == os.fstat(fd).st_ino:
                self._fd = fd
                return True
            # A cleanup removed the file between our open and our flock:
            # the lock we hold guards nothing. Start over on the new file.
            os.close(fd)

    def acquire(self, timeout: float) -> None:
        """Take the lock, polling up to ``timeout`` seconds.

        Raises:
            LockTimeout: The lock stayed held by someone else.
        """
        deadline = time.monotonic() + timeout
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                raise LockTimeout(f"{self.path} is held by another process")
            time.sleep(_LOCK_POLL_SECONDS)  # flock has no timeout: poll

    def release(self) -> None:
        """Release the lock (closing the descriptor drops the flock)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskCache:
    """The on-disk cache; cheap to construct, all state is in the directory.

    Methods do blocking file I/O: call them from a worker thread.
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._objects = directory / "objects"
        self._locks = directory / "locks"
        self._confirmed = directory / "confirmed"

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

    def _confirmed_link(self, identity: str) -> Path:
        return self._confirmed / hashlib.sha256(identity.encode()).hexdigest()

    def confirm(self, identity: str, key: str) -> None:
        """Record ``key`` as the version of ``identity`` the remote last said is current.

        Costs one ``readlink`` when nothing changed.
        """
        link = self._confirmed_link(identity)
        target = os.path.join("..", "objects", key[:2], key)
        try:
            if os.readlink(link) == target:
                return
        except OSError:
            pass
        self._confirmed.mkdir(parents=True, exist_ok=True)
        temp = link.with_name(f".{link.name}.{os.getpid()}.{secrets.token_hex(4)}")
        os.symlink(target, temp)
        os.replace(temp, link)

    def confirmed_key(self, identity: str) -> str | None:
        """Key of the version of ``identity`` the remote last confirmed (the
        file may be gone), or None if none was recorded."""
        try:
            return os.path.basename(os.readlink(self._confirmed_link(identity)))
        except OSError:
            return None

    def last_confirmed(self, identity: str) -> Path | None:
        """The cached file of the version of ``identity`` the remote last
        confirmed (marked recently used), or None if the cache does not hold it."""
        key = self.confirmed_key(identity)
        return None if key is None else self.lookup(key)

    def lock(self, key: str) -> KeyLock:
        """The inter-process lock that serialises downloads of ``key``."""
        self._locks.mkdir(parents=True, exist_ok=True)
        return KeyLock(self._locks / f"{key}{_LOCK_SUFFIX}")

    def temp_path(self, key: str) -> Path:
        """A fresh temp path next to the final one (same filesystem)."""
        folder = self._objects / key[:2]
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f".{key}.{os.getpid()}.{secrets.token_hex(4)}{_PART_SUFFIX}"

    def commit(self, temp: Path, key: str, *, fsync: bool = True) -> Path:
        """Atomically publish a complete temp file under ``key``.

        With ``fsync``, the data reach the disk before the name does; the
        directory is not synced: a rename lost in a crash is a cache miss.
        """
        if fsync:
            fsync_file(temp)
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

    def lock_files(self) -> list[Path]:
        """Lock files present in the cache."""
        if not self._locks.is_dir():
            return []
        return [Path(e.path) for e in os.scandir(self._locks) if e.name.endswith(_LOCK_SUFFIX)]

    def evict(
        self, keep: Path | None = None, *, timeout: float = _EVICT_WAIT_SECONDS
    ) -> list[Path]:
        """Remove least recently used files beyond ``max_bytes``; returns them.

        Runs under the cache-wide lock, waiting up to ``timeout`` for a
        cleanup of another process (returns [] if it does not finish), then
        removes idle lock files of keys no longer cached.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        lock = KeyLock(self.directory / ".evict.lock")
        try:
            lock.acquire(timeout)
        except LockTimeout:
            return []
        try:
            victims = plan_eviction(self.files(), self.max_bytes, keep)
            for victim in victims:
                victim.unlink(missing_ok=True)
            self._remove_stale_locks()
            self._remove_dangling_links()
            return victims
        finally:
            lock.release()

    def _remove_dangling_links(self) -> None:
        if not self._confirmed.is_dir():
            return
        now = time.time()
        for entry in os.scandir(self._confirmed):
            try:
                if entry.name.startswith("."):
                    # a temp link of a process that died between symlink and replace
                    if now - entry.stat(follow_symlinks=False).st_mtime > _STALE_PART_SECONDS:
                        os.unlink(entry.path)
                elif not os.path.exists(entry.path):  # follows the link
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue

    def _remove_stale_locks(self) -> list[Path]:
        removed: list[Path] = []
        for path in self.lock_files():
            key = path.name[: -len(_LOCK_SUFFIX)]
            if self.path_for(key).exists():
                continue  # cheap pre-check; a cached key is not downloaded again
            lock = KeyLock(path)
            if not lock.try_acquire():
                continue  # a download of this key is running or waiting
            try:
                # Checked again under the lock: a download may have finished
                # between the pre-check and the acquire.
                if not self.path_for(key).exists():
                    path.unlink(missing_ok=True)
                    removed.append(path)
            finally:
                lock.release()
        return removed
