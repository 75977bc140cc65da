"""Gemma 3 (text; ``gemma3_text`` and the text part of multimodal ``gemma3``).

Differences from Llama: RMSNorm weights centred on zero (``1 + w``), four norms per block
(``input_layernorm``, ``post_attention_layernorm``, ``pre_feedforward_layernorm``,
``post_feedforward_layernorm``), q/k norms, embeddings scaled by sqrt(hidden_size), GeGLU (tanh)
MLP, softmax scale ``query_pre_attn_scalar ** -0.5``, sliding-window and global layers with their
own rope bases (``rope_parameters[layer_type]``), tied head.
"""

from __future__ import annotations

from ollm.models.common import eos_ids, head_dim, layer_specs
from ollm.models.spec import ModelSpec

_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "silu": "silu"}


def build_spec(config: object) -> ModelSpec:
    c = getattr(config, "text_config", None) or config
    act = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", "gelu_pytorch_tanh")
    return ModelSpec(
        family="gemma3_text",
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads,
        head_dim=head_dim(c),
        norm_eps=c.rms_norm_eps,
        layers=layer_specs(c),
        act=_ACTS.get(act, "gelu_tanh"),
        attn_scale=float(c.query_pre_attn_scalar) ** -0.5,
        norm_unit_offset=True,
        qk_norm=True,
        sandwich_norm=True,
        embed_scale=float(c.hidden_size) ** 0.5,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        final_logit_softcap=getattr(c, "final_logit_softcapping", None),
        eos_token_ids=eos_ids(c) or eos_ids(config),
    )
