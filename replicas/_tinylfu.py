"""LRU with TinyLFU admission: the frequency-aware eviction policy (``"tinylfu"``).

Held models are kept in LRU order, as with :class:`~muxgate.replicas._lru.LRU`,
but a newly built model takes the least recently used one's place only if it
has been asked for more often than that victim ("TinyLFU: A Highly Efficient
Cache Admission Policy", Einziger, Friedman, Manes). A model asked for once
(a scan, a one-off) then no longer throws out a model in steady use; a model
refused is still loaded and handed to the requests that asked for it, and
dropped when they finish.

Frequencies come from a count-min sketch (:class:`FrequencySketch`): ``depth``
rows of counters indexed by independent hashes of the id, each access adds
one to the id's counter in every row, and the estimate is the smallest of
them (collisions only ever inflate it). Counters saturate at 15 as in
Caffeine, and aging halves every counter once ``sample_size`` accesses were
counted, so the sketch follows popularity that shifts and its memory is
fixed however many ids pass through.

Why written here rather than taken from a library: theine (W-TinyLFU) and
cachetools own their storage and evict on their own when an insert
overflows, so they cannot skip a model pinned by a request in flight, wait
for a load to succeed before evicting, or hand a refused model to the
requests that asked for it. The model cache needs only the admission
decision from a policy; the sketch that makes it is ~50 lines.
"""

from __future__ import annotations

import hashlib

from muxgate.replicas._lru import LRU

__all__ = ["FrequencySketch", "TinyLFU"]

_MAX_COUNT = 15  # 4-bit counters, as Caffeine's
_HALVED = bytes(count >> 1 for count in range(256))  # aging as one bytes.translate per row


class FrequencySketch:
    """Approximate access counts in fixed memory (count-min sketch with aging).

    Args:
        width: counters per row (rounded up to a power of two).
        depth: rows, each with its own hash.
        sample_size: accesses after which every counter is halved.
    """

    __slots__ = ("_additions", "_mask", "_rows", "depth", "sample_size")

    def __init__(self, width: int = 256, depth: int = 4, sample_size: int = 1000) -> None:
        if width < 1 or depth < 1 or sample_size < 1:
            raise ValueError("width, depth and sample_size must be at least 1")
        size = 1 << (width - 1).bit_length()
        self._mask = size - 1
        self.depth = depth
        self.sample_size = sample_size
        self._rows = [bytearray(size) for _ in range(depth)]
        self._additions = 0

    def _indexes(self, key: str) -> list[int]:
        # One 64-bit stable digest split into depth slices (not Python's salted hash():
        # every replica and every run count alike).
        digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=16).digest(), "little")
        return [(digest >> (16 * row)) & self._mask for row in range(self.depth)]

    def increment(self, key: str) -> None:
        """Count one access of ``key``; halves every counter at each ``sample_size``."""
        for row, index in zip(self._rows, self._indexes(key), strict=True):
            if row[index] < _MAX_COUNT:
                row[index] += 1
        self._additions += 1
        if self._additions >= self.sample_size:
            self._age()

    def frequency(self, key: str) -> int:
        """Estimated recent accesses of ``key`` (never below the true count since aging)."""
        return min(row[index] for row, index in zip(self._rows, self._indexes(key), strict=True))

    def _age(self) -> None:
        for row in self._rows:
            row[:] = row.translate(_HALVED)
        self._additions //= 2

    def __repr__(self) -> str:
        return (
            f"<FrequencySketch {self.depth}x{self._mask + 1} "
            f"additions={self._additions}/{self.sample_size}>"
        )


class TinyLFU(LRU):
    """LRU order, TinyLFU admission: see the module docstring.

    Args:
        capacity: the cache's capacity (``-1``: no limit); sizes the sketch:
            counters are halved every ``max(100, 50 * capacity)`` accesses
            (10,000 without a limit), with 16 counters per access of that
            window in each of 4 rows (at most 65,536). Caffeine ages every
            10 x capacity; with a capacity of 4 models that halves counts
            every 40 requests, too often to tell a model asked for every 10
            requests from one asked for every 30: replaying the peer
            benchmark's Zipf(1.1) sequences (tests/unit/test_tinylfu.py),
            50 x capacity came within 0.007 of exact counts at 20 and 100
            models, 10 x capacity lost 0.013 and 0.047.
    """

    __slots__ = ("sketch",)

    name = "tinylfu"

    def __init__(self, capacity: int = 3) -> None:
        super().__init__()
        sample = max(100, 50 * capacity) if capacity > 0 else 10_000
        self.sketch = FrequencySketch(width=min(65_536, 16 * sample), sample_size=sample)

    def access(self, model_id: str) -> None:
        self.sketch.increment(model_id)
        super().access(model_id)

    def admit(self, candidate: str, victim: str) -> bool:
        return self.sketch.frequency(candidate) > self.sketch.frequency(victim)

    def __repr__(self) -> str:
        return f"<TinyLFU {list(self.order())} {self.sketch!r}>"
