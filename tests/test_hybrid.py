"""Hybrid decode: the cost model's choices with synthetic rates, and the plans it produces."""

from __future__ import annotations

import pytest
import torch

from conftest import make_hf_model, plan_on_device
from ollm import LLM, SamplingParams
from ollm.planning.costmodel import MachineRates, choose_cpu_layers, interleave, predict_step
from ollm.planning.placement import Workload, plan_placement

GB = 1e9
LAYER = 436_000_000  # one Llama-3.1-8B layer in bf16
PARAMS = LAYER // 2
HEAD = 1_050_000_000


def rates(
    cpu: float = 72 * GB, pcie: float = 55 * GB, cpu_flops: float = 2e12, scale: float = 1.0
) -> MachineRates:
    return MachineRates(
        pcie=pcie * scale,
        pcie_shared=pcie * scale,
        cpu_mem=cpu * scale,
        cpu_mem_shared=cpu * scale,
        cpu_threads=16,
        cpu_flops=cpu_flops * scale,
        gpu_mem=3000 * GB * scale,
        gpu_flops=700e12 * scale,
    )


def test_both_paths_finish_together():
    k, pred = choose_cpu_layers(rates(), 10, 22, LAYER, PARAMS, HEAD)
    # balance: k / cpu = (22 - k) / pcie  ->  k = 22 * 72 / 127 = 12.5
    assert k in (12, 13)
    assert pred.copy_s == pytest.approx((22 - k) * LAYER / (55 * GB))
    stream_only = predict_step(rates(), 10, 22, 0, LAYER, PARAMS, HEAD)
    assert pred.seconds < 0.6 * stream_only.seconds
    assert stream_only.seconds == pytest.approx(22 * LAYER / (55 * GB))


def test_slow_cpu_gets_no_layers_fast_cpu_gets_all():
    assert choose_cpu_layers(rates(cpu=1 * GB), 10, 22, LAYER, PARAMS, HEAD)[0] == 0
    assert (
        choose_cpu_layers(rates(cpu=5000 * GB, cpu_flops=1e15), 10, 22, LAYER, PARAMS, HEAD)[0]
        == 22
    )


def test_cpu_share_shrinks_with_batch():
    shares = [
        choose_cpu_layers(rates(), 10, 22, LAYER, PARAMS, HEAD, tokens=b)[0]
        for b in (1, 8, 32, 128)
    ]
    assert shares == sorted(shares, reverse=True)
    assert shares[0] > shares[-1]


def test_predict_step_is_max_of_paths():
    p = predict_step(rates(), 0, 4, 4, LAYER, PARAMS, 0)
    assert p.seconds == pytest.approx(max(p.copy_s, p.cpu_s + p.gpu_s))


def test_interleave_spreads_choices():
    idx = list(range(10, 32))
    chosen = sorted(interleave(idx, 11))
    assert len(chosen) == 11 and set(chosen) <= set(idx)
    assert all(b - a >= 2 for a, b in zip(chosen, chosen[1:], strict=False))
    assert interleave(idx, 0) == set() and interleave(idx, 99) == set(idx)


def _plan(store, **kw):
    spec, s = store
    work = Workload(1, 64, 64)
    fixed = plan_placement(spec, s, "cuda:0", None, None, "cpu", work, 4)
    base = sum(
        v for k, v in fixed.reserved.items() if k not in ("resident layers", "stream buffers")
    )
    budget = base + int(3.5 * s.max_layer_nbytes)  # 1 resident layer, 3 in pinned RAM
    return plan_placement(spec, s, "cuda:0", budget, None, "cpu", work, 4, **kw)


def test_hybrid_plan_devices_and_schedules(store):
    # Rates scaled down so the tiny layers' bytes, not launch overheads, decide (as for 8B ones).
    plan = _plan(store, rates=rates(scale=1e-5), cpu_layers=None)
    assert plan.cpu_layers, plan.describe()
    for i in plan.cpu_layers:
        p = plan.layers[i]
        assert p.tier == "cpu" and p.device_for("decode") == "cpu" and p.kv_device == "cpu"
        assert p.kv_tier == "cpu"  # pinned RAM, written through the GPU scratch in prefill
        assert p.device_for("prefill") == "cuda:0"
        assert i in plan.streamed_for("prefill") and i not in plan.streamed_for("decode")
    assert plan.phase(1) == "decode" and plan.phase(10**6) == "prefill"
    assert plan.predicted["hybrid tok/s"] > plan.predicted["stream-only tok/s"]
    assert any("hybrid decode" in label for label, _ in plan.describe())


