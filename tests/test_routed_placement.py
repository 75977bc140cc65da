"""Placement under attention routing (issue 18, ``planning/routed_kv.py``): routed layers read
their chosen pages where they sit, so the planner reserves no fetch buffers for them and lets
the cost model move their KV to pinned RAM for resident weights. Plans are pure functions of
shapes and ``MachineRates``: Llama-3.1-8B shapes at 8 GiB and 100k with the H200 host's rates."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace as NS

import pytest

from conftest import plan_on_device
from ollm import LLM, SamplingParams
from ollm.engine.replan import routing_kv_read, routing_summary_bytes
from ollm.layers.routing import LayerRouting
from ollm.models.registry import build_spec
from ollm.planning.costmodel import MachineRates
from ollm.planning.decode_resident import fragmentation_allowance
from ollm.planning.placement import Workload, plan_placement
from ollm.storage.synthetic import preset_config

GiB = 1 << 30
H200 = MachineRates(54e9, 53e9, 50.8e9, 50.8e9, 16, 3.9e12, 6.4e12, 7.4e14, cpu_attn=8.5e9)
WORK = Workload(1, 100020, 100020)  # scripts/gpu/routing.py: 100k prompt + new tokens
# The device row's setting (docs/runs/2026-12-01/long_context_100k_routing_afce050.json).
ATTENTION, PAGE = "topk:189,window:256,sinks:64", 64


class _Store:
    """The sizes a plan reads of a layer store, for bf16 Llama-3.1-8B (no files)."""

    def __init__(self, spec) -> None:
        self.max_layer_nbytes = 2 * spec.layer_param_count()
        table = 2 * spec.vocab_size * spec.hidden_size
        self.files = {
            "globals.bin": NS(
                tensors={
                    "embed_tokens.weight": NS(nbytes=table),
                    "lm_head.weight": NS(nbytes=table),
                    "norm.weight": NS(nbytes=2 * spec.hidden_size),
                }
            )
        }

    def layer_nbytes(self, i: int) -> int:
        return self.max_layer_nbytes


@pytest.fixture(scope="module")
def llama8b():
    spec = build_spec(preset_config("llama3-8b"))
    return spec, _Store(spec)


def _routing(spec, attention=ATTENTION):
    cfg = NS(attention=attention, attention_page_tokens=PAGE, kv_codec="none", kv_evict="none")
    top = LayerRouting(("topk",) * spec.num_kv_heads, window=256, sinks=64, pages=189,
                       page_tokens=PAGE)  # fmt: skip
    engine = NS(config=cfg, routing=[top] * spec.num_layers)
    return routing_summary_bytes(spec, cfg, WORK, 2), routing_kv_read(engine, WORK)


def _plan(llama8b, rates=H200, hybrid="off", decode_resident=False, **kw):
    """The device row's plan; decode-resident layers (tests/test_decode_resident.py) off unless
    asked, so these tests see routed placement alone."""
    spec, store = llama8b
    return plan_placement(spec, store, "cuda:0", 8 * GiB, None, "cpu", WORK, 2, rates, hybrid,
                          decode_resident=decode_resident, **kw)  # fmt: skip


def _tiers(plan) -> tuple[str, str]:
    return (
        "".join(str(p.tier)[0] for p in plan.layers),
        "".join(str(p.kv_tier)[0] for p in plan.layers),
    )


def test_kv_read_share_is_the_routed_pages(llama8b):
    spec, _ = llama8b
    summaries, kv_read = _routing(spec)
    # 189 pages of 64 + 64 sinks + a 256-token window (page-aligned) of 100020 slots: ~1/8.
    assert len(kv_read) == 32 and 0.12 < kv_read[0] < 0.125 and len(set(kv_read)) == 1
    assert summaries == 2 * 8 * (-(-WORK.context // PAGE)) * 128 * 2 * 32  # kmin, kmax per page
    full = NS(config=NS(kv_codec="none", kv_evict="none"), routing=None)
    assert routing_kv_read(full, WORK) is None
    coded = NS(config=NS(kv_codec="int8", kv_evict="none"), routing=[None] * 32)
    assert routing_kv_read(coded, WORK) is None  # compressed KV is not routed
    batch = NS(config=NS(kv_codec="none", kv_evict="none"), routing=[LayerRouting(("topk",))])
    assert routing_kv_read(batch, Workload(4, 1024, 1024)) is None  # batches are not routed


def test_full_attention_plan_is_unchanged(llama8b):
    """The plan the code made before routed placement existed (figures from its commit), and
    the same with every layer reading all of its KV."""
    plan = _plan(llama8b)
    assert _tiers(plan) == ("c" * 32, "d" * 6 + "c" * 26)
    assert [i for i, p in enumerate(plan.layers) if p.kv_fetch] == list(range(6, 32))
    assert plan.layers[6].kv_device_tokens == 37888 and plan.ring_slots == 2
    assert plan.reserved == {
        "globals": 1050681344,
        "kv cache": 3842326528,
        "activations": 2824496128,
        "resident layers": 0,
        "stream buffers": 872415232,
    }
    assert plan.predicted["decode s (KV split)"] == pytest.approx(0.461419, abs=1e-6)
    assert replace(_plan(llama8b, kv_read=(1.0,) * 32), kv_read=()) == plan
    # Decode holds 5 streamed layers in the prefill activations it does not use (2.4 GiB):
    # 5 copies less per step (planning/decode_resident.py); the prefill plan is the same.
    held = _plan(llama8b, decode_resident=True)
    # Verify passes of up to 128 tokens: 256's activations no longer fit beside the allowance
    # kept for the allocator's fragmentation (fragmentation_allowance, 256 MiB at 8 GiB).
    assert held.decode_resident == [0, 1, 2, 3, 4] and held.decode_rows == 128
    assert held.predicted["decode s (KV split)"] == pytest.approx(0.420267, abs=1e-6)
    cap = 8 * GiB - fragmentation_allowance(8 * GiB)
    assert held.reserved == plan.reserved and sum(held.decode_reserved.values()) <= cap
    routed_off = _plan(llama8b, kv_read=(1.0,) * 32, decode_resident=True)
    assert replace(routed_off, kv_read=()) == held
    assert not any("routed" in label for label, _ in plan.describe())


def test_routed_plan_holds_weights_instead_of_kv(llama8b):
    spec, _ = llama8b
    summaries, kv_read = _routing(spec)
    full = _plan(llama8b, summary_bytes=summaries)  # routing without routed placement
    routed = _plan(llama8b, summary_bytes=summaries, kv_read=kv_read)
    assert routed.peak_device_bytes <= 8 * GiB and full.peak_device_bytes <= 8 * GiB
    assert routed.reserved["routing summaries"] == summaries
    # No fetch buffers: the device KV is the layers that keep theirs, the split layer's blocks
    # and the prefill scratch (prefill stays exact), nothing more.
    assert not any(p.kv_fetch for p in routed.layers)
    per_token = 2 * 8 * 128 * 2
    on_device = sum(p.kv_tier == "device" for p in routed.layers)
    split = sum(p.kv_device_tokens for p in routed.layers)
    want = per_token * (on_device * WORK.context + split + WORK.context)
    assert routed.reserved["kv cache"] == want
    assert routed.reserved["activations"] == full.reserved["activations"]  # same prefill chunk
    assert routed.prefill_chunk_tokens == full.prefill_chunk_tokens
    assert routed.count("gpu") >= 3 and full.count("gpu") == 0
    assert on_device < sum(p.kv_tier == "device" for p in full.layers)
    step, before = routed.predicted["decode s (KV split)"], full.predicted["decode s (KV split)"]
    assert step < 0.6 * before, (step, before)
    assert step < 32 * routed.layer_bytes / H200.pcie_busy  # below streaming every layer
    rows = dict(routed.describe())
    assert "32 layers read <= 12.5% of their KV" in rows["KV routed in decode"]
    assert "KV fetched to the GPU in decode" not in rows
    sub = dict(replace(routed, layers=routed.layers[:3]).describe())  # self-speculation's sub-plan
    assert sub["KV routed in decode"].startswith("3 layers read")


@pytest.mark.parametrize("hybrid", ["off", "auto"])
def test_the_cost_model_weighs_the_cpu_read(llama8b, hybrid):
    """Not a rule: the slower the CPU reads routed pages, the more KV stays on the device (its
    reads then cost the compute chain more than the copies a resident layer saves); with reads
    that cost nothing every layer's KV leaves and the freed bytes hold weights."""
    spec, _ = llama8b
    summaries, kv_read = _routing(spec)
    kept = []
    for attn in (0.2e9, 2e9, 8.5e9, 1e15):
        plan = _plan(llama8b, replace(H200, cpu_attn=attn), hybrid, summary_bytes=summaries,
                     kv_read=kv_read)  # fmt: skip
        assert plan.peak_device_bytes <= 8 * GiB and not any(p.kv_fetch for p in plan.layers)
        kept.append((sum(p.kv_tier == "device" for p in plan.layers), plan.count("gpu")))
    assert [k for k, _ in kept] == sorted((k for k, _ in kept), reverse=True), kept
    assert [r for _, r in kept] == sorted(r for _, r in kept), kept
    assert kept[-1][0] == 0 and kept[-1][1] > kept[0][1]


