"""Memory footprints shared by the code that allocates and the planner that reserves: the
blocked attention kernel's score blocks, a sliding-window cache's slots and a paged sequence's
live blocks. Pure arithmetic, here so that planning (below layers and kv) needs neither."""

from __future__ import annotations

# Live bytes one blocked attention call may hold at a time for its scores (see
# ``layers.attention.blocked_attention``); the planner reserves ``score_block_bytes`` for it.
SCORE_BLOCK_BYTES = 64 << 20


def score_block_bytes(batch: int, heads: int, keys: int, dtype_bytes: int) -> int:
    """Peak bytes ``blocked_attention`` holds beside its inputs and output for ``keys`` keys:
    the block's scores (``SCORE_BLOCK_BYTES``, or one query row when a row alone is larger)."""
    return max(SCORE_BLOCK_BYTES, batch * keys * row_cell_bytes(heads, dtype_bytes))


def row_cell_bytes(heads: int, dtype_bytes: int) -> int:
    """Bytes per (query row, key) of a block: float32 scores of every head, their copy in the
    input dtype (made by the matmul, then for the probabilities), and the boolean mask's few."""
    return heads * (4 + (dtype_bytes if dtype_bytes < 4 else 0)) + 4


def window_capacity(window: int | None, max_forward: int) -> int:
    """Slots a sliding-window layer's cache needs: the window, one forward, and as much slack
    again as the window so old slots are dropped once per window, not every step."""
    return 2 * window + max_forward if window else 0


def max_live_blocks(block_tokens: int, window: int | None, num_tokens: int, max_query: int) -> int:
    """Most blocks a sequence of ``num_tokens`` holds at once when steps carry at most
    ``max_query`` tokens (a window keeps ``window - 1`` earlier keys plus the step)."""
    full = -(-num_tokens // block_tokens)
    if window is None:
        return full
    return min(full, -(-(window - 1 + max_query) // block_tokens) + 1)
