"""Our models against transformers on tiny random-weight configs: greedy tokens and logits."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES
from ollm import LLM, SamplingParams

PROMPT = [5, 17, 99, 3, 42, 7, 250, 11]
NEW = 32


def hf_greedy(model, prompt, n=NEW):
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),  # else HF treats token 0 (pad id) as padding
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("offload", ["auto", "disk"])
def test_greedy_and_logits_match_transformers(family, offload, hf_models, tmp_path):
    model, path = hf_models(family)
    llm = LLM(path, device="cpu", offload=offload, cache_dir=tmp_path, progress=False)
    try:
        if offload == "disk":
            assert all(p.tier == "disk" for p in llm.plan.layers)
        res = llm.generate(PROMPT, SamplingParams(max_new_tokens=NEW, temperature=0))
        assert res.token_ids == hf_greedy(model, PROMPT)
        seq = PROMPT + res.token_ids
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([seq])).logits[0, :-1].float(), -1)
        ref = ref.gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
        ours = llm.score(seq)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
        if offload == "disk":
            assert (
                res.metrics.bytes_read_disk
                >= llm.store.total_nbytes - llm.store.files["globals.bin"].nbytes
            )
    finally:
        llm.close()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "gemma3_text"])
def test_chunked_prefill_matches_transformers(family, hf_models, tmp_path):
    """A prompt much longer than the prefill chunk (and than Gemma's sliding window): layers
    stream once per prompt, chunk c attends to the KV of chunks <= c."""
    model, path = hf_models(family)
    prompt = [(7 * i + 3) % 256 for i in range(300)]
    llm = LLM(
        path, device="cpu", offload="disk", prefill_chunk=64, cache_dir=tmp_path, progress=False
    )
    try:
        assert llm.plan.prefill_chunk_tokens == 64
        res = llm.generate(prompt, SamplingParams(max_new_tokens=8, temperature=0))
        assert res.token_ids == hf_greedy(model, prompt, 8)
        seq = prompt + res.token_ids
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([seq])).logits[0, :-1].float(), -1)
        ref = ref.gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
        torch.testing.assert_close(llm.score(seq), ref, atol=1e-4, rtol=1e-4)
    finally:
        llm.close()


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_kv_in_pinned_ram_matches_transformers(family, hf_models, tmp_path):
    """Layers whose KV the plan sends to RAM (OffloadedKVCache; the planner does so on a GPU
    under a tight budget): forced here on the CPU device, with chunked prefill through the
    shared scratch and decode attending where the KV lives."""
    from dataclasses import replace

    model, path = hf_models(family)
    prompt = [(7 * i + 3) % 256 for i in range(150)]
    llm = LLM(path, device="cpu", prefill_chunk=64, cache_dir=tmp_path, progress=False)
    try:
        n = len(llm.plan.layers)
        layers = tuple(
            replace(p, kv_tier="cpu") if i >= 1 else p for i, p in enumerate(llm.plan.layers)
        )
        llm.plan = llm.runner.plan = replace(llm.plan, layers=layers)
        assert sum(p.kv_tier == "cpu" for p in llm.plan.layers) == n - 1
        res = llm.generate(prompt, SamplingParams(max_new_tokens=12, temperature=0))
        assert res.token_ids == hf_greedy(model, prompt, 12)
    finally:
        llm.close()


def test_sliding_window_kv_is_bounded(hf_models, tmp_path):
    """Gemma 3's sliding layers keep window + one chunk of KV, not the whole context, and the
    output still matches transformers."""
    from ollm.kv.cache import SlidingKVCache

    model, path = hf_models("gemma3_text")
    prompt = [(5 * i + 1) % 256 for i in range(400)]
    llm = LLM(path, device="cpu", prefill_chunk=32, cache_dir=tmp_path, progress=False)
    try:
        caches = llm.runner.new_kv(1, len(prompt) + 12)
        sliding = [c for c in caches if isinstance(c, SlidingKVCache)]
        assert len(sliding) == 4 and all(c.capacity < 100 for c in sliding)
        res = llm.generate(prompt, SamplingParams(max_new_tokens=12, temperature=0))
        assert res.token_ids == hf_greedy(model, prompt, 12)
    finally:
        llm.close()


def test_sliding_kv_with_padded_batch(hf_models, tmp_path):
    """Left padding + chunked prefill + bounded sliding caches: each sequence as if alone."""
    _, path = hf_models("gemma3_text")
    prompts = [[(3 * i + 2) % 256 for i in range(n)] for n in (200, 90, 150)]
    llm = LLM(path, device="cpu", prefill_chunk=32, max_batch=3, cache_dir=tmp_path, progress=False)
    try:
        params = SamplingParams(max_new_tokens=8, temperature=0)
        batch = llm.generate(prompts, params)
        for p, r in zip(prompts, batch, strict=True):
            assert r.token_ids == llm.generate(p, params).token_ids
    finally:
        llm.close()