def test_tiny_routed_tokens_do_not_change_with_placement(hf_models, tmp_path):
    """A tiny Llama with top-k routing: the routed plan (KV of most layers in pinned RAM, read
    where it sits; more layers resident) executed with the accelerator played by the CPU gives
    the tokens of the plan made without routed placement (more KV on the device), which are
    those of the plain CPU run: routing's results do not change, only where the KV sits."""
    from ollm.engine.runner import Runner
    from ollm.runtime.prefetch import Prefetcher
    from ollm.storage.store import LayerStore

    _, path = hf_models("llama")
    kw = dict(attention="topk:3,window:8,sinks:2", attention_page_tokens=4, max_context=256)
    prompt = [(7 * i + 3) % 256 for i in range(120)]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    with LLM(path, device="cpu", cache_dir=tmp_path, progress=False, **kw) as llm:
        reference = llm.generate(prompt, params).token_ids
        spec, store, engine = llm.spec, llm.store, llm.engine
        work = Workload(1, 256, 256)
        summaries = routing_summary_bytes(spec, llm.config, work, 4)
        kv_read = routing_kv_read(engine, work)
        assert kv_read is not None and max(kv_read) < 0.5

        def plan(budget, **extra):
            return plan_placement(spec, store, "cuda:0", budget, None, "cpu", work, 4,
                                  chunk_tokens=32, summary_bytes=summaries, **extra)  # fmt: skip

        fixed = plan(None)
        base = sum(
            v for k, v in fixed.reserved.items() if k not in ("resident layers", "stream buffers")
        )
        budget = base + int(3.5 * store.max_layer_nbytes)
        fast = MachineRates(5e5, 5e5, 1e9, 1e9, 2, 1e12, 1e10, 1e12, cpu_attn=1e9)  # tiny layers
        before = plan(budget, rates=fast, hybrid="off")
        after = plan(budget, rates=fast, hybrid="off", kv_read=kv_read)
        assert after.count("gpu") > before.count("gpu")
        assert sum(p.kv_tier == "cpu" for p in after.layers) > sum(
            p.kv_tier == "cpu" for p in before.layers
        )
        tokens = []
        for p in (before, after):
            fake = plan_on_device(p, "cpu:1")
            prefetcher = Prefetcher(LayerStore(llm.store_path), fake, llm.stats)
            llm.prefetcher.close()
            llm.plan, llm.prefetcher = fake, prefetcher
            runner = Runner(spec, fake, prefetcher, llm.dtype)
            runner.routing = engine.routing
            llm.runner = engine.runner = engine.generator.runner = runner
            res = llm.generate(prompt, params)
            assert 0 < res.metrics.kv_read_fraction < 1  # routed reads ran
            tokens.append(res.token_ids)
    assert tokens[0] == tokens[1] == reference


