"""Grouped-query attention over a per-layer KV cache, with causal / sliding-window masks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ollm.layers.tree_mask import TreeMask
from ollm.planning import footprint
from ollm.runtime.uva import to_device


@dataclass
class AttentionMask:
    """What a layer's attention may see in one forward step.

    Slots are positions in the KV cache (padding included, as in transformers); ``q_start`` is the
    slot of the first query token. ``key_keep`` [B, S] marks real (non-padding) key slots; ``None``
    means no padding. ``window`` limits keys to ``q - window < k <= q``. ``sinks`` [H] (gpt-oss)
    are the logits of one more key, outside the cache, that every query sees, with value 0.
    ``tree`` (speculative trees): slots from ``tree.start`` on are tree nodes that see only
    their ancestors among themselves, at positions ``start + depth`` (`TreeMask`).
    """

    q_start: int
    q_len: int
    kv_len: int
    key_keep: torch.Tensor | None = None
    window: int | None = None
    sinks: torch.Tensor | None = None
    tree: TreeMask | None = None

    def is_plain_causal(self) -> bool:
        """True when the mask is exactly causal (or empty), so SDPA can use its fused kernels."""
        window_ok = self.window is None or self.window >= self.kv_len
        return self.key_keep is None and window_ok and self.tree is None

    def first_position(self) -> int:
        """Lowest position of a query (a tree node sits at its depth, before its slot)."""
        return self.q_start if self.tree is None else min(self.q_start, self.tree.start)

    def dense(self, device: torch.device) -> torch.Tensor:
        """Boolean mask [B or 1, 1, q_len, kv_len]; True = attend."""
        return self.block(device, 0, self.q_len, 0, self.kv_len)

    def block(self, device: torch.device, r0: int, r1: int, k0: int, k1: int) -> torch.Tensor:
        """Rows [r0, r1) of the query and key slots [k0, k1) of ``dense``: [B or 1, 1, r, k]."""
        q = torch.arange(self.q_start + r0, self.q_start + r1, device=device)[:, None]
        k = torch.arange(k0, k1, device=device)[None, :]
        if self.tree is not None:
            allowed = self.tree.allowed(q, k, self.window)
        else:
            allowed = k <= q
            if self.window is not None:
                allowed &= k > q - self.window
        mask = allowed[None, None]
        if self.key_keep is not None:
            mask = mask & self.key_keep.to(device)[:, None, None, k0:k1]
            # A padding query would otherwise see no key at all (NaN rows that poison the cache):
            # let it see itself; its output is never used.
            mask = mask | (k == q)[None, None]
        return mask


def attention_path(device_type: str, dtype: torch.dtype, head_dim: int, mask: AttentionMask) -> str:
    """Which kernel ``attend`` uses (after dropping keys outside the first query's window):
    "grouped" (CPU decode), "flash" (whole prompt or decode, causal), "chunk" (a later prefill
    chunk: two flash calls merged), "sdpa" (PyTorch's CPU kernel, which works in blocks with
    grouped KV heads native) or "blocked" (``blocked_attention``: query rows in blocks whose
    scores stay under ``SCORE_BLOCK_BYTES``). On CUDA every path is O(rows) in memory: SDPA's
    fallback there (float32, masks, grouped heads) builds [heads, q, kv] scores, never taken."""
    cpu = device_type == "cpu"
    if cpu and mask.q_len <= 8 and mask.kv_len >= 64:
        return "grouped"
    flash = cpu or (
        dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256
    )
    if mask.is_plain_causal() and flash:
        if mask.q_len == 1 or mask.q_start == 0 and mask.q_len == mask.kv_len:
            return "flash"
        if mask.kv_len - mask.q_len == mask.q_start:
            return "chunk"
    return "sdpa" if cpu else "blocked"


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    scale: float,
    dense_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v with GQA; q [B, H, T, D], k/v [B, KVH, S, D] -> [B, H, T, D]."""
    lo = mask.first_position() - mask.window + 1 if mask.window is not None else 0
    if lo > 0 and mask.key_keep is None:
        # Keys before the first query's window are masked for every query: drop them, so the
        # work and any mask are [q_len, q_len + window], not [q_len, kv_len].
        k, v = k[:, :, lo:], v[:, :, lo:]
        tree = None if mask.tree is None else mask.tree.shifted(lo)
        mask = AttentionMask(
            mask.q_start - lo, mask.q_len, mask.kv_len - lo, None, mask.window, mask.sinks, tree
        )
        dense_mask = None
    path = attention_path(q.device.type, q.dtype, q.shape[-1], mask)
    if mask.sinks is not None:  # sinks need the log-sum-exp: flash kernels give it, or blocked
        if path == "flash" and _flash_ok(q):
            out, lse = _flash_with_lse(q, k, v, mask.q_len > 1, scale)
        elif path == "chunk":
            out, lse = chunk_attention_lse(q, k, v, scale)
        else:
            out, lse = blocked_attention_lse(q, k, v, mask, scale, dense_mask)
        return with_sinks(out, lse, mask.sinks)
    if path == "grouped":
        # Decode on the CPU: PyTorch's CPU SDPA is ~10x slower than two grouped matmuls here.
        if dense_mask is None and not (mask.is_plain_causal() and mask.q_len == 1):
            dense_mask = mask.dense(q.device)
        return grouped_attention(q, k, v, scale, dense_mask)
    if path == "flash":
        causal = mask.q_len > 1
        if q.device.type == "cuda":
            # Flash directly: SDPA's default on Hopper is cuDNN, which builds an execution
            # plan for every new key length (~50 ms on the host), i.e. once per decode step.
            return _flash_with_lse(q, k, v, causal, scale)[0]
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, enable_gqa=True
        )
    if path == "chunk":
        return chunk_attention(q, k, v, scale)
    if path == "blocked":
        return blocked_attention(q, k, v, mask, scale, dense_mask)
    if dense_mask is None:
        dense_mask = mask.dense(q.device)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=dense_mask, scale=scale, enable_gqa=True
    )


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    scale: float,
    dense_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention for any mask, dtype and device in blocks of query rows, each over only
    the keys its rows can see (causal end, window start), with the query heads of a KV head
    folded into the rows (K/V never repeated). A block's rows are as many as keep its scores
    under ``SCORE_BLOCK_BYTES``; the softmax runs in float32, in place."""
    return blocked_attention_lse(q, k, v, mask, scale, dense_mask)[0]


def blocked_attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    scale: float,
    dense_mask: torch.Tensor | None = None,
    key_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``blocked_attention`` over keys that are the slots [key_offset, key_offset + S) of the
    mask's key axis (one part of a cache split between tiers), with the log-sum-exp [B, H, T]
    (float32) for merging parts. A row that sees no key of this part gets 0 and -inf."""
    b, h, t, _ = q.shape
    n = k.shape[2]
    cell = b * footprint.row_cell_bytes(h, q.element_size())
    if mask.key_keep is not None:  # once on the device, not once per block
        keep = mask.key_keep.to(q.device)
        mask = AttentionMask(
            mask.q_start, mask.q_len, mask.kv_len, keep, mask.window, mask.sinks, mask.tree
        )
    out = torch.zeros_like(q)
    lse = torch.full((b, h, t), float("-inf"), device=q.device)
    r0 = 0
    while r0 < t:
        first = mask.q_start + r0  # slot of the block's first query
        low = first if mask.tree is None else min(first, mask.tree.start)  # its lowest position
        lo = key_offset if mask.window is None else max(key_offset, low - mask.window + 1)
        seen = max(0, first - lo)  # keys before the first query (causal)
        # rows r with r * (seen + r) cells under the budget: the block's keys grow with its rows
        cap = footprint.SCORE_BLOCK_BYTES // cell
        r = max(1, int((-seen + (seen * seen + 4 * cap) ** 0.5) / 2))
        r1 = min(t, r0 + r)
        hi = min(key_offset + n, mask.kv_len, mask.q_start + r1)
        if hi > lo:
            _attend_block(q, k, v, mask, scale, dense_mask, key_offset, (r0, r1, lo, hi), out, lse)
        r0 = r1
    return out, lse


