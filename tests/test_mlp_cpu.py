"""The MLP of streamed layers on the CPU in batch-engine decode (``planning/mlp_cpu.py``, opt-in
``mlp_cpu``): the planner marks them only where the simulated step is shorter (the shared-prefix
bench's plan at the rates of the eleventh session's call 7, Llama-3.1-8B shapes, 8 GiB), and a
tiny model's tokens through the batch engine do not change while its decode steps copy only the
marked layers' attention (the accelerator played by the CPU, the slots' MLP bytes spoiled)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import llama8b_with_rates, plan_on_device
from ollm import LLM, SamplingParams
from ollm.planning.costmodel import MachineRates
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


def test_batch_engine_tokens_unchanged_with_mlp_on_the_cpu(hf_models, tmp_path) -> None:
    """A tiny Llama's shared-prefix batch through ``BatchEngine.for_plan`` on an engine-sized
    plan: two streamed layers marked ``mlp_cpu`` give the same greedy tokens as the plain plan
    and as each prompt alone although the ring slots' bytes are overwritten before every step
    (the MLP comes from the RAM copy), and every decode step copies those layers' MLP bytes
    (and the padding between tensors) fewer; the admission steps, larger, copy whole layers.
    With the engine's measured choice (probing steps that stream every layer) the same tokens."""
    from ollm.engine.batch import BatchEngine
    from ollm.engine.runner import Runner
    from ollm.engine.step_mode import StepMode
    from ollm.runtime.prefetch import Prefetcher
    from ollm.storage.store import LayerStore
    from test_batch_engine import alone

    _, path = hf_models("llama")
    g = torch.Generator().manual_seed(7)
    head = torch.randint(0, 256, (48,), generator=g).tolist()
    prompts = [head + torch.randint(0, 256, (5 + 3 * i,), generator=g).tolist() for i in range(4)]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    work = Workload(4, 96, 96, 48)
    kw = dict(device="cpu", cache_dir=tmp_path, progress=False, max_batch=4, max_context=96)
    with LLM(path, **kw, shared_prefix=48) as llm:
        want = alone(llm, prompts, params)
        spec, store = llm.spec, llm.store
        fixed = plan_placement(spec, store, "cuda:0", None, None, "cpu", work, 4, chunk_tokens=32,
                               batch_engine=True)  # fmt: skip
        budget = sum(fixed.reserved.values()) - fixed.reserved["resident layers"]
        budget += 2 * store.max_layer_nbytes
        fast = MachineRates(5e5, 5e5, 1e9, 1e9, 2, 1e12, 1e10, 1e12, cpu_attn=1e9)
        plain = plan_placement(spec, store, "cuda:0", budget, None, "cpu", work, 4, fast, "off",
                               chunk_tokens=32, batch_engine=True)  # fmt: skip
        assert len(plain.streamed) >= 3
        two = plain.streamed[:2]
        layers = tuple(replace(p, mlp_cpu=i in two) for i, p in enumerate(plain.layers))
        split = replace(plain, layers=layers, cpu_max_tokens=4)
        mlp = sum(e.nbytes for i in two for n, e in store.files[layer_file(i)].tensors.items()
                  if n.startswith(MLP_PREFIX))  # fmt: skip
        # what decode no longer copies: the MLP and the alignment padding between tensors
        saved = sum(store.layer_nbytes(i) - sum(n for _, n in attention_ranges(store,
                    layer_file(i))) for i in two)  # fmt: skip
        assert mlp <= saved < mlp + 2 * 64 * 1024
        tokens, copies = [], []
        for p, measured in ((plain, False), (split, False), (split, True)):
            fake = plan_on_device(p, "cpu:1")
            prefetcher = Prefetcher(LayerStore(llm.store_path), fake, llm.stats)
            eng = BatchEngine.for_plan(Runner(spec, fake, prefetcher, llm.dtype), None, (), 4, 96)
            if not measured:  # the planner's choice in every decode step (no probe of streaming)
                eng.step_mode = StepMode(None)
            ids = [eng.add(q, params) for q in prompts]
            steps = []
            while eng.has_work():
                for s in prefetcher._slots:  # stale bytes must never be computed from
                    s.fill_(0x7F)
                rows, copied = eng.step_tokens, llm.stats.bytes_h2d
                eng.step()
                steps.append((eng.step_tokens - rows, llm.stats.bytes_h2d - copied))
            tokens.append([eng.finished[r].token_ids for r in ids])
            copies.append(steps)
            assert eng.kv_blocks_used() == 0
            if measured:  # the engine measures the choice against streaming every layer
                assert eng.step_mode.probe_count >= 1
            eng.close()
            prefetcher.close()
        assert tokens[0] == tokens[1] == tokens[2] == want
        decode = 0
        for (rows, a), (rows2, b) in zip(copies[0], copies[1], strict=True):
            assert rows == rows2
            assert a - b == (saved if rows <= 4 else 0), (rows, a, b)
            decode += rows <= 4
        assert decode >= 6
