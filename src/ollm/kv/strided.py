"""Batched decode attention over a head-major host pool without a gather.

A decode batch attends ``[B, kv_heads, S, D]`` K/V. When every sequence's held blocks are
consecutive ids (`kv.slabs.SlabPool` places them so) and their first blocks lie on one grid of
``stride`` blocks, the head-major pool ``[kv_heads, blocks, block_tokens, D]`` of one layer *is*
that tensor as a strided view: row ``k`` starts at block ``first + k * stride``, its keys run
over consecutive slots, and one head's slots are ``blocks x block_tokens`` apart. The CPU's
attention reads it in place (measured on the H200 host, batch 64 x 2k tokens: the gather into a
buffer ran at ~35 GB/s and the attention over the buffer at ~50; over the view the attention
alone ran at ~50 GB/s). Rows of the grid that no sequence of the batch holds (another
sequence's slab, a free one) are attended with zero queries and dropped; a batch whose grid
would be over twice its size keeps the gather.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_WASTE = 2  # most grid rows per sequence before the gather is cheaper


@dataclass(frozen=True)
class StridedRun:
    """Where a decode batch's sequences lie in the pool: row ``k`` of the view starts at block
    ``first + k * stride``; ``rows`` maps each sequence (batch order) to its view row."""

    first: int
    stride: int
    num_rows: int
    rows: tuple[int, ...]
    identity: bool  # each sequence is the view row of its own index (no scatter of queries)


def strided_run(
    ids: Sequence[Sequence[int]],
    needs: Sequence[int],
    pool_blocks: int,
    runs: Sequence[bool] | None = None,
) -> StridedRun | None:
    """The grid of a batch whose sequences hold ``ids`` (their held blocks in order) and read
    their first ``needs`` blocks, or None when a gather is needed: a sequence whose blocks are
    not consecutive, two sequences on one first block, a sparse grid, a view past the pool.
    ``runs[k]``: sequence k's held blocks are known to be consecutive (not checked again)."""
    if len(ids) < 2:
        return None
    starts = []
    for k, (held, need) in enumerate(zip(ids, needs, strict=True)):
        a = held[0]
        if not (runs and runs[k]) and tuple(held[:need]) != tuple(range(a, a + need)):
            return None
        starts.append(a)
    lo = min(starts)
    stride = 0
    for s in starts:
        stride = math.gcd(stride, s - lo)
    if stride == 0 or len(set(starts)) != len(starts):
        return None
    n = (max(starts) - lo) // stride + 1
    if n > MAX_WASTE * len(starts) or lo + (n - 1) * stride + max(needs) > pool_blocks:
        return None
    rows = tuple((s - lo) // stride for s in starts)
    return StridedRun(lo, stride, n, rows, rows == tuple(range(n)))


def run_view(pool: torch.Tensor, run: StridedRun, num_blocks: int) -> tuple[torch.Tensor, ...]:
    """K and V of ``pool`` ``[2, kv_heads, blocks, block_tokens, D]`` (contiguous per K/V) as
    ``[rows, kv_heads, num_blocks * block_tokens, D]`` views."""
    _, kvh, blocks, bt, hd = pool.shape
    out = []
    for i in (0, 1):
        base = pool[i]
        shape = (run.num_rows, kvh, num_blocks * bt, hd)
        stride = (run.stride * bt * hd, blocks * bt * hd, hd, 1)
        offset = base.storage_offset() + run.first * bt * hd
        out.append(base.as_strided(shape, stride, offset))
    return tuple(out)


def scatter_rows(x: torch.Tensor, run: StridedRun, index: torch.Tensor) -> torch.Tensor:
    """``x`` [B, ...] placed at its sequences' view rows of a zero [rows, ...] tensor."""
    if run.identity:
        return x
    full = x.new_zeros((run.num_rows, *x.shape[1:]))
    return full.index_copy_(0, index, x)


def row_mask(keep: torch.Tensor, run: StridedRun, index: torch.Tensor) -> torch.Tensor:
    """The batch's key mask [B, 1, 1, S] on the view's rows (rows of no sequence see every key:
    their outputs are dropped, and a row that sees nothing would be NaN)."""
    if run.identity:
        return keep
    full = keep.new_ones((run.num_rows, *keep.shape[1:]))
    return full.index_copy_(0, index, keep)
