"""Decode through the expert cache (issue 19): one host read per sparse layer, a few batched
kernels per batch of experts instead of a chain per expert, and the same outputs as the resident
per-expert path. Counted on the CPU: host reads are the Tensor methods that bring device data to
the host (``tolist``, ``item``, ``cpu``, ``numpy``, ``to("cpu")``), each a sync on a GPU; aten
ops that are not views stand for kernel launches (the accelerator is played by the CPU under the
name "cpu:1", as in tests/test_moe_experts.py)."""

from __future__ import annotations

import collections
import threading
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_hf_model
from ollm import LLM
from ollm.layers.moe import (
    ResidentExperts,
    expert_forward,
    experts_forward,
    moe_mlp,
    sparse_weights,
)
from test_moe_experts import _cache

VIEWS = {
    "view", "_unsafe_view", "slice", "select", "expand", "t", "transpose", "as_strided", "alias",
    "unsqueeze", "squeeze", "reshape", "detach", "permute", "split", "chunk", "unbind",
    "split_with_sizes", "lift_fresh", "_reshape_alias", "empty", "promote_types",
}  # fmt: skip
HOST_READS = ("tolist", "item", "cpu", "numpy")


class Launches(TorchDispatchMode):
    """Counts aten ops other than views and allocations (kernel launches on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in VIEWS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads(monkeypatch):
    """Counter of host reads (see the module docstring), patched onto ``torch.Tensor``."""
    reads: collections.Counter = collections.Counter()
    main = threading.get_ident()  # the disk reader threads read files, not the device
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def wrap(self, *a, _real=real, _name=name, **k):
            reads[_name] += threading.get_ident() == main
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrap)
    real_to = torch.Tensor.to

    def to(self, *a, **k):
        dev = a[0] if a else k.get("device")
        if isinstance(dev, (str, torch.device)) and torch.device(dev).type == "cpu":
            reads["to(cpu)"] += 1
        return real_to(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "to", to)
    return reads


@pytest.fixture(scope="module")
def top8(tmp_path_factory):
    """A qwen3_moe of 16 experts, top-8 (the routing shape of Qwen3-30B-A3B), on the CPU."""
    d = tmp_path_factory.mktemp("moe-top8")
    make_hf_model("qwen3_moe", d / "hf", num_experts=16, num_experts_per_tok=8)
    llm = LLM(d / "hf", device="cpu", cache_dir=d / "c", progress=False)
    yield llm
    llm.close()


def _layer(llm, cache):
    i = cache.plan.layers[0]
    w = llm.prefetcher.get(i)
    return w, cache.bind(i, w)


@pytest.mark.parametrize("cpu_compute", ["off", "on"])
def test_decode_row_reads_the_host_once_and_launches_per_batch(top8, host_reads, cpu_compute):
    """A decode row's MoE through a cache of 6 slots (RAM and disk misses, evictions, waves;
    with ``"on"`` RAM misses computed by the CPU): exactly one host read per call, and at most
    ``BUDGET`` kernel launches besides the slot copies whatever the top-k (the per-expert path
    took ~11 per expert: 91 for top-8, plus a host read per CPU hand-off); outputs equal the
    resident per-expert path."""
    llm, moe, act = top8, top8.spec.moe, top8.spec.act
    st, cache = _cache(llm, slots=6, ram=10)
    cache.plan = replace(cache.plan, cpu_compute=cpu_compute)
    w, sw = _layer(llm, cache)
    g = torch.Generator().manual_seed(0)
    budget = 32  # route 6, per batch (hits, misses) 12 with its index copy, the slot sum 2;
    # a CPU batch adds its hand-back (cat, index copy, scatter)
    for call in range(12):
        x = torch.randn(1, 1, llm.spec.hidden_size, generator=g) * 4
        host_reads.clear()
        on_cpu = cache.counts["cpu"]
        with Launches() as c:
            y = moe_mlp(x, sw, moe, act)
        on_cpu = cache.counts["cpu"] - on_cpu  # the host's own ops: ~8 per expert it computes
        launches = sum(n for op, n in c.ops.items() if op != "copy_")  # copies: slot fills
        assert sum(host_reads.values()) == 1 and host_reads["tolist"] == 1, (call, host_reads)
        assert launches <= budget + (8 * on_cpu + 3 if on_cpu else 0), (call, on_cpu, c.ops)
        torch.testing.assert_close(y, moe_mlp(x, w, moe, act), atol=1e-5, rtol=1e-5)
    assert cache.counts["misses"] > 0 and cache.counts["hits"] > 0
    assert (cache.counts["cpu"] > 0) == (cpu_compute == "on")
    # the CPU's decode batches are timed for the cost model (seconds per expert)
    assert (cache.cpu_expert_s is not None) == (cpu_compute == "on")
    cache.close()


def test_hits_are_one_batch_misses_one_wave(top8):
    """With the slots to hold them, a decode call's hits come as one batch and its copied
    misses as one more (not one expert at a time); a prefill's misses one by one."""
    llm = top8
    st, cache = _cache(llm, slots=16, ram=16)
    i = cache.plan.layers[0]
    batches = [b for _, b in cache.run(i, list(range(8)), [1] * 16)]
    assert [len(b) for b in batches] == [8]  # all misses: one wave
    batches = [b for _, b in cache.run(i, list(range(4, 12)), [1] * 16)]
    assert sorted(len(b) for b in batches) == [4, 4]  # hits 4..7, then misses 8..11
    many = [100] * 16  # a prefill's rows: each miss computed as soon as its copy lands
    batches = [b for _, b in cache.run(i, list(range(8, 16)), many)]
    assert [len(b) for b in batches] == [4, 1, 1, 1, 1]
    cache.close()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_batched_experts_equal_one_by_one(family, tmp_path):
    """``experts_forward`` over stacked experts (padded rows) equals ``expert_forward`` of each
    expert over its rows, in every layout (per-expert names, gpt-oss's interleaved biases)."""
    make_hf_model(family, tmp_path / "hf")
    with LLM(tmp_path / "hf", device="cpu", cache_dir=tmp_path / "c", progress=False) as llm:
        moe, act = llm.spec.moe, llm.spec.act
        i = min(moe.sparse_layers)
        src = ResidentExperts(llm.prefetcher.get(i), moe)
        ews = [src.weights(e) for e in range(moe.num_experts)]
        x = torch.randn(moe.num_experts, 3, llm.spec.hidden_size) * 3
        y = experts_forward(x, ews, moe, act)
        for e, ew in enumerate(ews):
            torch.testing.assert_close(y[e], expert_forward(x[e], ew, moe, act))


