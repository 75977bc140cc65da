"""MXFP4 experts computed from their stored codes (issue 19, gpt-oss): when the expert cache's
slots hold the stored bytes only (``ExpertPlan.coded_slots``), a batch's weights are the stored
tensors ``{gate_up_proj,down_proj}_{blocks,scales,bias}`` and this module computes them:

* few rows on CUDA (decode: up to ``moe_mxfp4_triton.ROWS`` rows per expert): the Triton grouped
  GEMV (``moe_mxfp4_triton.gpt_oss_experts``: two launches for all of a batch's experts, the
  codes decoded in registers, no decoded copy of any expert);
* otherwise (the CPU, more rows, Triton missing or turned off): decode then matmul, the path
  experts had before (``decoded_forward``: a few experts decoded at a time, their temporaries
  within ``storage.expert_codec.DECODE_BYTES``); prefill's one GEMM per expert decodes the
  expert once per row group (``decode_weights``).

The first kernel call per dtype and device is compared with the decode-then-matmul path on the
same inputs; a kernel that fails to build or disagrees is turned off for the process with a
logged warning, and decode-then-matmul answers (``path_counts`` says which ran).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from ollm.storage.mxfp4 import dequantize_rows

log = logging.getLogger(__name__)
MATS = ("gate_up_proj", "down_proj")
_STATE: dict[tuple, bool] = {}  # (dtype, device) -> kernel checked good; False: off
path_counts = {"kernel": 0, "decoded": 0}  # expert batches by path (reports, tests)


def is_coded(w: Mapping) -> bool:
    """Whether ``w`` (an expert's tensors, or stacks of them) holds stored MXFP4 pairs."""
    return "gate_up_proj_blocks" in w


def decode_weights(ew: Mapping, dtype: torch.dtype | None = None) -> dict:
    """An expert's stored tensors as ``expert_forward`` reads them (the matrices decoded,
    [in, out] transposed views, in the biases' dtype unless ``dtype``; the biases as they are)."""
    dtype = dtype or ew["gate_up_proj_bias"].dtype
    out = {f"{m}_bias": ew[f"{m}_bias"] for m in MATS}
    for m in MATS:
        out[m] = dequantize_rows(ew[f"{m}_blocks"], ew[f"{m}_scales"], dtype)
    return out


def _decoded_bytes(stacks: Mapping) -> int:
    """One expert's decoded matrices in bytes (what decode-then-matmul makes per expert)."""
    el = stacks["gate_up_proj_bias"].element_size()
    return sum(stacks[f"{m}_blocks"][0].numel() * 2 * el for m in MATS)


def decoded_forward(x: torch.Tensor, stacks: Mapping, idx: torch.Tensor, forward) -> torch.Tensor:
    """Decode then matmul: ``x`` [g, m, H] through the experts at rows ``idx`` of ``stacks``,
    a few experts decoded at a time (``decode_chunk``); ``forward(x, w)``: the batched matmuls
    over decoded tensors (``moe_batched.forward_stacked``)."""
    from ollm.storage.expert_codec import decode_chunk

    g = x.shape[0]
    step = decode_chunk(_decoded_bytes(stacks), g)
    names = [f"{m}{s}" for m in MATS for s in ("_blocks", "_scales", "_bias")]
    outs = []
    for a in range(0, g, step):
        part = idx[a : a + step]
        w = decode_weights({n: stacks[n].index_select(0, part) for n in names})
        outs.append(forward(x[a : a + step], w))
        del w
    path_counts["decoded"] += 1
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def kernel_applies(x: torch.Tensor) -> bool:
    """Whether the Triton kernel takes these rows: CUDA, float32 / bf16, few rows per expert,
    Triton importable, and not turned off."""
    if x.device.type != "cuda" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if _STATE.get((x.dtype, str(x.device))) is False:
        return False
    try:
        from ollm.layers import moe_mxfp4_triton as k
    except ImportError:
        _STATE[(x.dtype, str(x.device))] = False
        log.warning("Triton is not importable: MXFP4 experts are decoded before their matmuls")
        return False
    return x.shape[1] <= k.ROWS


def kernel_forward(x: torch.Tensor, stacks: Mapping, idx: torch.Tensor) -> torch.Tensor:
    """The Triton kernels (``moe_mxfp4_triton.gpt_oss_experts``) with gpt-oss's constants."""
    from ollm.layers import moe_mxfp4_triton as k
    from ollm.layers.moe_batched import GPT_OSS_ALPHA, GPT_OSS_LIMIT

    return k.gpt_oss_experts(x, stacks, idx, GPT_OSS_ALPHA, GPT_OSS_LIMIT)


def coded_forward(x: torch.Tensor, stacks: Mapping, idx: torch.Tensor, forward) -> torch.Tensor:
    """gpt-oss experts over ``x`` [g, m, H] from their stored codes (``stacks``, slot rows
    ``idx``, a device int64 tensor): the Triton kernel where ``kernel_applies``, checked once
    against ``decoded_forward``; else ``decoded_forward``."""
    if not kernel_applies(x):
        return decoded_forward(x, stacks, idx, forward)
    key = (x.dtype, str(x.device))
    try:
        y = kernel_forward(x, stacks, idx)
        if key not in _STATE:
            want = decoded_forward(x, stacks, idx, forward)
            path_counts["decoded"] -= 1  # the check's, not a batch's
            _STATE[key] = agree(y, want)
            if not _STATE[key]:
                log.warning("the MXFP4 expert kernel disagrees with decode-then-matmul "
                            "(max diff %.3g); decoding instead", float((y - want).abs().max()))  # fmt: skip
                path_counts["decoded"] += 1
                return want
    except Exception as exc:  # noqa: BLE001 - an optional kernel: decode-then-matmul answers
        _STATE[key] = False
        log.warning("the MXFP4 expert kernel is unavailable (%s); decoding instead", exc)
        return decoded_forward(x, stacks, idx, forward)
    path_counts["kernel"] += 1
    return y


def agree(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Within the rounding the two paths differ by: the reference rounds each op to the
    activations' dtype (bf16: its gate_up, bias, SwiGLU and down), the kernel once."""
    eps = torch.finfo(want.dtype).eps
    tol = (4 * eps if want.dtype != torch.float32 else 64 * eps) * float(want.abs().max()) + 1e-6
    return bool((got.float() - want.float()).abs().max() <= tol)
