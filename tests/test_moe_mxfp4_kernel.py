"""gpt-oss MXFP4 experts computed from their stored codes (``layers/moe_mxfp4.py``): the Triton
grouped GEMV (``layers/moe_mxfp4_triton.py``) run on the CPU under ``TRITON_INTERPRET=1``
against the decode-then-matmul path over the same slots (float32 and bf16 rows, one row
expanded as decode passes it, several rows, slots in any order), its one-time check (a kernel
that disagrees is turned off, decode-then-matmul answers); and that path against one expert
at a time (no Triton needed)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ollm.layers.moe import MoeSpec, expert_forward
from ollm.layers.moe_batched import forward_stacked
from ollm.layers.moe_mxfp4 import decode_weights, decoded_forward
from ollm.runtime.expert_stacks import stacked_views
from ollm.storage.expert_codec import ExpertTensor

ROOT = Path(__file__).resolve().parents[1]
MOE = MoeSpec(8, 2, 64, frozenset({0}), expert_kind="gpt_oss")


def coded_slots(n: int, hidden: int, inter: int, dtype: torch.dtype, seed: int = 0):
    """``n`` slots of random gpt-oss MXFP4 experts in their stored layout (as the cache holds
    them): the stacked views (name -> [n, ...]) over one uint8 buffer [n, stride]."""
    shapes = {
        "down_proj_bias": ((hidden,), dtype),
        "down_proj_blocks": ((hidden, inter // 32, 16), torch.uint8),
        "down_proj_scales": ((hidden, inter // 32), torch.uint8),
        "gate_up_proj_bias": ((2 * inter,), dtype),
        "gate_up_proj_blocks": ((2 * inter, hidden // 32, 16), torch.uint8),
        "gate_up_proj_scales": ((2 * inter, hidden // 32), torch.uint8),
    }
    tensors, at = [], 0
    for name, (shape, dt) in shapes.items():
        nbytes = torch.Size(shape).numel() * dt.itemsize
        tensors.append(ExpertTensor(name, at, nbytes, dt, shape))
        at = (at + nbytes + 255) // 256 * 256
    buf = torch.zeros(n, (at + 4095) // 4096 * 4096, dtype=torch.uint8)
    stacks = stacked_views(buf, tensors)
    gen = torch.Generator().manual_seed(seed)
    for t in tensors:
        v = stacks[t.short]
        if t.short.endswith("_blocks"):
            v.copy_(torch.randint(0, 256, v.shape, generator=gen, dtype=torch.uint8))
        elif t.short.endswith("_scales"):  # 2^-6 .. 2^-1, gpt-oss's range
            v.copy_(torch.randint(121, 127, v.shape, generator=gen, dtype=torch.uint8))
        else:
            v.copy_((torch.randn(v.shape, generator=gen) * 0.1).to(dtype))
    return {k: v for k, v in stacks.items() if "+" not in k}


def test_decoded_forward_equals_one_expert_at_a_time(monkeypatch):
    """Decode-then-matmul over slots in any order (a few experts decoded at a time) equals
    ``expert_forward`` of each expert's decoded tensors, bit for bit in float32."""
    import ollm.storage.expert_codec as codec

    stacks = coded_slots(5, 64, 96, torch.float32)
    x = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(1))
    idx = torch.tensor([4, 0, 2])
    monkeypatch.setattr(codec, "DECODE_BYTES", 1)  # one expert decoded at a time
    got = decoded_forward(x, stacks, idx, lambda a, w: forward_stacked(a, w, MOE, "silu"))
    for j, s in enumerate(idx.tolist()):
        ew = decode_weights({k: v[s] for k, v in stacks.items()})
        want = expert_forward(x[j], ew, MOE, "silu")
        assert torch.allclose(got[j], want, rtol=1e-6, atol=1e-6)
    assert (got[0] != got[1]).any()


