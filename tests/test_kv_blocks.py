"""KV split between tiers in fixed-size blocks: the first blocks of an offloaded layer stay on
the device, the rest in RAM or on disk; decode attends each part where it sits and merges them.
Checked against a plain device cache, through the planner, and end to end against transformers
over prompts of a few thousand tokens with tiny chunks and blocks and a budget that forces KV to
disk."""

from __future__ import annotations

import pytest
import torch

from conftest import disk_kv_budget, make_hf_model
from ollm import LLM, SamplingParams
from ollm.kv.cache import LayerKVCache
from ollm.kv.offload import KVFetcher, KVScratch, OffloadedKVCache
from ollm.layers.attention import AttentionMask
from test_equivalence import hf_greedy

CAP = 80


def _steps():
    """(tokens, key_keep) per forward: prefill chunks through the scratch, then decode steps
    (one with two queries, one with a padding mask, which gather the parts)."""
    keep = torch.ones(2, CAP, dtype=torch.bool)
    keep[1, :5] = False
    return [(20, None), (13, None), (1, None), (1, None), (2, None), (1, keep), (1, None)]


@pytest.mark.parametrize("device_tokens", [0, 16, 48, 64])
@pytest.mark.parametrize("tier", ["ram", "disk"])
@pytest.mark.parametrize("fetch", [False, True])
def test_split_cache_matches_a_device_cache(device_tokens, tier, fetch, tmp_path):
    from ollm.kv.disk import KVDirectory

    torch.manual_seed(0)
    scratch = KVScratch(2, 2, 16, CAP, torch.float32, "cpu")
    with KVDirectory(tmp_path) as d:
        store = d.storage if tier == "disk" else None
        off = OffloadedKVCache(
            2, 2, 16, CAP, torch.float32, scratch, 2, storage=store, device_tokens=device_tokens
        )
        assert off.k.shape[2] == CAP - device_tokens  # the host tier holds only the rest
        if fetch:
            KVFetcher([off])
        ref = LayerKVCache(2, 2, 16, CAP, torch.float32, "cpu")
        for t, keep in _steps():
            q, k, v = torch.randn(2, 8, t, 16), torch.randn(2, 2, t, 16), torch.randn(2, 2, t, 16)
            mask = AttentionMask(ref.length, t, ref.length + t, keep)
            dense = None if keep is None else mask.dense(torch.device("cpu"))
            got = off.attend(q, k, v, mask, 0.25, dense)
            torch.testing.assert_close(got, ref.attend(q, k, v, mask, 0.25, dense))
        off.flush()
        n, g = ref.length, min(device_tokens, ref.length)
        if g:
            torch.testing.assert_close(off.dk[:, :, :g], ref.k[:, :, :g])
            torch.testing.assert_close(off.dv[:, :, :g], ref.v[:, :, :g])
        torch.testing.assert_close(off.k[:, :, : n - g], ref.k[:, :, g:n])
        torch.testing.assert_close(off.v[:, :, : n - g], ref.v[:, :, g:n])
        assert off.nbytes == ref.nbytes
        off.close()


def _plan(store, budget_share: float, block: int, context: int = 20000):
    from ollm.planning.placement import Workload, plan_placement

    spec, s = store
    work = Workload(1, context, context)
    kw = dict(chunk_tokens=256, hybrid="off", kv_block_tokens=block)
    fixed = plan_placement(spec, s, "cuda:0", None, None, "cpu", work, 4, **kw)
    kv = fixed.reserved["kv cache"]
    others = sum(
        v
        for k, v in fixed.reserved.items()
        if k not in ("resident layers", "stream buffers", "kv cache")
    )
    budget = others + int(kv * budget_share) + 3 * s.max_layer_nbytes
    return plan_placement(spec, s, "cuda:0", budget, None, "cpu", work, 4, **kw), budget


@pytest.mark.parametrize("share", [0.45, 0.6, 0.8])
def test_planner_splits_the_boundary_layer_in_whole_blocks(store, share):
    spec, _ = store
    per_token = 2 * spec.num_kv_heads * spec.head_dim * 4
    plan, budget = _plan(store, share, 64)
    split = [(i, p) for i, p in enumerate(plan.layers) if p.kv_device_tokens]
    offloaded = [i for i, p in enumerate(plan.layers) if p.kv_tier != "device"]
    assert offloaded and len(split) == 1
    i, p = split[0]
    assert i == offloaded[0] and p.kv_tier == "cpu"
    assert p.kv_device_tokens % 64 == 0 and 0 < p.kv_device_tokens < 20000
    assert plan.peak_device_bytes <= budget < plan.peak_device_bytes + 64 * per_token
    assert any(f"KV of layer {i} split" in label for label, _ in plan.describe())
    fine, _ = _plan(store, share, 16)
    coarse, _ = _plan(store, share, 1024)
    slots = [sum(p.kv_device_tokens for p in pl.layers) for pl in (fine, plan, coarse)]
    assert slots == sorted(slots, reverse=True) and all(x % 16 == 0 for x in slots)


PROMPT_LEN, NEW = 2600, 8


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_long_prompt_with_kv_forced_to_disk_matches_transformers(family, tmp_path):
    """A prompt of a few thousand tokens, prefill chunks of 128 rows, KV blocks of 32 slots and a
    RAM budget that holds the KV of some layers only: the others' KV goes to disk, the first of
    them split (its first blocks in RAM). Greedy tokens and log-probs equal transformers'."""
    model = make_hf_model(family, tmp_path / "hf", max_position_embeddings=4096)
    prompt = [(7 * i + 3) % 256 for i in range(PROMPT_LEN)]
    common = dict(
        kv_dir=tmp_path / "kv",
        prefill_chunk=128,
        kv_block_tokens=32,
        max_context=PROMPT_LEN + NEW,
        cache_dir=tmp_path / "c",
        progress=False,
    )
    budget = disk_kv_budget(tmp_path / "hf", 1.6, **common)
    llm = LLM(tmp_path / "hf", device="cpu", kv_cache="disk", cpu_memory=budget, **common)
    try:
        tiers = [p.kv_tier for p in llm.plan.layers]
        split = [p.kv_device_tokens for p in llm.plan.layers if p.kv_device_tokens]
        assert "device" in tiers and "disk" in tiers, llm.plan.describe()
        assert len(split) == 1 and split[0] % 32 == 0
        res = llm.generate(prompt, SamplingParams(max_new_tokens=NEW, temperature=0))
        assert res.token_ids == hf_greedy(model, prompt, NEW)
        seq = prompt + res.token_ids
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([seq])).logits[0, :-1].float(), -1)
        ref = ref.gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
        torch.testing.assert_close(llm.score(seq), ref, atol=1e-4, rtol=1e-4)
        assert not list((tmp_path / "kv").glob("ollm-kv-*"))
    finally:
        llm.close()
