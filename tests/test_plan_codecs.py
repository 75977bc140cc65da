"""The planner's view of compressed KV (issue 17 part 5): CPU decode attention over codes costs
more than over exact KV, encoded KV in RAM is copied for a GPU-computed layer each step, the
budget the hybrid choice frees (its layers' KV moves to RAM) holds resident layers, and at
Llama-3.1-8B shapes with 8 GiB a codec plan keeps at least as many layers off the link as the
bf16 plan, within the budget. Plans are pure functions of shapes and ``MachineRates``."""

from __future__ import annotations

import pytest

from ollm.kv.codecs import kv_format
from ollm.planning.costmodel import MachineRates
from ollm.planning.decode_split import choose_hybrid
from ollm.planning.placement import LayerPlacement, Workload, plan_placement
from ollm.planning.sizing import PlanSizes
from test_kv_codec_budget import llama8b

GIB = 1 << 30
CODECS = ("none", "int8", "int4", "k:int4,v:int8")


def h200(context: int | None = None) -> MachineRates:
    """The H200 host's rates (calibrated at 4k). With ``context``, ``cpu_mem`` as calibration
    measures it there (``engine/calibrate``: a real decoder layer with the context bucket's
    KV, whose attention runs at ``cpu_attn``), so a CPU layer's time includes its attention."""
    cpu_mem = 50.8e9
    if context is not None:
        model, store = llama8b()
        layer = store.max_layer_nbytes
        kv = 2 * model.num_kv_heads * model.head_dim * 2
        weights_s = layer / cpu_mem - kv * 4096 / 8.5e9
        bucket = 1 << (context - 1).bit_length()
        cpu_mem = layer / (weights_s + kv * bucket / 8.5e9)
    return MachineRates(54e9, 54e9, cpu_mem, cpu_mem, 16, 3.9e12, 6.4e12, 7.4e14, 8.5e9)


def plan(codec: str, context: int, rates: MachineRates):
    model, store = llama8b()
    return plan_placement(
        model, store, "cuda:0", 8 * GIB, 200 * GIB, work=Workload(1, context, context),
        rates=rates, kv_format=kv_format(codec, 128, 128, 2),
    )  # fmt: skip


def off_link(p) -> int:
    """Layers whose weights do not cross the link in decode (resident or CPU-computed)."""
    return len(p.layers) - len(p.streamed_for("decode"))


@pytest.mark.parametrize("context", [32768, 100000])
def test_codec_plans_keep_layers_off_the_link(context):
    rates = h200(context)
    plans = {c: plan(c, context, rates) for c in CODECS}
    for c, p in plans.items():
        assert p.peak_device_bytes <= 8 * GIB, c
        assert off_link(p) >= off_link(plans["none"]), (c, off_link(p))
    if context == 32768:  # compressed KV leaves room for resident weights
        assert off_link(plans["int8"]) >= 3 and off_link(plans["int4"]) >= 5


def test_cpu_attention_over_codes_costs_more():
    """A CPU-computed layer's extra seconds over its compressed KV: none for exact KV, the
    measured codec ratios (int8 34/24, int4 50/24 of bf16's time) of the exact KV's time."""
    model, store = llama8b()
    work = Workload(1, 32768, 32768)
    rates = h200()
    extra = {}
    for c in CODECS:
        sz = PlanSizes.of(model, store, work, 2, "cuda:0", 8 * GIB, None, None,
                          kv_format(c, 128, 128, 2))  # fmt: skip
        extra[c] = sz.cpu_kv_extra_s(rates, work.context)
    exact_s = 2 * 8 * 128 * 2 * 32768 / 8.5e9
    assert extra["none"] == 0.0
    assert extra["int8"] == pytest.approx(exact_s * (34 / 24 - 1))
    assert extra["int4"] == pytest.approx(exact_s * (50 / 24 - 1))
    assert extra["int8"] < extra["k:int4,v:int8"] < extra["int4"]


def _hybrid(cpu_kv_s: float, kv_copy=()):
    model, store = llama8b()
    layers = [LayerPlacement("gpu" if i < 4 else "cpu", "cuda:0") for i in range(32)]
    layers = [
        p if i < 16 else LayerPlacement(p.tier, p.exec_device, kv_tier="cpu")
        for i, p in enumerate(layers)
    ]
    work = Workload(1, 32768, 32768)
    out, _, predicted = choose_hybrid(
        model, layers, 4, store.max_layer_nbytes, 0, h200(), work, "auto", None, 3,
        cpu_kv_s, kv_copy,
    )  # fmt: skip
    return sum(p.decode_device == "cpu" for p in out), predicted


def test_hybrid_share_follows_the_codec_cost_and_the_kv_copies():
    """Slower CPU attention (int4 > int8 > exact) leaves fewer layers to the CPU; encoded KV
    a GPU layer must copy in each step makes computing it where the KV sits worth more."""
    counts = [_hybrid(s)[0] for s in (0.0, 0.0066, 0.017)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    copies = (0,) * 16 + (75_000_000,) * 16  # int8 KV at 32k, for the layers with RAM KV
    with_copies, predicted = _hybrid(0.0066, copies)
    assert with_copies >= counts[1]
    assert predicted["hybrid tok/s"] < _hybrid(0.0066)[1]["hybrid tok/s"]  # the copies cost


def test_budget_freed_by_the_hybrid_choice_holds_resident_layers():
    """H200 rates as calibrated at 4k, 32k context, bf16 KV: the CPU-computed layers' KV moves
    to RAM after placement sized the resident layers; that budget now holds resident layers
    (spread between streamed ones), and no further layer would fit."""
    model, store = llama8b()
    p = plan("none", 32768, h200())
    resident = [i for i, q in enumerate(p.layers) if q.tier == "gpu"]
    assert p.cpu_layers and len(resident) >= 3
    assert not set(resident) & set(p.cpu_layers)
    assert p.reserved["resident layers"] == len(resident) * store.max_layer_nbytes
    assert 0 <= p.budget - p.peak_device_bytes < store.max_layer_nbytes
    assert off_link(p) == len(resident) + len(p.cpu_layers)
