"""The decoder block shared by every family, driven by ModelSpec. Weights are passed in per call:
layers own no parameters, so the runner can stream them from any tier."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
import torch.nn.functional as F

from ollm.kv.cache import LayerKVCache
from ollm.layers.attention import AttentionMask
from ollm.layers.mlp import gated_mlp
from ollm.layers.moe import moe_mlp, moe_weight_names, shared_expert
from ollm.layers.norms import rms_norm
from ollm.layers.rope import apply_rope, apply_rope_signed, signed_sin
from ollm.models.qwen3_next import LINEAR_KEY, linear_attention, linear_weight_names
from ollm.models.spec import ModelSpec

Weights = Mapping[str, torch.Tensor]


def _norm(spec: ModelSpec, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return rms_norm(x, w, spec.norm_eps, spec.norm_unit_offset, spec.norm_float_weight)


def self_attention(
    spec: ModelSpec,
    x: torch.Tensor,
    w: Weights,
    kv: LayerKVCache,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: AttentionMask,
    dense_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Project, normalise (q/k norm), rotate, append to the cache, attend, project out (gated
    by the sigmoid of q_proj's second half per head with ``attn_output_gate``)."""
    q, k, v, gate = attention_in(spec, x, w, cos, sin)
    out = kv.attend(q, k, v, attention_mask(spec, w, mask), spec.scale, dense_mask)
    return attention_out(spec, out, gate, w)


def attention_mask(spec: ModelSpec, w: Weights, mask: AttentionMask) -> AttentionMask:
    """``mask`` with the layer's attention sinks (gpt-oss)."""
    return replace(mask, sinks=w["self_attn.sinks"]) if spec.attn_sinks else mask


