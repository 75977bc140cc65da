"""Qwen3-Next (Qwen3-Next-80B-A3B): a hybrid of gated DeltaNet linear-attention layers and gated
full-attention layers (``layer_types``: three linear, one full, repeated), each followed by a
mixture of experts with a shared expert.

- Linear layers (``linear_attn.*``) keep a recurrent state instead of KV (``kv/recurrent.py``):
  ``in_proj_qkvz`` gives per key-head group [q | k | v | z], ``in_proj_ba`` [b | a]; q, k, v
  pass a causal depthwise ``conv1d`` with SiLU; ``beta = sigmoid(b)``, the log decay
  ``g = -exp(A_log) * softplus(a + dt_bias)``; q and k repeat to the value heads; the gated delta
  rule (``layers/deltanet.py``); ``norm`` is an RMSNorm per value head gated by ``silu(z)``
  (plain weight), then ``out_proj``.
- Full-attention layers: q_proj doubled (per head [query | gate]); q/k RMSNorm; partial rotary
  (``partial_rotary_factor``, 0.25); the attention output times ``sigmoid(gate)``.
- RMSNorm weights centred on zero, ``(1 + w)`` (input, post-attention, q/k and final norms).
- MoE as Qwen3-MoE (softmax, top-k, renormalised by ``norm_topk_prob``, rounded to the
  activations' dtype), plus ``mlp.shared_expert`` gated by ``sigmoid(mlp.shared_expert_gate)``.
  transformers holds the routed experts fused (``mlp.experts.gate_up_proj`` [E, 2I, H]).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ollm.layers.deltanet import (
    LinearAttnSpec,
    causal_conv,
    chunk_delta_rule,
    gated_rms_norm,
    recurrent_delta_rule,
)
from ollm.models import llama
from ollm.models.common import layer_specs
from ollm.models.qwen3_moe import moe_spec
from ollm.models.spec import ModelSpec

if TYPE_CHECKING:
    from ollm.kv.recurrent import RecurrentState
    from ollm.layers.attention import AttentionMask

LINEAR_KEY = "linear_attn.in_proj_qkvz.weight"  # its presence marks a linear-attention layer
_LINEAR = ("in_proj_qkvz.weight", "in_proj_ba.weight", "conv1d.weight", "dt_bias", "A_log")
_LINEAR += ("norm.weight", "out_proj.weight")


def linear_weight_names() -> list[str]:
    """A linear-attention layer's mixer tensors (relative to ``model.layers.N.``)."""
    return [f"linear_attn.{n}" for n in _LINEAR]


def build_spec(config: object) -> ModelSpec:
    c = config
    moe = moe_spec(c, norm_topk_default=True)
    lin = LinearAttnSpec(
        num_k_heads=c.linear_num_key_heads,  # type: ignore[attr-defined]
        num_v_heads=c.linear_num_value_heads,  # type: ignore[attr-defined]
        k_dim=c.linear_key_head_dim,  # type: ignore[attr-defined]
        v_dim=c.linear_value_head_dim,  # type: ignore[attr-defined]
        conv_kernel=c.linear_conv_kernel_dim,  # type: ignore[attr-defined]
    )
    # Every non-sliding type is full attention to layer_specs, with one rope table; the
    # linear layers keep theirs unused.
    types = list(c.layer_types)  # type: ignore[attr-defined]
    layers = tuple(
        replace(spec, linear=t == "linear_attention")
        for spec, t in zip(layer_specs(c), types, strict=True)
    )
    return replace(
        llama.build_spec(c),
        qk_norm=True,
        norm_unit_offset=True,
        attn_output_gate=True,
        moe=moe,
        linear_attn=lin,
        layers=layers,
    )


def _split(spec: ModelSpec, x: torch.Tensor, w: Mapping[str, torch.Tensor]):
    """q, k, v [B, T, heads, d], z [B, T, Hv, dv], b and a [B, T, Hv] from the two in-projections
    (HF's ``fix_query_key_value_ordering``: per key head [q | k | v | z] and [b | a])."""
    lin = spec.linear_attn
    assert lin is not None
    bsz, t, _ = x.shape
    nk, dk, dv, r = lin.num_k_heads, lin.k_dim, lin.v_dim, lin.num_v_heads // lin.num_k_heads
    qkvz = F.linear(x, w["linear_attn.in_proj_qkvz.weight"]).view(bsz, t, nk, 2 * dk + 2 * r * dv)
    ba = F.linear(x, w["linear_attn.in_proj_ba.weight"]).view(bsz, t, nk, 2 * r)
    q, k, v, z = torch.split(qkvz, [dk, dk, r * dv, r * dv], dim=3)
    b, a = torch.split(ba, [r, r], dim=3)
    v, z = v.reshape(bsz, t, -1, dv), z.reshape(bsz, t, -1, dv)
    return q, k, v, z, b.reshape(bsz, t, -1), a.reshape(bsz, t, -1)


def linear_attention(
    spec: ModelSpec,
    x: torch.Tensor,
    w: Mapping[str, torch.Tensor],
    state: RecurrentState,
    mask: AttentionMask,
) -> torch.Tensor:
    """The gated DeltaNet mixer of ``x`` [B, T, H], continuing and updating ``state``. Padding
    rows (``mask.key_keep``) are zeroed first, so they leave the state at zero, as in
    transformers (left padding precedes every real token)."""
    lin = spec.linear_attn
    assert lin is not None
    bsz, t, _ = x.shape
    if mask.key_keep is not None and t > 1:
        keep = mask.key_keep[:, mask.q_start : mask.q_start + t].to(x.device)
        x = (x * keep[:, :, None]).to(x.dtype)
    q, k, v, z, b, a = _split(spec, x, w)
    mixed = torch.cat([q.reshape(bsz, t, -1), k.reshape(bsz, t, -1), v.reshape(bsz, t, -1)], -1)
    conv_past, ssm = state.load(x.device)
    mixed, conv_past = causal_conv(mixed.transpose(1, 2), conv_past, w["linear_attn.conv1d.weight"])
    q, k, v = torch.split(mixed.transpose(1, 2), [lin.key_dim, lin.key_dim, lin.value_dim], -1)
    q, k = q.reshape(bsz, t, -1, lin.k_dim), k.reshape(bsz, t, -1, lin.k_dim)
    v = v.reshape(bsz, t, -1, lin.v_dim)
    beta = b.sigmoid()
    g = -w["linear_attn.A_log"].float().exp() * F.softplus(a.float() + w["linear_attn.dt_bias"])
    r = lin.num_v_heads // lin.num_k_heads
    if r > 1:
        q, k = q.repeat_interleave(r, dim=2), k.repeat_interleave(r, dim=2)
    rule = recurrent_delta_rule if t == 1 and ssm is not None else chunk_delta_rule
    out, ssm = rule(q, k, v, g, beta, ssm)
    state.store(conv_past, ssm, t)
    out = gated_rms_norm(out, z, w["linear_attn.norm.weight"], spec.norm_eps)
    return F.linear(out.reshape(bsz, t, -1), w["linear_attn.out_proj.weight"])
