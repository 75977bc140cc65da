"""Prefill chunks of a packed batch step (issue 13, `ollm.kv.prefill_rows`): chunk edges cut at
sequence starts, and new K/V written into host pools one contiguous run per (K/V, head,
sequence), the asynchronous path a GPU takes into pinned RAM, forced here on the CPU."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from ollm import LLM, SamplingParams
from ollm.engine.batch import BatchEngine
from ollm.engine.runner import Runner
from ollm.kv import packed, prefill_rows
from ollm.kv.prefill_rows import aligned_chunks

GREEDY = SamplingParams(temperature=0, max_new_tokens=6)


def _check_edges(lengths: list[int], chunk: int) -> list[tuple[int, int]]:
    edges = aligned_chunks(lengths, chunk)
    assert edges[0][0] == 0 and edges[-1][1] == sum(lengths)
    assert all(a[1] == b[0] for a, b in zip(edges, edges[1:], strict=False))
    assert all(0 < c1 - c0 <= chunk for c0, c1 in edges)
    assert all(c1 - c0 > chunk // 2 for c0, c1 in edges[:-1])  # never less than half full
    return edges


def test_aligned_chunks_cut_at_sequence_starts():
    """Prompts that fit a chunk are whole in one where a start lies in the second half; long
    ones are cut every ``chunk`` rows; every chunk but the last is over half full."""
    assert _check_edges([2048] * 4, 1024) == [(i * 1024, (i + 1) * 1024) for i in range(8)]
    assert _check_edges([2048] * 4, 4096) == [(0, 4096), (4096, 8192)]
    assert _check_edges([100, 700, 50, 900], 512) == [(0, 512), (512, 850), (850, 1362),
                                                      (1362, 1750)]  # fmt: skip
    assert _check_edges([300] * 3, 512) == [(0, 300), (300, 600), (600, 900)]
    assert _check_edges([5], 64) == [(0, 5)]
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 20))]
        _check_edges(lengths, rng.choice([16, 64, 256]))


@pytest.fixture(scope="module")
def llm(hf_models, tmp_path_factory):
    _, path = hf_models("llama")
    kw = dict(max_batch=1, max_context=256, prefill_chunk=32, progress=False)
    made = LLM(path, device="cpu", cache_dir=tmp_path_factory.mktemp("rows-cache"), **kw)
    yield made
    made.close()


def _ram_runner(llm: LLM) -> Runner:
    """``llm``'s weights with every layer's KV in the RAM tier (its pools in host memory)."""
    layers = tuple(replace(p, kv_tier="cpu") for p in llm.plan.layers)
    return Runner(llm.spec, replace(llm.plan, layers=layers), llm.prefetcher, llm.dtype)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (70, 9, 33, 120, 14)]


def _pools_after_prefill(runner: Runner, prompts) -> list[torch.Tensor]:
    eng = BatchEngine(runner, None, (), block_tokens=8, max_batch=8, max_context=256)
    for p in prompts:
        eng.add(p, GREEDY)
    eng.step()  # every prompt in one step, 32-row chunks
    assert eng.sampled == len(prompts)
    out = [
        store.layer_pool("device", i).clone()
        for store in eng.pools.stores["full"].values()
        for i in range(len(runner.plan.layers))
    ]
    eng.close()
    return out


def test_run_writes_fill_the_pool_as_the_indexed_copy(llm, monkeypatch):
    """The prefill step's RAM pools after run writes equal those after the indexed copy."""
    runner, prompts = _ram_runner(llm), _prompts()
    want = _pools_after_prefill(runner, prompts)
    writes = []
    real = prefill_rows.write_runs
    monkeypatch.setattr(packed, "write_runs", lambda *a: writes.append(a[2]) or real(*a))
    monkeypatch.setattr(packed.PackedLayerKV, "run_writes", True)
    got = _pools_after_prefill(runner, prompts)
    # every piece of the prefill went by runs, a prefill's short tail in a chunk included
    assert writes and any(n <= packed.CPU_ATTEND_ROWS for w in writes for _, _, n in w)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_run_writes_and_aligned_chunks_give_tokens_alone(llm, monkeypatch):
    """Prompts of several lengths prefilled in one step over RAM pools, written by runs and cut
    at sequence starts (the 9- and 14-token prompts are whole in their chunks), then decoded:
    each prompt's tokens alone."""
    prompts = _prompts()
    want = [llm.generate(p, GREEDY).token_ids for p in prompts]
    chunks, writes = [], []
    real_chunks, real_write = packed.PackedStep.row_chunks, prefill_rows.write_runs
    monkeypatch.setattr(
        packed.PackedStep, "row_chunks", lambda s, c: chunks.append(real_chunks(s, c)) or chunks[-1]
    )
    monkeypatch.setattr(packed, "write_runs", lambda *a: writes.append(1) or real_write(*a))
    monkeypatch.setattr(packed.PackedLayerKV, "run_writes", True)
    eng = BatchEngine(_ram_runner(llm), None, (), block_tokens=8, max_batch=8, max_context=256)
    outs, _ = eng.generate(prompts, GREEDY)
    eng.close()
    assert [o.token_ids for o in outs] == want
    assert writes and chunks[0] == aligned_chunks([len(p) for p in prompts], 32)
    assert (70, 79) not in chunks[0] and any(c0 <= 70 and 79 <= c1 for c0, c1 in chunks[0])


