"""The CPU's batched decode attention over strided views of a head-major pool in RAM (issue 13):
measured by the calibration, priced by the cost model for batches of sequences (no gather when
the pool is attended in place), and used by the batch planner's KV-on-GPU vs resident-layer
choice and by the batch engine's hybrid prior."""

from __future__ import annotations

from dataclasses import asdict, replace
from types import SimpleNamespace

import pytest
import torch

from conftest import load_script
from ollm.planning.costmodel import MachineRates, cpu_step_layer_s, hybrid_step_pays
from ollm.planning.placement import Workload, plan_placement
from ollm.tiers import KvTier, Tier

KV_TOKEN = 2 * 8 * 128 * 2  # Llama-3.1-8B: K+V bytes per token and layer (bf16)


def rates(**kw) -> MachineRates:
    base = dict(
        pcie=54e9, pcie_shared=53e9, cpu_mem=50.8e9, cpu_mem_shared=50.8e9, cpu_threads=16,
        cpu_flops=3.9e12, gpu_mem=6.4e12, gpu_flops=7.4e14, cpu_attn=8.5e9,
    )  # fmt: skip
    return MachineRates(**{**base, **kw})


# -- calibration -----------------------------------------------------------------------------


def test_batch_attention_rate_is_measured_on_this_cpu():
    """A positive rate of a real batch of sequences over strided views of head-major pools,
    with enough sequences that their KV heads give every thread four work items."""
    from ollm.engine.calibrate import batch_attention_seqs, cpu_attn_batch_rate

    spec = SimpleNamespace(num_kv_heads=2, num_heads=4, head_dim=64)
    rate, seqs = cpu_attn_batch_rate(spec, 300, torch.bfloat16, nbytes=4 << 20, reps=1)
    assert 1e7 < rate < 1e13
    threads = torch.get_num_threads()
    assert seqs == batch_attention_seqs(2, threads) >= 2
    assert seqs * 2 >= 4 * threads or seqs == 64
    assert batch_attention_seqs(8, 16) == 8 and batch_attention_seqs(8, 1000) == 64


def test_batch_workload_attends_strided_views_as_the_engine(monkeypatch):
    """The calibration's step is the engine's call: ``attend`` over ``run_view``s of each
    layer's pool (one view per layer, every layer's pool distinct) with the dense key mask."""
    from ollm.engine import calibrate

    seen = []

    def spy(q, k, v, mask, scale, dense=None):
        seen.append((k, v, mask, dense))
        return q

    spec = SimpleNamespace(num_kv_heads=2, num_heads=4, head_dim=16)
    step, nbytes = calibrate._batch_attention_workload(spec, 40, torch.float32, 3, 1 << 16)
    monkeypatch.setattr(calibrate, "attend", spy)
    step()
    per_layer = 2 * 2 * 3 * 48 * 16 * 4  # 40 tokens in 3 blocks of 16
    assert nbytes == len(seen) * per_layer >= 1 << 16
    k, v, mask, dense = seen[0]
    assert k.shape == (3, 2, 48, 16) and not k.is_contiguous()  # a strided view, no gather
    assert dense.shape == (3, 1, 1, 48) and dense[:, 0, 0, :40].all() and not dense[..., 40:].any()
    assert mask.key_keep is not None and mask.q_len == 1
    assert len({x[0].untyped_storage().data_ptr() for x in seen}) == 1  # one pool tensor
    assert len({x[0].storage_offset() for x in seen}) == len(seen)  # a layer each


def test_rates_of_the_last_version_still_load():
    """A cached file without the batched rate loads (0: unknown, the old pricing)."""
    old = {k: v for k, v in asdict(rates()).items() if not k.startswith("cpu_attn_batch")}
    r = MachineRates(**old)
    assert r.cpu_attn_batch == 0 and r.cpu_attn_rate(16) == r.cpu_attn


# -- cost model ------------------------------------------------------------------------------