def attention_in(spec: ModelSpec, x: torch.Tensor, w: Weights, cos, sin) -> tuple:
    """q [B, Hq, T, D], k and v [B, Hk, T, D] (q/k normalised and rotated) and the output gate
    (``attn_output_gate``; else None) of the rows ``x`` [B, T, H]."""
    b, t, _ = x.shape
    q = F.linear(x, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias"))
    k = F.linear(x, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias"))
    v = F.linear(x, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias"))
    gate = None
    if spec.attn_output_gate:
        q, gate = q.view(b, t, -1, 2 * spec.head_dim).chunk(2, dim=-1)
        gate = gate.reshape(b, t, -1)
    q = q.reshape(b, t, -1, spec.head_dim).transpose(1, 2)
    k = k.view(b, t, -1, spec.head_dim).transpose(1, 2)
    v = v.view(b, t, -1, spec.head_dim).transpose(1, 2)
    q, k = _norm_rope_qk(spec, q, k, w, cos, sin)
    return q, k, v, gate


def attention_out(spec: ModelSpec, out: torch.Tensor, gate, w: Weights) -> torch.Tensor:
    """The attended values ``out`` [B, Hq, T, D] gated (``gate``) and projected out."""
    b, _, t, _ = out.shape
    out = out.transpose(1, 2).reshape(b, t, -1)
    if gate is not None:
        out = out * torch.sigmoid(gate)
    return F.linear(out, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))


_SIGNED: list[tuple[torch.Tensor, torch.Tensor] | None] = [None]  # (sin, signed_sin(sin))


def reset_rope_memo() -> None:
    """Forget the memoised signed sin (a CUDA graph capture computes its own)."""
    _SIGNED[0] = None


def _signed(sin: torch.Tensor) -> torch.Tensor:
    """``signed_sin(sin)``, made once per table (the runner builds one per step and rope type:
    every layer of that step gets the same tensor)."""
    memo = _SIGNED[0]
    if memo is not None and memo[0] is sin:
        return memo[1]
    ssin = signed_sin(sin)
    _SIGNED[0] = (sin, ssin)
    return ssin


def _norm_rope_qk(
    spec: ModelSpec, q: torch.Tensor, k: torch.Tensor, w: Weights, cos, sin
) -> tuple[torch.Tensor, torch.Tensor]:
    """The q/k norms and the rotation of q [B, Hq, T, D] and k [B, Hk, T, D] as one tensor of
    Hq + Hk heads (one chain of kernels instead of two: a decode step at batch 1 is bound by
    launches), the norm's weights side by side per head: every element goes through the same
    ops and roundings as with q and k apart. Returns views of q's and k's heads."""
    hq, hk, d = q.shape[1], k.shape[1], q.shape[-1]
    qk = torch.cat((q, k), dim=1)
    if spec.qk_norm:
        wq, wk = w["self_attn.q_norm.weight"], w["self_attn.k_norm.weight"]
        if wq.shape != (d,) or wk.shape != (d,):  # not one weight per head dim: apart
            q, k = _norm(spec, q, wq), _norm(spec, k, wk)
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        qk = _norm(spec, qk, torch.cat((wq.expand(hq, 1, d), wk.expand(hk, 1, d))))
    if cos.shape[-1] == d:
        qk = apply_rope_signed(qk, cos, _signed(sin))
    else:  # partial rotary (Qwen3-Next)
        qk = apply_rope(qk, cos, sin)
    return qk[:, :hq], qk[:, hq:]


def mlp(spec: ModelSpec, x: torch.Tensor, w: Weights, chunk_tokens: int | None) -> torch.Tensor:
    """The dense gated MLP, or the mixture of experts when the layer's weights hold a router
    (Qwen3-MoE's ``mlp_only_layers`` and ``decoder_sparse_step`` leave some layers dense). A
    dense MLP whose weights sit on another device than ``x`` runs there, ``x`` moved over and
    its output back."""
    if spec.moe is not None and spec.moe.router_key in w:
        return _sparse_mlp(spec, x, w, chunk_tokens)
    dev = w["mlp.down_proj.weight"].device
    if dev != x.device:  # computed where its weights sit (planning/mlp_cpu.py: RAM, in decode)
        return mlp(spec, x.to(dev), w, chunk_tokens).to(x.device, non_blocking=True)
    return gated_mlp(
        x,
        w["mlp.gate_proj.weight"],
        w["mlp.up_proj.weight"],
        w["mlp.down_proj.weight"],
        spec.act,
        chunk_tokens,
    )


def _sparse_mlp(spec: ModelSpec, x: torch.Tensor, w: Weights, chunk_tokens: int | None):
    moe = spec.moe
    assert moe is not None
    out = moe_mlp(x, w, moe, spec.act, chunk_tokens)
    if moe.shared_expert_size:
        out = out + shared_expert(x, w, moe, spec.act, chunk_tokens)
    return out


def decoder_block(
    spec: ModelSpec,
    h: torch.Tensor,
    w: Weights,
    kv: LayerKVCache,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: AttentionMask,
    dense_mask: torch.Tensor | None = None,
    mlp_chunk_tokens: int | None = None,
) -> torch.Tensor:
    """One transformer block: pre-norm attention and MLP with residuals (plus Gemma's sandwich norms).
    A decode row of a sparse layer whose experts decode directly may run as two CUDA graphs
    around its attention (``runtime/expert_graphs.py``)."""
    graphs = _graphs(w, h)
    if graphs is not None and LINEAR_KEY not in w and dense_mask is None:
        out = graphs.block(BLOCK_PARTS, spec, h, w, kv, cos, sin, mask, mlp_chunk_tokens)
        if out is not None:
            return out
    x = _norm(spec, h, w["input_layernorm.weight"])
    if LINEAR_KEY in w:  # a linear-attention layer: ``kv`` is its recurrent state
        a = linear_attention(spec, x, w, kv, mask)  # type: ignore[arg-type]
    else:
        a = self_attention(spec, x, w, kv, cos, sin, mask, dense_mask)
    return block_out(spec, h, a, w, mlp_chunk_tokens)


def block_out(spec: ModelSpec, h: torch.Tensor, a: torch.Tensor, w: Weights, chunk) -> torch.Tensor:
    """The block after its attention: residual, norm(s), MLP, residual."""
    if spec.sandwich_norm:
        a = _norm(spec, a, w["post_attention_layernorm.weight"])
        h = h + a
        x = _norm(spec, h, w["pre_feedforward_layernorm.weight"])
    else:
        h = h + a
        x = _norm(spec, h, w["post_attention_layernorm.weight"])
    m = mlp(spec, x, w, chunk)
    if spec.sandwich_norm:
        m = _norm(spec, m, w["post_feedforward_layernorm.weight"])
    if m.dtype == h.dtype and m.shape == h.shape:  # h is this block's own sum: added in place
        return h.add_(m)
    return h + m


def block_in(spec: ModelSpec, h: torch.Tensor, w: Weights, cos, sin) -> tuple:
    """``attention_in`` of the block's normalised input."""
    return attention_in(spec, _norm(spec, h, w["input_layernorm.weight"]), w, cos, sin)


# what ``runtime/expert_graphs.LayerGraphs`` captures, handed to it (runtime is below models)
BLOCK_PARTS = (block_in, attention_mask, attention_out, block_out, reset_rope_memo)


def _graphs(w: Weights, h: torch.Tensor):
    """The layer graphs of ``w``'s expert cache for a decode row (one token), else None."""
    if h.shape[:-1].numel() != 1:
        return None
    return getattr(getattr(getattr(w, "experts", None), "direct", None), "graphs", None)


def required_layer_tensors(
    spec: ModelSpec, layer: int | None = None, names: set[str] | None = None
) -> list[str]:
    """Tensor names (relative to ``model.layers.N.``) the block needs for this spec; biases are
    optional and found by name. ``layer`` picks the dense MLP or the experts (MoE specs; without
    it, a layer whose ``names`` hold the router is sparse); ``names`` picks the experts' layout."""
    moe, names = spec.moe, names or set()
    linear = spec.layers[layer].linear if layer is not None else LINEAR_KEY in names
    need = ["input_layernorm.weight", "post_attention_layernorm.weight"]
    if linear:
        need += linear_weight_names()
    else:
        need += [f"self_attn.{p}_proj.weight" for p in "qkvo"]
    sparse = (
        spec.is_sparse(layer)
        if layer is not None
        else (moe is not None and moe.router_key in names)
    )
    if sparse and moe is not None:
        need += moe_weight_names(moe, names)
    else:
        need += ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    if spec.qk_norm and not linear:
        need += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    if spec.attn_sinks:
        need.append("self_attn.sinks")
    if spec.sandwich_norm:
        need += ["pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"]
    return need


def layer_weight_names(spec: ModelSpec, names: set[str], layer: int | None = None) -> list[str]:
    """The required tensors missing from ``names`` (layer ``layer``'s relative tensor names)."""
    return [n for n in required_layer_tensors(spec, layer, names) if n not in names]
