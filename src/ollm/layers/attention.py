"""Grouped-query attention over a per-layer KV cache, with causal / sliding-window masks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMask:
    """What a layer's attention may see in one forward step.

    Slots are positions in the KV cache (padding included, as in transformers); ``q_start`` is the
    slot of the first query token. ``key_keep`` [B, S] marks real (non-padding) key slots; ``None``
    means no padding. ``window`` limits keys to ``q - window < k <= q``.
    """

    q_start: int
    q_len: int
    kv_len: int
    key_keep: torch.Tensor | None = None
    window: int | None = None

    def is_plain_causal(self) -> bool:
        """True when the mask is exactly causal (or empty), so SDPA can use its fused kernels."""
        window_ok = self.window is None or self.window >= self.kv_len
        return self.key_keep is None and window_ok

    def dense(self, device: torch.device) -> torch.Tensor:
        """Boolean mask [B or 1, 1, q_len, kv_len]; True = attend."""
        q = torch.arange(self.q_start, self.q_start + self.q_len, device=device)[:, None]
        k = torch.arange(self.kv_len, device=device)[None, :]
        allowed = k <= q
        if self.window is not None:
            allowed &= k > q - self.window
        mask = allowed[None, None]
        if self.key_keep is not None:
            mask = mask & self.key_keep.to(device)[:, None, None, : self.kv_len]
            # A padding query would otherwise see no key at all (NaN rows that poison the cache):
            # let it see itself; its output is never used.
            mask = mask | (k == q)[None, None]
        return mask


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    scale: float,
    dense_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v with GQA; q [B, H, T, D], k/v [B, KVH, S, D] -> [B, H, T, D]."""
    gqa = q.shape[1] != k.shape[1]
    if mask.is_plain_causal():
        if mask.q_len == 1 or mask.q_start == 0 and mask.q_len == mask.kv_len:
            causal = mask.q_len > 1
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa
            )
    if dense_mask is None:
        dense_mask = mask.dense(q.device)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=dense_mask, scale=scale, enable_gqa=gqa
    )
