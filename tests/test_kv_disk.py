"""The KV disk tier: equivalence, run-directory life cycle, refusals and disk-full handling."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from ollm import LLM, SamplingParams
from ollm.errors import OllmError
from test_equivalence import hf_greedy

PROMPT = [(7 * i + 3) % 256 for i in range(120)]


def runs(kv_dir):
    return sorted(p.name for p in kv_dir.glob("ollm-kv-*")) if kv_dir.exists() else []


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_disk_kv_matches_transformers_and_cleans_up(family, hf_models, tmp_path):
    model, path = hf_models(family)
    kv_dir = tmp_path / "kv"
    seen = []
    llm = LLM(
        path,
        device="cpu",
        kv_cache="disk",
        kv_dir=kv_dir,
        prefill_chunk=32,
        cache_dir=tmp_path,
        progress=False,
    )
    try:
        assert all(p.kv_tier == "disk" for p in llm.plan.layers)

        def on_token(_r, _tok):
            seen.append(sum(f.stat().st_size for f in kv_dir.glob("ollm-kv-*/*.bin")))

        res = llm.generate(
            PROMPT, SamplingParams(max_new_tokens=10, temperature=0), _on_token=on_token
        )
        assert res.token_ids == hf_greedy(model, PROMPT, 10)
        assert seen and seen[0] == llm.runner.disk_kv_bytes(1, len(PROMPT) + 10)
        assert runs(kv_dir) == []  # the run directory is gone once the request ends
    finally:
        llm.close()


def test_stale_run_dirs_are_removed_and_interrupts_clean_up(hf_models, tmp_path):
    _, path = hf_models("llama")
    kv_dir = tmp_path / "kv"
    (kv_dir / "ollm-kv-999999-0").mkdir(parents=True)  # left by a killed process
    (kv_dir / "ollm-kv-999999-0" / "kv-00000.bin").write_bytes(b"x" * 100)
    llm = LLM(
        path, device="cpu", kv_cache="disk", kv_dir=kv_dir, cache_dir=tmp_path, progress=False
    )

    def interrupt(_r, _tok):
        assert len(runs(kv_dir)) == 1 and "999999" not in runs(kv_dir)[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPT, SamplingParams(max_new_tokens=5, temperature=0), _on_token=interrupt)
    assert runs(kv_dir) == []
    ok = llm.generate(PROMPT[:20], SamplingParams(max_new_tokens=3, temperature=0))
    assert len(ok.token_ids) == 3
    llm.close()


def test_disk_full_is_a_clear_error_with_nothing_left(hf_models, tmp_path, monkeypatch):
    _, path = hf_models("llama")
    kv_dir = tmp_path / "kv"
    llm = LLM(
        path, device="cpu", kv_cache="disk", kv_dir=kv_dir, cache_dir=tmp_path, progress=False
    )
    calls = []

    def full(fd, offset, length):
        calls.append(length)
        if len(calls) > 3:  # the fourth file does not fit
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OllmError, match="No space left"):
        llm.generate(PROMPT, SamplingParams(max_new_tokens=3, temperature=0))
    assert runs(kv_dir) == []
    monkeypatch.undo()
    llm.close()


def test_free_space_and_writability_checked_before_prefill(hf_models, tmp_path, monkeypatch):
    import shutil

    import ollm.kv.disk as disk

    _, path = hf_models("llama")
    kv_dir = tmp_path / "kv"
    llm = LLM(
        path, device="cpu", kv_cache="disk", kv_dir=kv_dir, cache_dir=tmp_path, progress=False
    )
    real = shutil.disk_usage
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(OllmError, match="free; this request needs"):
        llm.generate(PROMPT, SamplingParams(max_new_tokens=3, temperature=0))
    monkeypatch.undo()
    assert runs(kv_dir) == []
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    bad = LLM(
        path,
        device="cpu",
        kv_cache="disk",
        kv_dir=blocker / "kv",
        cache_dir=tmp_path,
        progress=False,
    )
    with pytest.raises(OllmError, match="cannot be created"):
        bad.generate(PROMPT, SamplingParams(max_new_tokens=3, temperature=0))
    bad.close()
    llm.close()


def test_per_request_disk_cache_equals_memory(hf_models, tmp_path):
    _, path = hf_models("qwen3")
    llm = LLM(path, device="cpu", cache_dir=tmp_path, progress=False)
    params = SamplingParams(max_new_tokens=8, temperature=0)
    mem = llm.generate(PROMPT, params)
    disk = llm.generate(PROMPT, params, _kv_dir=str(tmp_path / "kv"))
    assert disk.token_ids == mem.token_ids
    torch.testing.assert_close(torch.tensor(disk.token_ids), torch.tensor(mem.token_ids))
    llm.close()


def test_pinned_kv_larger_than_ram_is_refused_before_prefill(hf_models, tmp_path, monkeypatch):
    from dataclasses import replace

    import psutil

    _, path = hf_models("llama")
    llm = LLM(path, device="cpu", cache_dir=tmp_path, progress=False)
    layers = tuple(replace(p, kv_tier="cpu") for p in llm.plan.layers)
    llm.plan = llm.runner.plan = replace(llm.plan, layers=layers)
    fake = psutil.virtual_memory()._replace(available=10_000)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: fake)
    with pytest.raises(OllmError, match="pinned RAM for its KV cache"):
        llm.generate(PROMPT, SamplingParams(max_new_tokens=3, temperature=0))
    llm.close()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fetched_kv_decode_matches_transformers(family, hf_models, tmp_path):
    """KV of some layers in (pinned) RAM attended on the CPU, of others fetched back to the
    compute device each decode step (``kv_fetch``), with the prompt in small prefill chunks:
    greedy tokens equal transformers', RAM stays the complete cache, and a forward that did not
    announce the step (no ``start_step``) still fetches correctly."""
    from dataclasses import replace

    from ollm.kv.offload import KVFetcher, OffloadedKVCache

    model, path = hf_models(family)
    llm = LLM(path, device="cpu", prefill_chunk=32, cache_dir=tmp_path, progress=False)
    n = len(llm.plan.layers)
    layers = tuple(
        replace(p, kv_tier="cpu", kv_fetch=i % 2 == 1) if i > 0 else p
        for i, p in enumerate(llm.plan.layers)
    )
    llm.plan = llm.runner.plan = replace(llm.plan, layers=layers)
    kv = llm.runner.new_kv(1, len(PROMPT) + 12)
    fetched = [c for c in kv if isinstance(c, OffloadedKVCache) and c.fetcher is not None]
    assert len(fetched) == n // 2 and isinstance(fetched[0].fetcher, KVFetcher)
    for c in kv:
        c.close()
    assert all(c.fetcher is None for c in fetched)

    calls = []
    orig = KVFetcher.take

    def take(self, cache):
        calls.append(id(cache) in self._pending)
        return orig(self, cache)

    KVFetcher.take = take
    try:
        res = llm.generate(PROMPT, SamplingParams(max_new_tokens=12, temperature=0))
    finally:
        KVFetcher.take = orig
    assert res.token_ids == hf_greedy(model, PROMPT, 12)
    assert len(calls) == 11 * (n // 2) and all(calls)  # every decode step, issued ahead
    llm.close()


def test_fetcher_without_start_step_and_ram_stays_complete():
    from ollm.kv.cache import LayerKVCache
    from ollm.kv.offload import KVFetcher, KVScratch, OffloadedKVCache
    from ollm.layers.attention import AttentionMask

    torch.manual_seed(0)
    scratch = KVScratch(1, 2, 16, 64, torch.float32, "cpu")
    offs = [OffloadedKVCache(1, 2, 16, 64, torch.float32, scratch, 2) for _ in range(3)]
    fetcher = KVFetcher(offs)
    refs = [LayerKVCache(1, 2, 16, 64, torch.float32, "cpu") for _ in range(3)]
    for step, t in enumerate((20, 1, 1, 2, 1)):
        if step == 2:
            fetcher.start_step()  # steps 1, 3, 4 are not announced: copies are made on demand
        for off, ref in zip(offs, refs, strict=True):
            q, k, v = torch.randn(1, 8, t, 16), torch.randn(1, 2, t, 16), torch.randn(1, 2, t, 16)
            mask = AttentionMask(ref.length, t, ref.length + t)
            got = off.attend(q, k, v, mask, 0.25, None)
            torch.testing.assert_close(got, ref.attend(q, k, v, mask, 0.25, None))
    for off, ref in zip(offs, refs, strict=True):
        off.flush()
        torch.testing.assert_close(off.k[:, :, : ref.length], ref.k[:, :, : ref.length])
        torch.testing.assert_close(off.v[:, :, : ref.length], ref.v[:, :, : ref.length])
