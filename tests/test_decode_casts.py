"""Fewer kernels per decode layer, same bits (issue 19): the norms' and the router's roundings to
the activations' dtype done by the multiply / division that precedes them (``norms.mul_to``,
``moe.route``: no cast kernel), the block's last residual added in place. Each compared with
the previous implementation, bitwise."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ollm.layers.moe import MoeSpec, route
from ollm.layers.norms import rms_norm
from ollm.models import decoder

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


class Ops(TorchDispatchMode):
    """Names of the aten ops run (a kernel each on a GPU, bar views and allocations)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))

    @property
    def kernels(self) -> int:
        allocs = ("empty", "empty_like", "view", "expand", "promote_types")
        return sum(n not in allocs for n in self.names)


def _old_norm(x, weight, eps, unit_offset, float_weight=False):
    """rms_norm before issue 19's change (a cast kernel after the normalising multiply)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (xf * (1.0 + weight.float())).type_as(x)
    if float_weight:
        return (xf * weight).type_as(x)
    return weight * xf.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["llama", "unit_offset", "float_weight"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_norm_rounds_in_the_multiply_bitwise(dtype, kind, layout):
    g = torch.Generator().manual_seed(len(kind) + len(layout))
    x = (torch.randn(2, 7, 5, 64, generator=g) * 5).to(dtype)
    if layout == "transposed":  # a projection's heads as attention sees them
        x = x.transpose(1, 2)
    flags = (kind == "unit_offset", kind == "float_weight")
    for wdt in DTYPES:
        w = (torch.randn(64, generator=g) + 1).to(wdt)
        want = _old_norm(x, w, 1e-6, *flags)
        with Ops() as ops:
            got = rms_norm(x, w, 1e-6, *flags)
        assert got.dtype == want.dtype and got.stride() == want.stride()
        assert torch.equal(got, want)
        if dtype in (torch.bfloat16, torch.float16) and wdt == dtype:
            assert ops.names.count("_to_copy") == 1 + (kind == "unit_offset")  # x; Gemma's w
            # x's cast, the square, mean, eps, rsqrt, the normalising multiply (rounding as it
            # stores), the weight's multiply (Gemma: + the weight's cast and + 1)
            assert ops.kernels == 7 + 2 * (kind == "unit_offset")


def _old_route(x, w, moe):
    logits = F.linear(x, w[moe.router_key])
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    top, idx = torch.topk(probs, moe.top_k, dim=-1)
    if moe.norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    if moe.weights_in_act_dtype:
        top = top.to(logits.dtype)
    return top, idx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("act_dtype", [True, False])
@pytest.mark.parametrize("rows", [1, 5])
def test_route_rounds_in_the_division_bitwise(dtype, norm, act_dtype, rows):
    """Qwen3-MoE's routing (renormalised top-k rounded to the activations' dtype) with one op
    fewer; Mixtral's (float32 weights) and unrenormalised routing as before."""
    moe = MoeSpec(
        num_experts=128, top_k=8, intermediate_size=4, sparse_layers=frozenset({0}),
        norm_topk_prob=norm, weights_in_act_dtype=act_dtype,
    )  # fmt: skip
    g = torch.Generator().manual_seed(rows + 2 * norm + act_dtype)
    for _ in range(20):
        x = (torch.randn(rows, 32, generator=g) * 3).to(dtype)
        w = {moe.router_key: torch.randn(128, 32, generator=g).to(dtype)}
        want = _old_route(x, w, moe)
        with Ops() as ops:
            got = route(x, w, moe)
        assert got[0].dtype == want[0].dtype and torch.equal(got[0], want[0])
        assert torch.equal(got[1], want[1])
        if norm and act_dtype and dtype != torch.float32:
            assert "_to_copy" not in ops.names[ops.names.index("div") :]


def test_topk_of_logits_then_softmax_is_not_bit_exact():
    """Why ``route`` keeps softmax over all experts, top-k, renormalise: the algebraically equal
    softmax over the top-k logits rounds differently (kept out of the decode path)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 128, generator=g) * 3
    top, idx = torch.topk(torch.softmax(logits, -1), 8, -1)
    want = top / top.sum(-1, keepdim=True)
    top2, idx2 = torch.topk(logits, 8, -1)
    assert torch.equal(idx, idx2)  # the same experts
    assert not torch.equal(torch.softmax(top2, -1), want)  # not the same bits


def test_block_adds_the_mlp_in_place_of_its_own_sum(monkeypatch):
    """The last residual lands in the tensor the block made (h + attention): the input stays."""
    spec = SimpleNamespace(sandwich_norm=False, norm_eps=1e-6, norm_unit_offset=False,
                           norm_float_weight=False)  # fmt: skip
    h = torch.randn(1, 1, 8)
    keep = h.clone()
    a, m = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    monkeypatch.setattr(decoder, "self_attention", lambda *args: a)
    monkeypatch.setattr(decoder, "mlp", lambda *args: m)
    w = {"input_layernorm.weight": torch.ones(8), "post_attention_layernorm.weight": torch.ones(8)}
    out = decoder.decoder_block(spec, h, w, None, None, None, None)
    assert torch.equal(h, keep) and out.data_ptr() != h.data_ptr()
    assert torch.equal(out, (keep + a) + m)
    m16 = m.to(torch.float64)  # another dtype: the promoted sum, as before
    monkeypatch.setattr(decoder, "mlp", lambda *args: m16)
    out = decoder.decoder_block(spec, h, w, None, None, None, None)
    assert out.dtype == torch.float64 and torch.equal(out, (keep + a) + m16)
