"""Helpers shared by the family modules: reading HF config fields the same way for every family."""

from __future__ import annotations

from ollm.layers.rope import RopeSpec
from ollm.models.spec import LayerSpec


def eos_ids(config: object) -> tuple[int, ...]:
    """EOS token ids from an HF config (int, list or None)."""
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return ()
    if isinstance(eos, int):
        return (eos,)
    return tuple(int(e) for e in eos)


def head_dim(config: object) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads  # type: ignore[attr-defined]


def layer_specs(config: object, default_window: int | None = None) -> tuple[LayerSpec, ...]:
    """One LayerSpec per layer from ``layer_types`` (full/sliding); rope per type when the config
    gives per-type rope parameters (Gemma 3), else one shared table."""
    n = config.num_hidden_layers  # type: ignore[attr-defined]
    types = getattr(config, "layer_types", None) or (
        ["sliding_attention" if default_window else "full_attention"] * n
    )
    window = getattr(config, "sliding_window", None) or default_window
    params = getattr(config, "rope_parameters", None) or {}
    per_type = isinstance(params, dict) and any(t in params for t in set(types))
    ropes = {}
    for t in set(types):
        ropes[t] = RopeSpec.from_hf(config, t if per_type else None)
    return tuple(
        LayerSpec(rope=ropes[t], window=window if t == "sliding_attention" else None)
        for t in types[:n]
    )
