"""Fewer kernels per decode layer with the same bits (issue 19): q and k normed and rotated as
one tensor (``models/decoder._norm_rope_qk``), the rotation's sign folded into the sin table
(``layers/rope.apply_rope_signed``), and a MoE batch's slot rows at the start of its index
tensor (``layers/moe._run_batch``: aligned for the MXFP4 kernel, no copy)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ollm.layers.moe as moe_mod
from ollm.layers.norms import rms_norm
from ollm.layers.rope import apply_rope, apply_rope_signed, signed_sin
from ollm.models import decoder
from ollm.runtime.expert_stacks import stacked_batch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tables(t: int, d: int, dtype: torch.dtype, g: torch.Generator, b: int = 2):
    ang = torch.randn(b, t, d, generator=g) * 3
    return ang.cos().to(dtype), ang.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 7])
def test_signed_rope_equals_apply_rope_bitwise(dtype, t):
    g = torch.Generator().manual_seed(t)
    x = torch.randn(2, 5, t, 64, generator=g).to(dtype) * 4
    cos, sin = _tables(t, 64, dtype, g)
    assert torch.equal(apply_rope_signed(x, cos, signed_sin(sin)), apply_rope(x, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
def test_float_weight_norm_promotes_the_weight_exactly(dtype):
    """gpt-oss's norm multiplies in float32 by its weight promoted inside the multiply (no cast
    kernel): bit-equal to casting the weight first."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 3, 64, generator=g) * 3).to(dtype)
    for wdt in DTYPES:
        w = torch.randn(64, generator=g).to(wdt)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)
        with Casts() as c:
            got = rms_norm(x, w, 1e-5, False, True)
        assert torch.equal(got, (xf * w.float()).type_as(x))
        assert c.n == (dtype != torch.float32)  # x to float32; back in the multiply; weight: none


class Casts(TorchDispatchMode):
    """Counts dtype casts (``_to_copy``: a kernel each on a GPU)."""

    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.__name__.startswith("_to_copy")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sinks_promoted_in_the_subtraction_exactly(dtype):
    """Attention sinks in half precision are promoted inside the subtraction (no cast kernel):
    bit-equal to casting them first."""
    from ollm.layers.attention import with_sinks

    g = torch.Generator().manual_seed(7)
    out = torch.randn(1, 4, 2, 8, generator=g).to(dtype)
    lse = torch.randn(1, 4, 2, generator=g) * 5
    for sdt in DTYPES:
        sinks = torch.randn(4, generator=g).to(sdt)
        keep = torch.sigmoid(lse - sinks.float()[None, :, None])
        with Casts() as c:
            got = with_sinks(out, lse, sinks)
        assert torch.equal(got, out * keep.unsqueeze(-1).to(dtype))
        assert c.n == (dtype != torch.float32)  # only the factor's cast to the output dtype


def _spec(qk_norm: bool, unit_offset: bool = False, float_weight: bool = False):
    return SimpleNamespace(
        qk_norm=qk_norm, norm_eps=1e-6, norm_unit_offset=unit_offset,
        norm_float_weight=float_weight,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 6])
@pytest.mark.parametrize("kind", ["none", "plain", "unit_offset", "float_weight", "partial_rotary"])
def test_q_and_k_as_one_tensor_equal_them_apart(dtype, t, kind):
    """Normed (Llama / Gemma / gpt-oss conventions) and rotated as one tensor of 8 + 2 heads
    (transposed views, as the projections give them), q and k are bit-equal to each alone."""
    g = torch.Generator().manual_seed(len(kind) * 10 + t)
    d, hq, hk = 32, 8, 2
    q = torch.randn(1, t, hq, d, generator=g).to(dtype).transpose(1, 2) * 3
    k = torch.randn(1, t, hk, d, generator=g).to(dtype).transpose(1, 2) * 3
    w = {n: torch.randn(d, generator=g).to(dtype) for n in ("q_norm", "k_norm")}
    w = {f"self_attn.{n}.weight": v for n, v in w.items()}
    spec = _spec(kind != "none", kind == "unit_offset", kind == "float_weight")
    rot = d // 2 if kind == "partial_rotary" else d
    cos, sin = _tables(t, rot, dtype, g, b=1)
    got_q, got_k = decoder._norm_rope_qk(spec, q, k, w, cos, sin)
    want = []
    for x, name in ((q, "q_norm"), (k, "k_norm")):
        if spec.qk_norm:
            x = rms_norm(x, w[f"self_attn.{name}.weight"], 1e-6, *(kind == s for s in
                         ("unit_offset", "float_weight")))  # fmt: skip
        want.append(apply_rope(x, cos, sin))
    assert torch.equal(got_q, want[0]) and torch.equal(got_k, want[1])
    assert got_q.shape == q.shape and got_k.shape == k.shape


