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
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (xf * (1.0 + weight.float())).type_as(x)
    if float_weight:  # the weight promoted inside the multiply: weight.float()'s values, exactly
        return (xf * weight).type_as(x)  # (one kernel fewer where it is stored in half precision)
    return weight * xf.to(x.dtype)
