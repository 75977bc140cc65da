"""Decode-resident layers on batch-engine plans (``planning/decode_resident.py``): the shared-prefix
bench's plan (16 x 6192 tokens sharing 6144, Llama-3.1-8B shapes, 8 GiB, the rates of the ninth
session's call 5) reserves its 6912-row admission step; its decode steps of 16 rows need far less,
and the difference holds a streamed layer while decode runs. Planner figures are pure functions
of shapes and rates; the tokens of a tiny model through the batch engine do not change when
decode holds layers, and its decode steps copy fewer bytes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import llama8b_with_rates, plan_on_device, streaming_engine_plan
from ollm import LLM, SamplingParams
from ollm.planning.batch_step import GATHER_BYTES, engine_parts
from ollm.planning.decode_resident import decode_activations, fragmentation_allowance
from ollm.planning.footprint import row_cell_bytes
from ollm.planning.placement import Workload, plan_placement
from ollm.tiers import Phase, Tier

GiB, MiB = 1 << 30, 1 << 20
SHARED = Workload(16, 6192, 6192, 6144)  # the bench's prefix case: 6176-token prompts + 16 new
STEP = "decode s (KV split)"


@pytest.fixture(scope="module")
def plans():
    spec, store, rates = llama8b_with_rates("2026-12-02/s9/call5_prefix6k_steps.json")

    def plan(work: Workload, held: bool):
        return plan_placement(spec, store, "cuda:0", 8 * GiB, None, "auto", work, 2, rates,
                              batch_engine=True, decode_resident=held)  # fmt: skip

    return spec, store, rates, plan


def test_shared_prefix_plan_holds_a_layer_in_decode(plans) -> None:
    """The bench's shared plan: 11 resident, 21 streamed as measured; with ``decode_resident``
    the prefill reservations are the same (within 8 GiB), decode holds one streamed layer from
    RAM (20 streamed per decode step, not 21) in forwards of at most 16 rows (one per
    sequence), its decode reservation stays under the budget less the allocator allowance, and
    the predicted step is one layer copy shorter, not below the copies left."""
    spec, store, rates, plan = plans
    plain, held = plan(SHARED, False), plan(SHARED, True)
    assert plain.count(Tier.GPU) == held.count(Tier.GPU) == 11
    assert held.reserved == plain.reserved and sum(held.reserved.values()) <= 8 * GiB
    assert not plain.decode_resident and len(plain.streamed_for(Phase.DECODE)) == 21
    chosen = held.decode_resident
    assert len(chosen) >= 1 and len(held.streamed_for(Phase.DECODE)) == 21 - len(chosen)
    assert all(held.layers[i].tier == Tier.CPU for i in chosen)
    assert held.decode_rows == 16
    assert held.phase(16) == Phase.DECODE and held.phase(17) == Phase.PREFILL
    assert held.phase(held.step_tokens) == Phase.PREFILL  # the admission step gives them back
    cap = 8 * GiB - fragmentation_allowance(8 * GiB)
    dec = held.decode_reserved
    assert sum(dec.values()) <= cap and held.peak_device_bytes <= 8 * GiB
    assert dec["decode-resident layers"] == len(chosen) * store.max_layer_nbytes
    assert sum(dec.values()) + store.max_layer_nbytes > cap  # no room for one more
    layer = store.max_layer_nbytes / rates.pcie
    before, after = plain.predicted[STEP], held.predicted[STEP]
    assert after < before - 0.9 * len(chosen) * layer
    assert after >= 0.999 * len(held.streamed_for(Phase.DECODE)) * layer
    rows = dict(held.describe())
    assert rows["decode-resident layers"].startswith(f"{len(chosen)} streamed in prefill")
    assert "forwards of <= 16 tokens" in rows["decode-resident layers"]


def test_decode_activations_are_the_engine_step_of_its_rows(plans) -> None:
    """What the held layer takes, byte by byte: the admission step's activations (731.76 MiB)
    less a 16-row decode step's, counted by the same allocation sites (``engine_parts`` with
    ``forward``): the 64 MiB decode gather and 96 MiB slack kept, float32 logits of 16 rows,
    and the attention scores of 16 rows over every key slot (20 MiB) instead of a 64 MiB score
    block a 16-row step cannot fill; larger than a single request's 16-token forward."""
    spec, store, _, plan = plans
    held = plan(SHARED, True)
    act = held.decode_reserved["activations"]
    parts = engine_parts(spec, SHARED, 2, held.mlp_chunk_tokens, held.prefill_chunk_tokens,
                         embed_on_device=False, logit_rows=16, forward=16)  # fmt: skip
    assert act == sum(parts.values())
    assert act > decode_activations(spec, Workload(1, 6192, 16), 2, held.mlp_chunk_tokens, 16)
    assert round(held.reserved["activations"] / MiB, 2) == 731.76
    assert parts["slack"] == 96 * MiB and parts["logits"] == 16 * (128256 * 10 + 4096 * 14)
    scores = 16 * 6192 * (row_cell_bytes(32, 2) + 4 * 4)
    kv = 2 * 8 * 16 * 128 * 2 + 2 * 16 * 32 * 128 * 2 + 16 * 32 * (128 * 2 + 12)
    assert parts["attention"] == kv + scores + GATHER_BYTES
    assert parts["residual stream"] == 16 * 4096 * 2
    # The prefill step's parts are what they were (``forward`` changes only decode's).
    step = engine_parts(spec, SHARED, 2, held.mlp_chunk_tokens, held.prefill_chunk_tokens,
                        embed_on_device=False)  # fmt: skip
    assert step == held.batch_parts and parts["attention"] < step["attention"]
    # Without the tighter scores (a 64 MiB block, as the prefill step counts) no layer fits.
    others = (
        sum(held.decode_reserved.values()) - act - held.decode_reserved["decode-resident layers"]
    )
    cap = 8 * GiB - fragmentation_allowance(8 * GiB)
    assert others + act + store.max_layer_nbytes <= cap
    assert others + act - scores + 64 * MiB + store.max_layer_nbytes > cap


