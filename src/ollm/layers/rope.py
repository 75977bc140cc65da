"""Rotary position embeddings: inverse frequencies per layer type, cos/sin tables, rotation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ollm.errors import UnsupportedModelError

# Rope types whose frequencies do not depend on the running sequence length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


@dataclass(frozen=True)
class RopeSpec:
    """Inverse frequencies (float32, length head_dim/2) and the cos/sin post-scaling factor."""

    inv_freq: tuple[float, ...]
    attention_scaling: float = 1.0

    @classmethod
    def from_hf(cls, config: object, layer_type: str | None = None) -> RopeSpec:
        """Build from a transformers (v5) config; ``layer_type`` selects per-type parameters (Gemma 3)."""
        params = getattr(config, "rope_parameters", None) or {}
        if layer_type is not None and layer_type in params:
            params = params[layer_type]
        else:
            layer_type = None
        rope_type = params.get("rope_type", params.get("type", "default"))
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads  # type: ignore[attr-defined]
        )
        if rope_type == "default":
            base = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
            # Partial rotary (Qwen3-Next: 0.25): only the first dims of each head rotate.
            dim = int(head_dim * float(params.get("partial_rotary_factor", 1.0)))
            exps = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
            inv = 1.0 / (base**exps)
            return cls(tuple(inv.tolist()), 1.0)
        if rope_type not in STATIC_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {rope_type!r} is not supported (supported: {', '.join(STATIC_ROPE_TYPES)})"
            )
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        kwargs = {"layer_type": layer_type} if layer_type is not None else {}
        inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, **kwargs)
        return cls(tuple(inv.float().tolist()), float(scaling))


# (inverse frequencies, device) -> them as a float32 tensor there: made once, not per step (a
# tensor built from a list on a GPU is a blocking copy, a host sync each decode step)
_INV: dict[tuple[tuple[float, ...], torch.device], torch.Tensor] = {}


def _inv_freq(spec: RopeSpec, device: torch.device) -> torch.Tensor:
    key = (spec.inv_freq, device)
    inv = _INV.get(key)
    if inv is None:
        inv = _INV[key] = torch.tensor(spec.inv_freq, dtype=torch.float32, device=device)
    return inv


def rope_cos_sin(
    spec: RopeSpec, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [B, T, head_dim] for integer ``positions`` [B, T], computed in float32."""
    inv = _inv_freq(spec, positions.device)
    freqs = positions.float()[..., None] * inv  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * spec.attention_scaling
    sin = emb.sin() * spec.attention_scaling
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, heads, T, D] by the half-split convention used by HF checkpoints; with
    tables narrower than D (partial rotary) only the first dims rotate, the rest pass through."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rot], cos[:, 0], sin[:, 0]), x[..., rot:]), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` [B, T, D] with its first half negated: the table ``apply_rope_signed`` takes."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope_signed(x: torch.Tensor, cos: torch.Tensor, ssin: torch.Tensor) -> torch.Tensor:
    """``apply_rope`` (full rotary: tables as wide as ``x``'s heads) with ``ssin =
    signed_sin(sin)``: ``x * cos + roll(x, D / 2) * ssin``, the rotation's sign moved from the
    rotated ``x`` onto the table (exact: ``(-a) * b == a * (-b)``), so the same bits in four
    kernels instead of five."""
    return x * cos.unsqueeze(1) + x.roll(x.shape[-1] // 2, -1) * ssin.unsqueeze(1)
