"""KV eviction (issue 17): what each policy keeps, attention over the kept slots, keeping
everything equals the exact path, the CLI's refusals."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from ollm.cli import app
from ollm.kv.evict import EvictingKVCache, EvictionPolicy, parse_eviction
from ollm.layers.attention import AttentionMask, attend


def _feed(cache, q, k, v, chunks):
    """Forward ``chunks`` rows at a time (then decode steps); the outputs in order."""
    outs, pos = [], 0
    for t in chunks:
        sl = slice(pos, pos + t)
        mask = AttentionMask(pos, t, pos + t)
        outs.append(cache.attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], mask, 0.25, None))
        pos += t
    return outs


def _qkv(n, heads=4, kv_heads=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, h, n, d, generator=g) for h in (heads, kv_heads, kv_heads))


def test_parse_eviction():
    assert parse_eviction("none", "25%") is None
    p = parse_eviction("h2o", "25%")
    assert (p.name, p.keep, p.budget(1000)) == ("h2o", 0.25, 250)
    assert parse_eviction("snapkv", "300").budget(1000) == 300
    assert parse_eviction("streaming", "1%").budget(1000) == 4 + 64 + 1  # sinks + window + 1
    for name, keep in (("lru", "25%"), ("h2o", "0%"), ("h2o", "150%"), ("h2o", "x")):
        with pytest.raises(ValueError):
            parse_eviction(name, keep)


@pytest.mark.parametrize("name", ["streaming", "h2o", "snapkv"])
def test_eviction_keeps_sinks_and_window(name):
    q, k, v = _qkv(300)
    policy = EvictionPolicy(name, 100, sinks=4, window=32)
    cache = EvictingKVCache(1, 2, 16, 300, torch.float32, "cpu", policy, forward=128)
    _feed(cache, q, k, v, [128, 128] + [1] * 44)
    assert len(cache) == 300 and cache.kept <= cache.budget + cache.slack
    pos = cache.pos[:, :, : cache.kept]
    for head in pos[0]:
        kept = set(head.tolist())
        assert set(range(4)) <= kept  # sinks
        assert set(range(300 - 32, 300)) <= kept  # the recent window
        assert head.tolist() == sorted(kept)  # position order, no duplicates
    if name == "streaming":  # sinks + the most recent: nothing in between survives
        assert pos[0, 0, 4].item() >= 300 - cache.kept


def test_h2o_keeps_the_heavy_hitter():
    q, k, v = _qkv(300, seed=1)
    u = torch.nn.functional.normalize(torch.ones(16), dim=0)
    q += 2 * u  # every query shares a direction; key 100 points along it: a heavy hitter
    k[:, :, 100] = 6 * u
    cache = EvictingKVCache(1, 2, 16, 300, torch.float32, "cpu", EvictionPolicy("h2o", 60),
                            forward=64)  # fmt: skip
    _feed(cache, q, k, v, [64] * 4 + [1] * 44)
    assert bool((cache.pos[:, :, : cache.kept] == 100).any(-1).all())


def test_keeping_everything_is_exact_attention():
    q, k, v = _qkv(200, seed=2)
    cache = EvictingKVCache(1, 2, 16, 200, torch.float32, "cpu", EvictionPolicy("h2o", 1.0),
                            forward=200)  # fmt: skip
    outs = torch.cat(_feed(cache, q, k, v, [150] + [1] * 50), 2)
    ref = attend(q, k, v, AttentionMask(0, 200, 200), 0.25)
    assert float((outs - ref).abs().max()) < 1e-5


def test_padding_mask_rows_stay_finite():
    q, k, v = _qkv(120, seed=3)
    q, k, v = (x.expand(2, -1, -1, -1).clone() for x in (q, k, v))
    keep = torch.ones(2, 120, dtype=torch.bool)
    keep[1, :7] = False
    cache = EvictingKVCache(2, 2, 16, 120, torch.float32, "cpu", EvictionPolicy("snapkv", 80),
                            forward=100)  # fmt: skip
    out = cache.attend(q[:, :, :100], k[:, :, :100], v[:, :, :100],
                       AttentionMask(0, 100, 100, keep), 1 / math.sqrt(16), None)  # fmt: skip
    assert not bool(out.isnan().any())
    ref = attend(q[:1, :, :100], k[:1, :, :100], v[:1, :, :100], AttentionMask(0, 100, 100), 0.25)
    assert float((out[:1] - ref).abs().max()) < 1e-5  # the forward itself saw every key
    assert cache.kept == cache.budget == 80
    cache.trim(90)
    assert len(cache) == 90 and int(cache.pos[:, :, : cache.kept].max()) < 90


def test_cli_refuses_bad_eviction():
    for args in (["--kv-evict", "lru"], ["--kv-evict", "h2o", "--kv-keep", "0%"],
                 ["--kv-evict", "h2o", "--kv-codec", "auto"]):  # fmt: skip
        res = CliRunner().invoke(app, ["run", "hi", "--device", "cpu", *args])
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("ollm: ")]
        assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr


@pytest.mark.parametrize(
    "knobs",
    [
        {"name": "h2o", "recent_share": 0.5},
        {"name": "h2o", "normalise": True},
        {"name": "h2o", "decay": 0.99, "normalise": True},
        {"name": "snapkv", "recent_share": 0.25, "observe": 64, "pool": 1},
    ],
)
def test_policy_variants_keep_sinks_window_and_budget(knobs):
    q, k, v = _qkv(300, seed=5)
    policy = EvictionPolicy(keep=100, sinks=4, window=16, **knobs)
    cache = EvictingKVCache(1, 2, 16, 300, torch.float32, "cpu", policy, forward=128)
    window = max(16, int(knobs.get("recent_share", 0) * cache.budget))
    assert cache.window == window
    _feed(cache, q, k, v, [128, 100] + [1] * 72)
    assert cache.kept <= cache.budget + cache.slack
    for head in cache.pos[0, :, : cache.kept]:
        kept = set(head.tolist())
        assert set(range(4)) <= kept and set(range(300 - window, 300)) <= kept
        assert head.tolist() == sorted(kept)


def test_decayed_scores_weight_recent_queries():
    """With decay, a key the newest queries attend to outranks one only old queries saw."""
    q, k, v = _qkv(200, seed=6)
    u = torch.nn.functional.normalize(torch.ones(16), dim=0)
    k[:, :, 20], k[:, :, 30] = 6 * u, -6 * u
    q[:, :, :100] += 3 * u  # old queries look at key 20
    q[:, :, 100:] -= 3 * u  # new ones at key 30
    kept = {}
    for decay in (1.0, 0.9):
        policy = EvictionPolicy("h2o", 40, window=16, decay=decay, normalise=False)
        cache = EvictingKVCache(1, 2, 16, 200, torch.float32, "cpu", policy, forward=200)
        _feed(cache, q, k, v, [200])
        kept[decay] = [set(head.tolist()) for head in cache.pos[0, :, : cache.kept]]
    assert all({20, 30} <= head for head in kept[1.0])  # accumulated: both heavy
    assert all(30 in head and 20 not in head for head in kept[0.9])  # decayed: the recent one


def test_pyramid_budgets():
    p = EvictionPolicy("streaming", 0.5, pyramid=0.5)
    keeps = [p.for_layer(j, 3).keep for j in range(3)]
    assert keeps == [0.75, 0.5, 0.25] and sum(keeps) / 3 == 0.5
    assert EvictionPolicy("h2o", 0.8, pyramid=0.5).for_layer(0, 3).keep == 1.0  # capped
    assert EvictionPolicy("h2o", 0.5).for_layer(2, 3).keep == 0.5
