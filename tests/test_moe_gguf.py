"""GGUF mixture of experts (issue 19): a qwen3moe GGUF, as llama.cpp's converter writes it,
converts to a layer store whose experts are cached one by one (tests/test_moe_experts.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_hf_model
from ollm import LLM, SamplingParams
from test_moe import hf_greedy

PROMPT = [(7 * i + 3) % 256 for i in range(40)]


def _qwen3moe_gguf(model, path: Path) -> None:
    """``model`` (transformers Qwen3-MoE, fused experts) written as llama.cpp's converter does:
    architecture qwen3moe, F32 tensors, ``ffn_{gate,up,down}_exps`` [E, ...] and the router."""
    gguf = pytest.importorskip("gguf")
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3MOE, cfg.num_hidden_layers)
    i_exp = cfg.moe_intermediate_size
    for name, t in model.state_dict().items():
        data = t.float().numpy().copy()
        if name.endswith("mlp.experts.gate_up_proj"):
            blk = f"blk.{name.split('.')[2]}"
            w.add_tensor(f"{blk}.ffn_gate_exps.weight", data[:, :i_exp].copy())
            w.add_tensor(f"{blk}.ffn_up_exps.weight", data[:, i_exp:].copy())
        elif name.endswith("mlp.experts.down_proj"):
            w.add_tensor(f"blk.{name.split('.')[2]}.ffn_down_exps.weight", data)
        else:
            base, suffix = name.rsplit(".", 1)
            w.add_tensor(f"{names.get_name(base)}.{suffix}", data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_qwen3moe_gguf_experts_map_and_run(tmp_path):
    """A qwen3moe GGUF (``blk.N.ffn_{gate,up,down}_exps``, ``ffn_gate_inp``): tensors equal the
    model's and transformers' own GGUF loader's (gate and up fused, gate first); the config has
    the experts' width; converted, its experts cached one by one give transformers' tokens."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from ollm.models.registry import STORE_FAMILIES
    from ollm.storage.convert import convert
    from ollm.storage.gguf import GGUFSource

    model = make_hf_model("qwen3_moe", tmp_path / "hf", mlp_only_layers=[])
    path = tmp_path / "tiny-qwen3moe.gguf"
    _qwen3moe_gguf(model, path)
    want = model.state_dict()
    with GGUFSource(path) as src:
        assert src.model_type == "qwen3_moe" and set(src.names()) == set(want)
        for name in src.names():
            assert src.shape(name) == tuple(want[name].shape), name
            assert torch.equal(src.get(name), want[name]), name
        config = src.hf_config()
        assert config.moe_intermediate_size == model.config.moe_intermediate_size
        assert config.norm_topk_prob and config.num_experts == model.config.num_experts
        with torch.device("meta"):
            from transformers import AutoModelForCausalLM

            meta = AutoModelForCausalLM.from_config(config)
        ref = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=meta)["tensors"]
        for name in src.names():
            assert torch.equal(src.get(name), ref[name]), name
        src.save_tokenizer = lambda out: None  # token ids only: the test GGUF has no vocabulary
        store = convert(src, tmp_path / "store", progress=False, families=STORE_FAMILIES)
    kw = dict(device="cpu", progress=False, moe_offload="expert", expert_slots=2)
    with LLM(store, **kw) as llm:
        assert llm.plan.experts.cache_slots == 2
        res = llm.generate(PROMPT, SamplingParams(max_new_tokens=8, temperature=0))
        assert res.token_ids == hf_greedy(model, PROMPT, 8)
