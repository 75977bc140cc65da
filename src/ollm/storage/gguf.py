"""A GGUF file seen as Hugging Face-named float32 tensors, read one tensor at a time.

Follows transformers' own GGUF loader (``transformers.modeling_gguf_pytorch_utils``):
llama-arch q/k weights are un-permuted (llama.cpp permutes them for its rotary layout) and
Gemma RMSNorm weights, stored by llama.cpp as ``w + 1``, get the 1 subtracted again.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ollm.errors import CorruptStoreError, ModelNotFoundError, UnsupportedModelError
from ollm.storage.gguf_reader import GGUFMetadata, write_config_gguf
from ollm.storage.progress import heartbeat

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# GGUF general.architecture -> HF model_type.
SUPPORTED_ARCHS = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3_text",
    "qwen3moe": "qwen3_moe",
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # the router of a mixture of experts
}
# Experts of a layer, [E, ...] each: gate and up together are transformers' fused gate_up_proj
# [E, 2I, H] (gate rows first), as its own GGUF loader builds it; down is down_proj [E, H, I].
_EXPERT_NAMES = {
    "ffn_gate_exps": ("mlp.experts.gate_up_proj", 0),
    "ffn_up_exps": ("mlp.experts.gate_up_proj", 1),
    "ffn_down_exps": ("mlp.experts.down_proj", None),
}
# Gemma 2/3 have four norms per layer; llama.cpp's ffn_norm is their pre-feedforward norm.
_GEMMA_LAYER_NAMES = {
    **_LAYER_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def gguf_to_hf_name(arch: str, gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor, or None for tensors HF models do not have (rope_freqs...)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or not parts[1].isdigit():
        return None
    _, layer, kind, suffix = parts
    if kind in _EXPERT_NAMES and suffix == "weight":
        return f"model.layers.{layer}.{_EXPERT_NAMES[kind][0]}"
    table = _GEMMA_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
    if kind not in table or suffix not in ("weight", "bias"):
        return None
    return f"model.layers.{layer}.{table[kind]}.{suffix}"


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``LlamaModel.permute`` of a q/k weight or bias (rows grouped by head)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (HF rotate-half layout -> GGUF interleaved layout)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, dim, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise UnsupportedModelError(
            "reading GGUF files needs the 'gguf' package: pip install 'ollm[gguf]'"
        ) from exc
    return gguf


class GGUFSource:
    """A GGUF file seen as HF-named tensors (the TensorSource protocol of ollm.weights)."""

    def __init__(self, path: str | Path, progress: bool = False) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {self.path}")
        self._gguf = _import_gguf()
        self.progress = progress
        try:
            # Our reader, not gguf.GGUFReader: same fields and tensor views, but it parses
            # Gemma's 262k-token vocabulary in 0.3 s instead of 25-40 s.
            reader = GGUFMetadata(self.path)
        except (ValueError, IndexError, KeyError, OverflowError, TypeError, struct.error) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CorruptStoreError(f"{self.path}: truncated or corrupt GGUF file ({msg})") from exc
        self._reader = reader
        self.arch = str(self._field("general.architecture", ""))
        if self.arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"{self.path.name}: GGUF architecture {self.arch!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHS)})"
            )
        self.model_type = SUPPORTED_ARCHS[self.arch]
        # transformers treats a llama GGUF as mistral only when general.name is exactly "mistral".
        if self.arch == "llama" and self._field("general.name", "") == "mistral":
            self.model_type = "mistral"
        self.n_head = int(self._field(f"{self.arch}.attention.head_count", 0))
        self.n_head_kv = int(self._field(f"{self.arch}.attention.head_count_kv", self.n_head))
        if self.arch == "llama" and self.n_head <= 0:
            raise CorruptStoreError(f"{self.path}: GGUF metadata lacks llama.attention.head_count")
        self._tensors = {}
        self._halves: dict[str, list] = {}  # fused gate_up_proj: its gate and up GGUF tensors
        for t in reader.tensors:
            hf = gguf_to_hf_name(self.arch, t.name)
            if hf is None:
                continue
            kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
            half = _EXPERT_NAMES.get(kind, (None, None))[1]
            if half is not None:
                self._halves.setdefault(hf, [None, None])[half] = t
            self._tensors[hf] = t
        self._config: PretrainedConfig | None = None

    def _field(self, key: str, default: Any) -> Any:
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def hf_config(self) -> PretrainedConfig:
        """The HF config transformers derives from the GGUF metadata (cached)."""
        if self._config is None:
            from transformers import AutoConfig

            # transformers parses the file element by element; a copy of the metadata without
            # the vocabulary arrays gives it the same config in a fraction of the time.
            with (
                heartbeat(f"reading the model config of {self.path.name}", self.progress),
                tempfile.TemporaryDirectory(prefix="ollm-gguf-config-") as tmp,
            ):
                light = Path(tmp) / self.path.name
                if not write_config_gguf(self._reader, self.arch, light):
                    light = self.path
                config = AutoConfig.from_pretrained(str(light.parent), gguf_file=light.name)
            config._name_or_path = str(self.path.parent)  # not the deleted temp directory
            # transformers does not map qwen3's key_length to head_dim; the tensors need it.
            key_length = self._field(f"{self.arch}.attention.key_length", None)
            heads = config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            if key_length is not None and head_dim != int(key_length):
                config.head_dim = int(key_length)
            # nor qwen3moe's expert width (it keeps Qwen3MoeConfig's default of 768)
            expert_ff = self._field(f"{self.arch}.expert_feed_forward_length", None)
            if expert_ff is not None and hasattr(config, "moe_intermediate_size"):
                config.moe_intermediate_size = int(expert_ff)
            self._config = config
        return self._config

    def save_tokenizer(self, out_dir: str | Path) -> None:
        """Write the tokenizer to ``out_dir``: our SentencePiece-BPE rebuild for "llama"-model
        vocabularies (transformers' GGUF rebuild loses the merges), transformers' otherwise."""
        model = self._reader.fields.get("tokenizer.ggml.model")
        with heartbeat(f"building the tokenizer of {self.path.name}", self.progress):
            if model is not None and model.contents() == "llama":
                from ollm.storage.gguf_tokenizer import build_tokenizer

                tok = build_tokenizer(self._reader.fields, self.arch)
            else:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
            tok.save_pretrained(str(out_dir))

    def names(self) -> list[str]:
        """HF names of the tensors in the file (no lm_head when embeddings are tied)."""
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` in HF layout, without reading its data."""
        shape = tuple(int(d) for d in reversed(self._tensors[name].shape))
        if name in self._halves:  # gate and up stacked along the rows of each expert
            return (shape[0], 2 * shape[1], *shape[2:])
        return shape

    def get(self, name: str) -> torch.Tensor:
        """Dequantize one tensor to float32 in HF layout ([out, in] for linear weights)."""
        if self._reader is None:
            raise ValueError(f"{self.path}: GGUFSource is closed")
        t = self._tensors.get(name)
        if t is None:
            raise KeyError(f"{self.path.name}: no tensor {name!r}")
        if name in self._halves:
            gate, up = self._halves[name]
            if gate is None or up is None:
                raise CorruptStoreError(f"{self.path}: {name} lacks its gate or up experts")
            return torch.cat([self._read(gate), self._read(up)], dim=1)
        return self._read(t)

    def _read(self, t) -> torch.Tensor:
        """One GGUF tensor dequantized to float32 in HF layout."""
        shape = tuple(reversed(t.shape))
        try:
            w = self._gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        except (ValueError, IndexError) as exc:
            raise CorruptStoreError(f"{self.path}: cannot read tensor {t.name} ({exc})") from exc
        if w.dtype != np.float32:
            w = w.astype(np.float32)
        elif np.may_share_memory(w, self._reader.data):
            w = w.copy()  # never hand out views of the memory map
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if self.arch == "llama" and kind in ("attn_q", "attn_k"):
            w = unpermute_qk(w, self.n_head if kind == "attn_q" else self.n_head_kv)
        if self.arch == "gemma3" and t.name.endswith("norm.weight"):
            w = w - 1
        return torch.from_numpy(np.ascontiguousarray(w))

    def close(self) -> None:
        """Drop the memory map; tensors already returned stay valid (they are copies)."""
        self._tensors = {}
        self._reader = None

    def __enter__(self) -> GGUFSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
