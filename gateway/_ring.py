"""The consistent-hash ring: a stable 64-bit hash and ``virtual_nodes`` points
per member, walked clockwise from a key's hash to give its preference list.
Adding or removing one of n members moves only about 1/n of the keys."""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator

__all__ = ["DEFAULT_VIRTUAL_NODES", "HashRing", "stable_hash"]

DEFAULT_VIRTUAL_NODES = 64


def stable_hash(key: str) -> int:
    """Return a 64-bit hash of ``key`` that is the same in every process.

    Python's ``hash()`` is salted per process (PYTHONHASHSEED), so two gateways
    would disagree; blake2b is stable, fast and well mixed.
    """
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class HashRing:
    """A consistent-hash ring with ``virtual_nodes`` points per member.

    The ring depends only on the *set* of members, never on the order they were
    added: points are sorted by (hash, member id), so even a hash collision
    breaks the same way everywhere.
    """

    def __init__(self, *, virtual_nodes: int = DEFAULT_VIRTUAL_NODES) -> None:
        if virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be >= 1, got {virtual_nodes}")
        self.virtual_nodes = virtual_nodes
        self._members: set[str] = set()
        self._points: list[tuple[int, str]] = []
        self._hashes: list[int] = []
        self._dirty = False

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, member: object) -> bool:
        return member in self._members

    def __repr__(self) -> str:
        return f"HashRing(members={len(self._members)}, virtual_nodes={self.virtual_nodes})"

    @property
    def members(self) -> list[str]:
        """The members, sorted."""
        return sorted(self._members)

    def add(self, member: str) -> None:
        """Add ``member`` (no-op if present)."""
        if member in self._members:
            return
        self._members.add(member)
        self._points.extend(
            (stable_hash(f"{member}#{i}"), member) for i in range(self.virtual_nodes)
        )
        # Sorting is deferred to the next lookup so adding many members is O(P log P) once.
        self._dirty = True

    def remove(self, member: str) -> None:
        """Remove ``member`` (no-op if absent)."""
        if member not in self._members:
            return
        self._members.discard(member)
        self._points = [p for p in self._points if p[1] != member]
        self._hashes = [p[0] for p in self._points]

    def _ensure_sorted(self) -> None:
        if self._dirty:
            self._points.sort()
            self._hashes = [p[0] for p in self._points]
            self._dirty = False

    def walk(self, key: str) -> Iterator[str]:
        """Yield the distinct members clockwise from ``stable_hash(key)``.

        This is the key's preference list; the first member is its home.
        """
        self._ensure_sorted()
        points = self._points
        n_points = len(points)
        if not n_points:
            return
        n_members = len(self._members)
        start = bisect.bisect_left(self._hashes, stable_hash(key))
        seen: set[str] = set()
        for i in range(n_points):
            member = points[(start + i) % n_points][1]
            if member not in seen:
                seen.add(member)
                yield member
                if len(seen) == n_members:
                    return

    def preference_list(self, key: str, limit: int | None = None) -> list[str]:
        """Return the first ``limit`` members (all when None) of ``walk(key)``."""
        out: list[str] = []
        for member in self.walk(key):
            if limit is not None and len(out) >= limit:
                break
            out.append(member)
        return out
