"""The MLP of streamed layers on the CPU in batch-engine decode (``planning/mlp_cpu.py``,
``mlp_cpu``, on by default): the planner marks them only where the simulated step is shorter (the
shared-prefix bench's plan at the rates of the eleventh session's call 7, Llama-3.1-8B shapes,
8 GiB) and never changes the layout for them (batch 16 at the twelfth session's call 3), and a
tiny model's tokens through the batch engine do not change while its decode steps copy only the
marked layers' attention (the accelerator played by the CPU, the slots' MLP bytes spoiled)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from conftest import llama8b_with_rates, load_script
from ollm import LLM
from ollm.planning.mlp_cpu import mlp_cpu_layers, mlp_cpu_s
from ollm.planning.placement import Workload, plan_placement
from ollm.runtime.mlp_split import MLP_PREFIX, attention_ranges
from ollm.storage.store import layer_file

GiB = 1 << 30
SHARED = Workload(16, 6192, 6192, 6144)
STEP = "decode s (KV split)"


@pytest.fixture(scope="module")
def setup():
    return llama8b_with_rates("2026-12-02/s11/call7_prefix6k_3rounds_37e9a2b.json")


def _plan(setup, work=SHARED, engine=True, **kw):
    spec, store, rates = setup
    return plan_placement(spec, store, "cuda:0", 8 * GiB, None, "auto", work, 2,
                          kw.pop("rates", rates), batch_engine=engine, **kw)  # fmt: skip


def test_planner_marks_layers_only_where_the_step_shortens(setup):
    """Off by default. On: at this host's rates (CPU weight read 65 GB/s, ~5.8 ms per 16-row
    MLP on the chain) several streamed layers, spread, a step >15 ms shorter than the plain
    plan's and the same device reservation; forwards of at most 16 rows (one per sequence) use
    them. A CPU reading weights at 20 GB/s, a single-sequence plan, or one holding layers in
    decode: none."""
    spec, store, rates = setup
    plain, split = _plan(setup), _plan(setup, mlp_cpu=True)
    assert mlp_cpu_layers(plain) == []
    chosen = mlp_cpu_layers(split)
    assert len(chosen) >= 4 and all(split.layers[i].tier.name == "CPU" for i in chosen)
    assert max(b - a for a, b in zip(chosen, chosen[1:], strict=False)) >= 2  # spread
    assert split.predicted[STEP] < plain.predicted[STEP] - 0.015
    assert split.peak_device_bytes == plain.peak_device_bytes <= 8 * GiB
    assert split.cpu_max_tokens == 16
    assert any(k == "MLP on the CPU in decode" for k, _ in split.describe())
    seconds, nbytes = mlp_cpu_s(spec, store, rates, 16)
    assert 0.8 * 352e6 < nbytes < 352e6 * 1.2 and 3e-3 < seconds < 9e-3
    slow = replace(rates, cpu_mem=20e9, cpu_mem_shared=20e9)
    assert mlp_cpu_layers(_plan(setup, rates=slow, mlp_cpu=True)) == []
    one = _plan(setup, Workload(1, 6192, 6192), engine=False, mlp_cpu=True)
    assert mlp_cpu_layers(one) == []
    held = _plan(setup, mlp_cpu=True, decode_resident=True)  # decode-resident layers win
    assert held.decode_resident and mlp_cpu_layers(held) == []


def test_layout_is_chosen_without_mlps_on_the_cpu():
    """At the rates of the H200 host where the KV-on-the-GPU layout with 14 split layers won the
    choice of KV placement (predicted 0.19 s, measured 0.57 s per step), batch 16 of 2k prompts
    keeps the plain plan's layout: the same tiers, KV layers in RAM and reservation, and no
    layer marked (its KV in RAM keeps the CPU busy)."""
    setup = llama8b_with_rates("2026-12-02/s12/call3_batch16_mlp_cpu_off.json")
    work = Workload(16, 2080, 2080)
    plain, split = _plan(setup, work), _plan(setup, work, mlp_cpu=True)
    assert [(p.tier, p.kv_tier) for p in split.layers] == [
        (p.tier, p.kv_tier) for p in plain.layers
    ]
    assert split.peak_device_bytes == plain.peak_device_bytes
    assert mlp_cpu_layers(split) == []


def test_a_near_tie_marks_nothing():
    """At call 3's rates, batch 16 of 512-token prompts (RAM KV attended on the CPU) predicts a
    best step under ``MIN_GAIN`` shorter with some layers marked: the plan stays unmarked. At
    call 7's faster CPU the same workload predicts more than ``MIN_GAIN`` and marks layers."""
    from ollm.planning import mlp_cpu

    work = Workload(16, 544, 544)
    slow = llama8b_with_rates("2026-12-02/s12/call3_batch16_mlp_cpu_off.json")
    assert mlp_cpu_layers(_plan(slow, work, mlp_cpu=True)) == []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mlp_cpu, "MIN_GAIN", 0.0)  # the raw choice: a few layers for ~1-2%
        raw = _plan(slow, work, mlp_cpu=True)
    plain = _plan(slow, work)
    assert mlp_cpu_layers(raw)
    assert raw.predicted[STEP] > plain.predicted[STEP] * (1 - mlp_cpu.MIN_GAIN)
    fast = llama8b_with_rates("2026-12-02/s11/call7_prefix6k_3rounds_37e9a2b.json")
    marked = _plan(fast, work, mlp_cpu=True)
    assert mlp_cpu_layers(marked)
    assert marked.predicted[STEP] <= _plan(fast, work).predicted[STEP] * (1 - mlp_cpu.MIN_GAIN)


