"""Decode-resident layers (``planning/decode_resident.py``): the prefill's activations, unused by
decode, hold streamed layers while decode runs. Plans are pure functions of shapes and rates
(Llama-3.1-8B at 8 GiB and 100k, the H200 host's rates, a sizes-only store); the tokens of a
tiny model do not change when decode holds layers, and its decode steps copy fewer bytes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from conftest import load_script, plan_on_device
from ollm import LLM, SamplingParams
from ollm.planning.costmodel import MachineRates
from ollm.planning.decode_resident import (
    DECODE_ROWS,
    DECODE_ROWS_UP_TO,
    decode_activations,
    fragmentation_allowance,
)
from ollm.planning.placement import Workload, plan_placement
from ollm.tiers import Phase, Tier

GiB = 1 << 30
WORK = Workload(1, 100020, 100020)


@pytest.fixture(scope="module")
def report():
    return load_script("plan_report.py")


@pytest.fixture(scope="module")
def llama8b(report):
    return report.llama8b()


CASES = [("none", "full"), ("int8", "full"), ("int4", "full"),
         ("none", "topk:189,window:256,sinks:64")]  # fmt: skip


@pytest.mark.parametrize("codec,attention", CASES)
def test_decode_holds_layers_within_the_budget(report, llama8b, codec, attention):
    """Every device row of issues 17/18: the prefill's reservations stay within 8 GiB, decode's
    (decode-size activations + decode-resident layers) too, the layers held are streamed ones
    with their weights in RAM, none has its KV fetched (its copy would queue behind a weight
    copy that decode no longer issues), and the step is shorter than without them."""
    spec, store = llama8b
    rates = report.h200_rates()

    def plan(held: bool):
        return report.plan_case(spec, store, WORK, 8 * GiB, rates, codec, attention,
                                decode_resident=held)  # fmt: skip

    held, plain = plan(True), plan(False)
    assert sum(held.reserved.values()) <= 8 * GiB
    # Decode plans below the budget by the allocator's allowance (256 MiB at 8 GiB): the H200
    # measured a peak reserved up to 0.112 GiB over the planned decode reservation.
    assert fragmentation_allowance(8 * GiB) == 256 << 20
    assert sum(held.decode_reserved.values()) <= 8 * GiB - fragmentation_allowance(8 * GiB)
    assert held.peak_device_bytes <= 8 * GiB
    chosen = held.decode_resident
    assert chosen and held.decode_rows in (DECODE_ROWS, *DECODE_ROWS_UP_TO)
    assert held.phase(held.decode_rows) == Phase.DECODE
    assert held.phase(held.decode_rows + 1) == Phase.PREFILL
    assert all(held.layers[i].tier == Tier.CPU and not held.layers[i].kv_fetch for i in chosen)
    assert set(chosen).isdisjoint(held.streamed_for(Phase.DECODE))
    assert set(chosen) <= set(held.streamed_for(Phase.PREFILL))
    dec = held.decode_reserved
    assert dec["decode-resident layers"] == len(chosen) * store.max_layer_nbytes
    assert dec["activations"] < held.reserved["activations"] / 4
    small = decode_activations(spec, WORK, 2, held.mlp_chunk_tokens, held.decode_rows)
    assert dec["activations"] == small
    step = held.predicted["decode s (KV split)"]
    before = plain.predicted.get("decode s (KV split)")
    if before is not None:
        assert step < before
    # The decode step cannot beat copying the layers that still stream.
    floor = len(held.streamed_for(Phase.DECODE)) * store.max_layer_nbytes / rates.pcie
    assert step >= floor * 0.999


def test_codec_rows_get_a_predicted_step_and_int4_gains(report, llama8b):
    """Compressed KV's plans now carry a simulated step (encoded RAM KV queued behind the
    weights); int4 over bf16 at 100k, both with decode-resident layers, beats the 1.6x the
    issue asks for in the model (the device decides)."""
    spec, store = llama8b
    rates = report.h200_rates()
    steps = {}
    for codec in ("none", "int4"):
        plan = report.plan_case(spec, store, WORK, 8 * GiB, rates, codec, decode_resident=True)
        steps[codec] = plan.predicted["decode s (KV split)"]
    assert steps["none"] / steps["int4"] > 1.6, steps


def test_small_budget_or_no_rates_holds_nothing(llama8b):
    """Without measured rates (no cost model) or on a budget whose decode frees less than a
    layer, the plan is what it was; a plan without streamed layers holds nothing more."""
    spec, store = llama8b
    plan = plan_placement(spec, store, "cuda:0", 8 * GiB, None, "cpu", WORK, 2,
                          decode_resident=True)  # fmt: skip
    assert not plan.decode_resident and not plan.decode_rows
    big = plan_placement(spec, store, "cuda:0", 80 * GiB, None, "cpu", Workload(1, 4096, 4096), 2,
                         load_script("plan_report.py").h200_rates(), decode_resident=True)  # fmt: skip
    assert not big.streamed and not big.decode_resident


def test_tiny_tokens_do_not_change_and_decode_copies_less(hf_models, tmp_path):
    """A tiny Llama whose plan holds two streamed layers in decode (the accelerator played by
    the CPU, as tests/test_routed_placement.py does): the same greedy tokens as the plain
    plan, each decode step copies two layers fewer, and a prefill after decode streams them
    again (the prefetcher gives them back: a second request's tokens are the same)."""
    from ollm.engine.runner import Runner
    from ollm.runtime.prefetch import Prefetcher
    from ollm.storage.store import LayerStore

    _, path = hf_models("llama")
    prompt = [(5 * i + 1) % 256 for i in range(96)]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    with LLM(path, device="cpu", cache_dir=tmp_path, progress=False, max_context=256) as llm:
        reference = llm.generate(prompt, params).token_ids
        spec = llm.spec
        fixed = plan_placement(spec, llm.store, "cuda:0", None, None, "cpu", Workload(1, 256, 256),
                               4, chunk_tokens=32)  # fmt: skip
        budget = sum(fixed.reserved.values()) - fixed.reserved["resident layers"]
        budget += 2 * llm.store.max_layer_nbytes
        fast = MachineRates(5e5, 5e5, 1e9, 1e9, 2, 1e12, 1e10, 1e12, cpu_attn=1e9)
        plain = plan_placement(spec, llm.store, "cuda:0", budget, None, "cpu",
                               Workload(1, 256, 256), 4, fast, "off", chunk_tokens=32,
                               decode_resident=False)  # fmt: skip
        assert len(plain.streamed) == 4
        layers = tuple(replace(p, decode_resident=i in (1, 2)) for i, p in enumerate(plain.layers))
        held = replace(plain, layers=layers, decode_rows=DECODE_ROWS)
        copied, tokens = [], []
        for p in (plain, held):
            fake = plan_on_device(p, "cpu:1")
            prefetcher = Prefetcher(LayerStore(llm.store_path), fake, llm.stats)
            llm.prefetcher.close()
            llm.plan, llm.prefetcher = fake, prefetcher
            runner = Runner(spec, fake, prefetcher, llm.dtype)
            llm.runner = llm.engine.runner = llm.engine.generator.runner = runner
            res = llm.generate(prompt, params)
            tokens.append(res.token_ids)
            copied.append(res.metrics.bytes_copied_h2d)
            assert llm.generate(prompt, params).token_ids == reference  # a second request
            assert prefetcher.streamed == fake.streamed_for(Phase.DECODE)
        assert tokens[0] == tokens[1] == reference
        steps = len(reference) - 1  # decode forwards after the prompt's
        saved = copied[0] - copied[1]
        layer = llm.store.layer_nbytes(1) + llm.store.layer_nbytes(2)
        # Played by the CPU the held layers are read where they sit (no copy engine): every
        # decode step copies two layers fewer (on a GPU they are copied once per request).
        assert saved == steps * layer, (copied, steps)


def test_off_by_default_and_the_allowance(report, llama8b):
    """Opt-in (``EngineConfig.decode_resident`` and ``plan_placement`` default False) until a
    device budget check passes: the default plan holds no layer in decode; held layers never
    fill the decode reservation past the budget less ``fragmentation_allowance`` (max(256 MiB,
    3%)), which costs verify rows or a layer rather than the budget."""
    from ollm.config import EngineConfig

    assert EngineConfig().decode_resident is False
    spec, store = llama8b
    rates = report.h200_rates()
    plain = plan_placement(spec, store, "cuda:0", 8 * GiB, None, "cpu", WORK, 2, rates, "off")
    assert not plain.decode_resident and not plain.decode_rows
    assert fragmentation_allowance(16 * GiB) == int(16 * GiB * 0.03) > 256 << 20
    for gib in (7, 8, 10, 16):
        budget = gib * GiB
        held = plan_placement(spec, store, "cuda:0", budget, None, "cpu", WORK, 2, rates, "off",
                              decode_resident=True)  # fmt: skip
        cap = budget - fragmentation_allowance(budget)
        assert sum(held.decode_reserved.values()) <= cap, gib
        if held.decode_resident:  # one layer more would cross the allowance (or none is left)
            more = sum(held.decode_reserved.values()) + store.max_layer_nbytes
            assert more > cap or set(held.decode_resident) == set(held.streamed), gib