def test_large_experts_run_in_smaller_batches(top8, monkeypatch):
    """Experts larger than the stacking reserve run a few (here one) per batched matmul, with
    the same outputs."""
    import ollm.layers.moe_batched as batched_mod

    llm, moe, act = top8, top8.spec.moe, top8.spec.act
    _, cache = _cache(llm, slots=16, ram=16)
    w, sw = _layer(llm, cache)
    x = torch.randn(1, 2, llm.spec.hidden_size) * 4
    want = moe_mlp(x, w, moe, act)
    monkeypatch.setattr(batched_mod, "STACK_BYTES", 1)
    with Launches() as c:
        got = moe_mlp(x, sw, moe, act)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert c.ops["bmm"] >= 2 * 8  # one expert per batch: two bmm each
    cache.close()


def test_all_hit_row_runs_in_pair_order(top8, monkeypatch):
    """A decode row whose experts all hit comes as one stacked batch and runs in pair order
    (no slot buffer, no scatter): bit for bit what the slot path gives, close to the resident
    per-expert path, with one ``index_select`` per stacked tensor and no ``index_put_``."""
    import ollm.layers.moe as moe_mod

    llm, moe, act = top8, top8.spec.moe, top8.spec.act
    _, cache = _cache(llm, slots=16, ram=16)
    w, sw = _layer(llm, cache)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 1, llm.spec.hidden_size, generator=g) * 4
    moe_mlp(x, sw, moe, act)  # every expert of the row copied in: the next call hits them all
    hits = cache.counts["hits"]
    with Launches() as c:
        got = moe_mlp(x, sw, moe, act)
    assert cache.counts["hits"] - hits == moe.top_k
    assert c.ops["index_put_"] == 0 and c.ops["index_select"] == 2  # gate+up as one, down
    torch.testing.assert_close(got, moe_mlp(x, w, moe, act), atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(moe_mod, "_whole", lambda first, n: False)  # the slot path
    with Launches() as c:
        slots = moe_mlp(x, sw, moe, act)
    assert c.ops["index_put_"] == 1
    assert torch.equal(got, slots)
    cache.close()


def test_fused_resident_experts_gathered_from_their_stacks(top8):
    """Whole-layer weights in the fused layout ([E, 2I, H] gate_up, [E, H, I] down), run as a
    device would (batched): each batch's experts are gathered from the fused tensors by index
    (no per-expert stack), for one row and for several, equal to the per-expert layout."""
    llm, moe, act = top8, top8.spec.moe, top8.spec.act
    i = min(moe.sparse_layers)
    w = llm.prefetcher.get(i)
    p = f"{moe.prefix}.experts"
    fused = {k: v for k, v in w.items() if not k.startswith(f"{p}.")}
    ews = [ResidentExperts(w, moe).weights(e) for e in range(moe.num_experts)]
    g, u, d = (f"{n}.weight" for n in moe.expert_names)
    fused[f"{p}.gate_up_proj"] = torch.stack([torch.cat([ew[g], ew[u]]) for ew in ews])
    fused[f"{p}.down_proj"] = torch.stack([ew[d] for ew in ews])

    class Device(ResidentExperts):
        batched = True  # the CPU plays an accelerator: batched matmuls

    src = Device(fused, moe)
    assert src.fused is not None
    for rows in (1, 3):
        x = torch.randn(1, rows, llm.spec.hidden_size) * 4
        sw = sparse_weights(fused, src, None)
        with Launches() as c:
            got = moe_mlp(x, sw, moe, act)
        assert c.ops["stack"] == 0 and c.ops["index_select"] >= 2
        torch.testing.assert_close(got, moe_mlp(x, w, moe, act), atol=1e-5, rtol=1e-5)
