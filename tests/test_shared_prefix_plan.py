"""A plan for requests that share a prompt prefix (``shared_prefix``, ``Workload.shared``)
counts the prefix's KV once: smaller pools and steps, the room given to resident layers (Llama
3.1-8B shapes, 8 GiB, the H200 rates of the eighth session's prefix call); the batch engine
sizes its pools from such a plan and gives each prompt's tokens alone."""

from __future__ import annotations

import pytest
import torch

from conftest import llama8b_with_rates
from ollm import LLM
from ollm.engine.batch import BatchEngine
from ollm.errors import OllmError
from ollm.planning.accounting import kv_pool_blocks
from ollm.planning.batch_step import step_tokens
from ollm.planning.placement import Workload, plan_placement
from test_batch_engine import GREEDY, alone


@pytest.fixture(scope="module")
def setup():
    return llama8b_with_rates("2026-12-02/s8/callC_prefix6k_shared_attention_5089315.json")


def test_shared_prefix_counted_once(setup) -> None:
    spec, store, rates = setup
    plans = {}
    for shared in (0, 6144):
        work = Workload(16, 6192, 6192, shared)
        plans[shared] = plan_placement(
            spec, store, "cuda:0", 8 << 30, None, "auto", work, 2, rates, batch_engine=True
        )
    alone_, shared_ = plans[0], plans[6144]
    assert alone_.kv_pools["full"] == 16 * 387
    assert shared_.kv_pools["full"] == 384 + 16 * 3  # the prefix's 384 blocks once
    assert shared_.step_tokens == 6192 + 15 * 48  # one whole prompt, the others' tails
    assert shared_.shared_prefix == 6144
    gpu = {k: [p.tier.name for p in v.layers].count("GPU") for k, v in plans.items()}
    assert gpu[6144] > gpu[0] + 8  # the KV and step room go to resident layers
    assert all(p.peak_device_bytes <= 8 << 30 for p in plans.values())
    assert ("shared prefix (KV held once)", "6144 tokens") in shared_.describe()
    # Its KV all on the device, the batch engine's host-bound decode chain (costmodel.
    # decode_chain) spreads the resident layers between streamed ones: placed first, a ring
    # full of the next step's first streamed layers waits while they compute (18 ms per step
    # in the H200 profile, docs/runs/2026-12-02/s10/call3_profile_prefix.json).
    resident = [i for i, p in enumerate(shared_.layers) if p.tier.name == "GPU"]
    assert resident != list(range(len(resident)))
    assert max(b - a for a, b in zip(resident, resident[1:], strict=False)) <= 3


def test_window_groups_and_steps() -> None:
    """A sliding window's live blocks are each sequence's own; a prefix as long as the prompt
    still leaves each prompt one token to compute."""

    class Layer:
        def __init__(self, window):
            self.window = window

    class Spec:
        layers = [Layer(None), Layer(64)]

    work = Workload(4, 512, 512, 256)
    pools = kv_pool_blocks(Spec, work, 16, 512)
    assert pools["full"] == 16 + 4 * 16
    assert pools["window64"] == 4 * kv_pool_blocks(Spec, Workload(1, 512, 512), 16, 512)["window64"]
    assert step_tokens(Spec, Workload(4, 512, 512, 512), 0) == 512 + 3


def test_engine_on_a_shared_prefix_plan(hf_models, tmp_path) -> None:
    """An LLM planned with ``shared_prefix``: the batch engine takes the plan's smaller pools,
    requests over the prefix give their tokens alone, and one with no shared prefix still runs."""
    _, path = hf_models("llama")
    g = torch.Generator().manual_seed(3)
    head = torch.randint(0, 256, (48,), generator=g).tolist()
    prompts = [head + torch.randint(0, 256, (4 + i,), generator=g).tolist() for i in range(4)]
    prompts.append(torch.randint(0, 256, (20,), generator=g).tolist())
    kw = dict(device="cpu", max_batch=4, max_context=80, cache_dir=tmp_path, progress=False)
    with LLM(path, **kw) as ref:
        want = alone(ref, prompts)
    with LLM(path, **kw, shared_prefix=48) as llm:
        assert llm.plan.shared_prefix == 48
        w = llm.workload
        eng = BatchEngine.for_plan(llm.runner, None, (), w.batch, w.context)
        blocks = {t: p.num_blocks for t, p in eng.pools.managers["full"].pools.items()}
        assert max(blocks.values()) == llm.plan.kv_pools["full"] < 4 * 5
        ids = [eng.add(prompts[0], GREEDY)]
        eng.step()
        ids += [eng.add(p, GREEDY) for p in prompts[1:]]
        eng.run()
        assert [eng.finished[r].token_ids for r in ids] == want
        assert eng.metrics().prefix_hits >= 3 and eng.kv_blocks_used() == 0
        eng.close()


def test_shared_prefix_is_checked() -> None:
    with pytest.raises(OllmError, match="shared_prefix"):
        LLM(max_context=64, shared_prefix=64, device="cpu")
