"""gpt-oss (20B, 120B): Llama-style blocks with q/k/v/o biases, attention sinks, alternating
sliding-window (128) and full layers (``layer_types``), YaRN rope, and a mixture of experts on
every layer.

Attention sinks: ``self_attn.sinks`` [heads] is the logit of one more key that every query sees,
with value 0 (``AttentionMask.sinks``). Routing: ``mlp.router`` (weight and bias), softmax over
the top-k logits only. Experts: fused ``mlp.experts.gate_up_proj`` [E, H, 2I] (gate and up
interleaved by column) and ``down_proj`` [E, I, H], each with a bias, clamped SwiGLU
(``layers/moe.py``). RMSNorm multiplies by its weight in float32 before rounding (HF keeps the
norms in float32). MXFP4 checkpoints are dequantized at conversion (``storage/mxfp4.py``).
"""

from __future__ import annotations

from dataclasses import replace

from ollm.layers.moe import MoeSpec
from ollm.models import llama
from ollm.models.spec import ModelSpec


def build_spec(config: object) -> ModelSpec:
    c = config
    moe = MoeSpec(
        num_experts=c.num_local_experts,  # type: ignore[attr-defined]
        top_k=c.num_experts_per_tok,  # type: ignore[attr-defined]
        intermediate_size=c.intermediate_size,  # type: ignore[attr-defined]
        sparse_layers=frozenset(range(c.num_hidden_layers)),  # type: ignore[attr-defined]
        routing="topk_softmax",
        norm_topk_prob=False,
        router="router",
        router_bias=True,
        expert_kind="gpt_oss",
    )
    # llama.build_spec reads layer_types (sliding / full) and the YaRN rope parameters.
    return replace(llama.build_spec(c), attn_sinks=True, norm_float_weight=True, moe=moe)