def test_signed_table_made_once_per_step_table():
    sin = torch.randn(1, 1, 16)
    a = decoder._signed(sin)
    assert decoder._signed(sin) is a  # every layer of a step: the same table
    other = sin.clone()
    b = decoder._signed(other)
    assert b is not a and torch.equal(b, a)


@pytest.mark.parametrize("coded", [True, False])
@pytest.mark.parametrize("rows_per_token", [1, 3])
def test_batch_index_puts_the_slot_rows_first(monkeypatch, coded, rows_per_token):
    """A stacked batch's slot rows are the index tensor's first entries (a slice at offset 0:
    16-byte aligned wherever the tensor is, so the Triton kernel takes it without a copy); the
    outputs land in their pairs' slots."""
    h, k, n = 4, 2, 6  # hidden, top-k, slots of the stacks
    seen = {}

    def fake_forward(xs, stacks, idx, *rest):
        seen["idx"] = idx
        return xs * (idx.view(-1, 1, 1) + 1).to(xs.dtype)  # expert j's rows times slot + 1

    if coded:
        monkeypatch.setattr(moe_mod, "coded_forward", fake_forward)
        ew = {"gate_up_proj_blocks": torch.zeros(1)}
    else:
        monkeypatch.setattr(moe_mod, "gather_experts", lambda st, idx, m: idx)
        monkeypatch.setattr(
            moe_mod, "forward_stacked", lambda xs, idx, m, a: fake_forward(xs, None, idx)
        )
        ew = {"w": torch.zeros(1)}
    t = rows_per_token
    x = torch.arange(t * h, dtype=torch.float32).view(t, h) + 1
    # experts 3 and 5 in slots 4 and 1; pairs: token r's slot 0 -> expert 3, slot 1 -> expert 5
    rows = {3: [r * k for r in range(t)], 5: [r * k + 1 for r in range(t)]}
    batch = stacked_batch([(3, ew), (5, ew)], {"s": torch.zeros(n, 1)}, [4, 1])
    slots = torch.zeros(t * k + 1, h)
    moe_mod._run_batch(x, slots, batch, rows, k, None, "silu")
    idx = seen["idx"]
    assert idx.storage_offset() == 0 and idx.tolist() == [4, 1]
    for r in range(t):
        assert torch.equal(slots[r * k], x[r] * 5) and torch.equal(slots[r * k + 1], x[r] * 2)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_resident_experts_decode_without_a_host_read(family, tmp_path, monkeypatch):
    """All experts resident (a cache planned resident, on the stand-in accelerator): a decode
    row's experts are gathered by the router's ids on the device, with no host read (no sync
    per layer on a GPU) and no call of the cache's ``run``; bit-equal to the path that reads the
    ids (``id_stacks`` off), several rows still read them."""
    from dataclasses import replace

    from conftest import make_hf_model
    from ollm import LLM
    from ollm.layers.moe import moe_mlp
    from test_moe_experts import _cache

    make_hf_model(family, tmp_path / "hf")
    with LLM(tmp_path / "hf", device="cpu", cache_dir=tmp_path / "c", progress=False) as llm:
        moe, act = llm.spec.moe, llm.spec.act
        st = _cache(llm, slots=2, ram=0)[1]
        st.close()
        plan = replace(st.plan, resident=True, cache_slots=0, ram=(0,) * len(st.plan.layers))
        from ollm.runtime.experts import ExpertCache
        from ollm.telemetry.stats import IOStats

        cache = ExpertCache(st.experts, plan, "cpu:1", IOStats(), moe_mod.sparse_weights)
        i = plan.layers[0]
        w = llm.prefetcher.get(i)
        sw = cache.bind(i, w)
        assert sw.experts.id_stacks
        reads = []
        real = torch.Tensor.tolist

        def counted(t):
            reads.append(1)
            return real(t)

        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            x = torch.randn(1, 1, llm.spec.hidden_size, generator=g) * 4
            with monkeypatch.context() as m:
                m.setattr(torch.Tensor, "tolist", counted)
                m.setattr(cache, "run", lambda *a: pytest.fail("run called"))
                got = moe_mlp(x, sw, moe, act)
            assert not reads
            with monkeypatch.context() as m:  # the path that reads the ids
                m.setattr(type(sw.experts), "id_stacks", None)
                m.setattr(torch.Tensor, "tolist", counted)
                want = moe_mlp(x, sw, moe, act)
            assert len(reads) == 1 and torch.equal(got, want)
            reads.clear()
            torch.testing.assert_close(got, moe_mlp(x, w, moe, act), atol=1e-5, rtol=1e-5)
        x = torch.randn(1, 3, llm.spec.hidden_size, generator=g) * 4
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "tolist", counted)
            moe_mlp(x, sw, moe, act)
        assert reads  # several rows: the ids are read (rows grouped by expert on the host)
        cache.close()