def test_prefill_chunk_ops_flat_in_batch(tmp_path):
    """``scripts/batch_prefill_overhead.py`` over 2 layers (one with its KV in RAM, written by
    runs): each 32-token prompt is one chunk per layer that reads no earlier keys, every more
    prompt adds the same aten ops to the step (a chunk's work does not grow with the step's
    sequences), and the step has one host read (the greedy picks)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "HF_HUB_OFFLINE": "1"}
    got = []
    for batch in (2, 4, 6):
        out = tmp_path / f"b{batch}.json"
        cmd = [sys.executable, str(root / "scripts/batch_prefill_overhead.py"), "--layers", "2",
               "--ram-layers", "1", "--batch", str(batch), "--prompt", "32", "--chunk", "32",
               "--repeats", "1", "--run-writes", "--out", str(out)]  # fmt: skip
        subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)
        got.append(json.loads(out.read_text()))
    for r, batch in zip(got, (2, 4, 6), strict=True):
        assert r["chunk_layer_iterations"] == 2 * batch
        assert r["packed_calls_per_step"] == {"attend": 2 * batch}  # no _gather / _run_kv
        assert r["host_reads_per_step"] == {"tolist": 1}
    ops = [r["ops_per_step"] for r in got]
    assert ops[2] - ops[1] == ops[1] - ops[0] > 0


def test_engine_chunk_is_priced_in_packed_rows():
    """Llama-3.1-8B shapes at 8 GiB with the H200's rates: the batch engine's chunk of its
    packed row is the smallest power of two whose fixed cost is at most half its compute (2048
    rows: 0.5 ms against 2 x 218M params x rows at 7.4e14 FLOP/s), never below the padded rule's
    rows, capped by 1/8 of the budget for one packed row's temporaries (0: the whole step);
    without rates the padded rule stands."""
    from conftest import load_script
    from ollm.planning.placement import Workload
    from ollm.planning.sizing import (
        CHUNK_OVERHEAD_S,
        CHUNK_OVERHEAD_SHARE,
        engine_chunk,
        prefill_chunk,
    )

    pr = load_script("plan_report.py")
    spec, store = pr.llama8b()
    rates, layer, gib = pr.h200_rates(), store.max_layer_nbytes, 1 << 30
    for batch in (16, 64):
        work = Workload(batch, 2080, 2080)
        padded = prefill_chunk(spec, work, 2, 8 * gib)
        assert padded == 16384 // batch
        rows = engine_chunk(spec, work, 2, 8 * gib, padded, layer, rates)
        assert rows == 2048
        row_s = 2 * layer / 2 / rates.gpu_flops
        assert CHUNK_OVERHEAD_S <= CHUNK_OVERHEAD_SHARE * rows * row_s
        assert CHUNK_OVERHEAD_S > CHUNK_OVERHEAD_SHARE * rows // 2 * row_s
        assert engine_chunk(spec, work, 2, 8 * gib, padded, layer, None) == padded
    small = Workload(2, 512, 512)  # a step of 1024 packed rows: one chunk
    assert engine_chunk(spec, small, 2, 8 * gib, 0, layer, rates) == 0
    tight = Workload(64, 2080, 2080)  # 1/8 of 256 MiB holds ~745 packed rows' temporaries
    assert engine_chunk(spec, tight, 2, 256 << 20, 256, layer, rates) == 512
