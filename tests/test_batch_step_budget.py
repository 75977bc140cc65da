"""The planner's accounting of the batch engine's steps (planning/batch_step.py, issue 13): what a
plan made for several sequences reserves is what `BatchEngine` allocates (counted on the CPU by
test_budget's dispatch mode, with the CUDA attention paths), and the budget it frees goes where
the cost model says (KV pools on the GPU before resident weights at Llama-3.1-8B batch 64)."""

from __future__ import annotations

import importlib

import pytest
import torch

from conftest import load_script, make_hf_model
from ollm import LLM
from ollm.engine.sampling import SamplingParams
from ollm.planning import batch_step, footprint
from ollm.planning.accounting import (
    PAGE_TOKENS,
    activation_parts,
    kv_pool_bytes,
    kv_scratch_bytes,
)
from ollm.planning.batch_step import batch_engine_runs, engine_parts
from ollm.planning.placement import Workload, plan_placement
from ollm.tiers import KvTier
from test_budget import LiveBytes, _cpu_flash

GREEDY = SamplingParams(max_new_tokens=3)


def _gather_modules():
    """The kv modules whose GATHER_BYTES cuts decode batches (kv/packed.py or, once split out,
    kv/decode_batch.py)."""
    mods = [importlib.import_module("ollm.kv.packed")]
    try:
        mods.append(importlib.import_module("ollm.kv.decode_batch"))
    except ImportError:
        pass
    return [m for m in mods if hasattr(m, "GATHER_BYTES")]


def test_gather_bytes_is_the_engines():
    """The planner's copy of the decode gather's cut is the one the engine uses."""
    assert {m.GATHER_BYTES for m in _gather_modules()} == {batch_step.GATHER_BYTES}


@pytest.fixture
def cuda_paths(monkeypatch):
    """The attention paths CUDA takes (blocked for float32, flash otherwise), small score blocks
    and decode gathers so that they do not dwarf a tiny model's step."""
    from ollm.layers import attention as attn

    monkeypatch.setattr(footprint, "SCORE_BLOCK_BYTES", 256 << 10)
    real_path = attn.attention_path
    monkeypatch.setattr(attn, "attention_path", lambda _dev, *a: real_path("cuda", *a))
    monkeypatch.setattr(attn, "_flash_with_lse", _cpu_flash)
    for m in [*_gather_modules(), batch_step]:
        monkeypatch.setattr(m, "GATHER_BYTES", 64 << 10)


@pytest.mark.parametrize("chunk", [32, 0])
def test_engine_steps_within_the_planned_parts(tmp_path, cuda_paths, chunk):
    """A plan for 4 sequences is sized for the batch engine; its first step (every prompt in
    one packed row, cut into ``chunk``-row chunks whose sequences straddle them, so later
    chunks gather their earlier K/V) and a decode step allocate no more than
    ``engine_parts`` (the slack is cuBLAS' and the allocator's, not tensors), and not far less:
    the accounting is the engine's, not the padded batch's ``batch x chunk`` rows."""
    from ollm.engine.batch import BatchEngine

    path = tmp_path / "hf"
    make_hf_model("llama", path)
    batch, ctx = 4, 160
    kw = dict(device="cpu", max_batch=batch, max_context=ctx, cache_dir=tmp_path / "c")
    with LLM(str(path), progress=False, prefill_chunk=chunk or None, **kw) as llm:
        plan, spec, w = llm.plan, llm.spec, llm.workload
        assert plan.batch_parts and plan.prefill_chunk_tokens == chunk
        e = torch.finfo(llm.runner.dtype).bits // 8
        parts = engine_parts(spec, w, e, plan.mlp_chunk_tokens, chunk, on_gpu=True,
                             embed_on_device=True, page=PAGE_TOKENS)  # fmt: skip
        planned = sum(parts.values()) - parts["slack"]
        eng = BatchEngine.for_plan(llm.runner, None, (), w.batch, w.context)
        g = torch.Generator().manual_seed(0)
        for n in (157, 150, 141, 156):  # nearly the planned batch x context rows
            eng.add(torch.randint(0, spec.vocab_size, (n,), generator=g).tolist(), GREEDY)
        peaks = []
        for _ in range(2):  # the packed prefill of all four, then a step of four decodes
            with LiveBytes() as live:
                eng.step()
            peaks.append(live.peak)
        eng.close()
    assert max(peaks) <= planned, (peaks, parts)
    assert peaks[0] >= planned // 4, (peaks, parts)  # an estimate, not a blanket
    padded = activation_parts(spec, w, e, plan.mlp_chunk_tokens, chunk or ctx, True)
    if chunk:  # the padded batch's chunk rows are batch x chunk: 4x the engine's
        assert parts["chunk temporaries"] * batch == padded["chunk temporaries"]


