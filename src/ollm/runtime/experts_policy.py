"""Replacement policies of the expert cache (``runtime/experts.py``): which cached expert a miss
evicts. Keys are (layer, expert); ``pinned`` keys (in use by the current call) are never chosen."""

from __future__ import annotations

from collections import OrderedDict

Key = tuple[int, int]  # (layer, expert)


class Lru:
    """Least recently used first."""

    def __init__(self) -> None:
        self.order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key: Key, cached: bool) -> None:
        if cached:
            self.order.move_to_end(key)

    def add(self, key: Key) -> None:
        self.order[key] = None

    def remove(self, key: Key) -> None:
        self.order.pop(key, None)

    def victim(self, pinned: set[Key]) -> Key | None:
        return next((k for k in self.order if k not in pinned), None)


class Lfu:
    """Least frequently used first (uses counted over the whole run, also while not cached, so
    an expert evicted once keeps its history); ties go to the least recently used. The least
    count is remembered (``_lo``: None or at most every bucket's count), not found by a ``min``
    over the buckets per eviction (a decode call of a cold cache evicts ~7 times)."""

    def __init__(self) -> None:
        self.uses: dict[Key, int] = {}
        self.buckets: dict[int, OrderedDict[Key, None]] = {}
        self._lo: int | None = None

    def touch(self, key: Key, cached: bool) -> None:
        n = self.uses.get(key, 0)
        self.uses[key] = n + 1
        if cached:
            self._move(key, n, n + 1)

    def _move(self, key: Key, old: int, new: int) -> None:
        b = self.buckets.get(old)
        if b is not None:
            b.pop(key, None)
            if not b:
                del self.buckets[old]
        self._put(key, new)

    def _put(self, key: Key, n: int) -> None:
        b = self.buckets.get(n)
        if b is None:
            b = self.buckets[n] = OrderedDict()
            if self._lo is not None and n < self._lo:
                self._lo = n
        b[key] = None

    def add(self, key: Key) -> None:
        self._put(key, self.uses.get(key, 0))

    def remove(self, key: Key) -> None:
        n = self.uses.get(key, 0)
        b = self.buckets.get(n)
        if b is not None:
            b.pop(key, None)
            if not b:
                del self.buckets[n]

    def victim(self, pinned: set[Key]) -> Key | None:
        if not self.buckets:
            return None
        lo = self._lo
        if lo not in self.buckets:  # unknown or emptied: the least count is found again
            lo = self._lo = min(self.buckets)
        least = self.buckets[lo]  # usually holds an unpinned key: no sort
        k = next((k for k in least if k not in pinned), None)
        if k is not None:
            return k
        for n in sorted(self.buckets):
            for k in self.buckets[n]:
                if k not in pinned:
                    return k
        return None
