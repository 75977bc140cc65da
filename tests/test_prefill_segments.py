"""Segmented prefill (``planning/segments.py``, ``Generator._prefill``): a prompt prefilled in
forwards of ``prefill_segment`` tokens, KV appended and positions continuing, gives the tokens
of one forward and its log-probs within float tolerance (the attention of a row is split
between segments), for KV on the device, in pinned RAM and on disk, exact and compressed; the
planner segments only when one forward is refused or pins more RAM than allowed."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import load_script
from ollm import LLM, SamplingParams
from ollm.engine.runner import Runner
from ollm.errors import BudgetError, OllmError
from ollm.kv.codecs import kv_format
from ollm.kv.offload import KVScratch
from ollm.planning.placement import Workload, plan_placement
from ollm.planning.segments import (
    mark,
    pinned_host_bytes,
    plan_segmented,
    segment_copy_bytes,
    segment_sizes,
)
from ollm.tiers import Phase

GiB = 1 << 30
PROMPT = [(7 * i + 3) % 256 for i in range(150)]
SEG = 40  # 150 tokens: segments of 40, 40, 40 and 30

CASES = {
    "device": {},
    "ram": {"ram": True},
    "disk": {"kv_cache": "disk"},
    "int8": {"kv_codec": "int8", "kv_recent": 16},
    "int4": {"kv_codec": "int4", "kv_recent": 16},
    "int4-ram": {"kv_codec": "int4", "kv_recent": 16, "ram": True},
    "int4-disk": {"kv_codec": "int4", "kv_recent": 16, "kv_cache": "disk"},
}


def _run(path, tmp_path, segment, options):
    """(greedy tokens, score log-probs, forwards of the generate's prefill) with ``options``."""
    opts = dict(options)
    ram = opts.pop("ram", False)
    if opts.get("kv_cache") == "disk":
        opts["kv_dir"] = str(tmp_path / "kv")
    kw = dict(device="cpu", cache_dir=tmp_path, progress=False, max_context=256, **opts)
    with LLM(path, prefill_segment=segment, **kw) as llm:
        assert llm.plan.prefill_segment == segment
        if ram:  # KV of every layer but the first in pinned RAM (OffloadedKVCache / RAM home)
            layers = tuple(
                replace(p, kv_tier="cpu") if i >= 1 else p for i, p in enumerate(llm.plan.layers)
            )
            llm.plan = llm.runner.plan = replace(llm.plan, layers=layers)
        rows = []
        real = Runner.forward

        def spy(self, ids, *args, **kwargs):
            rows.append(ids.shape[1])
            return real(self, ids, *args, **kwargs)

        Runner.forward = spy
        try:
            params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
            tokens = llm.generate(PROMPT, params).token_ids
        finally:
            Runner.forward = real
        return tokens, llm.score(PROMPT), rows[: len(rows) - 7]  # 7 decode steps follow


@pytest.mark.parametrize("case", list(CASES))
def test_segments_give_the_tokens_and_logits_of_one_forward(case, hf_models, tmp_path):
    """float32 tiny Llama: four forwards of at most 40 rows instead of one of 150; greedy
    tokens equal and every position's log-prob within 1e-4 (score segments too)."""
    _, path = hf_models("llama")
    one = _run(path, tmp_path / "one", 0, CASES[case])
    seg = _run(path, tmp_path / "seg", SEG, CASES[case])
    assert one[2] == [150]
    assert seg[2] == [40, 40, 40, 30]
    assert seg[0] == one[0]
    torch.testing.assert_close(seg[1], one[1], atol=1e-4, rtol=1e-4)


def test_ram_kv_reloads_only_the_earlier_segments(hf_models, tmp_path, monkeypatch):
    """A later segment of an offloaded layer copies that layer's earlier slots back into the
    shared prefill scratch once (its queries attend to them on the compute device), and
    nothing more: per RAM layer 40 + 80 + 120 slots for segments starting at 40, 80, 120."""
    _, path = hf_models("llama")
    loads: list[int] = []
    real = KVScratch.claim

    def spy(self, cache, start):
        if self.owner is not cache or self.valid < start:
            loads.append(start)
        return real(self, cache, start)

    monkeypatch.setattr(KVScratch, "claim", spy)
    _run(path, tmp_path, SEG, {"ram": True})
    with LLM(path, device="cpu", cache_dir=tmp_path, progress=False, max_context=256) as llm:
        ram_layers = len(llm.plan.layers) - 1
    prefill = loads[: 4 * ram_layers]  # the generate's prefill (score claims again after it)
    assert sorted(prefill) == sorted([0, 40, 80, 120] * ram_layers)


def _llama8b():
    return load_script("plan_report.py").llama8b()


def test_planner_segments_only_when_refused():
    """Llama-3.1-8B shapes, 8 GiB, bf16 KV: at 100k one forward fits and auto is that plan,
    unchanged; at 1.5M one forward is refused (even with the residual stream in RAM) and auto
    takes the largest power-of-two segment that fits, its activations for that many rows,
    within the budget; a fixed segment is planned as asked."""
    spec, store = _llama8b()

    def plan(work):
        return plan_placement(spec, store, "cuda:0", 8 * GiB, None, "auto", work, 2)

    w100 = Workload(1, 100_000, 100_000)
    assert plan_segmented(plan, w100, "auto") == plan(w100)
    assert plan_segmented(plan, w100, None).prefill_segment == 0
    big = Workload(1, 1_500_000, 1_500_000)
    with pytest.raises(BudgetError):
        plan(big)
    auto = plan_segmented(plan, big, "auto")
    seg = auto.prefill_segment
    assert seg in segment_sizes(big.prefill_tokens) and seg >= 16384
    assert auto.peak_device_bytes <= 8 * GiB
    assert auto == mark(plan(Workload(1, big.context, seg)), seg)
    with pytest.raises(BudgetError):  # the next larger one does not fit
        plan(Workload(1, big.context, 2 * seg))
    assert ("prefill segments", f"{seg} tokens per forward") in auto.describe()
    fixed = plan_segmented(plan, w100, 32768)
    assert fixed.prefill_segment == 32768
    assert fixed == mark(plan(Workload(1, 100_000, 32768)), 32768)
    assert 0 < fixed.prefill_chunk_tokens <= 32768
    assert fixed.reserved["activations"] < plan(w100).reserved["activations"]


def test_planner_segments_when_one_forward_pins_too_much_ram():
    """int4 KV at 270k in 8 GiB (one forward: <= 245k; segmented: 286k, 16-token int4 key
    groups): one forward fits the GPU but pins more host RAM than the
    bf16 plan does at 100k; with that as the limit, auto segments (the GPU then holds more KV,
    RAM less) and the plan pins at most the limit; without a limit it is one forward."""
    spec, store = _llama8b()
    fmt = kv_format("int4", 128, spec.head_dim, 2)

    def plan(work, f=fmt):
        return plan_placement(spec, store, "cuda:0", 8 * GiB, None, "auto", work, 2, kv_format=f)

    ref = plan(Workload(1, 100_000, 100_000), None)
    limit = pinned_host_bytes(spec, store, ref, None, 100_000)
    work = Workload(1, 270_000, 270_000)

    def pinned(p):
        return pinned_host_bytes(spec, store, p, fmt, work.context)

    whole = plan(work)
    assert pinned(whole) > limit and plan_segmented(plan, work) == whole
    seg = plan_segmented(plan, work, "auto", limit, pinned)
    assert seg.prefill_segment and pinned(seg) <= limit and seg.peak_device_bytes <= 8 * GiB


def test_segment_copies_are_counted():
    """The extra host->GPU bytes of 100k in 32k segments (bf16 KV, 8 GiB): three more passes
    of the streamed weights, and per later segment the earlier slots of every layer whose KV
    is off the GPU (less an exact split layer's device blocks); none for one forward."""
    spec, store = _llama8b()
    work = Workload(1, 100_000, 100_000)

    def plan(w):
        return plan_placement(spec, store, "cuda:0", 8 * GiB, None, "auto", w, 2)

    p = plan_segmented(plan, work, 32768)
    weights = sum(store.layer_nbytes(i) for i in p.streamed_for(Phase.PREFILL))
    per_token = 2 * spec.num_kv_heads * spec.head_dim * 2
    kv = sum(
        per_token * max(0, s - q.kv_device_tokens)
        for q in p.layers
        if q.kv_tier != "device"
        for s in (32768, 65536, 98304)
    )
    assert weights > 0 and kv > 0
    assert segment_copy_bytes(spec, store, p, None, work) == 3 * weights + kv
    assert segment_copy_bytes(spec, store, plan(work), None, work) == 0
    # int4: compressed RAM layers stage their encoded prefix per attention call in one forward
    # too, so only the weight passes are added
    fmt = kv_format("int4", 128, spec.head_dim, 2)
    q = plan_segmented(
        lambda w: plan_placement(spec, store, "cuda:0", 8 * GiB, None, "auto", w, 2, kv_format=fmt),
        work,
        32768,
    )
    assert any(x.kv_tier != "device" for x in q.layers)
    streamed = sum(store.layer_nbytes(i) for i in q.streamed_for(Phase.PREFILL))
    assert segment_copy_bytes(spec, store, q, fmt, work) == 3 * streamed


def test_bad_segment_values_are_refused():
    from ollm.config import EngineConfig

    for bad in (-1, "big", 1.5, True):
        with pytest.raises(OllmError, match="prefill_segment"):
            EngineConfig(prefill_segment=bad)
    assert EngineConfig().prefill_segment == "auto"
    assert segment_sizes(100_000) == [65536, 32768, 16384]
    assert segment_sizes(16384) == []