def test_hybrid_off_and_forced(store):
    assert _plan(store, rates=rates(scale=1e-5), hybrid="off").cpu_layers == []
    assert len(_plan(store, rates=rates(cpu=1 * GB), cpu_layers=2).cpu_layers) == 2
    assert _plan(store, rates=rates(cpu=1 * GB, scale=1e-5)).cpu_layers == []


@pytest.mark.parametrize("t", [1, 3])
def test_grouped_attention_matches_sdpa(t):
    import torch
    import torch.nn.functional as F

    from ollm.layers.attention import grouped_attention

    torch.manual_seed(0)
    q = torch.randn(2, 8, t, 16)
    k, v = torch.randn(2, 2, 100, 16), torch.randn(2, 2, 100, 16)
    mask = torch.rand(2, 1, t, 100) > 0.3
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(grouped_attention(q, k, v, 0.25, mask), ref)


def test_layer_workload_runs_a_real_decoder_layer(store):
    import torch

    from ollm.engine.calibrate import _layer_workload

    spec, s = store
    step, nbytes = _layer_workload(spec, 32, torch.float32)
    step()
    assert nbytes == spec.layer_param_count() * 4


def test_offloaded_kv_attends_on_the_cpu_for_a_cpu_computed_layer():
    """A hybrid layer's KV cache (scratch on the GPU) gets queries on the CPU in decode, also for
    forwards longer than ``decode_tokens``: it must attend in RAM without touching the scratch
    (a "meta" scratch stands in for the GPU one and would fail if used)."""
    from ollm.kv.cache import LayerKVCache
    from ollm.kv.offload import KVScratch, OffloadedKVCache
    from ollm.layers.attention import AttentionMask

    torch.manual_seed(0)
    scratch = KVScratch(1, 2, 16, 64, torch.float32, "meta")
    off = OffloadedKVCache(1, 2, 16, 64, torch.float32, scratch, decode_tokens=2)
    ref = LayerKVCache(1, 2, 16, 64, torch.float32, "cpu")
    for t in (20, 1, 9):
        q, k, v = torch.randn(1, 8, t, 16), torch.randn(1, 2, t, 16), torch.randn(1, 2, t, 16)
        mask = AttentionMask(ref.length, t, ref.length + t)
        torch.testing.assert_close(
            off.attend(q, k, v, mask, 0.25, None), ref.attend(q, k, v, mask, 0.25, None)
        )
    assert scratch.owner is None


@pytest.mark.parametrize("measured, demoted", [(40.0, True), (95.0, False)])
def test_hybrid_that_measures_slower_than_streaming_is_dropped(tmp_path, measured, demoted):
    """A hybrid plan (faked here on the CPU device: the review only reads the plan) whose decode
    measures below 90% of streaming's predicted 100 tok/s is re-planned without CPU layers."""
    from dataclasses import replace

    from ollm import LLM, SamplingParams
    from ollm.telemetry.metrics import GenerationMetrics

    make_hf_model("llama", tmp_path / "hf")
    llm = LLM(tmp_path / "hf", device="cpu", cache_dir=tmp_path / "c", progress=False)
    real = llm.plan
    layers = tuple(replace(p, decode_device="cpu") for p in real.layers)
    fake = replace(real, device="cuda:0", layers=layers, predicted={"stream-only tok/s": 100.0})
    llm.plan = fake
    assert llm.plan.cpu_layers
    too_short = GenerationMetrics(generated_tokens=4, decode_seconds=3 / measured)
    llm._review_hybrid(too_short, 1)
    assert llm.plan.cpu_layers  # 3 steps say nothing yet
    llm._review_hybrid(GenerationMetrics(generated_tokens=21, decode_seconds=20 / measured), 1)
    assert llm._hybrid_demoted == demoted
    assert (llm.plan is fake) != demoted
    if not demoted:
        llm.plan = real  # the fake plan cannot run here
    assert not llm.plan.cpu_layers and llm.plan.device == "cpu"
    out = llm.generate([5, 6, 7], SamplingParams(max_new_tokens=4, temperature=0))
    assert len(out.token_ids) == 4
    llm.close()


