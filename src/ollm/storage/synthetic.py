"""Random-weight models with the exact shapes of real architectures, for benchmarks: a
TensorSource that makes each tensor on demand (on the GPU when present), so ``convert`` writes
them straight into a layer store without any checkpoint download."""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from ollm.errors import OllmError
from ollm.storage.families import ModelFamilies
from ollm.storage.mxfp4 import BLOCKS, SCALES

# name -> (transformers config class, kwargs): the public configs of these models.
PRESETS: dict[str, tuple[str, dict]] = {
    "llama3-1b": (
        "LlamaConfig",
        dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            rms_norm_eps=1e-5,
            max_position_embeddings=131072,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        ),
    ),
    "llama3-8b": (
        "LlamaConfig",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            rms_norm_eps=1e-5,
            max_position_embeddings=131072,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        ),
    ),
    "qwen3-8b": (
        "Qwen3Config",
        dict(
            vocab_size=151936,
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            rms_norm_eps=1e-6,
            max_position_embeddings=40960,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
    "gemma3-12b": (
        "Gemma3TextConfig",
        dict(
            vocab_size=262208,
            hidden_size=3840,
            intermediate_size=15360,
            num_hidden_layers=48,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            rms_norm_eps=1e-6,
            query_pre_attn_scalar=256,
            sliding_window=1024,
            max_position_embeddings=131072,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
            },
        ),
    ),
}


# Mixture-of-experts presets (issue 19), from the public configs of Qwen3-30B-A3B and gpt-oss-20b.
PRESETS["qwen3-30b-a3b"] = (
    "Qwen3MoeConfig",
    dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
)
PRESETS["gpt-oss-20b"] = (
    "GptOssConfig",
    dict(
        vocab_size=201088,
        hidden_size=2880,
        intermediate_size=2880,
        num_hidden_layers=24,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        num_local_experts=32,
        num_experts_per_tok=4,
        sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * 12,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 4096,
        },
    ),
)
# Qwen3-Next-80B-A3B (its public config.json; the shapes are also transformers' Qwen3NextConfig
# defaults): gated DeltaNet and gated attention layers 3 : 1, 512 experts top-10 + a shared one.
PRESETS["qwen3-next-80b-a3b"] = (
    "Qwen3NextConfig",
    dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=5120,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
        num_hidden_layers=48,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        num_experts=512,
        num_experts_per_tok=10,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        rms_norm_eps=1e-6,
        max_position_embeddings=262144,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "partial_rotary_factor": 0.25,
        },
    ),
)


def preset_config(name: str, **overrides: object):
    """The transformers config of a preset (``num_hidden_layers`` etc. may be overridden)."""
    if name not in PRESETS:
        raise OllmError(f"unknown synthetic model {name!r}; available: {', '.join(PRESETS)}")
    import transformers

    cls_name, kwargs = PRESETS[name]
    kw = {**kwargs, **overrides, "dtype": "bfloat16"}
    pattern = kw.get("layer_types")
    if pattern and "layer_types" not in overrides:  # fewer layers: the same repeating pattern
        kw["layer_types"] = [pattern[i % len(pattern)] for i in range(kw["num_hidden_layers"])]
    return getattr(transformers, cls_name)(**kw)


