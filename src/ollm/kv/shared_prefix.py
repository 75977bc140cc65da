"""Decode attention of a batch whose sequences share a prefix: the prefix read once for all.

Sequences that started from one cached prompt prefix (prefix sharing, `kv/blocks.py`) hold the
same leading blocks. Gathering each sequence's K/V would copy that prefix once per sequence
(16 requests over a 6k-token prefix: 16 x 25 MB per layer and step, from pinned RAM when the
layer's KV sits there); attending it once with every query of the batch reads it once. A
batch's attention is then two parts merged exactly as one softmax (their log-sum-exps, as the
tiered KV merges its parts):

* the shared blocks, one K/V for all: the B sequences' queries folded into the query axis of
  each KV head (``[1, kv_heads, B * group, D]``), every key visible (a window masks per row);
* each sequence's own blocks after them, gathered as before (`DecodeBatch.block_ids`), under
  the batch's key mask.

Cost: the prefix's bytes once per layer and step instead of B times; one more small attention
call and a merge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ollm.kv.run_copy import block_runs
from ollm.layers.attention import (
    AttentionMask,
    _attend_lse,
    _flash_ok,
    blocked_attention_lse,
    merge_lse,
    with_sinks,
)
from ollm.runtime.uva import to_device

if TYPE_CHECKING:
    from ollm.kv.decode_batch import DecodeBatch

# Most consecutive-id runs of the shared blocks attended as views, one call each; a prefix in
# more pieces is gathered in pieces of at most GATHER_BYTES instead.
MAX_RUNS = 4


def attend_shared(
    layer,
    d: DecodeBatch,
    qb: torch.Tensor,
    mask: AttentionMask,
    scale: float,
) -> torch.Tensor:
    """Attention ``[B, heads, 1, D]`` of ``d``'s queries ``qb`` ``[B, heads, 1, D]`` (on the
    device that attends: the pool's, or the queries' for a pool on the GPU) over the shared
    blocks and then each sequence's own; ``layer`` is the `PackedLayerKV` (its pool, store and
    suffix gather)."""
    bt = layer.store.block_tokens
    # The shared parts first, each freed before the next and before the own blocks' gather:
    # at most one gathered piece or that gather at a time (the planner's GATHER_BYTES).
    out, lse = prefix_lse(layer.pool, d.shared_ids, bt, qb, scale, mask.window, d)
    keep = d.mask(mask.window, bt, qb.device)  # [B, 1, 1, S]: the keys after the shared ones
    s = keep.shape[-1]
    kv = [layer._gather_rows(i, d).to(qb.device, qb.dtype) for i in (0, 1)]
    own = AttentionMask(s - 1, 1, s)  # every row under the dense mask only
    o, lo = blocked_attention_lse(qb, kv[0], kv[1], own, scale, keep)
    out, lse = (o, lo) if out is None else merge_lse(out, lse, o, lo)
    return out if mask.sinks is None else with_sinks(out, lse, mask.sinks)


def prefix_lse(
    pool: torch.Tensor,
    ids: tuple[int, ...],
    bt: int,
    qb: torch.Tensor,
    scale: float,
    window: int | None,
    d,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Attention of the folded queries ``qb`` over the shared blocks ``ids`` (`prefix_parts`,
    each part freed before the next), parts merged: (out, log-sum-exp), None when no part is
    read; ``d`` holds the queries' positions (``d.seqs``; ``d.positions`` under a window)."""
    out = lse = None
    for k, v, k0 in prefix_parts(pool, ids, bt, qb, window, d):
        o, lp = _prefix_attention(qb, k, v, scale, _window_mask(d, window, bt, k0, k, qb))
        out, lse = (o, lp) if out is None else merge_lse(out, lse, o, lp)
        del k, v
    return out, lse


def prefix_parts(
    pool: torch.Tensor,
    ids: tuple[int, ...],
    bt: int,
    qb: torch.Tensor,
    window: int | None,
    d: DecodeBatch,
):
    """The shared blocks ``ids`` of ``pool`` ``[2, kv_heads, blocks, bt, D]`` as (K, V, first
    key slot) parts ``[1, kv_heads, n, D]`` on ``qb``'s device: views of consecutive-id runs,
    or gathered pieces of at most ``GATHER_BYTES``; under a window, only from the slot the
    lowest query still sees."""
    from ollm.kv.decode_batch import GATHER_BYTES

    lo = 0
    if window is not None:  # keys before every query's window: never read
        lo = min(s.start - s.key0 for s in d.seqs) - window + 1
    first = max(0, lo) // bt
    runs = block_runs(ids, first)
    kvh, hd = pool.shape[1], pool.shape[4]
    if len(runs) > MAX_RUNS:  # fragmented: gather pieces instead of many small calls
        per = max(1, GATHER_BYTES // (2 * kvh * bt * hd * pool.element_size()))
        runs = [(j, None, min(per, len(ids) - j)) for j in range(first, len(ids), per)]
    for j, run0, n in runs:
        if run0 is not None:  # a view of the pool
            parts = [pool[i][:, run0 : run0 + n].reshape(kvh, n * bt, hd) for i in (0, 1)]
        else:
            idx = to_device(torch.tensor(ids[j : j + n]), pool.device)
            parts = [pool[i].index_select(1, idx).view(kvh, n * bt, hd) for i in (0, 1)]
        k, v = (x.unsqueeze(0).to(qb.device, qb.dtype) for x in parts)
        yield k, v, j * bt


def _window_mask(
    d: DecodeBatch, window: int | None, bt: int, k0: int, k: torch.Tensor, qb: torch.Tensor
) -> torch.Tensor | None:
    """Under a window, which keys ``[k0, k0 + n)`` of a shared part each folded query row sees
    (``[1, 1, B * group, n]``, rows in ``_prefix_attention``'s order); None without a window."""
    if window is None:
        return None
    n, g = k.shape[2], qb.shape[1] // k.shape[1]
    pos = d.positions(qb.device)
    j = torch.arange(k0, k0 + n, device=qb.device)[None]
    keep = (j > pos - window) & (j <= pos)  # [B, n]
    return keep.repeat_interleave(g, 0)[None, None]


def _prefix_attention(
    qb: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    dense: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query of ``qb`` ``[B, heads, 1, D]`` over one K/V ``[1, kv_heads, n, D]``: the
    batch folded into each KV head's query rows, one call; (out ``[B, heads, 1, D]``,
    log-sum-exp ``[B, heads, 1]`` float32)."""
    b, h, _, d = qb.shape
    kvh = k.shape[1]
    g = h // kvh
    qg = qb.view(b, kvh, g, d).transpose(0, 1).reshape(1, kvh, b * g, d)
    n = k.shape[2]
    if dense is None and (qg.device.type == "cpu" or _flash_ok(qg)):
        o, lse = _attend_lse(qg, k, v, scale)
    else:  # a window's mask, or a GPU dtype flash does not take: blocked, in float32
        every = AttentionMask(n, b * g, n + b * g)  # queries after every key: all visible
        o, lse = blocked_attention_lse(qg, k, v, every, scale, dense)
    o = o.view(kvh, b, g, d).transpose(0, 1).reshape(b, h, 1, d)
    return o, lse.float().view(kvh, b, g).transpose(0, 1).reshape(b, h, 1)