def _attend_block(q, k, v, mask, scale, dense_mask, off, span, out, lse) -> None:
    """Query rows [r0, r1) over key slots [lo, hi) into ``out`` and ``lse`` (see above)."""
    r0, r1, lo, hi = span
    b, h, _, d = q.shape
    kvh = k.shape[1]
    if dense_mask is not None:
        m = dense_mask[..., r0:r1, lo:hi].to(q.device)
    else:
        m = mask.block(q.device, r0, r1, lo, hi)
    qg = q[:, :, r0:r1].reshape(b, kvh, h // kvh * (r1 - r0), d)
    s = torch.matmul(qg, k[:, :, lo - off : hi - off].transpose(-1, -2))
    s = s.float() if s.dtype != torch.float32 else s
    s.view(b, kvh, h // kvh, r1 - r0, hi - lo).mul_(scale).masked_fill_(~m[:, :, None], -torch.inf)
    top = s.amax(-1, keepdim=True).nan_to_num_(0.0, neginf=0.0)  # a row seeing nothing: 0
    s.sub_(top).exp_()
    den = s.sum(-1, keepdim=True)
    s.div_(den.clamp_min(torch.finfo(torch.float32).tiny))  # such a row stays 0, not NaN
    out[:, :, r0:r1] = torch.matmul(s.to(v.dtype), v[:, :, lo - off : hi - off]).view(
        b, h, r1 - r0, d
    )
    lse[:, :, r0:r1] = (den.log_() + top).view(b, h, r1 - r0)


SPLIT_MIN_KEYS = 4096  # fewest keys per part when one sequence's keys are split over threads


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    dense_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Attention for a few queries with the query heads of each KV head folded into the query
    axis: q [B, H, T, D] -> [B, KVH, G*T, D] against k/v [B, KVH, S, D], no K/V repetition and
    one SDPA call with KVH x G*T rows (PyTorch's CPU kernel is slow for many 1-row heads)."""
    b, h, t, d = q.shape
    kvh, s = k.shape[1], k.shape[2]
    g = h // kvh
    qg = q.reshape(b, kvh, g * t, d)
    parts = key_parts(b * kvh, s) if dense_mask is None and b == 1 else 1
    if parts > 1:  # one sequence, every key visible: its keys in parts, one per idle thread
        return split_keys_attention(qg, k, v, scale, parts).reshape(b, h, t, d)
    mask = None
    if dense_mask is not None and t == 1 and dense_mask.shape[-2] == 1:
        mask = dense_mask  # [B, 1, 1, S]: broadcast over KV heads and folded rows, no copy
    elif dense_mask is not None:
        mask = (
            dense_mask.unsqueeze(2).expand(dense_mask.shape[0], 1, g, t, s).reshape(-1, 1, g * t, s)
        )
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, h, t, d)


def key_parts(work: int, keys: int) -> int:
    """In how many parts the CPU attends ``keys`` keys of ``work`` (batch x KV heads) query
    groups: PyTorch's CPU flash kernel runs one thread per (batch, head, query block), so one
    sequence with few KV heads leaves threads idle (8 of 16 on Llama-3.1-8B shapes, 1 of 2 with
    Gemma 3 270M's single KV head); parts of at least ``SPLIT_MIN_KEYS`` keys fill them."""
    return max(1, min(torch.get_num_threads() // max(1, work), keys // SPLIT_MIN_KEYS))


def split_keys_attention(
    qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, parts: int
) -> torch.Tensor:
    """Attention of one sequence's grouped queries ``qg`` [1, KVH, G, D] over every key of
    ``k``/``v`` [1, KVH, S, D] (any stride along S), computed as ``parts`` equal key ranges
    viewed as a batch (one flash call, no copy of K/V) plus the remainder, merged exactly by
    their log-sum-exps (float32) -> [1, KVH, G, D]."""
    _, kvh, s, d = k.shape
    n = s // parts
    views = []
    for x in (k, v):
        st = x.stride()
        views.append(x.as_strided((parts, kvh, n, d), (n * st[2], st[1], st[2], st[3])))
    q = qg.expand(parts, *qg.shape[1:]).contiguous()
    out, lse = _flash_with_lse(q, views[0], views[1], False, scale)
    if parts * n < s:  # the remainder's keys
        o_r, l_r = _flash_with_lse(qg, k[:, :, parts * n :], v[:, :, parts * n :], False, scale)
        out, lse = torch.cat([out, o_r]), torch.cat([lse, l_r])
    w = torch.softmax(lse.float(), dim=0).unsqueeze(-1)  # [P, KVH, G, 1]: each part's weight
    return (out.float() * w).sum(0, keepdim=True).to(qg.dtype)


def _flash_ok(q: torch.Tensor) -> bool:
    """Whether the flash kernels (with their log-sum-exp output) take these queries."""
    d = q.shape[-1]
    if q.device.type == "cuda":
        return q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256
    return q.device.type == "cpu"


def _flash_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention (GQA native: K/V are never repeated) returning (out, logsumexp [B, H, T])."""
    if q.device.type == "cuda":
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale
        )
        return res[0], res[1][..., : q.shape[2]]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, scale=scale
    )


def chunk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention for a prefill chunk that follows earlier ones: q holds the last T of the
    S keys. Two flash calls, the earlier keys without a mask and the chunk's own keys with a
    square causal mask, merged by their log-sum-exps (the online-softmax merge), so neither the
    [T, S] scores nor per-head copies of K/V are ever built."""
    return chunk_attention_lse(q, k, v, scale)[0]


def chunk_attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``chunk_attention`` and the log-sum-exp [B, H, T] over all S keys."""
    t, s = q.shape[2], k.shape[2]
    o_old, lse_old = _flash_with_lse(q, k[:, :, : s - t], v[:, :, : s - t], False, scale)
    o_new, lse_new = _flash_with_lse(q, k[:, :, s - t :], v[:, :, s - t :], True, scale)
    return merge_lse(o_old, lse_old, o_new, lse_new)


def merge_lse(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over two key sets from each one's output and log-sum-exp (the online-softmax
    merge; ``o_b`` is overwritten): softmax over both = w * o_a + (1 - w) * o_b with
    w = sigmoid(lse_a - lse_b). A row that saw no key in either (-inf twice) stays 0."""
    w = torch.sigmoid(lse_a - lse_b).nan_to_num_(0.5).unsqueeze(-1).to(o_b.dtype)
    return o_b.lerp_(o_a, w), torch.logaddexp(lse_a, lse_b)


def attend_parts(
    q: torch.Tensor,
    parts: list[tuple[torch.Tensor, torch.Tensor]],
    mask: AttentionMask,
    scale: float,
    dense_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``attend`` over keys/values stored as consecutive parts (slots in order), each possibly on
    another device (a KV cache split between tiers). Each part is attended where it sits (only
    q and the outputs move; never a copy of the KV) and the parts are merged by their
    log-sum-exps: one query per sequence with a plain causal mask sees every key of a part
    (flash); any other mask or several queries go through ``blocked_attention_lse`` under the
    part's slice of the mask."""
    if len(parts) == 1:
        k, v = parts[0]
        dense = None if dense_mask is None else dense_mask.to(k.device)
        return to_device(attend(q.to(k.device), k, v, mask, scale, dense), q.device)
    plain = mask.q_len == 1 and mask.is_plain_causal()
    out, lse, off = None, None, 0
    for k, v in parts:
        qk = q.to(k.device)
        if plain:
            o, s = _attend_lse(qk, k, v, scale)
        else:
            dense = None if dense_mask is None else dense_mask.to(k.device)
            o, s = blocked_attention_lse(qk, k, v, mask, scale, dense, off)
        off += k.shape[2]
        o, s = to_device(o, q.device), to_device(s, q.device)
        out, lse = (o, s) if out is None else merge_lse(out, lse, o, s)
    return out if mask.sinks is None else with_sinks(out, lse, mask.sinks)


def with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Attention output [B, H, T, D] with one more key of logit ``sinks`` [H] and value 0 in
    the softmax: each probability shrinks by Z / (Z + e^sink) = sigmoid(lse - sink)."""
    # half-precision sinks promoted inside the subtraction: their float32 values, no cast kernel
    keep = torch.sigmoid(lse.float() - sinks.to(lse.device)[None, :, None])
    return out * keep.unsqueeze(-1).to(out.dtype)


def _attend_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention of q [B, H, T, D] over k/v [B, KVH, S, D] with its log-sum-exp."""
    if q.device.type == "cuda" and _flash_ok(q):
        return _flash_with_lse(q, k, v, False, scale)
    b, h, t, d = q.shape
    kvh = k.shape[1]
    qg = q.reshape(b, kvh, h // kvh * t, d)  # query heads of a KV head folded (grouped_attention)
    if q.device.type == "cpu":
        o, lse = _flash_with_lse(qg, k, v, False, scale)
    else:  # a GPU dtype the flash kernel does not take (float32): plain math in float32
        s = torch.matmul(qg.float(), k.float().transpose(-1, -2)) * scale
        lse = torch.logsumexp(s, -1)
        o = torch.matmul(torch.softmax(s, -1), v.float()).to(q.dtype)
    return o.reshape(b, h, t, d), lse.reshape(b, h, t)
