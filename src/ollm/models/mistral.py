"""Mistral: Llama blocks plus an optional sliding window on every layer (``sliding_window``)."""

from __future__ import annotations

from dataclasses import replace

from ollm.models import llama
from ollm.models.common import layer_specs
from ollm.models.spec import ModelSpec


def build_spec(config: object) -> ModelSpec:
    spec = llama.build_spec(config)
    window = getattr(config, "sliding_window", None)
    return replace(spec, layers=layer_specs(config, default_window=window))
