"""ModelSpec: everything the runner needs to know about an architecture, as plain frozen data."""

from __future__ import annotations

from dataclasses import dataclass

from ollm.layers.deltanet import LinearAttnSpec
from ollm.layers.moe import MoeSpec
from ollm.layers.rope import RopeSpec


@dataclass(frozen=True)
class LayerSpec:
    """Per-layer attention shape: the rotary table and the sliding window (None = full attention)."""

    rope: RopeSpec
    window: int | None = None
    linear: bool = False  # gated DeltaNet linear attention: a recurrent state instead of KV


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
    attn_output_gate: bool = (
        False  # q_proj doubled: sigmoid gate on the attention output (Qwen3-Next)
    )
    linear_attn: LinearAttnSpec | None = None  # shapes of the ``LayerSpec.linear`` layers

    @property
    def kv_layers(self) -> int:
        """Layers holding KV (the linear-attention ones hold a fixed-size state instead)."""
        return sum(1 for layer in self.layers if not layer.linear)

    def state_bytes(self, batch: int, dtype_bytes: int) -> int:
        """Recurrent state of every linear-attention layer for ``batch`` sequences (fixed size,
        whatever the context; 0 without such layers)."""
        if self.linear_attn is None:
            return 0
        n = self.num_layers - self.kv_layers
        return n * self.linear_attn.state_bytes(batch, dtype_bytes)

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
        q_heads = self.num_heads * (3 if self.attn_output_gate else 2)
        attn = h * d * (q_heads + 2 * self.num_kv_heads)
        if self.linear_attn is not None:
            attn = max(attn, self.linear_attn.param_count(h))
        dense = 3 * h * self.intermediate_size
        if self.moe is None or not self.moe.sparse_layers:
            return attn + dense
        experts = self.moe.top_k if active else self.moe.num_experts
        sparse = experts * self.moe.expert_param_count(h) + 3 * h * self.moe.shared_expert_size
        all_sparse = len(self.moe.sparse_layers) == self.num_layers
        return attn + (sparse if all_sparse else max(sparse, dense))

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV cache bytes per token over all layers (keys and values, per KV head, never
        repeated); linear-attention layers hold none (``state_bytes``: theirs, per sequence)."""
        return 2 * self.kv_layers * self.num_kv_heads * self.head_dim * dtype_bytes
