"""A block pool that keeps each sequence's blocks in one run of consecutive ids.

The CPU attends a decode batch over a host pool by one attention call over ``[B, kv_heads, S,
D]`` K/V. With blocks scattered through the pool that tensor must first be gathered (a copy the
size of the whole batch's KV, every layer and step: on the H200 host the gather cost more than
the attention). A sequence whose blocks are consecutive ids is one strided view of a head-major
pool (`kv/paged.py`), and a batch of such sequences whose first blocks lie on one grid (the
*slabs*: ``slab_blocks`` blocks each) is one strided view of all of them: no copy at all.

`SlabPool` places a sequence's first block at the start of a free slab and each next block right
after its previous one, while that block is free and in the same slab; otherwise (no free slab,
a sequence longer than its slab, prefix blocks shared with another sequence, swapped blocks) it
falls back to the plain free list, and attention falls back to the gather. Placement never
changes results, only which copy the attention needs.

Bookkeeping: a block taken out of the middle of the free deque leaves a *stale* entry there
(per block: entries minus stale count is 1 while it is free, else 0), skipped when popped; the
free list's own allocations pop from its end, the last slabs, away from the first sequences'
tails; per slab, the blocks not free (``held``) and the blocks
referenced (``refd``) say whether a slab is free (no held block) or reusable (only cached prefix
blocks, which a fresh sequence may evict as the free list would).
"""

from __future__ import annotations

from collections import Counter

from ollm.kv.blocks import BlockPool, OutOfBlocks

FREE, CACHED, USED = 0, 1, 2


class SlabPool(BlockPool):
    """A `BlockPool` of ``num_blocks`` whose sequences start on ``slab_blocks``-block slabs."""

    def __init__(self, tier: str, num_blocks: int, slab_blocks: int) -> None:
        super().__init__(tier, num_blocks)
        if slab_blocks < 1:
            raise ValueError(f"slab_blocks must be >= 1, got {slab_blocks}")
        self.slab_blocks = slab_blocks
        self._stale: Counter[int] = Counter()  # free-deque entries of blocks taken directly
        self._nstale = 0
        n = num_blocks // slab_blocks  # whole slabs; a tail shorter than a slab is never one
        self._held = [0] * n
        self._refd = [0] * n

    @property
    def num_free(self) -> int:
        return len(self._free) - self._nstale + len(self._lru)

    def state(self, block: int) -> int:
        """FREE, CACHED (unreferenced, keyed) or USED."""
        if self._refs[block]:
            return USED
        return CACHED if block in self._lru else FREE

    def _track(self, block: int, before: int) -> None:
        s = block // self.slab_blocks
        if s < len(self._held):
            after = self.state(block)
            self._held[s] += (after != FREE) - (before != FREE)
            self._refd[s] += (after == USED) - (before == USED)

    def free_slab(self) -> int | None:
        """The first slab with no held block, else the first with only cached ones."""
        for want in (self._held, self._refd):
            for s, n in enumerate(want):
                if n == 0:
                    return s
        return None

    def _take(self, block: int) -> int:
        before = self.state(block)
        if before == CACHED:
            del self._lru[block]
            self._by_key.pop(self._key_of.pop(block), None)
        else:  # FREE: its deque entry goes stale
            self._stale[block] += 1
            self._nstale += 1
        self._refs[block] = 1
        self._track(block, before)
        return block

    def allocate(self, after: int | None = None, fresh: bool = False) -> int:
        """The block right after ``after`` when free in the same slab; the first block of a
        free slab for a ``fresh`` sequence; else the free list's next (`BlockPool.allocate`)."""
        slab = self.slab_blocks
        if after is not None:
            nxt = after + 1
            if nxt // slab == after // slab and nxt // slab < len(self._held):
                if self.state(nxt) != USED:
                    return self._take(nxt)
        elif fresh:
            s = self.free_slab()
            if s is not None:
                return self._take(s * slab)
        while self._free:  # from the end: the last slabs, away from the first sequences' tails
            block = self._free.pop()
            if self._stale[block]:
                self._stale[block] -= 1
                self._nstale -= 1
                continue
            self._refs[block] = 1
            self._track(block, FREE)
            return block
        if not self._lru:
            raise OutOfBlocks(f"tier {self.tier!r}: all {self.num_blocks} blocks in use")
        block = super().allocate()  # the least recently used cached block
        self._track(block, CACHED)
        return block

    def incref(self, block: int) -> None:
        if self._refs[block]:  # used before and after: no slab count changes
            self._refs[block] += 1
            return
        before = self.state(block)
        super().incref(block)
        self._track(block, before)

    def decref(self, block: int) -> None:
        before = self.state(block)
        super().decref(block)
        self._track(block, before)

    def unregister(self, block: int) -> bytes | None:
        before = self.state(block)
        key = super().unregister(block)
        self._track(block, before)
        return key
