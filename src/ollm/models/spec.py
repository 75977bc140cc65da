"""ModelSpec: everything the runner needs to know about an architecture, as plain frozen data."""

from __future__ import annotations

from dataclasses import dataclass

from ollm.layers.moe import MoeSpec
from ollm.layers.rope import RopeSpec


@dataclass(frozen=True)
class LayerSpec:
    """Per-layer attention shape: the rotary table and the sliding window (None = full attention)."""

    rope: RopeSpec
    window: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer described as data; built from an HF config by a family module."""

    family: str  # HF model_type this spec was built from
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP width (Mixtral: one expert's, it has no dense layers)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    layers: tuple[LayerSpec, ...]
    act: str = "silu"  # key of ollm.layers.mlp.ACTIVATIONS
    attn_scale: float | None = None  # softmax scale; None = head_dim ** -0.5
    norm_unit_offset: bool = False  # Gemma's (1 + w) RMSNorm
    norm_float_weight: bool = False  # (w * norm(x)) in float32, then rounded (gpt-oss)
    qk_norm: bool = False  # RMSNorm on each query/key head (Qwen3, Gemma 3)
    sandwich_norm: bool = False  # extra norms after attention and MLP (Gemma 2/3)
    embed_scale: float | None = None  # multiply embeddings (Gemma: sqrt(hidden_size))
    tie_word_embeddings: bool = False
    final_logit_softcap: float | None = None
    eos_token_ids: tuple[int, ...] = ()
    attn_sinks: bool = False  # a learned logit per head joins every softmax (gpt-oss)
    moe: MoeSpec | None = None  # mixture-of-experts MLP on ``moe.sparse_layers``; None = dense

    def is_sparse(self, layer: int) -> bool:
        """Whether layer ``layer``'s MLP is the mixture of experts."""
        return self.moe is not None and layer in self.moe.sparse_layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    def layer_param_count(self, active: bool = False) -> int:
        """Parameters of the largest decoder layer (weights only; biases, norms and routers are
        negligible). MoE: every expert, or with ``active`` the ``top_k`` a token runs (FLOPs)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        dense = 3 * h * self.intermediate_size
        if self.moe is None or not self.moe.sparse_layers:
            return attn + dense
        experts = self.moe.top_k if active else self.moe.num_experts
        sparse = experts * self.moe.expert_param_count(h)
        all_sparse = len(self.moe.sparse_layers) == self.num_layers
        return attn + (sparse if all_sparse else max(sparse, dense))

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV cache bytes per token over all layers (keys and values, per KV head, never repeated)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes
