"""Gated DeltaNet linear attention (Qwen3-Next): kernels, no state of their own.

A linear-attention layer keeps, per sequence, a recurrent state instead of KV: the last
``kernel - 1`` inputs of its causal depthwise convolution over (q, k, v), and a matrix
S [v_heads, k_dim, v_dim] updated per token by the gated delta rule

    S <- exp(g_t) * S;   S <- S + k_t (beta_t * (v_t - S^T k_t))^T;   o_t = S^T q_t

(q, k l2-normalised, q scaled by k_dim ** -0.5). Prefill computes it in chunks of 64 tokens (a
triangular solve per chunk, a scan over chunks), decode one token at a time, both in float32,
as transformers' torch fallbacks do (``modeling_qwen3_next.py``), whose operation order is kept
so that the results agree to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CHUNK = 64  # tokens per chunk of the chunked form (transformers' and FLA's default)


@dataclass(frozen=True)
class LinearAttnSpec:
    """Shapes of a gated DeltaNet layer (HF ``linear_*`` config fields)."""

    num_k_heads: int  # heads of queries and keys
    num_v_heads: int  # heads of values (and of the state); a multiple of num_k_heads
    k_dim: int  # per-head query/key width
    v_dim: int  # per-head value width
    conv_kernel: int  # width of the causal convolution over q, k, v

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.v_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the convolution: q, k and v concatenated."""
        return 2 * self.key_dim + self.value_dim

    def state_bytes(self, batch: int, dtype_bytes: int) -> int:
        """Bytes of one layer's recurrent state for ``batch`` sequences: the delta-rule matrix
        (float32) and the convolution's last ``conv_kernel - 1`` inputs (activations' dtype)."""
        ssm = self.num_v_heads * self.k_dim * self.v_dim * 4
        conv = self.conv_dim * (self.conv_kernel - 1) * dtype_bytes
        return batch * (ssm + conv)

    def param_count(self, hidden_size: int) -> int:
        """Weights of the layer's projections (in_proj_qkvz, in_proj_ba, conv, out_proj)."""
        qkvz = 2 * self.key_dim + 2 * self.value_dim
        return hidden_size * (qkvz + 2 * self.num_v_heads + self.value_dim) + (
            self.conv_dim * self.conv_kernel
        )


def causal_conv(
    x: torch.Tensor, past: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution with SiLU of ``x`` [B, C, T] continuing ``past`` [B, C, K-1]
    (the previous inputs, zeros at the start); returns (output [B, C, T], the new past).
    ``weight`` is HF's ``conv1d.weight`` [C, 1, K]; computed in the weight's dtype."""
    full = torch.cat([past.to(x.dtype), x], dim=-1)
    out = F.conv1d(full.to(weight.dtype), weight, None, groups=x.shape[1])
    new_past = full[..., full.shape[-1] - past.shape[-1] :]
    return F.silu(out).to(x.dtype), new_past


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _prepare(q, k, v, beta, g):
    """[B, T, heads, d] inputs -> float32 [B, heads, T, d], q and k l2-normalised, q scaled."""
    q, k, v, beta, g = (
        t.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        for t in (q, k, v, beta, g)
    )
    q, k = l2norm(q), l2norm(k)
    return q * q.shape[-1] ** -0.5, k, v, beta, g


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over T tokens in chunks: q, k [B, T, H, dk], v [B, T, H, dv], g (log
    decay) and beta [B, T, H], ``state`` [B, H, dk, dv] float32 or None (zeros). Returns the
    output [B, T, H, dv] in q's dtype and the final state (float32)."""
    dtype, t = q.dtype, q.shape[1]
    q, k, v, beta, g = _prepare(q, k, v, beta, g)
    b, h, _, dk = k.shape
    dv = v.shape[-1]
    pad = (CHUNK - t % CHUNK) % CHUNK
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    n = (t + pad) // CHUNK
    v_beta, k_beta = v * beta.unsqueeze(-1), k * beta.unsqueeze(-1)
    q, k, k_beta, v_beta = (x.reshape(b, h, n, CHUNK, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    cum = g.reshape(b, h, n, CHUNK).cumsum(dim=3)  # log decay from the chunk's start
    upper = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).triu(1)
    pair = (cum.unsqueeze(4) - cum.unsqueeze(3)).masked_fill(upper, float("-inf")).exp()
    system = (k_beta @ k.transpose(-1, -2)) * pair  # unit lower-triangular (UT transform)
    intra = (q @ k.transpose(-1, -2)) * pair
    decayed_k_beta = k_beta * cum.exp().unsqueeze(-1)
    new_v = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    k_cum = torch.linalg.solve_triangular(system, decayed_k_beta, upper=False, unitriangular=True)
    s = torch.zeros(b, h, dk, dv, dtype=new_v.dtype, device=q.device)
    if state is not None:
        s = state.to(new_v)
    out = torch.zeros_like(new_v)
    q = q * cum.exp().unsqueeze(-1)
    k = k * (cum[..., -1:] - cum).exp().unsqueeze(-1)
    chunk_decay = cum[..., -1].exp()[..., None, None]
    for i in range(n):  # the scan: read the state, then write the chunk's correction into it
        v_i = new_v[:, :, i] - k_cum[:, :, i] @ s
        out[:, :, i] = q[:, :, i] @ s + intra[:, :, i] @ v_i
        s = s * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_i
    out = out.reshape(b, h, -1, dv)[:, :, :t]
    return out.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format), s


def recurrent_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule one token at a time (decode); same arguments as ``chunk_delta_rule``."""
    dtype = q.dtype
    q, k, v, beta, g = _prepare(q, k, v, beta, g)
    b, h, t, dk = k.shape
    s = torch.zeros(b, h, dk, v.shape[-1], dtype=v.dtype, device=v.device)
    if state is not None:
        s = state.to(v)
    out = torch.zeros_like(v)
    for i in range(t):
        s = s * g[:, :, i].exp()[..., None, None]
        mem = (s * k[:, :, i].unsqueeze(-1)).sum(dim=-2)
        delta = (v[:, :, i] - mem) * beta[:, :, i].unsqueeze(-1)
        s = s + k[:, :, i].unsqueeze(-1) * delta.unsqueeze(-2)
        out[:, :, i] = (s * q[:, :, i].unsqueeze(-1)).sum(dim=-2)
    return out.transpose(1, 2).contiguous().to(dtype), s


def gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """RMSNorm over the last dim, then ``* silu(gate)`` in float32 (Qwen3-Next's
    ``RMSNormGated``: plain weight, rounded to x's dtype before the gate)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return ((weight * xf.to(x.dtype)) * F.silu(gate.float())).to(x.dtype)