def _overhead(*flags: str) -> dict:
    """scripts/moe_overhead.py's report, run in its own process (it patches module globals)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(root / "scripts" / "moe_overhead.py"), "--steps", "4", *flags]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def test_overhead_script_plays_the_mxfp4_kernel_and_counts_gpu_ops():
    """gpt_oss: the kernel's branch taken (two ops a batch), exact outputs, one host read per
    call, the GPU-only copies counted on top; the engine's ops per layer and step reported."""
    out = _overhead("--family", "gpt_oss", "--layers", "2", "--slots", "20", "--engine",
                    "--engine-tokens", "4", "--engine-runs", "1")  # fmt: skip
    assert out["ops"]["mxfp4_kernel"] >= 2 and out["max_abs_diff"] == 0.0
    assert out["host_reads_per_call"] == {"tolist": 1.0}
    assert out["ops"]["gpu: d2h ids"] == 1.0 and out["gpu_ops_per_call"] > out["ops_per_call"]
    assert "gpu: idx clone" not in out["ops"]  # the slot rows lead the index: aligned
    assert out["engine"]["ops_per_layer_step"] > out["ops_per_call"]


def test_overhead_script_resident_reads_nothing():
    out = _overhead("--resident", "--layers", "2")
    assert out["host_reads_per_call"] == {} and out["max_abs_diff"] == 0.0
    assert out["gpu_ops_per_call"] == out["ops_per_call"]  # no index or ids copies


def test_batch_indices_reach_a_gpu_by_kernel_reads(monkeypatch):
    """A batch's index (and the CPU's outputs) go to a CUDA device through ``uva.to_device``
    (a kernel's read of pinned memory: not queued behind the misses' expert copies on the
    copy engine), unless ``OLLM_UVA`` turns it off; the CPU keeps the array's tensor."""
    sent = []
    real = moe_mod.to_device
    monkeypatch.setattr(
        moe_mod, "to_device", lambda t, d, **k: sent.append((t.tolist(), d, k)) or t
    )
    cuda = torch.device("cuda", 0)
    moe_mod._index([3, 1, 2], cuda)
    assert sent == [([3, 1, 2], cuda, {"non_blocking": True})]
    assert moe_mod._index([4], torch.device("cpu")).tolist() == [4] and len(sent) == 1
    monkeypatch.setattr(moe_mod, "to_device", real)  # its fallback with UVA off
    monkeypatch.setenv("OLLM_UVA", "0")
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: t)  # no CUDA here
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: ("copied", a, k))
    assert moe_mod._index([5], cuda) == ("copied", (cuda,), {"non_blocking": True})
    assert len(sent) == 1
