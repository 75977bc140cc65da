"""Qwen2 / Qwen2.5: Llama blocks with q/k/v biases; sliding window only on layers its
``layer_types`` mark (``use_sliding_window`` with ``max_window_layers``)."""

from __future__ import annotations

from ollm.models import llama
from ollm.models.spec import ModelSpec


def build_spec(config: object) -> ModelSpec:
    # Biases are found by name in the weights (self_attn.{q,k,v}_proj.bias), so the block is Llama's.
    return llama.build_spec(config)