def test_batches_are_priced_at_the_batched_rate_in_place():
    kv = 16 * 2080 * KV_TOKEN
    slow = rates(cpu_gather=35e9)
    fast = replace(slow, cpu_attn_batch=50e9, cpu_attn_batch_seqs=4)
    old = kv / 8.5e9 + kv / 35e9
    assert slow.cpu_kv_s(kv, 16) == pytest.approx(old)  # no batched rate: as before
    assert fast.cpu_kv_s(kv, 16) == pytest.approx(kv / 50e9)  # in place: no gather
    assert fast.cpu_kv_s(kv, 16, in_place=False) == pytest.approx(old)  # gathered
    assert fast.cpu_kv_s(kv, 1) == pytest.approx(old)  # one sequence keeps cpu_attn
    # fewer sequences than the measurement: between one query's rate and the batched one
    assert 8.5e9 < fast.cpu_attn_rate(2) < fast.cpu_attn_rate(3) < 50e9 == fast.cpu_attn_rate(4)
    assert replace(fast, cpu_attn=0.0).cpu_kv_s(kv, 16) == 0.0  # unknown rates: not counted


def test_the_hybrid_prior_uses_the_batched_rate():
    """Batch 16 over 2k tokens, 13 CPU layers against 29 streamed (the H200's batch-16 plan):
    with one query's rate and the gather the CPU chain loses; at the batched rate in place it
    pays; gathered (prefix-shared sequences) it still loses."""
    layer, kv = 416 << 20, 16 * 2064 * KV_TOKEN
    slow = rates(cpu_attn=8.5e9, cpu_gather=35e9)
    fast = replace(slow, cpu_attn_batch=50e9, cpu_attn_batch_seqs=4)
    assert not hybrid_step_pays(slow, 13, 29, layer, 2, 16, kv)
    assert hybrid_step_pays(fast, 13, 29, layer, 2, 16, kv)
    assert not hybrid_step_pays(fast, 13, 29, layer, 2, 16, kv, in_place=False)
    got = cpu_step_layer_s(fast, layer, 2, 16, kv)
    assert got == pytest.approx(fast.cpu_layer_s(layer, layer // 2, 16, True) + kv / 50e9)


# -- planner ---------------------------------------------------------------------------------


def _plan(rates_, batch: int):
    pr = load_script("plan_report.py")
    spec, store = pr.llama8b()
    work = Workload(batch, 2080, 2080)
    return plan_placement(spec, store, "cuda:0", 8 << 30, None, "auto", work, 2, rates_), store


def test_batch16_with_a_fast_batched_rate_keeps_kv_in_ram_for_resident_layers():
    """Llama-3.1-8B shapes at 8 GiB, batch 16, the H200 rates: with one query's rate the CPU's
    attention of a RAM KV layer looks slow and the budget holds KV pools; with the batched rate
    it holds resident weight layers instead (fewer streamed per step), within the budget, and
    the plan's predicted step is shorter than the old plan's at the same (batched) rates."""
    pr = load_script("plan_report.py")
    bpr = load_script("batch_plan_report.py")
    base = pr.h200_rates()
    fast = bpr.batched_rates(base, 50e9)
    old, store = _plan(base, 16)
    new, _ = _plan(fast, 16)
    kv = {n: sum(p.kv_tier == KvTier.DEVICE for p in x.layers) for n, x in (("o", old), ("n", new))}
    res = {"o": old.count(Tier.GPU), "n": new.count(Tier.GPU)}
    assert kv["n"] < kv["o"] and res["n"] > res["o"]
    assert all(p.peak_device_bytes <= 8 << 30 for p in (old, new))
    work = Workload(16, 2080, 2080)
    old_at_fast = bpr.engine_step_s(store, old, work, fast)
    assert new.predicted["decode s (KV split)"] < old_at_fast
    assert bpr.engine_step_s(store, new, work, fast) < old_at_fast  # streaming every layer too


def test_batch_plans_never_predict_their_cpu_layers_slower_than_streaming():
    """A batch-engine plan keeps CPU-computed layers only when its simulated step (their
    batch's KV attention included) beats the same layout with none (``decode_splits``)."""
    bpr = load_script("batch_plan_report.py")
    rep = bpr.report((64, 16), 2048, 32, 8.0)
    for case in rep["cases"]:
        b = case["batched"]
        assert b["plan_decode_step_s"] <= b["engine_step_s"] * 1.001
        assert b["reserved_total"] <= rep["budget"]
        assert b["engine_step_s_batched"] <= case["after"]["engine_step_s_batched"]
