"""Paged KV in every tier (issue 13): the batch engine's pools in GPU/device memory, pinned RAM
and disk files, per layer as the plan places its KV; tokens equal each prompt alone, pools back
to zero after completion, preemption and cancellation; the planner sizes the pools."""

from __future__ import annotations

from dataclasses import replace

import pytest

from conftest import FAMILIES, disk_kv_budget
from ollm import LLM, SamplingParams
from ollm.engine.batch import BatchEngine, batch_supported
from ollm.engine.runner import Runner
from ollm.engine.scheduler import KVCapacityError
from test_batch_engine import GREEDY, LATE, alone, make_prompts

TIERS = ("device", "cpu", "disk")  # layer i keeps its KV in TIERS[i % 3]


@pytest.fixture(scope="module")
def llms(hf_models, tmp_path_factory):
    """family -> LLM on the CPU (prefill chunked at 32 rows), one per module."""
    cache = tmp_path_factory.mktemp("tier-cache")
    made: dict[str, LLM] = {}

    def get(family: str) -> LLM:
        if family not in made:
            _, path = hf_models(family)
            kw = dict(max_batch=1, max_context=256, prefill_chunk=32, progress=False)
            made[family] = LLM(path, device="cpu", cache_dir=cache, **kw)
        return made[family]

    yield get
    for llm in made.values():
        llm.close()


def spread(llm: LLM) -> Runner:
    """A runner over ``llm``'s weights whose plan keeps layer i's KV in ``TIERS[i % 3]``."""
    plan = llm.plan
    layers = tuple(replace(p, kv_tier=TIERS[i % 3]) for i, p in enumerate(plan.layers))
    return Runner(llm.spec, replace(plan, layers=layers), llm.prefetcher, llm.dtype)


def engine(runner: Runner, kv_dir, **kw) -> BatchEngine:
    args = dict(block_tokens=8, max_batch=8, max_context=256, max_step_tokens=64)
    return BatchEngine(runner, None, (), kv_dir=str(kv_dir), **{**args, **kw})


def files(kv_dir) -> list:
    return sorted(kv_dir.glob("ollm-kv-*/*.bin")) if kv_dir.exists() else []


@pytest.mark.parametrize("family", FAMILIES)
def test_tiers_match_alone(family, llms, tmp_path):
    """8 prompts (3 sharing a prefix, 2 added while the others decode) with KV spread over the
    device, RAM and disk tiers give each prompt's tokens alone; disk pools live in files of a
    run directory removed at close; every block is returned."""
    llm = llms(family)
    runner = spread(llm)
    assert batch_supported(runner)
    prompts = make_prompts()
    want = alone(llm, prompts)
    eng = engine(runner, tmp_path / "kv")
    homes = {h for s in eng.pools.stores.values() for h in s}
    assert homes == {"device", "ram", "disk"}
    assert files(tmp_path / "kv") and eng.pools.nbytes["disk"] > 0
    ids = [eng.add(p, GREEDY) for p in prompts[:-LATE]]
    for _ in range(3):
        eng.step()
    ids += [eng.add(p, GREEDY) for p in prompts[-LATE:]]
    eng.run()
    assert [eng.finished[r].token_ids for r in ids] == want
    assert eng.metrics().prefix_hits > 0
    assert eng.kv_blocks_used() == 0
    eng.close()
    assert files(tmp_path / "kv") == []


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_tiers_preempt_and_cancel_leak_nothing(family, llms, tmp_path):
    """Pools too small for every request: swaps (each home's swap tier) and recomputes keep the
    tokens; cancelling running and waiting requests returns every block."""
    llm = llms(family)
    runner = spread(llm)
    prompts = make_prompts()
    want = alone(llm, prompts)
    for swap in (0, 96):
        eng = engine(runner, tmp_path / "kv", max_batch=2, max_context=96, swap_tokens=swap)
        ids = [eng.add(p, GREEDY) for p in prompts]
        swapped = 0
        while eng.has_work():
            eng.step()
            swapped = max(swapped, eng.metrics().swapped)
        assert [eng.finished[r].token_ids for r in ids] == want
        assert eng.metrics().preemptions > 0 and (swapped > 0) == (swap > 0)
        assert eng.kv_blocks_used() == 0
        eng.close()
    eng = engine(runner, tmp_path / "kv", max_step_tokens=32)
    ids = [eng.add(p, GREEDY) for p in prompts]
    for _ in range(4):
        eng.step()
    assert eng.kv_blocks_used() > 0
    assert eng.cancel(ids[0]) and eng.cancel(ids[7])
    eng.run()
    for r, w in zip(ids[1:7], want[1:7], strict=True):
        assert eng.finished[r].token_ids == w
    assert eng.kv_blocks_used() == 0
    eng.close()
    assert files(tmp_path / "kv") == []


