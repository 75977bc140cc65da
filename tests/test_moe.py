"""Mixture-of-experts families (Qwen3-MoE, Mixtral, gpt-oss) against transformers: which layers
are sparse, routing, the expert MLP in its weight layouts and in row chunks, attention sinks, and
whole models with layers resident, split between RAM and disk, streamed from disk and (on a GPU)
from pinned RAM. Greedy tokens and log-probs of the tiny configs (resident and streamed from
disk) are also checked by tests/test_equivalence.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_hf_model, tiny_config
from ollm import LLM, SamplingParams
from ollm.layers.moe import moe_mlp, route
from ollm.models.decoder import layer_weight_names
from ollm.models.registry import STORE_FAMILIES, build_spec

MOE_FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss"]
PROMPT = [5, 17, 99, 3, 42, 7, 250, 11]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def hf_logprobs(model, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([seq], device=model.device)).logits[0, :-1].float().cpu()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]


def layer_weights(path: Path, i: int) -> dict[str, torch.Tensor]:
    """Layer ``i``'s tensors of a saved HF checkpoint, by their names relative to the layer."""
    prefix = f"model.layers.{i}."
    tensors = load_file(str(path / "model.safetensors"))
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def check_model(llm: LLM, model, prompt: list[int], new: int = 16) -> None:
    """Greedy tokens equal transformers'; log-probs of the whole sequence within 1e-4."""
    res = llm.generate(prompt, SamplingParams(max_new_tokens=new, temperature=0))
    assert res.token_ids == hf_greedy(model, prompt, new)
    seq = prompt + res.token_ids
    torch.testing.assert_close(llm.score(seq).cpu(), hf_logprobs(model, seq), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"decoder_sparse_step": 2, "mlp_only_layers": [3]},
        {"decoder_sparse_step": 3, "mlp_only_layers": []},
    ],
)
def test_qwen3_moe_sparse_layers_follow_transformers(overrides):
    """``decoder_sparse_step`` and ``mlp_only_layers`` pick the same dense layers as HF's model,
    and the converter's check asks for the experts only on the sparse layers."""
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = tiny_config("qwen3_moe")
    cfg.num_hidden_layers = 6
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = AutoModelForCausalLM.from_config(cfg)
    hf_sparse = {
        i
        for i, layer in enumerate(model.model.layers)
        if isinstance(layer.mlp, Qwen3MoeSparseMoeBlock)
    }
    spec = build_spec(cfg)
    assert spec.moe is not None and set(spec.moe.sparse_layers) == hf_sparse
    assert 0 < len(hf_sparse) < 6
    for i in range(6):
        missing = layer_weight_names(spec, set(), i)
        assert ("mlp.gate.weight" in missing) == (i in hf_sparse)
        assert ("mlp.gate_proj.weight" in missing) == (i not in hf_sparse)


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routing_and_experts_match_transformers(family, dtype, tmp_path):
    """Router weights and indices equal HF's router module; the MoE MLP over 64 rows equals HF's
    sparse block, whole and in row chunks (the same up to GEMM rounding by row count). Inputs
    are scaled so that gpt-oss's SwiGLU clamp at 7 is reached."""
    model = make_hf_model(family, tmp_path, dtype=dtype)
    spec = build_spec(model.config)
    w = {k: v.to(dtype) for k, v in layer_weights(tmp_path, 0).items()}
    block = model.model.layers[0].mlp
    router = block.router if family == "gpt_oss" else block.gate
    torch.manual_seed(1)
    x = torch.randn(1, 64, spec.hidden_size, dtype=dtype) * (4 if family == "gpt_oss" else 1)
    with torch.no_grad():
        _, ref_w, ref_i = router(x.view(-1, spec.hidden_size))
        ref = block(x)
        ref = ref[0] if isinstance(ref, tuple) else ref  # gpt-oss also returns router scores
    ours_w, ours_i = route(x.view(-1, spec.hidden_size), w, spec.moe)
    assert torch.equal(ours_i, ref_i)
    assert ours_w.dtype == ref_w.dtype and torch.equal(ours_w, ref_w)
    assert len(set(ours_i.flatten().tolist())) == spec.moe.num_experts  # every expert gets rows
    tol = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    whole = moe_mlp(x, w, spec.moe, spec.act)
    torch.testing.assert_close(whole, ref, **tol)
    chunked = moe_mlp(x, w, spec.moe, spec.act, chunk_tokens=10)
    torch.testing.assert_close(chunked, whole, **(tol or {"atol": 1e-4, "rtol": 1e-4}))


