"""The consistent-hash ring: a stable 64-bit hash and ``virtual_nodes`` points
per member, walked clockwise from a key's hash to give its preference list.
Adding or removing one of n members moves only about 1/n of the keys."""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Iterable, Iterator

__all__ = [
    "DEFAULT_PREFIX_CACHE_SIZE",
    "DEFAULT_VIRTUAL_NODES",
    "CachedRing",
    "HashRing",
    "stable_hash",
]

DEFAULT_VIRTUAL_NODES = 64
DEFAULT_PREFIX_CACHE_SIZE = 131_072
_PREFIX_LEN = 4  # preference-list prefix cached per key


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


class CachedRing:
    """A :class:`HashRing` that keeps the first few members of the preference
    lists of the ``cache_size`` keys walked most recently (an LRU; 0: none).

    Most walks stop within those first members, so they cost a dictionary
    lookup instead of a hash and a bisect; the rest of a walk is computed only
    when a caller reads past them. Membership goes through :meth:`add` and
    :meth:`remove`, which forget every cached prefix.
    """

    def __init__(
        self,
        *,
        virtual_nodes: int = DEFAULT_VIRTUAL_NODES,
        cache_size: int = DEFAULT_PREFIX_CACHE_SIZE,
    ) -> None:
        self.ring = HashRing(virtual_nodes=virtual_nodes)
        self._members = 0
        self._prefixes: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self._cache_size = max(0, cache_size)

    def __repr__(self) -> str:
        return f"CachedRing({self.ring!r}, cached_prefixes={len(self._prefixes)})"

    def add(self, member: str) -> None:
        """Add ``member`` to the ring (no-op if present)."""
        self.ring.add(member)
        self._members = len(self.ring)
        self._prefixes.clear()

    def remove(self, member: str) -> None:
        """Remove ``member`` from the ring (no-op if absent)."""
        self.ring.remove(member)
        self._members = len(self.ring)
        self._prefixes.clear()

    def walk(self, key: str) -> Iterable[str]:
        """The preference list of ``key``, as :meth:`HashRing.walk` yields it."""
        prefix = self._prefixes.get(key)
        if prefix is None:
            prefix = tuple(self.ring.preference_list(key, _PREFIX_LEN))
            if self._cache_size:
                self._prefixes[key] = prefix
                if len(self._prefixes) > self._cache_size:
                    self._prefixes.popitem(last=False)
        else:
            self._prefixes.move_to_end(key)
        if len(prefix) < _PREFIX_LEN or self._members == _PREFIX_LEN:
            return prefix
        return itertools.chain(prefix, self._walk_beyond_prefix(key))

    def _walk_beyond_prefix(self, key: str) -> Iterator[str]:
        walk = self.ring.walk(key)
        for _ in range(_PREFIX_LEN):
            next(walk)
        yield from walk
