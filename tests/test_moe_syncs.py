"""One host sync per MoE decode layer (issue 19): the router's expert ids read back once, and
nothing else waits for the device: not the pinned ring's reuse of a buffer (``runtime/uva.py``:
an event queried first, waited on only when the GPU has not read the buffer yet), not the
layer's attention. Counted on the CPU stand-in accelerator by ``tests/sync_count.py`` (its
docstring says what counts as a sync), for tiny random-weight qwen3_moe and gpt_oss (bf16-like
float experts and MXFP4 ones) decoding with their experts in RAM through a cache of fewer
slots than experts (hits and misses in most calls), outputs still equal transformers'."""

from __future__ import annotations

import pytest
import torch

import ollm.engine.runner as runner_mod
from conftest import make_hf_model
from ollm import LLM
from ollm.engine.runner import Runner
from ollm.layers.moe import SparseWeights
from ollm.planning.experts import plan_experts
from ollm.planning.placement import plan_placement
from ollm.runtime import uva
from ollm.storage.experts import StoreExperts
from sync_count import _Event, counting
from test_moe import hf_greedy
from test_moe_experts import _REFS, PROMPT, _check, _stand_in

NEW = 8


def _decode_syncs(llm, model, monkeypatch, slots: int, **extra) -> tuple[list, list, object]:
    """Run ``llm`` on the stand-in through ``slots`` expert slots (RAM experts, CPU compute off
    unless ``extra`` says), its tokens checked against ``model``'s under the count. Returns
    (each decode step's layers as (sparse?, syncs by kind, transfers through the ring), each
    decode step's syncs by kind, the counter). A step's syncs outside its layers (the token's
    ids and positions sent to the device, the next token read) are not judged: on the
    stand-in the token's tensors are the host's anyway."""
    st, spec, work = StoreExperts(llm.store), llm.spec, llm.workload

    def dense(s, gpu, cpu):
        return plan_placement(spec, s, "cuda:0", gpu, cpu, "auto", work, 4, hybrid="off")

    extra = {"cpu_compute": "off"} | extra
    plan = plan_experts(spec, llm.store, st, "cuda:0", None, None, "auto", work, 4,
                        slots=slots, plan_dense=dense, **extra)  # fmt: skip
    assert not plan.experts.resident and plan.experts.cache_slots == slots
    _stand_in(llm, llm.store_path, plan)
    if id(model) not in _REFS:  # transformers' tokens, outside the count
        _REFS[id(model)] = hf_greedy(model, PROMPT, NEW), None
    layers: list = []
    steps: list = []
    with monkeypatch.context() as m, counting(m) as c:
        real_block, real_forward = runner_mod.decoder_block, Runner.forward

        def block(spec, h, w, *a, **k):
            before, puts = c.gpu.syncs.copy(), c.gpu.puts
            out = real_block(spec, h, w, *a, **k)
            if h.shape[1] == 1:
                syncs = c.gpu.syncs - before
                layers.append((isinstance(w, SparseWeights), syncs, c.gpu.puts - puts))
            return out

        def forward(self, input_ids, *a, **k):
            before = c.gpu.syncs.copy()
            out = real_forward(self, input_ids, *a, **k)
            if input_ids.shape[1] == 1:
                steps.append(c.gpu.syncs - before)
            return out

        m.setattr(runner_mod, "decoder_block", block)
        m.setattr(Runner, "forward", forward)
        res = _check(llm, model, new=NEW, score=False)
    assert len(res.token_ids) == NEW and len(steps) == NEW - 1
    assert len(layers) == (NEW - 1) * spec.num_layers
    return layers, steps, c


QWEN3 = dict(num_experts=16, num_experts_per_tok=4)


@pytest.mark.parametrize(
    ("family", "kw", "slots", "extra"),
    [
        ("qwen3_moe", QWEN3, 12, {}),
        ("qwen3_moe", QWEN3, 12, {"lookahead": True}),  # the prediction read in the same sync
        ("qwen3_moe", QWEN3, 12, {"cpu_compute": "on"}),  # the rows too; outputs sent back
        ("gpt_oss", dict(num_local_experts=8, num_experts_per_tok=4), 20, {}),
    ],
)
def test_one_host_sync_per_sparse_decode_layer(family, kw, slots, extra, tmp_path, monkeypatch):
    """Each decode layer of a step: its expert ids read once if sparse, nothing if dense."""
    model = make_hf_model(family, tmp_path / "hf", **kw)
    kws = dict(device="cpu", cache_dir=tmp_path / "c", progress=False, prefill_chunk=32)
    with LLM(tmp_path / "hf", **kws) as llm:
        sparse = len(llm.spec.moe.sparse_layers)
        layers, _, c = _decode_syncs(llm, model, monkeypatch, slots, **extra)
        cache = llm.prefetcher.experts
        assert cache.counts["misses"]
        if extra.get("cpu_compute") == "on":  # every miss computed by the CPU: nothing cached
            assert cache.counts["cpu"] == cache.counts["misses"]
        else:
            assert cache.counts["hits"]
        if extra.get("lookahead"):
            assert cache.ahead.counts["predicted"]
    assert c.gpu.puts > uva.RING  # the ring wrapped: its buffers were reused
    assert sum(s for s, _, _ in layers) == (NEW - 1) * sparse
    for is_sparse, syncs, _ in layers:  # the expert ids, once per sparse layer; nothing else
        assert dict(syncs) == ({"_to_host": 1} if is_sparse else {}), syncs