_KERNEL_CHECK = """
import torch
from ollm.layers import moe_mxfp4 as mm
from ollm.layers.moe_batched import forward_stacked
from test_moe_mxfp4_kernel import MOE, coded_slots
fwd = lambda a, w: forward_stacked(a, w, MOE, "silu")
worst = {}
for hidden, inter, dt, m, idx in ((96, 160, torch.float32, 1, [4, 0, 2]),
                                  (64, 96, torch.float32, 5, [1, 3]),
                                  (160, 64, torch.bfloat16, 3, [2, 4, 0, 1]),
                                  (128, 96, torch.bfloat16, 16, [3])):
    stacks = coded_slots(5, hidden, inter, dt, seed=hidden + m)
    gen = torch.Generator().manual_seed(m)
    g = len(idx)
    idx = torch.tensor(idx)
    for x in (torch.randn(g, m, hidden, generator=gen).to(dt),
              torch.randn(1, 1, hidden, generator=gen).to(dt).expand(g, 1, hidden)):
        got, want = mm.kernel_forward(x, stacks, idx), mm.decoded_forward(x, stacks, idx, fwd)
        assert got.shape == want.shape == (g, x.shape[1], hidden) and got.dtype == dt
        rel = float((got.float() - want.float()).abs().max() / want.float().abs().max())
        worst[str(dt)] = max(worst.get(str(dt), 0.0), rel)
        assert mm.agree(got, want), (hidden, inter, dt, m, rel)
# the one-time check: a good kernel is kept, a disagreeing one is turned off
mm.kernel_applies = lambda x: x.shape[1] <= 16 and mm._STATE.get((x.dtype, str(x.device))) is not False
x = torch.randn(2, 1, 64, generator=gen)
stacks = coded_slots(3, 64, 96, torch.float32)
mm.path_counts.update(kernel=0, decoded=0)
y = mm.coded_forward(x, stacks, torch.tensor([2, 0]), fwd)
assert mm.path_counts == {"kernel": 1, "decoded": 0}, mm.path_counts
mm._STATE.clear()
mm.kernel_forward = lambda x, s, i: torch.zeros_like(x)
z = mm.coded_forward(x, stacks, torch.tensor([2, 0]), fwd)
assert torch.allclose(z, y, rtol=1e-5, atol=1e-5) and mm._STATE == {(torch.float32, "cpu"): False}
assert mm.path_counts == {"kernel": 1, "decoded": 1}, mm.path_counts
print("WORST", worst["torch.float32"], worst["torch.bfloat16"])
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_mxfp4_expert_kernel_in_the_interpreter():
    """The kernel equals decode-then-matmul within float32 rounding (float32 rows) and within
    the reference's own bf16 roundings (bf16 rows: it rounds every op, the kernel once)."""
    path = os.pathsep.join(
        [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    res = subprocess.run(
        [sys.executable, "-c", _KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    f32, bf16 = (float(v) for v in res.stdout.split("WORST")[-1].split())
    assert f32 < 1e-5 and bf16 < 2e-2, (f32, bf16)


_MODEL_CHECK = """
import sys, tempfile
from pathlib import Path
import torch
import ollm.layers.moe_mxfp4 as mm
from ollm import LLM
from ollm.planning.experts import plan_experts
from ollm.planning.placement import plan_placement
from ollm.storage.experts import StoreExperts
from test_moe_experts import _check, _stand_in
from test_mxfp4 import _mxfp4_hf
mm.kernel_applies = lambda x: x.shape[1] <= 16 and mm._STATE.get((x.dtype, "cpu")) is not False
d = Path(tempfile.mkdtemp())
model = _mxfp4_hf(d / "hf")
with LLM(d / "hf", device="cpu", cache_dir=d / "c", progress=False, prefill_chunk=32) as llm:
    st, spec, work = StoreExperts(llm.store), llm.spec, llm.workload
    def dense(s, gpu, cpu):
        return plan_placement(spec, s, "cuda:0", gpu, cpu, "auto", work, 4, hybrid="off")
    plan = plan_experts(spec, llm.store, st, "cuda:0", None, None, "auto", work, 4, slots=2,
                        cpu_compute="off", plan_dense=dense, coded_slots=True)
    _stand_in(llm, llm.store_path, plan)
    _check(llm, model)
assert mm.path_counts["kernel"] > 0 and mm._STATE == {(torch.float32, "cpu"): True}, mm._STATE
print("PATHS", mm.path_counts["kernel"], mm.path_counts["decoded"])
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_gpt_oss_through_coded_slots_with_the_kernel_in_the_interpreter():
    """A tiny gpt-oss with MXFP4 experts through two slots holding the stored bytes on a
    stand-in accelerator, its decode batches run by the Triton kernel (the interpreter, made to
    take CPU rows): greedy tokens equal transformers', log-probs within 1e-4, and the kernel
    ran the decode steps' experts (prefill's many rows: decode-then-matmul)."""
    path = os.pathsep.join(
        [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    res = subprocess.run(
        [sys.executable, "-c", _MODEL_CHECK], env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    kernel, decoded = (int(v) for v in res.stdout.split("PATHS")[-1].split())
    assert kernel > 0 and decoded > 0, (kernel, decoded)
