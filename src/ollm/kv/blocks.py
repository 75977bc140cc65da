"""Paged KV bookkeeping without tensors: block pools per tier, block tables per sequence.

A tier (``"gpu"``, ``"cpu"``, ``"disk"``, any name) holds a fixed number of blocks of
``block_tokens`` KV slots each. A sequence's `BlockTable` lists the blocks that hold its
positions ``[i * block_tokens, (i + 1) * block_tokens)`` and its own length. One manager serves one
*KV group*: all layers whose tables have the same shape (all full-attention layers, or all
sliding-window layers of one window); a block id indexes the same slot in each layer's pool.

Nothing here moves bytes. Operations that need data moved (a copy-on-write of a shared last
block, a swap between tiers) return `BlockMove` lists which the tensor side (`kv/paged.py`)
executes, in order, before the next forward.

Prefix sharing: a full block is keyed by ``blake2b(previous key, its token ids)``, so a key names
the whole prefix up to the block's end; the KV of a block is a function of that prefix only, which
is what makes reusing it exact. Unreferenced keyed blocks stay cached and are evicted LRU
(`kv/block_pool.py`). While a step is planned, the full blocks it computes are offered to the
admissions after them in that step (`offer_inflight`), unkeyed until computed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ollm.kv.block_pool import BlockPool as BlockPool  # re-exported
from ollm.kv.block_pool import OutOfBlocks as OutOfBlocks
from ollm.kv.block_pool import chain_keys as chain_keys
from ollm.planning.footprint import max_live_blocks


@dataclass(frozen=True)
class BlockRef:
    """One physical block: its tier and index in that tier's pool."""

    tier: str
    block: int


@dataclass(frozen=True)
class BlockMove:
    """Copy the whole block ``src_tier[src_block]`` into ``dst_tier[dst_block]`` (every layer)."""

    src_tier: str
    src_block: int
    dst_tier: str
    dst_block: int