def test_attention_ranges_leave_out_the_mlp(hf_models, tmp_path):
    """The ranges a decode step copies cover every tensor but the MLP's, each exactly once."""
    from ollm.storage.store import LayerStore

    _, path = hf_models("llama")
    with LLM(path, device="cpu", cache_dir=tmp_path, progress=False) as llm:
        store = LayerStore(llm.store_path)
        try:
            f = layer_file(0)
            ranges = attention_ranges(store, f)
            covered = set()
            for off, n in ranges:
                covered |= set(range(off, off + n))
            for name, e in store.files[f].tensors.items():
                span = set(range(e.offset, e.offset + e.nbytes))
                assert (span <= covered) != name.startswith(MLP_PREFIX), name
        finally:
            store.close()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def test_batch_engine_tokens_unchanged_with_mlp_on_the_cpu(hf_models, tmp_path, family) -> None:
    """``scripts/gpu/mlp_cpu_check.py`` with the accelerator played by the CPU: a tiny model's
    (every dense family)
    shared-prefix batch on an engine-sized plan, two streamed layers marked ``mlp_cpu``, gives
    the same greedy tokens as the plain plan and as each prompt alone although the ring slots'
    bytes are overwritten before every step (the MLP comes from the RAM copy), every decode step
    copies those layers' MLP bytes (and the padding between tensors) fewer, the admission
    steps (larger) copy whole layers, and with the engine's measured choice (probing steps that
    stream every layer) the tokens are the same."""
    mod = load_script("gpu/mlp_cpu_check.py")
    _, path = hf_models(family)
    row = mod.check(path, "cpu", tmp_path)
    assert row["equal"] and row["streamed"] >= 3
    assert row["decode_steps"] >= 6 and row["copies_fewer_by_skipped"]
    steps = row["steps"]
    assert [r for r, _ in steps["plain"]] == [r for r, _ in steps["split"]]
    assert any(r > mod.ROWS for r, _ in steps["split"])  # the admission
    for (rows, a), (_, b) in zip(steps["plain"], steps["split"], strict=True):
        assert a == b or rows <= mod.ROWS  # whole layers in the larger steps
    assert row["mlp_bytes"] <= row["skipped_bytes"] < row["mlp_bytes"] + 2 * 64 * 1024  # padding


def test_sweep_dry_run_gives_the_same_tokens_at_every_count(tmp_path) -> None:
    """``scripts/gpu/mlp_cpu_sweep.py --device cpu``: counts 0..2 of layers with their MLP on
    the CPU (forced in every decode step) give the count-0 tokens, with decode steps timed; the
    marked plans carry exactly ``k`` layers, spread over the streamed RAM layers."""
    from conftest import streaming_engine_plan

    mod = load_script("gpu/mlp_cpu_sweep.py")
    rep = mod.cpu_dry_run(tmp_path, 1)
    assert sorted(rep["counts"]) == [0, 1, 2]
    for row in rep["counts"].values():
        assert row["tokens_equal_k0"] and row["median_decode_step_s"] > 0
        assert any(rows > 4 for _, rows in row["steps"])  # the admission step
    spec, store, _ = llama8b_with_rates("2026-12-02/s11/call7_prefix6k_3rounds_37e9a2b.json")
    plan = streaming_engine_plan(spec, store, Workload(16, 2080, 2080))
    for k in (0, 3, len(plan.streamed)):
        chosen = mlp_cpu_layers(mod.marked(plan, k, 16))
        assert len(chosen) == k and set(chosen) <= set(plan.streamed)