def test_a_measured_routed_read_spreads_resident_layers(llama8b):
    """With the routed read's own rate measured (``cpu_routed``: 2x cpu_attn, as the split read
    may run) the reads fit beside the copies: every layer's KV leaves, the freed bytes hold 7
    resident layers spread between streamed ones (resident layers first would idle the copy
    engine once the ring is full while they read), and the step is the copies' floor."""
    spec, _ = llama8b
    summaries, kv_read = _routing(spec)
    rates = replace(H200, cpu_routed=17e9)
    plan = _plan(llama8b, rates, summary_bytes=summaries, kv_read=kv_read)
    resident = [i for i, p in enumerate(plan.layers) if p.tier == "gpu"]
    assert len(resident) == 7 and resident != list(range(7)), resident
    assert all(p.kv_tier == "cpu" for p in plan.layers) and plan.peak_device_bytes <= 8 * GiB
    assert 8 * GiB - plan.peak_device_bytes < 256 * 4096  # the rest: device blocks of layer 0
    assert plan.layers[0].kv_device_tokens > 0
    floor = 25 * plan.layer_bytes / rates.pcie_busy
    assert plan.predicted["decode s (KV split)"] == pytest.approx(floor, rel=0.01)
    slow = _plan(llama8b, replace(rates, cpu_routed=4e9), summary_bytes=summaries, kv_read=kv_read)
    assert slow.predicted["decode s (KV split)"] > 1.05 * floor  # the reads cost the chain
    # Smaller prefill chunks (scripts/gpu/routing.py's third row) free activations for weights.
    lever = _plan(llama8b, rates, summary_bytes=summaries, kv_read=kv_read, chunk_tokens=8192)
    assert lever.count("gpu") == 9 and lever.peak_device_bytes <= 8 * GiB
    assert lever.predicted["decode s (KV split)"] < 0.95 * floor