def test_fused_expert_layout(tmp_path):
    """transformers v5 modules hold Qwen3-MoE's experts fused (``mlp.experts.gate_up_proj``
    [E, 2I, H], ``down_proj`` [E, H, I]); that layout gives the same output as per-expert names."""
    model = make_hf_model("qwen3_moe", tmp_path)
    spec = build_spec(model.config)
    per_expert = layer_weights(tmp_path, 0)
    fused = {
        k.removeprefix("model.layers.0."): v
        for k, v in model.state_dict().items()
        if k.startswith("model.layers.0.")
    }
    assert (
        fused["mlp.experts.gate_up_proj"].dim() == 3
        and "mlp.experts.0.up_proj.weight" in per_expert
    )
    assert not layer_weight_names(spec, set(fused), 0)
    x = torch.randn(2, 9, spec.hidden_size)
    torch.testing.assert_close(
        moe_mlp(x, fused, spec.moe, spec.act), moe_mlp(x, per_expert, spec.moe, spec.act)
    )


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_random_router_uses_several_experts(family, hf_models):
    """Over a prompt and its greedy continuation, every sparse layer of the tiny model sends
    tokens to most of its experts (else the equivalence tests would exercise one or two)."""
    model, _ = hf_models(family)
    seq = PROMPT + hf_greedy(model, PROMPT, 24)
    with torch.no_grad():
        out = model(torch.tensor([seq]), output_router_logits=True)
    spec = build_spec(model.config)
    assert len(out.router_logits) == len(spec.moe.sparse_layers)
    for logits in out.router_logits:
        used = set(torch.topk(logits, spec.moe.top_k, dim=-1).indices.flatten().tolist())
        assert len(used) >= max(3, spec.moe.num_experts * 3 // 4), used


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_layers_split_between_ram_and_disk(family, hf_models, tmp_path):
    """A ``cpu_memory`` budget of three layers: one resident, two ring buffers: the rest are read from disk each
    pass, whole MoE layers at a time; a 150-token prompt in chunks of 64 rows."""
    model, path = hf_models(family)
    kw = dict(device="cpu", prefill_chunk=64, cache_dir=tmp_path, progress=False)
    kw["moe_offload"] = "layer"  # whole layers (experts one by one: tests/test_moe_experts.py)
    with LLM(path, **kw) as probe:
        r, layer = probe.plan.reserved, probe.plan.layer_bytes
        budget = r["globals"] + r["kv cache"] + r["activations"] + 3 * layer
    with LLM(path, cpu_memory=budget, **kw) as llm:
        tiers = [p.tier for p in llm.plan.layers]
        assert "cpu" in tiers and "disk" in tiers, tiers
        check_model(llm, model, [(7 * i + 3) % 256 for i in range(150)], new=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_gpu_streams_moe_layers_from_ram_and_disk(family, hf_models, tmp_path):
    """On a GPU under a budget of a few layers, MoE layers stream from pinned RAM
    (``offload="cpu"``) and from disk, and the output still equals transformers'."""
    model, path = hf_models(family)
    model = model.to("cuda")
    try:
        kw = dict(device="cuda", dtype="float32", hybrid="off", cache_dir=tmp_path, progress=False)
        kw["moe_offload"] = "layer"  # whole layers stream (experts one by one: scripts/gpu/moe.py)
        with LLM(path, **kw) as probe:
            r, layer = probe.plan.reserved, probe.plan.layer_bytes
            budget = r["globals"] + r["kv cache"] + r["activations"] + 3 * layer
        for offload, tier in (("cpu", "cpu"), ("disk", "disk")):
            with LLM(path, offload=offload, gpu_memory=budget, **kw) as llm:
                tiers = [p.tier for p in llm.plan.layers]
                assert tier in tiers and "gpu" not in tiers[-1:], tiers
                check_model(llm, model, PROMPT)
    finally:
        model.to("cpu")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_padded_batch_matches_transformers(family, tmp_path):
    """Three left-padded prompts in one batch (padding rows are routed too, and must not touch
    the real rows): each equals transformers alone. Mixtral with a sliding window of 12."""
    extra = {"sliding_window": 12} if family == "mixtral" else {}
    model = make_hf_model(family, tmp_path / "hf", **extra)
    prompts = [[(3 * i + 2 + n) % 256 for i in range(n)] for n in (40, 17, 29)]
    kw = dict(device="cpu", max_batch=3, cache_dir=tmp_path / "c", progress=False)
    with LLM(tmp_path / "hf", **kw) as llm:
        if extra:
            assert {layer.window for layer in llm.spec.layers} == {12}
        batch = llm.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0))
        for p, r in zip(prompts, batch, strict=True):
            assert r.token_ids == hf_greedy(model, p, 10)