def test_mxfp4_experts_one_host_sync_per_sparse_decode_layer(tmp_path, monkeypatch):
    """gpt-oss as released (MXFP4 experts), the slots holding the stored bytes (the device's
    path for gpt-oss-20b; here decoded before their matmuls: no Triton on the CPU)."""
    from test_mxfp4 import _mxfp4_hf

    model = _mxfp4_hf(tmp_path / "hf")
    kws = dict(device="cpu", cache_dir=tmp_path / "c", progress=False, prefill_chunk=32)
    with LLM(tmp_path / "hf", **kws) as llm:
        sparse = len(llm.spec.moe.sparse_layers)
        layers, _, _ = _decode_syncs(llm, model, monkeypatch, 2, coded_slots=True)
    assert sum(s for s, _, _ in layers) == (NEW - 1) * sparse
    for is_sparse, syncs, _ in layers:
        assert dict(syncs) == ({"_to_host": 1} if is_sparse else {}), syncs


def test_ring_waits_only_for_a_buffer_the_device_has_not_read(monkeypatch):
    """``uva``'s ring reuses a buffer after a query of its event (no host sync) when the GPU
    has read it, and waits for it (a sync) only when it has not: with a host sync between
    every ``RING`` transfers, none waits; without one, the reuse waits."""
    sent = []
    with monkeypatch.context() as m, counting(m) as c:
        ring = uva._Ring(torch.device("cpu", 1))
        for i in range(3 * uva.RING):
            if i % uva.RING == 0:
                c.gpu.sync("_to_host")
            src = torch.arange(i + 3, dtype=torch.int64)
            sent.append((src, ring.put(src)))
        synced = dict(c.gpu.syncs)
        for _ in range(uva.RING):  # no host sync since the last RING transfers
            ring.put(torch.arange(4))
        assert isinstance(ring.slots[0][2], _Event)
    assert synced == {"_to_host": 3}
    assert dict(c.gpu.syncs) == {"_to_host": 3, "event.synchronize": 1}
    assert all(torch.equal(a, b) for a, b in sent)


def test_rope_frequencies_go_to_the_device_once(monkeypatch):
    """The inverse frequencies become a tensor once per rope and device, not per step (built
    from a list on a GPU: a blocking copy, a host sync): the same tables as building them."""
    from ollm.layers import rope as rope_mod

    spec = rope_mod.RopeSpec(tuple(1.0 / 10000 ** (i / 16) for i in range(0, 16, 2)), 1.25)
    made = []
    real = torch.tensor
    monkeypatch.setattr(rope_mod, "_INV", {})
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    pos = torch.arange(5)[None]
    got = [rope_mod.rope_cos_sin(spec, pos + s, torch.bfloat16) for s in range(3)]
    assert len(made) == 1
    monkeypatch.setattr(torch, "tensor", real)
    inv = torch.tensor(spec.inv_freq, dtype=torch.float32)
    for s, (cos, sin) in enumerate(got):
        emb = ((pos + s).float()[..., None] * inv).repeat(1, 1, 2)
        assert torch.equal(cos, (emb.cos() * 1.25).to(torch.bfloat16))
        assert torch.equal(sin, (emb.sin() * 1.25).to(torch.bfloat16))


def test_decode_ids_and_positions_reach_the_device_without_a_blocking_copy(tmp_path, monkeypatch):
    """A step's token ids (when the table is on the device) and positions, host tensors, go
    through ``uva.to_device`` asked not to block (on a GPU a kernel's read of pinned memory,
    not a copy and a stream sync); more than 4096 are copied as before; tokens unchanged."""
    make_hf_model("qwen3_moe", tmp_path / "hf")
    sent = []
    real = runner_mod.to_device

    def to_device(t, device, non_blocking=False):
        if t.dtype == torch.int64:
            sent.append((tuple(t.shape), non_blocking))
        return real(t, device, non_blocking=non_blocking)

    kws = dict(device="cpu", cache_dir=tmp_path / "c", progress=False)
    with LLM(tmp_path / "hf", **kws) as llm:
        from ollm import SamplingParams

        want = llm.generate(PROMPT, SamplingParams(max_new_tokens=4, temperature=0)).token_ids
        monkeypatch.setattr(runner_mod, "to_device", to_device)
        got = llm.generate(PROMPT, SamplingParams(max_new_tokens=4, temperature=0)).token_ids
        assert runner_mod._few_to(torch.arange(5000)[None], "cpu").shape == (1, 5000)
    assert got == want
    assert sent == [((1, len(PROMPT)), True)] * 2 + [((1, 1), True)] * 6  # ids, positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_outputs_and_their_slots_reach_the_device_in_one_transfer(dtype, monkeypatch):
    """A CPU batch's outputs and their slots' index go to a CUDA device as one buffer through
    one ``to_device`` (was two transfers, two kernels and two ring buffers), asked not to
    block; the views give back the same values, bit for bit; the CPU keeps them on the host."""
    import ollm.layers.moe as moe_mod

    sent = []
    monkeypatch.setattr(
        moe_mod, "to_device", lambda t, d, **k: sent.append((t.dtype, t.shape, d, k)) or t
    )
    g = torch.Generator().manual_seed(2)
    ys = [(torch.randn(r, 24, generator=g) * 5).to(dtype) for r in (3, 1, 2)]
    dst = [7, 0, 12, 5, 9, 1]
    cuda = torch.device("cuda", 0)
    for device in (cuda, torch.device("cpu")):
        (idx,), y = moe_mod._hand_back(ys, dst, device)
        assert idx.dtype == torch.int64 and idx.tolist() == dst
        assert y.dtype == dtype and torch.equal(y, torch.cat(ys))
    nbytes = 8 * 6 + 6 * 24 * dtype.itemsize
    assert sent == [(torch.uint8, (nbytes,), cuda, {"non_blocking": True})]
