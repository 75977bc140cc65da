"""Mixtral (8x7B, 8x22B): Mistral blocks whose every MLP is a mixture of experts.

Routing: softmax over all experts in float32, top-k, renormalised to sum to 1 (always), kept in
float32 when scaling the experts' outputs. HF names kept: ``block_sparse_moe.gate.weight``
(router), ``block_sparse_moe.experts.{e}.w1/w3/w2.weight`` (gate / up / down). The optional
``sliding_window`` applies to every layer, as in Mistral.
"""

from __future__ import annotations

from dataclasses import replace

from ollm.layers.moe import MoeSpec
from ollm.models import mistral
from ollm.models.spec import ModelSpec


def build_spec(config: object) -> ModelSpec:
    c = config
    moe = MoeSpec(
        num_experts=c.num_local_experts,  # type: ignore[attr-defined]
        top_k=c.num_experts_per_tok,  # type: ignore[attr-defined]
        intermediate_size=c.intermediate_size,  # type: ignore[attr-defined]
        sparse_layers=frozenset(range(c.num_hidden_layers)),  # type: ignore[attr-defined]
        norm_topk_prob=True,
        weights_in_act_dtype=False,
        prefix="block_sparse_moe",
        expert_names=("w1", "w3", "w2"),
    )
    return replace(mistral.build_spec(c), moe=moe)