@pytest.mark.parametrize(
    ("family", "fields", "total", "active"),
    [
        (  # Qwen3-30B-A3B's config.json: 30.5B parameters, 3.3B activated (its model card)
            "qwen3_moe",
            dict(
                vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
            ),
            30.5e9,
            3.3e9,
        ),
        (  # Mixtral-8x7B's config.json: 46.7B parameters, 12.9B used per token (Mistral's post)
            "mixtral",
            dict(
                vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                num_experts_per_tok=2,
            ),
            46.7e9,
            12.9e9,
        ),
    ],
)  # fmt: skip
def test_real_configs_parameter_counts(family, fields, total, active):
    """The spec of a real MoE config counts the published parameters: all experts (what the
    layer store holds and streams) and the ``top_k`` a token runs (what its FLOPs are)."""
    import transformers as tf

    cls = {"qwen3_moe": tf.Qwen3MoeConfig, "mixtral": tf.MixtralConfig}[family]
    spec = build_spec(cls(**fields))
    embed = 2 * spec.vocab_size * spec.hidden_size  # untied embeddings and head
    n = spec.num_layers
    assert spec.moe is not None and len(spec.moe.sparse_layers) == n
    assert n * spec.layer_param_count() + embed == pytest.approx(total, rel=0.01)
    assert n * spec.layer_param_count(active=True) + embed == pytest.approx(active, rel=0.02)


# case -> (query rows, keys, padding, window, cache parts); the kernel attend takes on the CPU.
SINK_CASES = {
    "prompt": (40, 40, False, None, 1),  # flash, with its log-sum-exp
    "chunk": (24, 40, False, None, 1),  # two flash calls merged
    "decode": (1, 40, False, None, 1),  # flash
    "decode-grouped": (1, 80, False, None, 1),  # CPU decode kernel: blocked instead
    "window": (24, 40, False, 6, 1),  # blocked
    "padding": (24, 40, True, None, 1),  # blocked
    "decode-parts": (1, 40, False, None, 2),  # a cache split between tiers, merged
}


