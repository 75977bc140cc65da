"""Gated MLP (SwiGLU / GeGLU), optionally in row chunks so intermediate activations fit a budget."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def gated_mlp(
    x: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    act: str,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """down(act(gate(x)) * up(x)); rows of ``x`` [B, T, H] processed ``chunk_tokens`` at a time."""
    fn = ACTIVATIONS[act]
    tokens = x.shape[0] * x.shape[1]
    if chunk_tokens is None or tokens <= chunk_tokens:
        return F.linear(fn(F.linear(x, gate)) * F.linear(x, up), down)
    flat = x.reshape(tokens, x.shape[-1])
    out = torch.empty(tokens, down.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, tokens, chunk_tokens):
        rows = flat[start : start + chunk_tokens]
        out[start : start + chunk_tokens] = F.linear(
            fn(F.linear(rows, gate)) * F.linear(rows, up), down
        )
    return out.view(*x.shape[:-1], down.shape[0])
