"""Eviction over encoded slots (issue 17, ``kv/evict_codec.py``): attention equals
decode-then-attend over the kept slots, the policy keeps sinks and window, budgets hold, trim,
bytes held, and the config's acceptance and refusals."""

from __future__ import annotations

import pytest
import torch

from ollm.config import EngineConfig
from ollm.errors import OllmError
from ollm.kv.codecs import decode, encode, parse_kv_codec
from ollm.kv.evict import EvictionPolicy
from ollm.kv.evict_codec import EncodedEvictingKVCache
from ollm.layers.attention import AttentionMask

D, SCALE = 32, 0.2


def _qkv(n, heads=4, kv_heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, h, n, D, generator=g) for h in (heads, kv_heads, kv_heads))


def _roundtrip_keys(k, codec):
    """Keys as the per-channel blocks of ``codec.block`` positions decode them."""
    g = codec.block
    n = k.shape[2] // g * g
    out = k.clone()
    for a in range(0, n, g):
        codes, params = encode(k[:, :, a : a + g], codec.key)
        decode(codes, params, codec.key, out[:, :, a : a + g])
    return out


def _roundtrip_values(v, codec):
    codes, params = encode(v, codec.value)
    return decode(codes, params, codec.value, torch.empty_like(v))


def _reference(q, k, v, kept, start, codec):
    """Rows [start, start + t) of q over the positions ``kept`` [B, KVH, n] (earlier kept
    slots) plus the forward's own, each key read decoded iff its position is below
    ``codec.boundary(row + 1)``."""
    kd, vd = _roundtrip_keys(k, codec), _roundtrip_values(v, codec)
    t = q.shape[2] - start
    b, h = q.shape[:2]
    kvh = k.shape[1]
    out = torch.empty(b, h, t, D)
    for head in range(h):
        j = head // (h // kvh)
        keys = torch.cat([kept[0, j], torch.arange(start, start + t)])
        for r in range(t):
            qp = start + r
            seen = keys[keys <= qp]
            dec = seen < codec.boundary(qp + 1)
            kk = torch.where(dec[:, None], kd[0, j, seen], k[0, j, seen])
            vv = torch.where(dec[:, None], vd[0, j, seen], v[0, j, seen])
            p = torch.softmax(q[0, head, qp] @ kk.T * SCALE, -1)
            out[0, head, r] = p @ vv
    return out


@pytest.mark.parametrize("spec", ["int4", "int8", "k:int4,v:int8"])
@pytest.mark.parametrize("name", ["h2o", "snapkv", "streaming"])
def test_attention_equals_decode_then_attend(spec, name):
    n, recent = 260, 24
    q, k, v = _qkv(n, seed=3)
    codec = parse_kv_codec(spec, recent)
    policy = EvictionPolicy(name, 96, sinks=4, window=16)
    cache = EncodedEvictingKVCache(1, 2, D, n, torch.float32, "cpu", policy, 64, codec)
    pos = 0
    for t in [64, 40, 64] + [1] * 30 + [50] + [1] * 12:
        kept = cache.pos[:, :, : cache.kept].clone()
        mask = AttentionMask(pos, t, pos + t)
        sl = slice(pos, pos + t)
        out = cache.attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], mask, SCALE, None)
        ref = _reference(q[:, :, : pos + t], k[:, :, : pos + t], v[:, :, : pos + t], kept,
                         pos, codec)  # fmt: skip
        assert float((out - ref).abs().max()) < 1e-4, (t, pos)
        pos += t
        held = cache.pos[0, :, : cache.kept]
        assert cache.kept <= cache.budget + cache.slack
        for head in held:
            assert set(range(4)) <= set(head.tolist())  # sinks
            assert set(range(pos - cache.window, pos)) <= set(head.tolist())  # window
            assert head.tolist() == sorted(set(head.tolist()))
        assert cache.tail == pos - codec.boundary(pos + 1)  # the exact tail: the newest