@pytest.mark.parametrize("case", list(SINK_CASES))
def test_attention_sinks_match_their_definition(case):
    """gpt-oss's sinks: softmax over the keys plus one more logit per head whose value is 0
    (as transformers' eager attention computes it), on every path ``attend`` takes and through
    ``attend_parts`` merging a cache split in two tiers."""
    from dataclasses import replace

    from ollm.layers.attention import AttentionMask, attend, attend_parts

    torch.manual_seed(0)
    t, s, padded, window, parts = SINK_CASES[case]
    b, h, kvh, d = 2, 4, 2, 16
    q = torch.randn(b, h, t, d)
    k, v = torch.randn(b, kvh, s, d), torch.randn(b, kvh, s, d)
    sinks = torch.randn(h) * 2
    keep = torch.ones(b, s, dtype=torch.bool)
    keep[1, :5] = False  # the second sequence left-padded by 5
    mask = AttentionMask(s - t, t, s, keep if padded else None, window, sinks)
    scale = d**-0.5
    scores = torch.einsum("bhtd,bhsd->bhts", q, k.repeat_interleave(h // kvh, 1)) * scale
    scores = scores.masked_fill(~mask.dense(q.device), float("-inf"))
    logits = torch.cat([scores, sinks[None, :, None, None].expand(b, h, t, 1)], -1)
    probs = torch.softmax(logits, -1)[..., :-1]
    ref = probs @ v.repeat_interleave(h // kvh, 1)
    if parts == 2:
        split = [(k[:, :, :16], v[:, :, :16]), (k[:, :, 16:], v[:, :, 16:])]
        ours = attend_parts(q, split, mask, scale)
    else:
        ours = attend(q, k, v, mask, scale)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    plain = attend(q, k, v, replace(mask, sinks=None), scale)
    assert (plain - ref).abs().max() > 1e-2  # the sinks change the output


def test_gpt_oss_rms_norm_rounds_like_transformers():
    """gpt-oss keeps its norms in float32 and rounds ``w * norm(x)`` once: in bfloat16 our
    norm equals HF's bit for bit (with weights a bf16 store holds exactly)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

    from ollm.layers.norms import rms_norm

    torch.manual_seed(0)
    ref_norm = GptOssRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ref_norm.weight.copy_((1 + 0.3 * torch.randn(64)).bfloat16().float())
    x = torch.randn(3, 7, 64).bfloat16()
    with torch.no_grad():
        ref = ref_norm(x)
    ours = rms_norm(x, ref_norm.weight.detach().bfloat16(), 1e-5, False, float_weight=True)
    assert ours.dtype == ref.dtype == torch.bfloat16 and torch.equal(ours, ref)


def test_converter_checks_each_layer_for_its_own_mlp(tmp_path):
    """A Qwen3-MoE checkpoint missing one expert's tensor of a sparse layer is refused at
    conversion, naming it; the dense layer (``mlp_only_layers``) needs no experts, and its
    store file is smaller than a sparse layer's."""
    from safetensors.torch import save_file

    from ollm.errors import CorruptStoreError
    from ollm.storage.convert import convert
    from ollm.storage.store import LayerStore

    make_hf_model("qwen3_moe", tmp_path / "hf")
    store = LayerStore(
        convert(tmp_path / "hf", tmp_path / "store", progress=False, families=STORE_FAMILIES)
    )
    assert store.layer_nbytes(1) < store.layer_nbytes(0)  # layer 1 is dense
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CorruptStoreError, match=r"layer 2 lacks mlp\.experts\.5\.up_proj\.weight"):
        convert(tmp_path / "hf", tmp_path / "store2", progress=False, families=STORE_FAMILIES)


SHAPED = {  # small configs with the width ratios of Mixtral-8x7B, Qwen3-30B-A3B and gpt-oss-20B
    "mixtral": dict(hidden_size=256, intermediate_size=896, num_local_experts=8),
    "qwen3_moe": dict(
        hidden_size=256, intermediate_size=768, moe_intermediate_size=96, num_experts=32,
        num_experts_per_tok=8, norm_topk_prob=True,
    ),
    "gpt_oss": dict(
        hidden_size=288, intermediate_size=288, num_local_experts=8, num_experts_per_tok=4,
        head_dim=32, sliding_window=16,
    ),
}  # fmt: skip


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_temporaries_within_the_planned_mlp_reserve(family, dtype, tmp_path):
    """The planner reserves the dense MLP's intermediates for ``mlp_chunk_tokens`` rows; the
    MoE runs ``mlp_chunk_tokens // top_k`` rows at a time, and its live temporaries (router,
    gathered rows, each expert's intermediates, the top-k slots) stay within that reserve."""
    import transformers as tf

    from ollm.planning.accounting import activation_parts
    from ollm.planning.placement import Workload
    from test_budget import LiveBytes

    cls = {"qwen3_moe": tf.Qwen3MoeConfig, "mixtral": tf.MixtralConfig, "gpt_oss": tf.GptOssConfig}
    cfg = cls[family](
        **SHAPED[family], num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, initializer_range=0.05,
    )  # fmt: skip
    tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype).save_pretrained(tmp_path)
    spec = build_spec(cfg)
    w = layer_weights(tmp_path, 0)
    rows, mlp_chunk = 512, 128
    x = torch.randn(1, rows, spec.hidden_size, dtype=dtype)
    with LiveBytes() as live:
        out = moe_mlp(x, w, spec.moe, spec.act, mlp_chunk)
    e = torch.finfo(dtype).bits // 8
    planned = activation_parts(spec, Workload(1, rows, rows), e, mlp_chunk, rows, True)["mlp"]
    assert live.peak - out.nbytes <= planned, (live.peak - out.nbytes, planned)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_cost_model_times_a_layer_of_every_moe_family(family):
    """The cost model times one decoder layer of the spec with weights of its own (hybrid
    decode's CPU rate): that layer must run for MoE specs too (gpt-oss needs its sinks)."""
    from ollm.engine.calibrate import _layer_workload

    step, nbytes = _layer_workload(build_spec(tiny_config(family)), 64, torch.float32)
    step()
    assert nbytes > 0