@dataclass
class BlockTable:
    """One sequence's blocks in one KV group and its length.

    ``blocks[i]`` holds positions ``[i * block_tokens, (i + 1) * block_tokens)``; ``None`` marks a
    block a sliding window released (always a leading run of ``dropped`` entries). There are
    always ``ceil(length / block_tokens)`` entries.
    """

    block_tokens: int
    blocks: list[BlockRef | None] = field(default_factory=list)
    length: int = 0
    dropped: int = 0
    num_keyed: int = 0  # leading full blocks already registered (or adopted) under their key

    @property
    def start_token(self) -> int:
        """First position whose KV is still held (0 without a window)."""
        return self.dropped * self.block_tokens

    def slot(self, pos: int) -> tuple[BlockRef, int]:
        """The block and offset that hold position ``pos``."""
        ref = self.blocks[pos // self.block_tokens] if 0 <= pos < self.length else None
        if ref is None:
            raise IndexError(
                f"position {pos} is not held (start {self.start_token}, length {self.length})"
            )
        return ref, pos % self.block_tokens

    def snapshot(self) -> tuple[BlockRef | None, ...]:
        """An immutable copy of the block list for a step plan."""
        return tuple(self.blocks)


class BlockManager:
    """Allocation, trim, fork, free, swap and prefix sharing for the tables of one KV group.

    ``alloc_tiers`` (fastest first) serve running sequences; ``swap_tier`` receives the blocks of
    preempted ones. ``window`` (tokens, HF ``sliding_window`` semantics: a query at position p
    sees keys ``> p - window``) makes appends release blocks that no later query can see.
    """

    def __init__(
        self,
        block_tokens: int,
        pools: Mapping[str, int | BlockPool],
        alloc_tiers: Sequence[str] | None = None,
        swap_tier: str | None = None,
        window: int | None = None,
    ) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.block_tokens = block_tokens
        self.pools = {
            t: n if isinstance(n, BlockPool) else BlockPool(t, n) for t, n in pools.items()
        }
        self.alloc_tiers = tuple(alloc_tiers) if alloc_tiers is not None else tuple(pools)
        self.swap_tier = swap_tier
        for tier in (*self.alloc_tiers, *([swap_tier] if swap_tier else [])):
            if tier not in self.pools:
                raise ValueError(f"tier {tier!r} has no pool (pools: {list(self.pools)})")
        if swap_tier in self.alloc_tiers:
            raise ValueError(f"swap tier {swap_tier!r} is also an allocation tier")
        self.window = window
        self._made: dict[str, dict[int, BlockRef]] = {}  # `_lookups`' refs, per tier and block
        # Blocks the step being planned computes in full, by prefix key (`offer_inflight`).
        self._inflight: dict[bytes, BlockRef] = {}
        self.prefix_hits = 0
        self.prefix_saved_tokens = 0

    # -- capacity ---------------------------------------------------------------------------

    def num_free(self, tiers: Sequence[str] | None = None) -> int:
        """Allocatable blocks in ``tiers`` (default: the allocation tiers)."""
        return sum(self.pools[t].num_free for t in (tiers or self.alloc_tiers))

    def usage(self) -> dict[str, tuple[int, int]]:
        """(used, free) blocks per tier; cached prefix blocks count as free."""
        return {t: (p.num_used, p.num_free) for t, p in self.pools.items()}

    def max_live_blocks(self, num_tokens: int, max_query: int) -> int:
        """Most blocks a sequence of ``num_tokens`` holds at once when steps carry at most
        ``max_query`` tokens (a window keeps ``window - 1`` earlier keys plus the step)."""
        return max_live_blocks(self.block_tokens, self.window, num_tokens, max_query)

    def capacity_blocks(self) -> int:
        """Blocks of all allocation tiers."""
        return sum(self.pools[t].num_blocks for t in self.alloc_tiers)

    # -- tables -----------------------------------------------------------------------------

    def new_table(self) -> BlockTable:
        """An empty table."""
        return BlockTable(self.block_tokens)

    def _first_needed(self, length: int) -> int:
        """Index of the first block a query at position ``length`` can see."""
        if self.window is None:
            return 0
        return max(0, length - self.window + 1) // self.block_tokens

    def _allocate(self, prev: BlockRef | None = None, fresh: bool = False) -> BlockRef:
        """A block of the first allocation tier with one free; ``prev`` (the table's last block)
        and ``fresh`` (its first) are placement hints for the pool."""
        for tier in self.alloc_tiers:
            pool = self.pools[tier]
            if pool.num_free:
                after = prev.block if prev is not None and prev.tier == tier else None
                return BlockRef(tier, pool.allocate(after, fresh))
        raise OutOfBlocks(f"no free KV block in tiers {list(self.alloc_tiers)}")

    def _last_needs_copy(self, table: BlockTable) -> bool:
        """The partially filled last block is shared, so the next write must copy it."""
        if table.length % self.block_tokens == 0:
            return False
        ref = table.blocks[-1]
        assert ref is not None  # a window never releases the block being written
        return self.pools[ref.tier].ref(ref.block) > 1

    def blocks_needed(self, table: BlockTable, n: int) -> int:
        """Net fresh blocks `append(table, n)` takes (new blocks + a copy - window releases)."""
        new = -(-(table.length + n) // self.block_tokens) - len(table.blocks)
        released = 0
        for ref in table.blocks[table.dropped : self._first_needed(table.length)]:
            assert ref is not None
            pool = self.pools[ref.tier]
            released += ref.tier in self.alloc_tiers and pool.ref(ref.block) == 1
        return new + self._last_needs_copy(table) - released

    def can_append(self, table: BlockTable, n: int) -> bool:
        """Whether `append(table, n)` would succeed."""
        return self.blocks_needed(table, n) <= self.num_free()

    def append(self, table: BlockTable, n: int) -> list[BlockMove]:
        """Make room for ``n`` more tokens; return the copies to run before writing.

        All or nothing: raises `OutOfBlocks` with the table unchanged.
        """
        if n < 0:
            raise ValueError(f"cannot append {n} tokens")
        if not self.can_append(table, n):
            raise OutOfBlocks(
                f"appending {n} tokens needs {self.blocks_needed(table, n)} blocks, "
                f"{self.num_free()} free in {list(self.alloc_tiers)}"
            )
        self._release_window(table)
        moves: list[BlockMove] = []
        if n and table.length % self.block_tokens:
            moves += self._make_last_writable(table)
        for _ in range(-(-(table.length + n) // self.block_tokens) - len(table.blocks)):
            prev = table.blocks[-1] if table.blocks else None
            table.blocks.append(self._allocate(prev, not table.blocks))
        table.length += n
        return moves

    def _release_window(self, table: BlockTable) -> None:
        first = self._first_needed(table.length)
        for i in range(table.dropped, first):
            ref = table.blocks[i]
            assert ref is not None
            self.pools[ref.tier].decref(ref.block)
            table.blocks[i] = None
        table.dropped = max(table.dropped, first)

    def _make_last_writable(self, table: BlockTable) -> list[BlockMove]:
        ref = table.blocks[-1]
        assert ref is not None
        pool = self.pools[ref.tier]
        if pool.ref(ref.block) == 1:
            # Only we hold it: write in place, but its content no longer matches its key.
            if pool.key(ref.block) is not None:  # (unkeyed and referenced: nothing to undo)
                pool.unregister(ref.block)
            return []
        copy = self._allocate()
        pool.decref(ref.block)
        table.blocks[-1] = copy
        return [BlockMove(ref.tier, ref.block, copy.tier, copy.block)]

    def trim(self, table: BlockTable, n: int) -> None:
        """Roll back the last ``n`` tokens, releasing blocks past the new end (O(blocks))."""
        if not 0 <= n <= table.length:
            raise ValueError(f"cannot trim {n} of {table.length} tokens")
        new_len = table.length - n
        if self._first_needed(new_len) < table.dropped:
            raise ValueError(
                f"trim to {new_len} needs KV the window already released (held from "
                f"{table.start_token}); trim at most the tokens of the last append"
            )
        keep = -(-new_len // self.block_tokens)
        for ref in reversed(table.blocks[keep:]):
            assert ref is not None
            self.pools[ref.tier].decref(ref.block)
        del table.blocks[keep:]
        table.length = new_len
        table.num_keyed = min(table.num_keyed, new_len // self.block_tokens)

    def fork(self, table: BlockTable) -> BlockTable:
        """A second table sharing every block (copy-on-write of the last one at the next
        append of either)."""
        for ref in table.blocks:
            if ref is not None:
                self.pools[ref.tier].incref(ref.block)
        return BlockTable(
            self.block_tokens, list(table.blocks), table.length, table.dropped, table.num_keyed
        )

    def free(self, table: BlockTable) -> None:
        """Release every block; the tail first, so cached prefix blocks are evicted tail first."""
        for ref in reversed(table.blocks):
            if ref is not None:
                self.pools[ref.tier].decref(ref.block)
        table.blocks.clear()
        table.length = table.dropped = table.num_keyed = 0

    # -- swapping ---------------------------------------------------------------------------

    def _movable(self, table: BlockTable, into: Sequence[str]) -> list[int]:
        """Indices of exclusively owned blocks outside ``into`` (shared ones stay: moving them
        would free nothing and break the other holders)."""
        return [
            i
            for i, ref in enumerate(table.blocks)
            if ref is not None and ref.tier not in into and self.pools[ref.tier].ref(ref.block) == 1
        ]

    def swap_out_blocks(self, table: BlockTable) -> int:
        """Blocks `swap_out` would move."""
        return len(self._movable(table, [self.swap_tier] if self.swap_tier else []))

    def swap_in_blocks(self, table: BlockTable) -> int:
        """Blocks `swap_in` would move."""
        return len(self._movable(table, self.alloc_tiers))

    def swap_out(self, table: BlockTable) -> list[BlockMove]:
        """Move the table's own blocks to the swap tier (a preempted sequence); only allocation
        tiers hold keyed blocks, so prefix hits look there alone."""
        if self.swap_tier is None:
            raise OutOfBlocks("this KV group has no swap tier")
        return self._move(table, [self.swap_tier])

    def swap_in(self, table: BlockTable) -> list[BlockMove]:
        """Move the table's blocks back to the allocation tiers."""
        return self._move(table, self.alloc_tiers)

    def _move(self, table: BlockTable, into: Sequence[str]) -> list[BlockMove]:
        idx = self._movable(table, into)
        if len(idx) > self.num_free(into):
            raise OutOfBlocks(f"moving {len(idx)} blocks, {self.num_free(into)} free in {into}")
        moves = []
        for i in idx:
            src = table.blocks[i]
            assert src is not None
            dst = next(t for t in into if self.pools[t].num_free)
            dst_ref = BlockRef(dst, self.pools[dst].allocate())
            # A keyed source keeps its key: unreferenced, it stays cached for prefix hits.
            self.pools[src.tier].decref(src.block)
            table.blocks[i] = dst_ref
            moves.append(BlockMove(src.tier, src.block, dst, dst_ref.block))
        if idx and into == self.alloc_tiers:
            table.num_keyed = 0  # the copies are unkeyed: let `register` key them again
        return moves

    # -- prefix sharing ---------------------------------------------------------------------

    def _lookups(self, keys: Sequence[bytes]) -> list[BlockRef | None]:
        """The cached block of each of ``keys`` (the first allocation tier holding it), else the
        in-flight block offered under it (`offer_inflight`), or None (a prompt's hundreds of
        keys: each tier's `BlockRef` of a block made once, ``_made``)."""
        refs: list[BlockRef | None] = [None] * len(keys)
        for tier in self.alloc_tiers:
            made = self._made.setdefault(tier, {})
            for j, b in enumerate(map(self.pools[tier].lookup, keys)):
                if b is not None and refs[j] is None:
                    refs[j] = made.get(b) or made.setdefault(b, BlockRef(tier, b))
        if self._inflight:
            for j, k in enumerate(keys):
                if refs[j] is None:
                    refs[j] = self._inflight.get(k)
        return refs

    def offer_inflight(
        self, table: BlockTable, keys: Sequence[bytes], lo: int, hi: int
    ) -> list[bytes]:
        """Offer ``table``'s blocks ``[lo, hi)``, which the step being planned computes in full
        (its query covers each one's last position), to the admissions after it in that step
        under their prefix ``keys``: they are adoptable as cached blocks are, without being
        keyed in the pool (keys name computed KV only; `register` keys them after the step).
        The caller (the scheduler's step builder) withdraws them if that sequence leaves the
        step, and clears them once the step is planned. Returns the keys added (a key already
        cached or offered is left as it is)."""
        hi = min(hi, len(keys), len(table.blocks))
        added = []
        for j, have in zip(range(lo, hi), self._lookups(keys[lo:hi]), strict=True):
            ref = table.blocks[j]
            if have is None and ref is not None:
                self._inflight[keys[j]] = ref
                added.append(keys[j])
        return added

    def withdraw_inflight(self, keys: Sequence[bytes]) -> None:
        """Take back offered ``keys`` (their sequence left the step before anyone adopted)."""
        for k in keys:
            self._inflight.pop(k, None)

    def clear_inflight(self) -> None:
        """Forget every offer (the step is planned: its blocks are keyed by `register` once
        computed, or freed if the step is aborted)."""
        self._inflight.clear()

    def can_adopt(self, keys: Sequence[bytes], n: int) -> bool:
        """Whether the first ``n`` blocks of a prompt with ``keys`` can be taken from the cache
        (with a window, only the blocks a query at position ``n * block_tokens`` can see)."""
        first = self._first_needed(n * self.block_tokens) if n else 0
        return n <= len(keys) and all(r is not None for r in self._lookups(keys[first:n]))

    def match_prefix(self, keys: Sequence[bytes], max_blocks: int) -> int:
        """The largest ``n <= max_blocks`` with `can_adopt(keys, n)`."""
        limit = min(max_blocks, len(keys))
        hit = [r is not None for r in self._lookups(keys[:limit])]
        run = 0  # cached blocks ending at index n - 1
        runs = []
        for h in hit:
            run = run + 1 if h else 0
            runs.append(run)
        for n in range(limit, 0, -1):
            if n - self._first_needed(n * self.block_tokens) <= runs[n - 1]:
                return n
        return 0

    def revived_blocks(self, keys: Sequence[bytes], n: int) -> int:
        """Cached, unreferenced blocks `adopt_prefix(keys, n)` would take out of the free count."""
        first = self._first_needed(n * self.block_tokens) if n else 0
        refs = self._lookups(keys[first:n])
        return sum(1 for r in refs if r is not None and self.pools[r.tier].ref(r.block) == 0)

    def adopt_prefix(self, table: BlockTable, keys: Sequence[bytes], n: int) -> None:
        """Fill an empty table with ``n`` cached (or in-flight) blocks (references taken)."""
        if table.blocks or table.length:
            raise ValueError("a prefix is adopted into an empty table only")
        first = self._first_needed(n * self.block_tokens) if n else 0
        refs = self._lookups(keys[first:n])
        if n > len(keys) or any(r is None for r in refs):
            raise ValueError(f"the first {n} blocks are not all cached")
        keyed = n  # blocks before the first in-flight one (unkeyed: `register` keys it later)
        for j, ref in enumerate(refs):
            pool = self.pools[ref.tier]  # type: ignore[union-attr]
            pool.incref(ref.block)  # type: ignore[union-attr]
            if keyed == n and pool.key(ref.block) is None:  # type: ignore[union-attr]
                keyed = first + j
        table.blocks += [None] * first + refs
        table.length = n * self.block_tokens
        table.dropped = first
        table.num_keyed = keyed
        if n:
            self.prefix_hits += 1
            self.prefix_saved_tokens += n * self.block_tokens

    def register(self, table: BlockTable, keys: Sequence[bytes]) -> None:
        """Key the table's full blocks whose KV is final (``keys``: the sequence's confirmed
        tokens' chain keys), so later prompts with the same prefix can share them."""
        upto = min(len(keys), table.length // self.block_tokens)
        for j in range(table.num_keyed, upto):
            ref = table.blocks[j]
            if ref is not None:
                self.pools[ref.tier].register(ref.block, keys[j])
        table.num_keyed = max(table.num_keyed, upto)
