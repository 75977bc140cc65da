"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3 blocks (q/k norms) whose MLP is a mixture
of experts on the layers HF's rule picks, a dense SwiGLU MLP on the others.

A layer ``i`` is sparse when ``i not in mlp_only_layers`` and ``(i + 1) % decoder_sparse_step
== 0`` (with ``num_experts > 0``). Routing: softmax over all experts in float32, top-k,
renormalised when ``norm_topk_prob``, then rounded to the activations' dtype. HF names kept:
``mlp.gate.weight`` (router), ``mlp.experts.{e}.{gate,up,down}_proj.weight`` (or the fused
``mlp.experts.gate_up_proj`` / ``down_proj``), dense layers ``mlp.{gate,up,down}_proj.weight``.
"""

from __future__ import annotations

from dataclasses import replace

from ollm.layers.moe import MoeSpec
from ollm.models import llama
from ollm.models.common import layer_specs
from ollm.models.spec import ModelSpec


def sparse_layers(config: object) -> frozenset[int]:
    """Indices of the layers whose MLP is the mixture of experts (transformers' rule)."""
    c = config
    n, experts = c.num_hidden_layers, getattr(c, "num_experts", 0) or 0  # type: ignore[attr-defined]
    step = getattr(c, "decoder_sparse_step", 1) or 1
    dense = set(getattr(c, "mlp_only_layers", None) or [])
    return frozenset(i for i in range(n) if experts > 0 and i not in dense and (i + 1) % step == 0)


def moe_spec(config: object, norm_topk_default: bool = False) -> MoeSpec:
    """The Qwen MoE block of ``config`` (Qwen3-MoE; Qwen3-Next adds its shared expert and
    renormalises by default)."""
    c = config
    return MoeSpec(
        num_experts=c.num_experts,  # type: ignore[attr-defined]
        top_k=c.num_experts_per_tok,  # type: ignore[attr-defined]
        intermediate_size=c.moe_intermediate_size,  # type: ignore[attr-defined]
        sparse_layers=sparse_layers(c),
        norm_topk_prob=bool(getattr(c, "norm_topk_prob", norm_topk_default)),
        weights_in_act_dtype=True,
        shared_expert_size=int(getattr(c, "shared_expert_intermediate_size", 0) or 0),
    )


def build_spec(config: object) -> ModelSpec:
    c = config
    moe = moe_spec(c)
    window = getattr(c, "sliding_window", None)  # None unless use_sliding_window
    spec = llama.build_spec(c)
    return replace(spec, qk_norm=True, moe=moe, layers=layer_specs(c, default_window=window))
