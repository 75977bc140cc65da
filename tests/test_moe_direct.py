"""Direct expert decode (issue 19, ``runtime/expert_direct.py``): a decode row's experts planned,
cached and gathered on the device without a host sync. On the CPU the accelerator is played by
the CPU ("cpu:1", as in tests/test_moe_experts.py) and the kernels by their torch reference
(``OLLM_MOE_DIRECT=torch``); the Triton kernels themselves run under ``TRITON_INTERPRET=1`` when
Triton is installed (tests/test_moe_direct.py's last test; on the device: scripts/gpu/moe.py)."""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_moe_experts import MOE_FAMILIES, _cache, _check, _stand_in

ROOT = Path(__file__).resolve().parents[1]


def _ref_bytes(st, cache):
    ref = {}
    for i in cache.plan.layers:
        for e in range(st.num_experts(i)):
            buf = torch.empty(st.regions[i].sizes[e], dtype=torch.uint8)
            st.read_range(i, e, e + 1, buf)
            ref[(i, e)] = buf
    return ref


def _tables_agree(cache) -> set:
    """slot_of and key_of describe the same one-to-one map; every slot holds its expert's bytes
    (checked by the caller); returns the held keys."""
    d = cache.direct
    key_of, slot_of = d.key_of.tolist(), d.slot_of.tolist()
    held = [g for g in key_of if g >= 0]
    assert len(held) == len(set(held))
    assert {g: s for g, s in enumerate(slot_of) if s >= 0} == {
        g: s for s, g in enumerate(key_of) if g >= 0
    }
    return {(cache.plan.layers[g // d.E], g % d.E) for g in held}


def drive(cache, st, calls: int = 150, seed: int = 0) -> dict:
    """Random direct calls (top-k distinct ids of one layer) mixed with host-path calls (the
    state moves back and forth): every gathered expert and every slot holds exactly its expert's
    bytes, the tables stay one-to-one, a call's experts are all held after it, empty slots are
    filled before anything is evicted, misses are the experts not held before. Returns counts
    and the final tables (to compare backends)."""
    d = cache.direct
    assert d is not None
    ref = _ref_bytes(st, cache)
    rng = random.Random(seed)
    seen: set = set()
    misses = hits = 0
    for call in range(calls):
        i = rng.choice(cache.plan.layers)
        k = rng.randint(1, min(4, d.S))
        ids = rng.sample(range(st.num_experts(i)), k)
        seen |= {(i, e) for e in ids}
        if call % 17 == 16:  # the host path runs (prefill): the state moves to the host and back
            used = sorted(ids)
            counts = [1 if e in used else 0 for e in range(st.num_experts(i))]
            for _, batch in cache.run(i, used, counts):
                for e, w in batch:
                    assert (i, e) in ref and w
            assert {(i, e) for e in ids} <= set(cache.cached())
            continue
        before = _tables_agree(cache) if d.owner == "device" else set(cache.cached())
        stacks = d.experts(i, torch.tensor(ids, dtype=torch.int64))
        scratch = next(iter(stacks.values()))
        flat = torch.empty(0, dtype=torch.uint8).set_(scratch.untyped_storage())
        for j, e in enumerate(ids):
            assert torch.equal(flat[j * d.nbytes : (j + 1) * d.nbytes], ref[(i, e)]), (call, e)
        held = _tables_agree(cache)
        assert {(i, e) for e in ids} <= held
        assert len(held) == min(d.S, len(seen)) or len(held) == d.S
        new = {(i, e) for e in ids} - before
        misses += len(new)
        hits += k - len(new)
        for s, g in enumerate(d.key_of.tolist()):
            if g >= 0:
                key = (cache.plan.layers[g // d.E], g % d.E)
                assert torch.equal(cache.slots[s, : d.nbytes], ref[key]), (call, s)
    return {"hits": hits, "misses": misses, "key_of": d.key_of.tolist()}


@pytest.fixture
def direct_env(monkeypatch):
    monkeypatch.setenv("OLLM_MOE_DIRECT", "torch")


def test_direct_cache_never_returns_a_stale_expert(converted, direct_env):
    """``drive`` over 4 slots of a 2-layer, 8-expert store, every expert in RAM; the counts the
    device kept equal the model's, and reach the I/O stats at a snapshot."""
    _, _, llm = converted("qwen3_moe")
    st, cache = _cache(llm, slots=4, ram=8)
    assert cache.direct is not None and not cache.host_rows
    before = cache.counts["hits"], cache.counts["misses"]
    got = drive(cache, st)
    snap = cache.stats.snapshot()
    host_calls = cache.counts["hits"] + cache.counts["misses"] - sum(before)
    assert got["misses"] > 0 and got["hits"] > 0
    assert snap["expert_misses"] >= got["misses"] and snap["expert_hits"] >= got["hits"]
    assert host_calls == snap["expert_hits"] + snap["expert_misses"]
    assert snap["bytes_h2d"] > 0
    cache.close()


def test_direct_evicts_the_least_recently_used(converted, direct_env):
    """Two slots, one expert per call: a, b, a, c evicts b (not a); then b misses, a stays."""
    _, _, llm = converted("qwen3_moe")
    _, cache = _cache(llm, slots=2, ram=8)
    d, i = cache.direct, cache.plan.layers[0]
    for e in (1, 2, 1, 3):
        d.experts(i, torch.tensor([e]))
    assert set(cache.cached()) == {(i, 1), (i, 3)}  # pulled to the host: the same answer there
    d.experts(i, torch.tensor([2]))
    assert set(cache.cached()) == {(i, 2), (i, 3)}
    cache.close()


def test_direct_off_and_reasons(converted, monkeypatch):
    """No direct decode on the CPU device or when turned off; a disk tier or LFU says why."""
    from ollm.runtime.expert_direct import reason

    _, _, llm = converted("qwen3_moe")
    monkeypatch.setenv("OLLM_MOE_DIRECT", "0")
    _, cache = _cache(llm, slots=2, ram=8)
    assert cache.direct is None and "off" in reason(cache)
    cache.close()
    monkeypatch.setenv("OLLM_MOE_DIRECT", "torch")
    _, cache = _cache(llm, slots=2, ram=3)
    assert cache.direct is None and "disk" in reason(cache)
    cache.close()
    _, cache = _cache(llm, slots=2, ram=8, policy="lfu")
    assert cache.direct is None and "lfu" in reason(cache)
    cache.close()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_direct_decode_matches_transformers(family, converted, direct_env, monkeypatch):
    """A stand-in accelerator, every expert in RAM, two slots: decode rows take the direct path
    (prefill and scoring the host path, the state moving between them), greedy tokens equal
    transformers' and log-probs within 1e-4, and no decode row reads its experts to the host."""
    import ollm.layers.moe as moe_mod
    from ollm import LLM
    from ollm.planning.experts import plan_experts
    from ollm.planning.placement import plan_placement
    from ollm.storage.experts import StoreExperts

    model, path, base = converted(family)
    kw = dict(device="cpu", cache_dir=base.config.cache_dir, progress=False, prefill_chunk=32)
    st = StoreExperts(base.store)
    n_exp = len(st.regions) * st.num_experts(next(iter(st.regions)))
    with LLM(path, moe_offload="expert", **kw) as llm:
        work, spec, store = llm.workload, llm.spec, llm.store

        def dense(s, gpu, cpu):
            return plan_placement(spec, s, "cuda:0", gpu, cpu, "auto", work, 4, hybrid="off")

        plan = plan_experts(spec, store, st, "cuda:0", None, 2 * n_exp * st.expert_bytes, "auto",
                            work, 4, slots=2, cpu_compute="auto", plan_dense=dense)  # fmt: skip
        assert plan.experts.tier_counts()["disk"] == 0 and plan.experts.cache_slots == 2
        _stand_in(llm, llm.store_path, plan)
        cache = llm.prefetcher.experts
        assert cache.direct is not None
        host_reads = []
        real = moe_mod._to_host
        k = spec.moe.top_k
        monkeypatch.setattr(
            moe_mod, "_to_host", lambda ts: host_reads.append(ts[0].numel() == k) or real(ts)
        )
        before = llm.stats.snapshot()
        _check(llm, model)
        assert host_reads and not any(host_reads)  # prefill rows only: no decode row's ids
        assert llm.stats.expert_misses > before["expert_misses"]
        assert llm.stats.bytes_h2d > before["bytes_h2d"]


_KERNELS = """
import os, sys, tempfile
from pathlib import Path
import torch
from conftest import make_hf_model
from ollm import LLM
from test_moe_experts import _cache
from test_moe_direct import drive

d = Path(tempfile.mkdtemp())
make_hf_model("qwen3_moe", d / "hf")
with LLM(d / "hf", device="cpu", cache_dir=d / "c", progress=False) as llm:
    out = {}
    for mode in ("torch", "triton"):
        os.environ["OLLM_MOE_DIRECT"] = mode
        st, cache = _cache(llm, slots=5, ram=8)
        assert cache.direct.mode == mode
        out[mode] = drive(cache, st, calls=60, seed=3)
        cache.close()
assert out["torch"] == out["triton"], out
print("SAME", out["triton"]["hits"], out["triton"]["misses"])
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_direct_kernels_equal_their_reference_in_the_interpreter():
    """The Triton plan and gather kernels, run by Triton's interpreter on the CPU, leave the
    same tables, counts and bytes as the torch reference after the same random calls."""
    path = os.pathsep.join(
        [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-c", _KERNELS], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SAME" in res.stdout


def test_graphs_kept_only_where_they_work_and_fit():
    """``engine.moe_offload._graphs_fit``: the decode graphs stay with every dense part resident
    and room under the budget for their pool (expert rows + slack); streamed or decode-copied
    dense parts, or too little room, turn them off."""
    from types import SimpleNamespace

    from ollm.engine.moe_offload import GRAPH_SLACK, _graphs_fit

    def case(streamed=(), held=(), room=1 << 30, rows=100 << 20):
        direct = SimpleNamespace(graphs=object())
        plan = SimpleNamespace(
            streamed_for=lambda phase: list(streamed), decode_resident=list(held),
            budget=8 << 30, peak_device_bytes=(8 << 30) - room, reserved={"expert rows": rows},
        )  # fmt: skip
        _graphs_fit(SimpleNamespace(direct=direct), plan)
        return direct.graphs is not None

    assert case()
    assert not case(streamed=[3])
    assert not case(held=[5])
    assert case(room=(100 << 20) + GRAPH_SLACK)
    assert not case(room=(100 << 20) + GRAPH_SLACK - 1)


def test_layer_graphs_bookkeeping_without_a_gpu():
    """``LayerGraphs``' host-side rules: the static rope tables are refilled only when the runner
    hands new tables; more weights than sparse layers (weights changing under the graphs) turn
    them off and drop what they hold."""
    from types import SimpleNamespace

    from ollm.runtime.expert_graphs import LayerGraphs

    g = LayerGraphs(lambda: None, layers=2)
    cos, sin = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    a = g._rope(cos, sin)
    assert torch.equal(a[0], cos) and a[0] is not cos
    cos.add_(1)  # the same table object: not copied again (the runner makes one per step)
    assert not torch.equal(g._rope(cos, sin)[0], cos)
    cos2 = cos.clone()
    assert torch.equal(g._rope(cos2, sin)[0], cos2)
    spec = SimpleNamespace(moe=SimpleNamespace(router_key="r"))
    ws = [{"r": torch.zeros(2)} for _ in range(3)]
    assert g._new_weights(ws[0], spec) and g._new_weights(ws[1], spec)
    assert g._new_weights(ws[0], spec)  # the same layer's weights again
    assert not g._new_weights(ws[2], spec) and g.off and not g.seen and not g.rope
    assert not g._new_weights({}, SimpleNamespace(moe=None))


def test_layer_graphs_paths_with_a_stand_in_capture(monkeypatch):
    """``LayerGraphs.block``'s plumbing without a GPU: the block's parts stand in for the model
    and the CUDA graph API for a capture that runs its body once (as a capture records it) and a
    replay that does nothing. The first row runs eagerly and equals the parts' composition; a
    later row copies its input in, attends eagerly on the captured q/k/v and returns the
    captured output; a failing capture turns the graphs off (the caller runs eagerly)."""
    import contextlib
    from types import SimpleNamespace

    from ollm.runtime import expert_graphs as eg

    class FakeGraph:
        def replay(self):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(torch.cuda, "graph", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    attends = []

    class Kv:
        def attend(self, q, k, v, mask, scale, dense):
            attends.append(q.clone())
            return q * 2 + k + v

    def block_in(spec, h, w, cos, sin):
        return h * cos, h + sin, h - 1, None

    def attention_out(spec, out, gate, w):
        return out * w["r"]

    def block_out(spec, h, a, w, chunk):
        return h + a

    parts = (block_in, lambda spec, w, mask: mask, attention_out, block_out, lambda: None)
    spec = SimpleNamespace(moe=SimpleNamespace(router_key="r"), attn_sinks=False, scale=1.0)
    w = {"r": torch.full((4,), 3.0)}
    h, cos, sin = torch.randn(1, 1, 4), torch.randn(1, 1, 4), torch.randn(1, 1, 4)
    g = eg.LayerGraphs(lambda: None, layers=1)
    want = h + (h * cos * 2 + (h + sin) + (h - 1)) * 3
    out = g.block(parts, spec, h, w, Kv(), cos, sin, None, None)
    torch.testing.assert_close(out, want)
    assert len(g.layers) == 1 and not g.off
    again = g.block(parts, spec, h.clone(), w, Kv(), cos, sin, None, None)
    torch.testing.assert_close(again, want)  # the captured output (the replay is a stand-in)
    assert g.replays == 1 and len(attends) == 2

    def boom(*a, **k):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "graph", boom)
    g2 = eg.LayerGraphs(lambda: None, layers=1)
    torch.testing.assert_close(g2.block(parts, spec, h, w, Kv(), cos, sin, None, None), want)
    assert g2.off and g2.block(parts, spec, h, w, Kv(), cos, sin, None, None) is None