def _kv_plan(store, context: int, **kw):
    """A long context whose KV cannot all sit on the GPU: weights streamed, KV partly in RAM."""
    spec, s = store
    work = Workload(1, context, context)
    fixed = plan_placement(spec, s, "cuda:0", None, None, "cpu", work, 4, chunk_tokens=256)
    kv = fixed.reserved["kv cache"]
    others = sum(
        v
        for k, v in fixed.reserved.items()
        if k not in ("resident layers", "stream buffers", "kv cache")
    )
    budget = others + kv * 3 // 4 + 3 * s.max_layer_nbytes  # 3/4 of the KV fits, 2-3 slots
    return plan_placement(
        spec, s, "cuda:0", budget, None, "cpu", work, 4, chunk_tokens=256, hybrid="off", **kw
    )


@pytest.mark.parametrize(
    "cpu_gb, pcie_gb, fetch",
    [(0.1, 55.0, "most"), (1000.0, 55.0, "none"), (1.0, 55.0, "some")],
)
def test_kv_fetch_split_follows_the_rates(store, cpu_gb, pcie_gb, fetch):
    """Which RAM-KV layers decode fetches to the GPU: nearly all when the CPU is slow, none
    when it is fast (and then no fetch buffers are reserved), a share when both are close.
    (``cpu`` is a whole layer's weight bytes/s at the context; its KV is ~50x the tiny layer's
    weights here, so 1 GB/s of weights is ~50 GB/s of KV reads.)"""
    r = rates(cpu=cpu_gb * GB, pcie=pcie_gb * GB, scale=1e-5)
    plan = _kv_plan(store, 20000, rates=r)
    ram = [i for i, p in enumerate(plan.layers) if p.kv_tier == "cpu"]
    fetched = [i for i, p in enumerate(plan.layers) if p.kv_fetch]
    assert ram and set(fetched) <= set(ram)
    without = _kv_plan(store, 20000)  # no cost model: no fetching, no buffers
    assert not any(p.kv_fetch for p in without.layers)
    if fetch == "none":
        assert not fetched and plan.reserved == without.reserved
        return
    assert plan.reserved["kv cache"] <= without.reserved["kv cache"]  # same GPU memory...
    assert len(ram) >= sum(p.kv_tier == "cpu" for p in without.layers)  # ...more KV in RAM
    assert "decode s (KV split)" in plan.predicted
    if fetch == "most":
        assert len(fetched) >= len(ram) - 1
    else:
        assert 0 < len(fetched) < len(ram)
    assert any("KV fetched" in label for label, _ in plan.describe())


def test_kv_fetch_uses_the_measured_cpu_attention_rate(store):
    """With the CPU's attention rate measured, a slower CPU attention sends more KV layers to
    the GPU (never fewer)."""
    from dataclasses import replace

    counts = []
    for attn in (1e12, 50e3, 10e3, 1e3):  # KV bytes/s (rates are scaled down 1e5 here)
        r = replace(rates(scale=1e-5), cpu_attn=attn)
        plan = _kv_plan(store, 20000, rates=r)
        counts.append(sum(p.kv_fetch for p in plan.layers))
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] > 0, counts


def test_pipeline_step_limits():
    """The layer-by-layer simulation: copies alone, compute alone, and CPU stalls that a ring of
    two slots covers only with the next layer's copy (a deeper ring covers more)."""
    from ollm.planning.costmodel import pipeline_step

    n = 8
    assert pipeline_step([1e-4] * n, [1.0] * n, 2) == pytest.approx(n * 1.0 + 1e-4, rel=1e-3)
    assert pipeline_step([2.0] * n, [0.0] * n, 2) == pytest.approx(n * 2.0)
    # Every other layer stalls 3 s on the CPU, copies take 1 s: with 2 slots the copy engine
    # idles during each stall once the next layer is in; step = 4 x (3 + small) ...
    stalls = [3.0 if i % 2 == 0 else 0.01 for i in range(n)]
    two = pipeline_step(stalls, [1.0] * n, 2)
    assert two == pytest.approx(4 * 3.0 + 4 * 1.0, rel=0.01)
    # ... a deep ring lets copies run ahead through the stalls: step = max(copies, chain).
    deep = pipeline_step(stalls, [1.0] * n, n)
    assert deep == pytest.approx(max(n * 1.0, sum(stalls)), rel=0.01) and deep < two


