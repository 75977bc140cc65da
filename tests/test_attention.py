"""Attention kernels against a dense reference (scores built in full, float64)."""

from __future__ import annotations

import pytest
import torch

from ollm.layers.attention import AttentionMask, attend, chunk_attention


def reference(q, k, v, mask: AttentionMask, scale: float) -> torch.Tensor:
    g = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(g, 1)
    v = v.double().repeat_interleave(g, 1)
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask.dense(q.device), float("-inf"))
    return (scores.softmax(-1) @ v).to(q.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefix", [1, 37, 256])
def test_chunk_attention_merges_prefix_and_causal_block(dtype, prefix):
    torch.manual_seed(prefix)
    t, heads, kv_heads, d = 48, 8, 2, 64
    q = torch.randn(2, heads, t, d, dtype=dtype)
    k = torch.randn(2, kv_heads, prefix + t, d, dtype=dtype)
    v = torch.randn(2, kv_heads, prefix + t, d, dtype=dtype)
    mask = AttentionMask(prefix, t, prefix + t)
    ref = reference(q, k, v, mask, 0.125)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(chunk_attention(q, k, v, 0.125), ref, atol=tol, rtol=tol)
    # attend() routes a later prefill chunk through the same merge
    torch.testing.assert_close(attend(q, k, v, mask, 0.125), ref, atol=tol, rtol=tol)


def test_window_and_padding_chunks_still_exact():
    torch.manual_seed(0)
    t, s = 16, 80
    q, k, v = torch.randn(1, 4, t, 32), torch.randn(1, 2, s, 32), torch.randn(1, 2, s, 32)
    keep = torch.ones(1, s, dtype=torch.bool)
    keep[0, :5] = False
    for mask in (AttentionMask(s - t, t, s, window=24), AttentionMask(s - t, t, s, keep)):
        torch.testing.assert_close(
            attend(q, k, v, mask, 0.2), reference(q, k, v, mask, 0.2), atol=1e-5, rtol=1e-5
        )