class SyntheticSource:
    """Random N(0, 0.02) linear weights and unit-ish norms with HF names, made on demand
    (``families``: ``ollm.models.registry.STORE_FAMILIES``, which names a layer's tensors).
    gpt-oss experts are MXFP4 as the released checkpoints' (``W_blocks`` random codes,
    ``W_scales`` 2^-8 .. 2^-6) unless ``mxfp4=False`` (bf16 ``W``)."""

    model_type: str

    def __init__(
        self,
        name: str,
        seed: int = 0,
        *,
        families: ModelFamilies,
        mxfp4: bool | None = None,
        **overrides: object,
    ) -> None:
        self.config = preset_config(name, **overrides)
        self.model_type = self.config.model_type
        self.path = Path(f"synthetic-{name}")
        self.seed = seed
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.families = families
        self.spec = families.spec(self.config)
        gpt_oss = self.spec.moe is not None and self.spec.moe.expert_kind == "gpt_oss"
        self.mxfp4 = gpt_oss if mxfp4 is None else (mxfp4 and gpt_oss)

    def hf_config(self):
        return self.config

    def save_tokenizer(self, out_dir: str | Path) -> None:
        return None  # token ids only

    def names(self) -> list[str]:
        s = self.spec
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not s.tie_word_embeddings:
            names.append("lm_head.weight")
        for i in range(s.num_layers):  # a mixture of experts names its experts per layer
            layer = i if s.moe is not None else None
            names += [f"model.layers.{i}.{n}" for n in self.families.layer_tensors(s, layer, None)]
            m = s.moe
            if m is not None and self._zipf and not m.router_bias and s.is_sparse(i):
                names.append(f"model.layers.{i}.{m.prefix}.{m.router}.bias")
        if self.mxfp4:  # each expert matrix as its codes and scales
            mats = (".experts.gate_up_proj", ".experts.down_proj")
            names = [x for n in names for x in (
                (n + BLOCKS, n + SCALES) if n.endswith(mats) else (n,)
            )]  # fmt: skip
        return names

    @property
    def _zipf(self) -> float:
        """``router_zipf=a`` (a config override, benchmarks only): every router gets a bias of
        -a log(rank) over a random ranking of its experts, so routing is skewed Zipf-like
        (random routers route about uniformly). Qwen3-MoE has no router bias; ollm's router
        adds one when the weights hold it."""
        return float(getattr(self.config, "router_zipf", 0) or 0)

    def _moe_shape(self, name: str) -> tuple[int, ...] | None:
        """Shapes of the router and the experts (None for any other tensor)."""
        s, m = self.spec, self.spec.moe
        h, e, i = s.hidden_size, m.num_experts, m.intermediate_size
        if name.endswith(f".{m.prefix}.{m.router}.weight"):
            return (e, h)
        if name.endswith(f".{m.prefix}.{m.router}.bias"):
            return (e,)
        if ".experts." not in name:
            return None
        short = name.rsplit(".experts.", 1)[1]
        if short.endswith((BLOCKS, SCALES)):  # MXFP4: W [E, cols, rows] as [E, rows, cols/32]
            _, cols, rows = self._moe_shape(name[: -len(BLOCKS)])  # type: ignore[misc]
            return (e, rows, cols // 32, 16) if short.endswith(BLOCKS) else (e, rows, cols // 32)
        if m.expert_kind == "gpt_oss":  # fused [E, ...], gate/up interleaved by column
            fused = {
                "gate_up_proj": (e, h, 2 * i),
                "gate_up_proj_bias": (e, 2 * i),
                "down_proj": (e, i, h),
                "down_proj_bias": (e, h),
            }
            return fused[short]
        proj = short.split(".")[1]
        return (h, i) if proj == m.expert_names[2] else (i, h)

    def _hybrid_shape(self, name: str) -> tuple[int, ...] | None:
        """Shapes of Qwen3-Next's linear-attention tensors and shared expert (None otherwise)."""
        s, lin = self.spec, self.spec.linear_attn
        h = s.hidden_size
        shared = s.moe.shared_expert_size if s.moe is not None else 0
        if shared and ".shared_expert" in name:
            if name.endswith("shared_expert_gate.weight"):
                return (1, h)
            return (h, shared) if "down_proj" in name else (shared, h)
        if lin is None or ".linear_attn." not in name:
            return None
        short = name.rsplit(".linear_attn.", 1)[1]
        return {
            "in_proj_qkvz.weight": (2 * lin.key_dim + 2 * lin.value_dim, h),
            "in_proj_ba.weight": (2 * lin.num_v_heads, h),
            "conv1d.weight": (lin.conv_dim, 1, lin.conv_kernel),
            "dt_bias": (lin.num_v_heads,),
            "A_log": (lin.num_v_heads,),
            "norm.weight": (lin.v_dim,),
            "out_proj.weight": (h, lin.value_dim),
        }[short]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` (HF layout)."""
        s = self.spec
        h, d, i = s.hidden_size, s.head_dim, s.intermediate_size
        hybrid = self._hybrid_shape(name)
        if hybrid is not None:
            return hybrid
        moe = self._moe_shape(name) if s.moe is not None else None
        if moe is not None:
            return moe
        if name.endswith("self_attn.sinks"):
            return (s.num_heads,)
        table = {
            "q_proj": (s.num_heads * d * (2 if s.attn_output_gate else 1), h),
            "k_proj": (s.num_kv_heads * d, h),
            "v_proj": (s.num_kv_heads * d, h),
            "o_proj": (h, s.num_heads * d),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
            "q_norm": (d,),
            "k_norm": (d,),
            "embed_tokens": (s.vocab_size, h),
            "lm_head": (s.vocab_size, h),
        }
        for key, shape in table.items():
            if f"{key}." in name:
                return shape
        return (h,)  # the per-layer and final norms

    def get(self, name: str) -> torch.Tensor:
        # crc32, not hash(): str hashes are salted per process, and the same preset must give
        # byte-identical weights in every process (benchmarks compare stores across runs).
        g = torch.Generator(self.device).manual_seed(zlib.crc32(f"{self.seed}:{name}".encode()))
        shape = self.shape(name)
        m = self.spec.moe
        if name.endswith((BLOCKS, SCALES)):  # MXFP4 codes (any byte) and scales 2^-8 .. 2^-6
            lo, hi = (0, 256) if name.endswith(BLOCKS) else (119, 122)
            kw = dict(generator=g, device=self.device, dtype=torch.uint8)
            return torch.randint(lo, hi, shape, **kw).cpu()  # type: ignore[arg-type]
        if m is not None and self._zipf and name.endswith(f".{m.prefix}.{m.router}.bias"):
            rank = torch.randperm(shape[0], generator=g, device=self.device) + 1
            return (-self._zipf * torch.log(rank.float())).to(torch.bfloat16).cpu()
        t = torch.randn(shape, generator=g, device=self.device, dtype=torch.float32)
        if len(shape) == 1:  # norms; Qwen3-Next's gated norm has a plain weight
            plain = not self.spec.norm_unit_offset or name.endswith("linear_attn.norm.weight")
            t = t * 0.05 + (1.0 if plain else 0.0)
        else:
            t = t * 0.02
        return t.to(torch.bfloat16).cpu()

    def close(self) -> None:
        return None


def make_synthetic_store(
    name: str,
    dst: str | Path,
    progress: bool = True,
    *,
    families: ModelFamilies,
    mxfp4: bool | None = None,
    **overrides: object,
) -> Path:
    """Write a random-weight layer store of preset ``name`` at ``dst`` (bf16; gpt-oss experts
    MXFP4 unless ``mxfp4=False``); returns ``dst``."""
    from ollm.storage.convert import convert

    dst = Path(dst)
    from ollm.storage.store import is_store

    if is_store(dst):
        return dst
    source = SyntheticSource(name, families=families, mxfp4=mxfp4, **overrides)
    return convert(source, dst, dtype=torch.bfloat16, progress=progress, families=families)
