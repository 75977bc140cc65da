"""Llama (1, 2, 3.x incl. llama3 rope scaling): pre-norm blocks, SwiGLU MLP, GQA.

HF parameter names are kept: ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``,
``input_layernorm``, ``post_attention_layernorm``; optional q/k/v/o biases (``attention_bias``).
"""

from __future__ import annotations

from ollm.models.common import eos_ids, head_dim, layer_specs
from ollm.models.spec import ModelSpec


def build_spec(config: object) -> ModelSpec:
    c = config
    return ModelSpec(
        family=c.model_type,
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_heads=c.num_attention_heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_dim=head_dim(c),
        norm_eps=c.rms_norm_eps,
        layers=layer_specs(c),
        act="silu",
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        eos_token_ids=eos_ids(c),
    )
