"""Prefill rows of a packed step over host pools: where chunks cut, how new K/V reach RAM.

A batch step packs every sequence's query rows into one row and the runner cuts it into chunks
of ``plan.prefill_chunk_tokens`` rows (``Runner._chunked_block``); each chunk costs a fixed
amount of host work and kernel launches whatever its size (on the H200, ~1.5 ms per chunk and
layer at batch 64 x 2k, where its compute was ~0.2 ms), and a sequence cut by a chunk edge reads
its earlier keys back from its pool (RAM for an offloaded layer: a copy over the link).

* `aligned_chunks`: chunk edges moved back to a sequence's first row when one lies in the
  chunk's second half, so prompts that fit a chunk are whole in one (no earlier-key read) and
  no chunk is less than half full unless the step ends.
* `run_pieces` / `write_runs`: a chunk's new K/V written into a head-major host pool
  ``[2, kv_heads, blocks, block_tokens, D]`` as one contiguous copy per (K/V, head, sequence):
  a sequence whose held blocks are one run (slab) has each head's slots consecutive, so from a
  GPU each copy goes straight into pinned memory, asynchronously, on the compute stream. The
  indexed write it replaces copied the rows to pageable memory first, a host sync per chunk
  and layer that drained the GPU's queue every time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

import torch


def aligned_chunks(lengths: Sequence[int], chunk: int) -> list[tuple[int, int]]:
    """Row ranges ``[c0, c1)`` of at most ``chunk`` rows covering sequences of ``lengths`` rows
    packed in order: each ends at ``c0 + chunk`` unless a sequence starts in ``(c0 + chunk / 2,
    c0 + chunk)``; then it ends at the last such start."""
    total = sum(lengths)
    starts, row = [], 0
    for n in lengths:
        starts.append(row)
        row += n
    out, c0 = [], 0
    while c0 < total:
        cut = min(total, c0 + chunk)
        if cut < total:
            k = bisect_left(starts, cut) - 1  # the last sequence starting before the edge
            if k >= 0 and starts[k] > c0 + chunk // 2:
                cut = starts[k]
        out.append((c0, cut))
        c0 = cut
    return out


def run_pieces(seqs, r0: int, r1: int, block_tokens: int) -> list[tuple[int, int, int]] | None:
    """For rows ``[r0, r1)`` of ``seqs`` (`SeqRows` overlapping them, in row order): (slot of
    the first row in a head's ``blocks x block_tokens`` slots, first row relative to ``r0``,
    rows) per sequence, or None when one of them is not a run of consecutive blocks."""
    pieces = []
    for s in seqs:
        a, b = max(s.row0, r0), min(s.row0 + s.n, r1)
        if a >= b:
            continue
        if s.run0 is None:
            return None
        slot = s.run0 * block_tokens + s.start + (a - s.row0) - s.key0
        pieces.append((slot, a - r0, b - a))
    return pieces


def write_runs(
    pool: torch.Tensor, new: torch.Tensor, pieces: Sequence[tuple[int, int, int]]
) -> None:
    """``new`` ``[2 kv_heads, rows, D]`` (K heads then V heads, rows of a chunk) into ``pool``
    ``[2, kv_heads, blocks, block_tokens, D]`` at ``pieces`` (`run_pieces`): one contiguous copy
    per (K/V, head, piece), asynchronous from a GPU into pinned memory."""
    two, kvh, blocks, bt, d = pool.shape
    slots = pool.view(two * kvh, blocks * bt, d)
    nb = new.device.type == "cuda" and pool.is_pinned()
    for slot, row, n in pieces:
        for j in range(two * kvh):
            slots[j, slot : slot + n].copy_(new[j, row : row + n], non_blocking=nb)
