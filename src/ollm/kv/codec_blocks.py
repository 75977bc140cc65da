"""Block bookkeeping of encoded paged KV (issue 17): every block id has an encoded slot, and
the blocks of recent windows also have an exact copy in a smaller pool of *exact slots*.

Attention over an encoded pool is decode-faithful, as the single-request caches'
(``kv/compressed.py``): a query at position ``q`` sees the blocks before
``(q + 1) // block_tokens - recent_blocks`` encoded and the later ones exact. A full block is
encoded once, when it fills (full blocks are immutable; they are what prefix sharing shares), so
a prefix-shared block is stored once in encoded form, reference counted through the prefix keys
of `BlockManager`. Its exact copy is kept while it is inside the recent window of a table that
holds it (``sweep``), and after that only while exact slots are not needed elsewhere (oldest
first), so a prefix hit can still take blocks its window needs exact.

``recent_blocks`` (W) whole blocks plus the block being filled stay exact per sequence; a step
needs exact slots for the blocks it writes. With ``exact_slots >= running x (W + 3) + step
tokens / block_tokens`` (`exact_slots_for`) an allocation never runs out of them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence

from ollm.kv.blocks import BlockManager, BlockRef, BlockTable, OutOfBlocks


def exact_slots_for(
    running: int, recent_blocks: int, step_tokens: int, block_tokens: int, blocks: int
) -> int:
    """Exact slots a pool of ``blocks`` needs: each running sequence's window and block being
    filled (and one more while its window moves), plus the blocks one step writes."""
    return min(blocks, running * (recent_blocks + 3) + -(-step_tokens // block_tokens))


class CodecBlockManager(BlockManager):
    """A `BlockManager` of one full-attention KV group whose pools store blocks encoded, with
    exact copies of the recent windows in ``exact_slots`` slots (``exact_of[block]``: the slot,
    or -1). No sliding window and no swap tier: a preempted sequence recomputes."""

    def __init__(
        self,
        block_tokens: int,
        pools: Mapping[str, int],
        *,
        recent_blocks: int,
        exact_slots: int,
    ) -> None:
        if len(pools) != 1:
            raise ValueError(f"an encoded KV group has one pool, not {list(pools)}")
        super().__init__(block_tokens, pools)
        if recent_blocks < 0:
            raise ValueError(f"recent_blocks must be >= 0, got {recent_blocks}")
        ((self.tier, pool),) = self.pools.items()
        self.recent_blocks = recent_blocks
        self.exact_slots = max(0, min(exact_slots, pool.num_blocks))
        self.exact_of = [-1] * pool.num_blocks
        self._free_slots: deque[int] = deque(range(self.exact_slots))
        self._holders: dict[int, None] = {}  # blocks with an exact slot, oldest first
        self._needed: set[int] = set()  # blocks in some table's window (since the last sweep)
        self.version = 0  # bumped whenever ``exact_of`` changes

    def window_first(self, length: int) -> int:
        """First block whose exact copy a table of ``length`` tokens needs: its next query's
        window, and always the block that query writes into."""
        b = self.block_tokens
        return max(0, min(length // b, (length + 1) // b - self.recent_blocks))

    def exact_used(self) -> int:
        """Exact slots holding a block."""
        return len(self._holders)

    # -- exact slots --------------------------------------------------------------------------

    def _take_slot(self) -> int:
        if self._free_slots:
            return self._free_slots.popleft()
        for block in self._holders:  # the oldest copy no window needs
            if block not in self._needed:
                return self._drop(block)
        raise OutOfBlocks(
            f"all {self.exact_slots} exact KV slots hold recent windows: run fewer sequences "
            "at once or a shorter --kv-recent"
        )

    def _drop(self, block: int) -> int:
        slot = self.exact_of[block]
        self.exact_of[block] = -1
        del self._holders[block]
        self.version += 1
        return slot

    def _allocate(self, prev: BlockRef | None = None, fresh: bool = False) -> BlockRef:
        ref = super()._allocate(prev, fresh)
        if self.exact_of[ref.block] < 0:  # a reused id keeps the slot of its previous content
            self.exact_of[ref.block] = self._take_slot()
            self.version += 1
        self._holders.pop(ref.block, None)
        self._holders[ref.block] = None  # newest
        self._needed.add(ref.block)
        return ref

    def _window(self, table: BlockTable, length: int | None = None) -> list[BlockRef]:
        n = table.length if length is None else length
        end = -(-n // self.block_tokens)
        return [r for r in table.blocks[self.window_first(n) : end] if r is not None]

    def sweep(self, tables: Iterable[BlockTable]) -> None:
        """Recompute which blocks windows need exact from every live table (between steps):
        the others' exact slots may be reused, oldest first."""
        self._needed = {r.block for t in tables for r in self._window(t)}

    # -- operations that depend on exact copies -----------------------------------------------

    def can_adopt(self, keys: Sequence[bytes], n: int) -> bool:
        """`BlockManager.can_adopt`, and the blocks the adopter's window needs are still exact."""
        if not super().can_adopt(keys, n):
            return False
        refs = self._lookups(keys[self.window_first(n * self.block_tokens) : n])
        return all(r is not None and self.exact_of[r.block] >= 0 for r in refs)

    def adopt_prefix(self, table: BlockTable, keys: Sequence[bytes], n: int) -> None:
        super().adopt_prefix(table, keys, n)
        self._needed.update(r.block for r in self._window(table))

    def trim(self, table: BlockTable, n: int) -> None:
        """`BlockManager.trim`; refused when the shorter table's window needs a block whose
        exact copy is gone (only codes are left)."""
        if 0 <= n <= table.length:
            for ref in self._window(table, table.length - n):
                if self.exact_of[ref.block] < 0:
                    raise ValueError(
                        f"trim to {table.length - n} needs block {ref.block} exact, and only "
                        "its codes are left; trim at most the tokens of the last step"
                    )
        super().trim(table, n)
