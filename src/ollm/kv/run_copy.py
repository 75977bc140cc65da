"""Copies of a sequence's K/V out of a head-major host pool by runs of consecutive blocks.

A head-major pool ``[kv_heads, blocks, block_tokens, D]`` holds each head's slots of a run of
consecutive block ids contiguously, so a run crosses the link as one copy per head at the
pinned rate, where a gather (`index_select`) would first copy on the CPU and then go through a
pageable, synchronous copy. A sequence that starts on a shared prefix holds two runs or more
(the prefix's blocks, then its own): each is copied as such.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Most runs a sequence's blocks are copied in by runs (one copy per run and head); more
# fragmented blocks are gathered.
MAX_COPY_RUNS = 8


def block_runs(ids: Sequence[int], first: int = 0) -> list[tuple[int, int, int]]:
    """(index in ``ids``, first block id, blocks) of each run of consecutive ids of ``ids``
    from index ``first`` on."""
    out: list[tuple[int, int, int]] = []
    for j in range(first, len(ids)):
        if out and ids[j] == ids[j - 1] + 1:
            i, b0, n = out[-1]
            out[-1] = (i, b0, n + 1)
        else:
            out.append((j, ids[j], 1))
    return out


def copy_runs(
    pool: torch.Tensor, runs: Sequence[tuple[int, int, int]], n: int, device: torch.device
) -> torch.Tensor:
    """The first ``n`` slots of the blocks ``runs`` (`block_runs` of a sequence's ids from
    index 0) of ``pool`` ``[kv_heads, blocks, bt, D]`` as ``[1, kv_heads, n, D]`` on
    ``device``: one non-blocking copy per run and head (from pinned memory, asynchronous)."""
    kvh, _, bt, d = pool.shape
    end = runs[-1][0] + runs[-1][2]
    out = torch.empty((kvh, end * bt, d), dtype=pool.dtype, device=device)
    for j, b0, m in runs:
        src = pool[:, b0 : b0 + m].reshape(kvh, m * bt, d)
        for h in range(kvh):
            out[h, j * bt : (j + m) * bt].copy_(src[h], non_blocking=True)
    return out[:, :n].unsqueeze(0)
