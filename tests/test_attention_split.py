"""One sequence's CPU decode attention with its keys split over idle threads
(layers/attention.py ``split_keys_attention``): equal to one call over all keys, for any key
stride and a remainder part, and used only when threads would idle."""

from __future__ import annotations

import pytest
import torch

from ollm.layers import attention as A


@pytest.mark.parametrize("parts", [2, 3, 4])
@pytest.mark.parametrize("strided", [False, True])
def test_split_equals_one_call(parts, strided):
    g = torch.Generator().manual_seed(parts)
    kvh, grp, d, s = 2, 3, 16, 1001  # 1001 keys: a remainder for every part count
    q = torch.randn(1, kvh, grp, d, generator=g, dtype=torch.float64)
    if strided:  # keys inside a larger cache (as a cache's first S slots, or a view)
        big = torch.randn(1, kvh, s + 37, d, generator=g, dtype=torch.float64)
        k, v = big[:, :, 5 : 5 + s], big.flip(2)[:, :, 3 : 3 + s]
    else:
        k = torch.randn(1, kvh, s, d, generator=g, dtype=torch.float64)
        v = torch.randn(1, kvh, s, d, generator=g, dtype=torch.float64)
    want = torch.softmax(q @ k.transpose(-1, -2) * 0.3, dim=-1) @ v  # float64 reference
    got = A.split_keys_attention(q, k, v, 0.3, parts)
    # the CPU flash kernel's exp is not float64-exact (~1e-8 either way, split or not)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_parts_fill_idle_threads_only(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    n = A.SPLIT_MIN_KEYS
    assert A.key_parts(8, 100_000) == 2  # one sequence, 8 KV heads: 8 threads idle
    assert A.key_parts(1, 100_000) == 16
    assert A.key_parts(1, 3 * n) == 3  # parts of at least SPLIT_MIN_KEYS keys
    assert A.key_parts(16, 100_000) == 1  # every thread busy: one call
    assert A.key_parts(8, n) == 1


def test_grouped_decode_uses_the_split(monkeypatch):
    """A one-token decode over many keys with idle threads goes through the split; its output
    equals the float64 reference."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    calls = []
    real = A.split_keys_attention
    monkeypatch.setattr(A, "split_keys_attention", lambda *a: calls.append(a[-1]) or real(*a))
    g = torch.Generator().manual_seed(0)
    s = 3 * A.SPLIT_MIN_KEYS + 11
    q = torch.randn(1, 4, 1, 32, generator=g)
    k = torch.randn(1, 1, s, 32, generator=g)
    v = torch.randn(1, 1, s, 32, generator=g)
    got = A.grouped_attention(q, k, v, 0.2, None)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().expand(1, 4, s, 32), v.double().expand(1, 4, s, 32), scale=0.2
    )
    assert calls == [3]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