def test_routed_read_workload_reads_an_eighth():
    """engine/calibrate's routed-read probe: sinks, window and every eighth page of the middle,
    the bytes it reports are those it gathers, and it runs on the CPU."""
    import torch

    from ollm.engine.calibrate import _attention_workload, _routed_workload

    spec = NS(num_kv_heads=2, num_heads=4, head_dim=16)
    _, full, kv = _attention_workload(spec, 4096, torch.float32)
    read, nbytes = _routed_workload(kv, spec, torch.float32)
    read()
    middle = (4096 - 256) // 64 - 1  # pages between the 64 sinks and the window's start
    slots = 64 + (middle // 8) * 64 + (4096 - (4096 - 256) // 64 * 64)
    assert nbytes == 2 * 2 * slots * 16 * 4 and nbytes < full / 5  # 768 of 4096 slots


def test_ollm_info_shows_the_routed_layers(hf_models, tmp_path):
    import json

    from typer.testing import CliRunner

    from ollm.cli import app

    _, path = hf_models("llama")
    args = ["info", str(path), "--device", "cpu", "--max-context", "256", "--json"]
    args += ["--cache-dir", str(tmp_path)]
    routed = CliRunner().invoke(app, [*args, "--attention", "topk:2,window:32,sinks:4"])
    assert routed.exit_code == 0, routed.output
    plan = json.loads(routed.stdout.splitlines()[-1])["plan"]
    assert " layers read <= " in plan["KV routed in decode"]
    full = CliRunner().invoke(app, args)
    assert "KV routed in decode" not in json.loads(full.stdout.splitlines()[-1])["plan"]
