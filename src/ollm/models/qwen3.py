"""Qwen3 (dense): Llama blocks with per-head RMSNorm on queries and keys (``q_norm``, ``k_norm``)
applied before RoPE, no q/k/v biases by default."""

from __future__ import annotations

from dataclasses import replace

from ollm.models import llama
from ollm.models.spec import ModelSpec


def build_spec(config: object) -> ModelSpec:
    return replace(llama.build_spec(config), qk_norm=True)
