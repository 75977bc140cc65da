"""Shared fixtures: tiny random-weight models of every family, saved as HF directories."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.2,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
    tie_word_embeddings=False,
)


def tiny_config(family: str):
    """A small transformers config of ``family`` exercising its special features."""
    import transformers as tf

    if family == "llama":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return tf.LlamaConfig(**TINY, rope_parameters=rope)
    if family == "mistral":
        return tf.MistralConfig(**TINY, sliding_window=12)
    if family == "qwen2":
        return tf.Qwen2Config(**TINY)
    if family == "qwen3":
        return tf.Qwen3Config(**{**TINY, "tie_word_embeddings": True}, head_dim=32)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(
            **{**TINY, "tie_word_embeddings": True, "num_hidden_layers": 6},
            head_dim=16,
            sliding_window=10,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention"] * 2
            + ["full_attention"]
            + ["sliding_attention"] * 2
            + ["full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
            },
        )
    if family == "qwen3_moe":  # layer 1 dense (mlp_only_layers), the others 8 experts, top-2
        return tf.Qwen3MoeConfig(
            **TINY,
            head_dim=32,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            norm_topk_prob=True,
            mlp_only_layers=[1],
        )
    if family == "mixtral":  # 4 experts, top-2, on every layer
        return tf.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2)
    if family == "gpt_oss":  # sliding (12) / full layers alternating, YaRN past 64 positions
        rope = {
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 8.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 64,
        }
        return tf.GptOssConfig(
            **TINY,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=12,
            rope_parameters=rope,
        )
    if (
        family == "qwen3_next"
    ):  # linear / full attention 3:1, 8 experts top-2 + shared, layer 1 dense
        return tf.Qwen3NextConfig(
            **TINY,
            head_dim=16,
            partial_rotary_factor=0.25,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=8,
            linear_conv_kernel_dim=4,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=32,
            norm_topk_prob=True,
            mlp_only_layers=[1],
        )
    raise ValueError(family)


FAMILIES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma3_text",
    "qwen3_moe",
    "mixtral",
    "gpt_oss",
]


def make_hf_model(family: str, path, dtype=torch.float32, seed: int = 0, **overrides):
    """Random-weight HF model of ``family`` saved (safetensors) under ``path``; returns the model.
    ``overrides`` set config fields (e.g. ``max_position_embeddings``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    with torch.no_grad():  # make norm weights non-trivial so their conventions are tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif family == "gpt_oss" and "bias" in name:  # HF initialises biases to zero
                p.normal_(0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    return model


def char_tokenizer(chat_template: str | None = None):
    """A 256-entry character-level tokenizer (no BOS/EOS) matching the tiny configs' vocab."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    extra = [chr(i) for i in range(0xA1, 0x250) if chr(i).isprintable()]
    vocab_list = ["<unk>", *chars]
    vocab_list += extra[: 256 - len(vocab_list)]
    tok = Tokenizer(
        models.BPE(vocab={c: i for i, c in enumerate(vocab_list)}, merges=[], unk_token="<unk>")
    )
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", clean_up_tokenization_spaces=False
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """family -> (HF model, saved directory), built once per test session."""
    cache = {}

    def get(family: str):
        if family not in cache:
            d = tmp_path_factory.mktemp(f"hf-{family}")
            cache[family] = (make_hf_model(family, d), d)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """(ModelSpec, LayerStore) of the tiny random Llama, converted once per test session."""
    from ollm.models.registry import STORE_FAMILIES, build_spec
    from ollm.storage.convert import convert
    from ollm.storage.store import LayerStore

    d = tmp_path_factory.mktemp("tiny-store")
    make_hf_model("llama", d / "hf")
    s = LayerStore(convert(d / "hf", d / "store", progress=False, families=STORE_FAMILIES))
    return build_spec(s.hf_config()), s


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (HF model, HF dir, LLM on the CPU with every layer resident), made once per
    test module (the MoE tests' models: tests/test_moe_experts.py, tests/test_moe_direct.py)."""
    from ollm import LLM

    made = {}

    def get(family: str):
        if family not in made:
            d = tmp_path_factory.mktemp(f"experts-{family}")
            model = make_hf_model(family, d / "hf")
            llm = LLM(d / "hf", device="cpu", cache_dir=d / "c", progress=False)
            made[family] = (model, d / "hf", llm)
        return made[family]

    yield get
    for _, _, llm in made.values():
        llm.close()


def disk_kv_budget(model=None, extra_kv_layers: float = 1.0, **llm_kwargs) -> int:
    """A ``cpu_memory`` for ``LLM(model, kv_cache="disk", **llm_kwargs)`` on the CPU that holds
    the weights' minimum, the prefill scratch and ``extra_kv_layers`` layers' worth of KV: the
    rest of the KV must go to disk (planned first without a budget, where all of it does)."""
    from ollm import LLM
    from ollm.planning.batch_step import pool_layer_bytes

    args = () if model is None else (model,)
    with LLM(*args, device="cpu", kv_cache="disk", **llm_kwargs) as probe:
        assert all(p.kv_tier == "disk" for p in probe.plan.layers)
        plan, r = probe.plan, probe.plan.reserved
        scratch = r["kv cache"]  # every layer's KV on disk: only the prefill scratch here
        elem = torch.finfo(probe.runner.dtype).bits // 8
        # one layer's KV: its paged pool (the scratch is a layer at batch 1 in a batch plan)
        kv_layer = max(pool_layer_bytes(probe.spec, plan.kv_pools, plan.kv_page_tokens, elem))
        minimum = r["globals"] + r["activations"] + 2 * plan.layer_bytes + scratch
    return minimum + int(extra_kv_layers * kv_layer)


def load_script(rel: str):
    """A module of the repo's ``scripts/`` folder (not a package), by its path there."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "scripts" / rel
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def streaming_engine_plan(spec, store, work):
    """A batch-engine plan for ``work`` on "cuda:0" (float32, 32-token chunks) whose budget
    holds its reservations and two layers, so the rest stream through the ring; fixed fast
    rates, no CPU-computed layers (run it elsewhere with ``plan_on_device``)."""
    from ollm.planning.costmodel import MachineRates
    from ollm.planning.placement import plan_placement

    kw = dict(chunk_tokens=32, batch_engine=True)
    fixed = plan_placement(spec, store, "cuda:0", None, None, "cpu", work, 4, **kw)
    budget = sum(fixed.reserved.values()) - fixed.reserved["resident layers"]
    budget += 2 * store.max_layer_nbytes
    fast = MachineRates(5e5, 5e5, 1e9, 1e9, 2, 1e12, 1e10, 1e12, cpu_attn=1e9)
    plan = plan_placement(spec, store, "cuda:0", budget, None, "cpu", work, 4, fast, "off", **kw)
    # A family whose budgeted activations come out smaller than the unbudgeted plan's (qwen3)
    # would hold every layer: trim the budget by half layers until all but one stream.
    while len(plan.streamed) < spec.num_layers - 1:
        budget -= store.max_layer_nbytes // 2
        plan = plan_placement(spec, store, "cuda:0", budget, None, "cpu", work, 4, fast, "off",
                              **kw)  # fmt: skip
    return plan


def plan_on_device(plan, device: str):
    """``plan`` (made for an accelerator) with its accelerator played by ``device`` (CPU
    layers stay on "cpu"): runs a GPU plan's split on a CPU-only machine."""
    from dataclasses import replace

    def swap(d):
        return device if d == plan.device else d

    layers = tuple(replace(p, exec_device=swap(p.exec_device)) for p in plan.layers)
    return replace(plan, device=device, layers=layers, embed_device=swap(plan.embed_device),
                   head_device=swap(plan.head_device))  # fmt: skip


def llama8b_with_rates(run: str):
    """(spec, sizes-only store, MachineRates) of Llama-3.1-8B shapes (``scripts/plan_report``)
    with the rates recorded in the device run ``docs/runs/<run>`` (its JSON's "rates")."""
    import json
    from dataclasses import fields
    from pathlib import Path

    from ollm.planning.costmodel import MachineRates

    raw = json.loads((Path(__file__).parent.parent / "docs" / "runs" / run).read_text())["rates"]
    rates = MachineRates(**{f.name: raw[f.name] for f in fields(MachineRates) if f.name in raw})
    return (*load_script("plan_report.py").llama8b(), rates)
