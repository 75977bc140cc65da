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


# KV codecs (``kv/compressed.py``'s ``CodecWorkspace``, ``kv/codec_attend.py``): slots of the
# encoded prefix decoded per chunk (CPU chunks stay in cache, GPU ones are few large kernels) and
# query rows per band tile (rounded up to whole codec blocks).
CODEC_CPU_CHUNK = 2048
CODEC_GPU_CHUNK = 16384
CODEC_BAND_ROWS = 32


def codec_band_tile(block: int, rows: int = CODEC_BAND_ROWS) -> int:
    """Query rows per band tile: ``rows`` rounded up to whole codec blocks."""
    return block * -(-rows // block)


def codec_decoded_slots(forward: int, context: int, block: int, recent: int, on_gpu: bool) -> int:
    """Slots of each of the workspace's two decoded K/V buffers for forwards of at most
    ``forward`` rows over ``context`` tokens: a chunk of the encoded prefix, or a forward's band
    (whole tiles plus the lag ``recent + block - 1`` before its first row), whichever is larger
    (a padded forward's partly encoded keys, < rows + block, and a trim's few blocks fit both)."""
    chunk = CODEC_GPU_CHUNK if on_gpu else CODEC_CPU_CHUNK
    rows = max(1, min(forward, context))
    m = codec_band_tile(block)
    return max(min(chunk, context), -(-rows // m) * m + recent + block - 1)


def temporal_ring_slots(span: int, forward: int, block: int, capacity: int) -> int:
    """Slots of a temporal KV schedule's middle-tier ring (``kv/temporal.py``): the blocks
    between the exact window and the age ``span`` tokens later where they are re-encoded, plus
    one forward of ``forward`` rows and two blocks of rounding (never more than the capacity)."""
    whole = -(-capacity // block) * block
    return min(whole, -(-(span + forward + block) // block) * block + block)


def codec_attention_bytes(
    batch: int, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int, rows: int,
    recent: int, block: int,
) -> int:  # fmt: skip
    """Peak transient bytes of a compressed layer's attention for a forward of ``rows`` rows
    (``CompressedKVCache.attend`` without padding, ``kv/codec_attend.py``), beside the codec
    workspace: three [rows, heads, head_dim] outputs with their log-sum-exps (the encoded part's,
    the band's, the causal part's), the exact keys/values twice (this forward's with the tail,
    and padded to the band's slots), the band masks, one group of band tiles (float32 scores up
    to ``SCORE_BLOCK_BYTES`` and their copy in the input dtype, folded queries, two products,
    unfolded values) or, before them, the encoder's float32 temporaries."""
    m = codec_band_tile(block)
    lag = recent + block - 1
    width = m + lag
    padded = -(-rows // m) * m
    kvd, e = kv_heads * head_dim, dtype_bytes
    outputs = 3 * batch * padded * heads * (head_dim * e + 4)
    exact = 2 * batch * kvd * e * ((rows + recent + block) + (padded + lag))
    masks = padded * 2 * width
    cell = batch * heads * 2 * width * 4  # float32 scores of one query row (all heads)
    group = min(padded, max(1, SCORE_BLOCK_BYTES // (cell * m)) * m)  # rows per tile group
    scores = group * cell * (1 + (e / 4 if e < 4 else 0))
    tiles = batch * heads * group * head_dim * e * 3 + 2 * batch * kvd * (group // m) * width * e
    encode = 12 * batch * (rows + block) * kvd
    return int(outputs + exact + masks + max(scores + tiles, encode))