def test_off_by_default_and_distinct_plan_within_budget(plans) -> None:
    """Opt-in: the default plan holds nothing; the distinct case's plan (16 x 6192, nothing
    shared) asking for it also stays within its decode cap, and a single-sequence plan's rows
    are still ``DECODE_ROWS``-based (not the batch's)."""
    spec, store, rates, plan = plans
    default = plan_placement(spec, store, "cuda:0", 8 * GiB, None, "auto", SHARED, 2, rates,
                             batch_engine=True)  # fmt: skip
    assert not default.decode_resident and not default.decode_rows
    distinct = plan(Workload(16, 6192, 6192), True)
    cap = 8 * GiB - fragmentation_allowance(8 * GiB)
    assert sum(distinct.reserved.values()) <= 8 * GiB
    assert sum(distinct.decode_reserved.values()) <= cap
    assert distinct.decode_rows in (0, 16, 32, 64)


def test_batch_engine_tokens_unchanged_with_held_layers(hf_models, tmp_path) -> None:
    """A tiny Llama's shared-prefix batch through ``BatchEngine.for_plan`` on an engine-sized plan
    (the accelerator played by the CPU): holding two streamed layers in decode (forwards of at
    most 4 rows, one per sequence) gives the same greedy tokens as the plain plan and as each
    prompt alone, and every decode-phase step copies the two layers fewer (the admission
    steps, larger, stream them: a prompt admitted while the others decode gets them back)."""
    from ollm.engine.batch import BatchEngine
    from ollm.engine.runner import Runner
    from ollm.runtime.prefetch import Prefetcher
    from ollm.storage.store import LayerStore
    from test_batch_engine import alone

    _, path = hf_models("llama")
    g = torch.Generator().manual_seed(5)
    head = torch.randint(0, 256, (48,), generator=g).tolist()
    prompts = [head + torch.randint(0, 256, (5 + 3 * i,), generator=g).tolist() for i in range(4)]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    work = Workload(4, 96, 96, 48)
    kw = dict(device="cpu", cache_dir=tmp_path, progress=False, max_batch=4, max_context=96)
    with LLM(path, **kw, shared_prefix=48) as llm:
        want = alone(llm, prompts, params)
        spec, store = llm.spec, llm.store
        plain = streaming_engine_plan(spec, store, work)
        assert len(plain.streamed) >= 3 and plain.step_tokens and plain.shared_prefix == 48
        two = plain.streamed[:2]
        layers = tuple(replace(p, decode_resident=i in two) for i, p in enumerate(plain.layers))
        held = replace(plain, layers=layers, decode_rows=4)
        tokens, saved = [], []
        for p in (plain, held):
            fake = plan_on_device(p, "cpu:1")
            prefetcher = Prefetcher(LayerStore(llm.store_path), fake, llm.stats)
            runner = Runner(spec, fake, prefetcher, llm.dtype)
            eng = BatchEngine.for_plan(runner, None, (), 4, 96)
            ids = [eng.add(q, params) for q in prompts[:3]]
            copies = []
            while eng.has_work():
                if len(copies) == 3:  # a prompt admitted during decode: held layers given back
                    ids.append(eng.add(prompts[3], params))
                rows, copied = eng.step_tokens, llm.stats.bytes_h2d
                eng.step()
                copies.append((eng.step_tokens - rows, llm.stats.bytes_h2d - copied))
            tokens.append([eng.finished[r].token_ids for r in ids])
            saved.append(copies)
            assert eng.kv_blocks_used() == 0
            eng.close()
            prefetcher.close()
        assert tokens[0] == tokens[1] == want
        pair = sum(store.layer_nbytes(i) for i in two)
        decode = 0
        for (rows, a), (rows2, b) in zip(*saved, strict=True):
            assert rows == rows2
            assert a - b == (pair if rows <= 4 else 0), (rows, a, b)
            decode += rows <= 4
        assert decode >= 6  # the decode steps after the admission
        assert saved[1][1][0] <= 4 < saved[1][3][0]  # decode, then the late prompt's prefill
