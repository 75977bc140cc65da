"""RMSNorm in the two conventions found in HF checkpoints."""

from __future__ import annotations

import torch


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool, float_weight: bool = False
) -> torch.Tensor:
    """RMSNorm computed in float32.

    ``unit_offset=False`` is Llama's ``w * norm(x).to(dtype)``; ``unit_offset=True`` is Gemma's
    ``(norm(x) * (1 + w)).to(dtype)`` (weights stored centred on zero); ``float_weight`` is
    gpt-oss's ``(w * norm(x)).to(dtype)`` (norms kept in float32). The rounding order matches
    transformers exactly, which matters for bit-identical greedy decoding in half precision.
    """
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return mul_to(xf * r, 1.0 + weight.float(), x.dtype)
    if float_weight:  # the weight promoted inside the multiply: weight.float()'s values, exactly
        return mul_to(xf * r, weight, x.dtype)  # (one kernel fewer where it is stored in half)
    return weight * mul_to(xf, r, x.dtype)


def mul_to(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(a * b).to(dtype)`` for ``a`` of the product's full shape, the rounding to ``dtype``
    done by the multiply's kernel as it stores (computed in the inputs' common dtype, then cast
    as ``to`` casts: bit-equal), so no separate cast kernel; ``a``'s layout kept."""
    if a.dtype == dtype:
        return (a * b).to(dtype)  # the product may promote (a float64 weight): cast back
    return torch.mul(a, b, out=torch.empty_like(a, dtype=dtype))
