"""Blocks of one KV tier (free list, reference counts, prefix keys, an LRU of cached blocks) and
the chained prefix keys that name full blocks (split out of `kv/blocks.py`, which re-exports
them; nothing here moves bytes)."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence


class OutOfBlocks(RuntimeError):
    """No free (or evictable) block is left in the tiers asked for."""


def chain_keys(tokens: Sequence[int], block_tokens: int, keys: Sequence[bytes] = ()) -> list[bytes]:
    """Prefix keys of every full block of ``tokens``; ``keys`` (already known ones) are reused."""
    n = len(tokens) // block_tokens
    out = list(keys[:n])
    # the new blocks' tokens as bytes at once; blake2b(a + b) is blake2b fed a, then b
    raw = memoryview(array("q", tokens[len(out) * block_tokens : n * block_tokens]).tobytes())
    step = 8 * block_tokens
    prev = out[-1] if out else b""
    for o in range(0, len(raw), step):
        prev = hashlib.blake2b(prev + raw[o : o + step], digest_size=16).digest()
        out.append(prev)
    return out


class BlockPool:
    """Blocks of one tier: free list, reference counts, prefix keys and an LRU of cached blocks.

    A block is *used* while referenced, *cached* when unreferenced but keyed (reusable by a later
    prefix hit, evicted oldest first when a fresh block is needed) and *free* otherwise.
    """

    def __init__(self, tier: str, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.tier = tier
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}
        self._by_key: dict[bytes, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free ones plus evictable cached ones."""
        return len(self._free) + len(self._lru)

    @property
    def num_used(self) -> int:
        """Referenced blocks."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Unreferenced blocks kept for prefix hits."""
        return len(self._lru)

    def ref(self, block: int) -> int:
        """Reference count of ``block``."""
        return self._refs[block]

    def key(self, block: int) -> bytes | None:
        """The prefix key of ``block``, if registered."""
        return self._key_of.get(block)

    def allocate(self, after: int | None = None, fresh: bool = False) -> int:
        """A block with one reference: a free one, else the least recently used cached one.
        ``after`` (the sequence's last block here) and ``fresh`` (its first block) are hints a
        placement-aware pool (`kv.slabs.SlabPool`) uses; this one ignores them."""
        if self._free:
            block = self._free.popleft()
        elif self._lru:
            block, _ = self._lru.popitem(last=False)
            self.unregister(block)
        else:
            raise OutOfBlocks(f"tier {self.tier!r}: all {self.num_blocks} blocks in use")
        self._refs[block] = 1
        return block

    def incref(self, block: int) -> None:
        """Add a reference (a fork, or a prefix hit that revives a cached block)."""
        if self._refs[block] == 0:
            self._lru.pop(block)  # only cached blocks are unreferenced and reachable
        self._refs[block] += 1

    def decref(self, block: int) -> None:
        """Drop a reference; at zero the block becomes cached (keyed) or free."""
        if self._refs[block] <= 0:
            raise RuntimeError(f"tier {self.tier!r}: block {block} freed twice")
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if block in self._key_of:
                self._lru[block] = None
            else:
                self._free.append(block)

    def lookup(self, key: bytes) -> int | None:
        """The block holding prefix ``key``, if any (references unchanged)."""
        return self._by_key.get(key)

    def register(self, block: int, key: bytes) -> bool:
        """Key a full, referenced block; False when another block already holds ``key``."""
        old = self._key_of.get(block)
        if old is not None:
            if old != key:
                raise RuntimeError(f"block {block} already keyed with another prefix")
            return True
        if key in self._by_key:
            return False
        self._key_of[block] = key
        self._by_key[key] = block
        return True

    def unregister(self, block: int) -> bytes | None:
        """Forget ``block``'s key (its content is about to change or move); return the key."""
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._by_key[key]
        if block in self._lru:  # unreferenced and no longer keyed: plain free
            del self._lru[block]
            self._free.append(block)
        return key