def test_alternating_fetch_beats_none_and_all():
    """Measured 100k figures of an H100 host (2026-11-27): a layer's weights copy in 8 ms, its KV
    in 7.5 ms, the CPU attends it in 17.4 ms. A CPU stall is best covered by the next layer's
    weights + KV copies, so fetching every other layer beats fetching none or all."""
    from ollm.planning.costmodel import interleave, pipeline_step

    n = 29
    w, f, a = 8e-3, 7.5e-3, 17.4e-3

    def step(k):
        chosen = interleave(list(range(n)), k)
        chain = [1e-3 + (0 if i in chosen else a) for i in range(n)]
        return pipeline_step(chain, [w] * n, 2, [f if i in chosen else 0.0 for i in range(n)])

    best = min(range(n + 1), key=step)
    assert 10 <= best <= 19 and step(best) < 0.9 * min(step(0), step(n))


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_hybrid_split_on_a_stand_in_accelerator_matches(family, hf_models, tmp_path):
    """The CPU/GPU split run on a CPU-only machine: the plan the cost model makes for a GPU
    (some RAM layers computed by the CPU in decode, the others streamed through ring slots, the
    CPU layers' KV in RAM written through the prefill scratch) executed with the accelerator
    played by the CPU under another device name ("cpu:1"). Every device crossing, both phases'
    streamed-layer schedules and the RAM KV of the CPU layers run; the greedy tokens equal those
    of the same plan without CPU layers (the all-"GPU" path) and transformers'."""
    from ollm.engine.runner import Runner
    from ollm.runtime.prefetch import Prefetcher
    from ollm.storage.store import LayerStore
    from test_equivalence import hf_greedy

    model, path = hf_models(family)
    llm = LLM(path, device="cpu", cache_dir=tmp_path, progress=False)
    spec, store = llm.spec, llm.store
    work = Workload(1, 256, 256)
    fixed = plan_placement(spec, store, "cuda:0", None, None, "cpu", work, 4, chunk_tokens=32)
    base = sum(
        v for k, v in fixed.reserved.items() if k not in ("resident layers", "stream buffers")
    )
    budget = base + int(3.5 * store.max_layer_nbytes)  # 1 resident layer, the rest in RAM
    kw = dict(rates=rates(scale=1e-5), chunk_tokens=32)
    split = plan_placement(spec, store, "cuda:0", budget, None, "cpu", work, 4, cpu_layers=2, **kw)
    plain = plan_placement(spec, store, "cuda:0", budget, None, "cpu", work, 4, hybrid="off", **kw)
    assert len(split.cpu_layers) == 2 and not plain.cpu_layers and split.count("gpu") >= 1
    prompt = [(7 * i + 3) % 256 for i in range(100)]
    params = SamplingParams(max_new_tokens=10, temperature=0)
    tokens, cpu_seconds, copied = [], [], []
    for plan in (split, plain):
        fake = plan_on_device(plan, "cpu:1")
        assert fake.cpu_layers == plan.cpu_layers
        prefetcher = Prefetcher(LayerStore(llm.store_path), fake, llm.stats)
        llm.prefetcher.close()
        llm.plan, llm.prefetcher = fake, prefetcher
        llm.runner = llm._engine.runner = Runner(spec, fake, prefetcher, llm.dtype)
        res = llm.generate(prompt, params)
        tokens.append(res.token_ids)
        cpu_seconds.append(res.metrics.cpu_path_seconds)
        copied.append(res.metrics.bytes_copied_h2d)
    llm.close()
    assert tokens[0] == tokens[1] == hf_greedy(model, prompt, 10)
    assert cpu_seconds[0] > 0 and cpu_seconds[1] == 0  # the CPU path ran only in the split
    # Prefill streams the same layers; each decode step streams 2 fewer in the split.
    layer = store.max_layer_nbytes
    assert copied[1] - copied[0] == pytest.approx(9 * 2 * layer, rel=0.05)