def test_llm_generate_routes_disk_plans(hf_models, tmp_path, monkeypatch):
    """A plan that puts some layers' KV on disk (small cpu_memory, kv_cache="disk") and a
    request with ``kv_dir`` (every layer's KV on disk) run several prompts through the batch
    engine, not the padded batch: tokens equal each alone, no run directory is left."""
    from ollm.engine import batch

    _, path = hf_models("qwen2")
    common = dict(max_batch=4, max_context=128, prefill_chunk=32, cache_dir=tmp_path / "c")
    common["progress"] = False
    budget = disk_kv_budget(path, 1.6, **common)
    kv_dir = tmp_path / "kv"
    made = []
    run = batch.BatchEngine.generate

    def recorded(self, *a, **k):
        made.append({h for s in self.pools.stores.values() for h in s})
        return run(self, *a, **k)

    monkeypatch.setattr(batch.BatchEngine, "generate", recorded)
    prompts = make_prompts(4)
    kw = dict(device="cpu", kv_cache="disk", cpu_memory=budget, kv_dir=kv_dir, **common)
    with LLM(path, **kw) as llm:
        tiers = {p.kv_tier for p in llm.plan.layers}
        assert tiers == {"device", "disk"}
        want = alone(llm, prompts)
        got = llm.generate(prompts, GREEDY)
        assert [g.token_ids for g in got] == want
        assert made[-1] == {"device", "disk"}
        got = llm.generate(prompts, GREEDY, _kv_dir=str(tmp_path / "all"))
        assert [g.token_ids for g in got] == want
        assert made[-1] == {"disk"}
    assert files(kv_dir) == [] and files(tmp_path / "all") == []


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_planner_sizes_pools(family, hf_models, tmp_path):
    """The plan sizes the paged pools (blocks per KV group, each layer's in its KV tier); the
    engine for the plan takes exactly those; a request beyond them is refused clearly."""
    from ollm.planning.accounting import kv_pool_bytes

    _, path = hf_models(family)
    kw = dict(device="cpu", max_batch=3, max_context=200, prefill_chunk=32, cache_dir=tmp_path)
    with LLM(path, progress=False, **kw) as llm:
        plan, w = llm.plan, llm.workload
        bt = plan.kv_page_tokens
        if "full" in plan.kv_pools:
            assert plan.kv_pools["full"] == w.batch * -(-w.context // bt)
        for g, n in plan.kv_pools.items():
            if g != "full":  # a window group: only the blocks a window keeps live
                assert n < w.batch * -(-w.context // bt)
        eng = BatchEngine.for_plan(llm.runner, None, (), w.batch, w.context)
        assert {g: m.pools["device"].num_blocks for g, m in eng.scheduler.kv.items()} == (
            plan.kv_pools
        )
        elem = llm.dtype.itemsize
        want = kv_pool_bytes(llm.spec, plan.layers, plan.kv_pools, bt, elem)
        assert eng.pools.nbytes["device"] == want["device"] > 0
        if "full" in plan.kv_pools:
            with pytest.raises(KVCapacityError, match="holds at most"):
                eng.add([1] * plan.kv_pools["full"] * bt, SamplingParams(max_new_tokens=1))
        eng.close()
