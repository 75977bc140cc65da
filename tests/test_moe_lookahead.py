"""Expert lookahead (issue 19, ``expert_lookahead``): the next sparse layer's experts predicted
from the current layer's MoE input and copied into the cache early. It never changes a result,
its counts are what the routing says, and on a skewed router it predicts well. The accelerator
is played by the CPU ("cpu:1"), as in tests/test_moe_experts.py."""

from __future__ import annotations

import pytest
import torch

from conftest import make_hf_model
from ollm import LLM
from ollm.config import EngineConfig
from ollm.errors import OllmError
from ollm.layers.moe import moe_mlp, route, sparse_weights
from ollm.planning.experts import ExpertPlan, plan_experts
from ollm.planning.placement import plan_placement
from ollm.runtime.experts import ExpertCache
from ollm.storage.experts import StoreExperts
from ollm.telemetry.stats import IOStats
from test_moe_experts import _check, _stand_in

EXPERTS, TOP_K = 32, 4


@pytest.fixture(scope="module")
def moe4(tmp_path_factory):
    """(HF model, its dir, LLM on the CPU): a qwen3_moe of four sparse layers, 32 experts, top-4."""
    d = tmp_path_factory.mktemp("moe-lookahead")
    model = make_hf_model(
        "qwen3_moe", d / "hf", num_experts=EXPERTS, num_experts_per_tok=TOP_K, mlp_only_layers=[]
    )
    llm = LLM(d / "hf", device="cpu", cache_dir=d / "c", progress=False)
    yield model, d / "hf", llm
    llm.close()


def _cache(llm, slots: int, lookahead: bool, zipf: float = 0.0):
    """An expert cache on "cpu:1" (every expert in RAM, ``slots`` slots) with each sparse
    layer's weights bound: {layer: (dense weights, bound weights)}. ``zipf``: a router bias of
    -zipf log(rank) (a random ranking per layer) skews the random router's uniform routing."""
    st = StoreExperts(llm.store)
    layers = tuple(sorted(st.regions))
    plan = ExpertPlan(
        device="cpu:1", layers=layers, num_experts=EXPERTS, expert_bytes=st.expert_bytes,
        resident=False, ram=(EXPERTS,) * len(layers), cache_slots=slots, group_rows=64,
        cpu_compute="off", lookahead=lookahead,
    )  # fmt: skip
    cache = ExpertCache(st, plan, "cpu:1", IOStats(), sparse_weights)
    g = torch.Generator().manual_seed(1)
    moe, bound = llm.spec.moe, {}
    for i in layers:
        w = dict(llm.prefetcher.get(i))
        if zipf:
            rank = torch.randperm(EXPERTS, generator=g) + 1
            w[f"{moe.prefix}.{moe.router}.bias"] = -zipf * torch.log(rank.float())
        bound[i] = (w, cache.bind(i, w))
    return cache, bound


def _decode(llm, cache, bound, steps: int, rows: int = 1, seed: int = 0):
    """``steps`` passes over the sparse layers in order, ``rows`` random rows per call; the
    outputs, and per call (layer, its input) for the caller's own bookkeeping."""
    g = torch.Generator().manual_seed(seed)
    moe, act, h = llm.spec.moe, llm.spec.act, llm.spec.hidden_size
    outs, calls = [], []
    for _ in range(steps):
        for i in cache.plan.layers:
            x = torch.randn(1, rows, h, generator=g) * 4
            outs.append(moe_mlp(x, bound[i][1], moe, act))
            calls.append((i, x.view(rows, h)))
    return outs, calls


@pytest.mark.parametrize("rows", [1, 3])
def test_lookahead_never_changes_results(moe4, rows):
    """Through a cache of 12 slots for 128 experts (evictions every call), the outputs with
    lookahead equal those without (bit for bit for one row, a decode token; within float
    rounding for several, whose batched matmuls pad to the batch's most rows, and a prefetch
    changes which experts share a batch) and the resident path's; the prediction did
    prefetch experts, and its copies are counted as bytes moved."""
    _, _, llm = moe4
    off, b_off = _cache(llm, slots=12, lookahead=False)
    on, b_on = _cache(llm, slots=12, lookahead=True)
    want, calls = _decode(llm, off, b_off, steps=6, rows=rows)
    got, _ = _decode(llm, on, b_on, steps=6, rows=rows)
    moe, act = llm.spec.moe, llm.spec.act
    for (i, x), a, b in zip(calls, want, got, strict=True):
        if rows == 1:
            assert torch.equal(a, b)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        ref = moe_mlp(x.unsqueeze(0), b_on[i][0], moe, act)
        torch.testing.assert_close(b, ref, atol=1e-5, rtol=1e-5)
    assert off.ahead is None and on.ahead is not None
    c = on.ahead.counts
    assert c["predicted"] > 0 and c["fetched"] > 0 and c["fetched_used"] <= c["fetched"]
    assert on.stats.bytes_h2d > 0
    off.close()
    on.close()