def test_bytes_held_are_the_encoded_ones():
    codec = parse_kv_codec("int4", 32, group=32)  # keys in blocks of 32 positions
    policy = EvictionPolicy("h2o", 0.5)
    cache = EncodedEvictingKVCache(1, 1, 256, 2048, torch.float32, "cpu", policy, 256, codec)
    q, k, v = (torch.randn(1, h, 2048, 256) for h in (4, 1, 1))
    for p in range(0, 2048, 256):
        mask = AttentionMask(p, 256, p + 256)
        sl = slice(p, p + 256)
        cache.attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], mask, SCALE, None)
    assert cache.kept == cache.budget == 1024
    # int4: 128 code bytes a side; values' 8 groups x 3 B of packed (lo, scale) per
    # slot; keys' 3 B per channel per block of 32 positions encoded so far
    per_slot = 128 + 128 + 8 * 3
    exact = 2 * 256 * 4
    blocks = codec.boundary(2048 + 1) // 32
    expect = cache.enc * per_slot + blocks * 3 * 256 + cache.tail * exact
    assert cache.kept_bytes() == expect
    assert cache.nbytes < 0.3 * 2048 * exact  # held storage, not the full-precision size


def test_trim():
    q, k, v = _qkv(200, seed=4)
    codec = parse_kv_codec("int4", 16, group=32)  # blocks of 32 positions
    cache = EncodedEvictingKVCache(1, 2, D, 200, torch.float32, "cpu",
                                   EvictionPolicy("streaming", 80), 64, codec)  # fmt: skip
    pos = 0
    for t in [64, 64, 40]:
        sl = slice(pos, pos + t)
        cache.attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], AttentionMask(pos, t, pos + t),
                     SCALE, None)  # fmt: skip
        pos += t
    cache.trim(160)  # inside the exact tail (positions from boundary(169) = 128 on)
    assert len(cache) == 160 and int(cache.pos[:, :, : cache.kept].max()) == 159
    assert cache.tail == 160 - 128
    cache.trim(100)  # below it: encoded slots past 100 go, block [96, 100) back to the tail
    assert len(cache) == 100 and cache.tail == 4
    assert int(cache.pos[:, :, : cache.kept].max()) == 99
    sl = slice(100, 101)
    out = cache.attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], AttentionMask(100, 1, 101),
                       SCALE, None)  # fmt: skip
    assert torch.isfinite(out).all() and len(cache) == 101


def test_config_accepts_plain_codecs_with_eviction():
    for spec in ("int4", "int8", "k:int4,v:int8", "fp8"):
        EngineConfig(kv_codec=spec, kv_evict="h2o", kv_keep="50%")
    for spec in ("auto", "4k:bf16,32k:int8,rest:int4"):
        with pytest.raises(OllmError, match="kv_evict"):
            EngineConfig(kv_codec=spec, kv_evict="h2o", kv_keep="50%")


def test_codec_with_eviction_through_a_tiny_model(tmp_path):
    """A tiny model runs with int4 + eviction: every full-attention cache is an encoded evicting
    one, log-probs before any eviction or encoding equal the exact path's, generation runs."""
    from conftest import char_tokenizer, make_hf_model
    from ollm import LLM, SamplingParams

    make_hf_model("llama", tmp_path)
    char_tokenizer().save_pretrained(str(tmp_path))
    ids = list(range(1, 150))
    opts = {"device": "cpu", "max_context": 256, "prefill_chunk": 32}
    with LLM(str(tmp_path), **opts) as exact:
        ref = exact.score(ids)
    with LLM(str(tmp_path), kv_codec="int4", kv_recent=16, kv_evict="h2o", kv_keep="50%",
             **opts) as llm:  # fmt: skip
        caches = llm.runner.new_kv(1, 256)
        assert all(isinstance(c, EncodedEvictingKVCache) for c in caches)
        for c in caches:
            c.close()
        lp = llm.score(ids)
        assert torch.allclose(lp[:16], ref[:16], atol=1e-4)  # exact window, nothing evicted
        assert bool(torch.isfinite(lp).all()) and float((lp - ref).abs().mean()) > 0
        params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
        assert len(llm.generate(ids, params).token_ids) == 6