def test_plans_the_engine_does_not_run_keep_their_accounting(store):
    """One sequence, compressed KV (encoded pools), and a model with a recurrent state keep the
    padded batch's accounting; a batch of exact KV gets the engine's."""
    from ollm.planning.accounting import KVFormat

    spec, s = store
    work = Workload(4, 256, 256)
    assert batch_engine_runs(spec, work, None)
    assert not batch_engine_runs(spec, Workload(1, 256, 256), None)
    assert not batch_engine_runs(spec, work, KVFormat(70.0, 160, 32))
    one = plan_placement(spec, s, "cuda:0", 1 << 30, None, work=Workload(1, 256, 256))
    many = plan_placement(spec, s, "cuda:0", 1 << 30, None, work=work)
    padded = plan_placement(spec, s, "cuda:0", 1 << 30, None, work=work, batch_engine=False)
    assert not one.batch_parts and not padded.batch_parts and many.batch_parts
    assert many.reserved["activations"] == sum(many.batch_parts.values())
    assert many.step_tokens == work.batch * work.prefill_tokens and many.logit_rows == 4


@pytest.fixture(scope="module")
def report():
    return load_script("batch_plan_report.py").report((64, 16), 2048, 32, 8.0)


def test_8b_batch_plans_reserve_what_the_engine_allocates(report):
    """Llama-3.1-8B shapes at 8 GiB (the H200 batch bench's plans, sizes only): the batch plan
    reserves each device-tier layer's paged pool, a prefill scratch of one sequence (single
    prompts on the same plan), no fetch buffers or split blocks, and the engine's step parts;
    the total stays within the budget."""
    pr = load_script("plan_report.py")
    spec, store = pr.llama8b()
    for case in report["cases"]:
        b, after = case["batch"], case["after"]
        work, plan = load_script("batch_plan_report.py").plan_for(
            spec, store, b, 2080, report["budget"], pr.h200_rates(), True
        )
        dev = kv_pool_bytes(spec, plan.layers, plan.kv_pools, PAGE_TOKENS, 2)[KvTier.DEVICE]
        offloaded = any(p.kv_tier != KvTier.DEVICE for p in plan.layers)
        scratch = kv_scratch_bytes(spec, Workload(1, 2080, 2080), 2) if offloaded else 0
        assert plan.reserved["kv cache"] == dev + scratch
        assert not any(p.kv_fetch or p.kv_device_tokens for p in plan.layers)
        parts = engine_parts(spec, work, 2, plan.mlp_chunk_tokens, plan.prefill_chunk_tokens)
        assert plan.batch_parts == parts  # the engine's step outweighs a single request's
        assert plan.reserved["activations"] == sum(parts.values())
        assert plan.peak_device_bytes == after["reserved_total"] <= report["budget"]
        assert sum(after["reserved"].values()) == after["reserved_total"]


def test_freed_budget_goes_where_the_cost_model_says(report):
    """What the padded accounting reserved and the engine never allocated now holds KV pools on
    the GPU (a layer's KV in RAM stalls the batch step while the CPU attends it; a resident
    layer saves only its copy), so the engine's predicted decode step is shorter."""
    for case in report["cases"]:
        before, after = case["before"], case["after"]
        assert after["kv_layers_on_gpu"] > before["kv_layers_on_gpu"]
        assert after["engine_step_s"] < before["engine_step_s"]
        # The engine's chunks are rows of its one packed row, at least as many as the padded
        # plan's rows per sequence (sizing.engine_chunk): temporaries of that many rows only.
        rows = [int(c["plan"]["prefill chunk"].split()[0]) for c in (before, after)]
        assert rows[1] >= rows[0]
        assert (
            after["reserved"]["act: chunk temporaries"] * case["batch"] * rows[0]
            == before["reserved"]["act: chunk temporaries"] * rows[1]
        )
        for key in ("KV: fetch buffers", "KV: split layer's device blocks"):
            assert before["reserved"][key] > 0 and after["reserved"][key] == 0


def test_kv_or_weights_is_the_cost_models_choice():
    """The same batch at the same budget, two CPU attention rates: where the CPU attends a
    batch's RAM KV slowly (the H200 host's rate) the freed budget holds KV pools; where it is
    nearly free, it holds resident layers instead (each saves a copy per step); both within
    the budget."""
    from dataclasses import replace

    from ollm.tiers import Tier

    pr = load_script("plan_report.py")
    spec, store = pr.llama8b()
    work, budget = Workload(64, 2080, 2080), 8 << 30
    slow, fast = pr.h200_rates(), replace(pr.h200_rates(), cpu_attn=1e13)
    plans = {
        name: plan_placement(spec, store, "cuda:0", budget, None, "auto", work, 2, rates)
        for name, rates in (("slow", slow), ("fast", fast))
    }
    kv = {k: sum(p.kv_tier == KvTier.DEVICE for p in v.layers) for k, v in plans.items()}
    res = {k: v.count(Tier.GPU) for k, v in plans.items()}
    assert kv["slow"] > kv["fast"] and res["fast"] > res["slow"]
    assert all(p.peak_device_bytes <= budget for p in plans.values())
