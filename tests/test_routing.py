"""Attention routing (issue 18): routed decode against float64 references with explicit key sets,
top-k over every page equal to full attention, summaries kept current, routed prefill equal to
step-by-step routed decode, the offloaded (tiered) cache equal to the device cache."""

from __future__ import annotations

import pytest
import torch

from ollm.errors import OllmError
from ollm.kv.cache import LayerKVCache
from ollm.kv.offload import KVScratch, OffloadedKVCache
from ollm.kv.routed import Router
from ollm.layers.attention import AttentionMask, attend
from ollm.layers.routing import (
    FULL,
    TOPK,
    WINDOW,
    KeySummaries,
    LayerRouting,
    parse_attention,
)
from ollm.telemetry.stats import IOStats

B, H, KVH, D, SCALE = 2, 6, 3, 16, 0.25


def _kv(n, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, KVH, n, D, generator=g, dtype=dtype)
    v = torch.randn(B, KVH, n, D, generator=g, dtype=dtype)
    q = torch.randn(B, H, 1, D, generator=g, dtype=dtype)
    return q, k, v


def _ref_pages(q, k, r: LayerRouting, head: int, b: int, lo: int, hi: int) -> list[int]:
    """The top-k pages by the definition: max over the group's query heads of
    sum_d max(q_d min_d, q_d max_d), over pages touching [lo, hi)."""
    p_, g = r.page_tokens, H // KVH
    pages = range(lo // p_, -(-hi // p_))
    scores = []
    for p in pages:
        keys = k[b, head, p * p_ : (p + 1) * p_]
        mn, mx = keys.min(0).values, keys.max(0).values
        qs = q[b, head * g : (head + 1) * g, 0]
        scores.append(float(torch.maximum(qs * mn, qs * mx).sum(-1).max()))
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[: r.pages]
    return [pages[i] for i in order]


def _reference(q, k, v, r: LayerRouting, n: int) -> torch.Tensor:
    """float64 attention of one decode query at slot n - 1 with each head's key set built
    explicitly (sinks, window, chosen pages clipped to the middle)."""
    lo, hi = r.middle(n - 1)
    g = H // KVH
    out = torch.empty(B, H, 1, D, dtype=torch.float64)
    for b in range(B):
        for hd, mech in enumerate(r.heads):
            keep = torch.zeros(n, dtype=torch.bool)
            if mech == FULL:
                keep[:] = True
            else:
                keep[:lo] = True
                keep[hi:] = True
                if mech == TOPK:
                    for p in _ref_pages(q, k[:, :, :n], r, hd, b, lo, hi):
                        a, e = max(lo, p * r.page_tokens), min(hi, (p + 1) * r.page_tokens)
                        keep[a:e] = True
            qs = q[b, hd * g : (hd + 1) * g, 0].double()
            s = (qs @ k[b, hd, :n].double().T) * SCALE
            s[:, ~keep] = -torch.inf
            out[b, hd * g : (hd + 1) * g, 0] = s.softmax(-1) @ v[b, hd, :n].double()
    return out


def _routed_cache(r: LayerRouting, n: int, dtype=torch.float64, stats=None) -> LayerKVCache:
    cache = LayerKVCache(B, KVH, D, n + 8, dtype, "cpu")
    cache.router = Router(r, B, D, n + 8, dtype, "cpu", stats)
    return cache


def _decode_last(cache, q, k, v, n, prompt_chunk=None):
    """Append keys [0, n - 1) as prefill chunks, then attend the decode query at slot n - 1."""
    prompt_chunk = prompt_chunk or n // 2
    for a in range(0, n - 1, prompt_chunk):
        e = min(n - 1, a + prompt_chunk)
        cache.attend(
            torch.zeros(B, H, e - a, D, dtype=q.dtype), k[:, :, a:e], v[:, :, a:e],
            AttentionMask(a, e - a, e), SCALE, None,
        )  # fmt: skip
    return cache.attend(
        q, k[:, :, n - 1 : n], v[:, :, n - 1 : n], AttentionMask(n - 1, 1, n), SCALE, None
    )


@pytest.mark.parametrize("n", [203, 256])
def test_mixed_heads_match_float64_reference(n):
    q, k, v = _kv(n)
    r = LayerRouting((FULL, WINDOW, TOPK), window=40, sinks=5, pages=3, page_tokens=16)
    stats = IOStats()
    out = _decode_last(_routed_cache(r, n, stats=stats), q, k, v, n)
    ref = _reference(q, k, v, r, n)
    # routed heads in the input's float64; full heads through the float32-softmax kernel
    torch.testing.assert_close(out[:, 2:], ref[:, 2:], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert stats.kv_read_tokens == r.read_tokens(n - 1, n) < stats.kv_total_tokens == 3 * n


def test_window_and_sinks_match_masked_reference():
    n = 300
    q, k, v = _kv(n, seed=1)
    r = LayerRouting((WINDOW,) * KVH, window=64, sinks=4, page_tokens=16)
    out = _decode_last(_routed_cache(r, n), q, k, v, n)
    keep = torch.zeros(1, 1, 1, n, dtype=torch.bool)
    lo, hi = r.middle(n - 1)  # sinks rounded up, the window's start down, to whole pages
    assert (lo, hi) == (16, 224)
    keep[..., :lo] = keep[..., hi:] = True
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = (q @ kk.transpose(-1, -2) * SCALE).masked_fill(~keep, -torch.inf)
    torch.testing.assert_close(out, s.softmax(-1) @ vv, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_over_every_page_is_full_attention(dtype):
    n = 200
    q, k, v = (x.to(dtype) for x in _kv(n, seed=2))
    r = LayerRouting((TOPK,) * KVH, window=32, sinks=4, pages=100, page_tokens=16)
    routed = _decode_last(_routed_cache(r, n, dtype), q, k, v, n)
    full = attend(q, k, v, AttentionMask(n - 1, 1, n), SCALE)
    assert torch.equal(routed, full)  # the key set is every key: the exact path, bit for bit
    # the gathered path itself, forced (mixed with a window head so it does not short-cut)
    q, k, v = _kv(n, seed=2)
    r = LayerRouting((TOPK, TOPK, WINDOW), window=32, sinks=4, pages=100, page_tokens=16)
    out = _decode_last(_routed_cache(r, n), q, k, v, n)
    ref = attend(q, k, v, AttentionMask(n - 1, 1, n), SCALE)
    torch.testing.assert_close(out[:, :4], ref[:, :4], rtol=1e-12, atol=1e-12)


def test_summaries_follow_append_and_trim():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(1, 2, 100, 4, generator=g)
    s = KeySummaries(1, 2, 4, 100, 8, torch.float32, "cpu")
    n = 0
    for step, t in enumerate((13, 1, 1, 5, 20, 1, 3)):
        s.update(keys[:, :, n : n + t], n)
        n += t
        if step == 4:  # roll back into a page that was full
            n -= 11
            s.trim(n, lambda a, b: keys[:, :, a:b])
        for p in range(-(-n // 8)):
            chunk = keys[:, :, p * 8 : min(n, (p + 1) * 8)]
            assert torch.equal(s.kmin[:, :, p], chunk.amin(2))
            assert torch.equal(s.kmax[:, :, p], chunk.amax(2))


def test_routed_prefill_equals_decoding_step_by_step():
    n = 160
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, H, n, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, KVH, n, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, KVH, n, D, generator=g, dtype=torch.float64)
    heads = (TOPK, WINDOW, FULL)
    r = LayerRouting(heads, window=24, sinks=3, pages=2, page_tokens=8, prefill=True)
    whole = _routed_cache(r, n).attend(q, k, v, AttentionMask(0, n, n), SCALE, None)
    step = _routed_cache(LayerRouting(heads, window=24, sinks=3, pages=2, page_tokens=8), n)
    rows = [
        step.attend(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1],
                    AttentionMask(i, 1, i + 1), SCALE, None)
        for i in range(n)
    ]  # fmt: skip
    rows = torch.cat(rows, 2)
    torch.testing.assert_close(whole[:, :4], rows[:, :4], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(whole, rows, rtol=1e-6, atol=1e-6)  # decode's full head: float32


def test_offloaded_tiers_read_like_the_device_cache():
    """KV split between a device part (40 slots) and RAM: the same routed output; trim works."""
    n = 230
    q, k, v = _kv(n, seed=5)
    r = LayerRouting((TOPK, WINDOW, TOPK), window=32, sinks=4, pages=3, page_tokens=16)
    scratch = KVScratch(B, KVH, D, n + 8, torch.float64, "cpu")
    off = OffloadedKVCache(B, KVH, D, n + 8, torch.float64, scratch, device_tokens=48)
    off.router = Router(r, B, D, n + 8, torch.float64, "cpu")
    got = _decode_last(off, q, k, v, n, prompt_chunk=100)
    torch.testing.assert_close(got, _reference(q, k, v, r, n), rtol=1e-6, atol=1e-6)
    off.trim(n - 20)
    s = off.router.summaries
    p = (n - 20) // 16
    assert torch.equal(s.kmin[:, :, p], k[:, :, p * 16 : n - 20].amin(2))


def test_parse_attention_and_one_line_errors():
    assert parse_attention("full").mode == "full"
    s = parse_attention("window:128,sinks:8")
    assert (s.mode, s.window, s.sinks, s.pages) == ("window", 128, 8, None)
    assert parse_attention("topk:32").pages == 32
    assert parse_attention("auto,topk:8").mode == "auto"
    for bad in ("", "topk", "topk:x", "full,topk:3", "sinks:4", "full,auto", "window:0", "lru:3"):
        with pytest.raises(OllmError) as err:
            parse_attention(bad)
        assert "\n" not in str(err.value)


def test_masked_gather_path_equals_paged_path():
    """A key padding mask (all real keys) takes the general gathered path: same result."""
    n = 203
    q, k, v = _kv(n, seed=6)
    r = LayerRouting((TOPK, WINDOW, TOPK), window=40, sinks=5, pages=3, page_tokens=16)
    paged = _decode_last(_routed_cache(r, n), q, k, v, n)
    cache = _routed_cache(r, n)
    keep = torch.ones(B, n + 8, dtype=torch.bool)
    for a, e in ((0, 101), (101, n - 1)):
        m = AttentionMask(a, e - a, e, keep)
        cache.attend(torch.zeros(B, H, e - a, D, dtype=q.dtype), k[:, :, a:e], v[:, :, a:e], m,
                     SCALE, None)  # fmt: skip
    m = AttentionMask(n - 1, 1, n, keep)
    masked = cache.attend(q, k[:, :, n - 1 :], v[:, :, n - 1 :], m, SCALE, None)
    torch.testing.assert_close(masked, paged, rtol=1e-10, atol=1e-10)