def test_lookahead_counts_on_a_skewed_router(moe4):
    """With a Zipf-skewed router, the cache's counts equal the ones the routing gives (each
    call of a layer but the last predicts the next layer's experts from its own input; the
    next call of that layer routes its own): predicted, routed, correct; precision is far
    above chance (top_k / experts: twice it) and the prefetched experts that were used became hits."""
    _, _, llm = moe4
    # the tiny config's router logits spread ~6 (initializer_range 0.2, rows x4): a bias
    # of -4 log(rank) is what skews them as -1.2 log(rank) skews a real model's
    cache, bound = _cache(llm, slots=24, lookahead=True, zipf=4.0)
    _, calls = _decode(llm, cache, bound, steps=8)
    moe, layers = llm.spec.moe, cache.plan.layers
    nxt = dict(zip(layers, layers[1:], strict=False))
    want = {"predicted": 0, "correct": 0, "routed": 0}
    pending: dict[int, set[int]] = {}
    for i, x in calls:
        used = set(route(x, bound[i][0], moe)[1].reshape(-1).tolist())
        pred = pending.pop(i, None)
        if pred is not None:
            want["routed"] += len(used)
            want["correct"] += len(used & pred)
        if i in nxt:
            pending[nxt[i]] = set(route(x, bound[nxt[i]][0], moe)[1].reshape(-1).tolist())
            want["predicted"] += len(pending[nxt[i]])
    c = cache.ahead.counts
    assert {k: c[k] for k in want} == want
    assert want["correct"] / want["predicted"] > 2 * TOP_K / EXPERTS
    assert 0 < c["fetched_used"] <= min(c["fetched"], c["correct"])
    assert cache.counts["hits"] >= c["fetched_used"]
    cache.close()


def test_lookahead_planned_and_exact_end_to_end(moe4):
    """``expert_lookahead=True`` is planned on an accelerator with a cache (not on the CPU
    device, nor with every expert resident); greedy tokens and log-probs through two slots
    with lookahead equal transformers'."""
    model, path, llm = moe4
    st = StoreExperts(llm.store)
    spec, work = llm.spec, llm.workload

    def dense(s, gpu, cpu):
        return plan_placement(spec, s, "cuda:0", gpu, cpu, "auto", work, 4, hybrid="off")

    kw = dict(plan_dense=dense, cpu_compute="off", lookahead=True)
    plan = plan_experts(spec, llm.store, st, "cuda:0", None, None, "auto", work, 4, slots=2, **kw)
    assert plan.experts.lookahead and plan.experts.cache_slots == 2
    assert "lookahead" in dict(plan.experts.describe())["expert cache"]
    resident = plan_experts(spec, llm.store, st, "cuda:0", None, None, "auto", work, 4, **kw)
    assert resident.experts.resident and not resident.experts.lookahead
    on_cpu = plan_experts(spec, llm.store, st, "cpu", None, None, "auto", work, 4, slots=2, **kw)
    assert not on_cpu.experts.lookahead
    with LLM(path, device="cpu", cache_dir=llm.config.cache_dir, progress=False) as run:
        _stand_in(run, run.store_path, plan)
        _check(run, model)
        ahead = run.prefetcher.experts.ahead
        assert ahead is not None and ahead.counts["predicted"] > 0
    with pytest.raises(OllmError, match="expert_lookahead"):
        EngineConfig(expert_lookahead="yes")


def test_prefetch_never_evicts_the_next_layers_predicted_experts(moe4):
    """A prediction whose experts are partly cached fetches the others into free slots or
    evicted ones, never evicting those it predicted (three slots: two hold predicted experts,
    one is free; of the two missing, one fits, the other waits for the call)."""
    _, _, llm = moe4
    cache, _ = _cache(llm, slots=3, lookahead=True)
    i, j = cache.plan.layers[:2]
    list(cache.run(j, [0, 1], [1, 1] + [0] * (EXPERTS - 2)))
    cache.ahead.prefetch(i, [0, 1, 2, 3])
    held = {k for k in cache.cached() if k[0] == j}
    assert {(j, 0), (j, 1)} <= held and len(held) == 3 and not cache.pinned
    assert cache.ahead.counts["fetched"] == 1
    cache.close()


def test_lookahead_stops_when_its_prefetches_are_used_less_than_hits(moe4):
    """Each layer routing its own random row, a prediction is at chance (top_k / experts)
    while a cache of 96 slots for 128 experts hits most calls: once judged, lookahead stops
    predicting (its counts frozen), and the outputs equal those without it throughout."""
    _, _, llm = moe4
    off, b_off = _cache(llm, slots=96, lookahead=False)
    on, b_on = _cache(llm, slots=96, lookahead=True)
    on.ahead.judge = 16
    want, _ = _decode(llm, off, b_off, steps=24)
    got, _ = _decode(llm, on, b_on, steps=24)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    c, h = on.ahead.counts, on.counts
    assert not on.ahead.active and c["fetched"] >= 16
    assert c["fetched_used"] / c["fetched"] < h["hits"] / (h["hits"] + h["misses"])
    frozen = dict(c)
    _decode(llm, on, b_on, steps=2, seed=1)
    assert on.ahead.counts == frozen and on.ahead.next_weights(on.plan.layers[0]) is None
    off.close()
    on.close()
