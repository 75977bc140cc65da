"""Qwen3-Next (gated DeltaNet linear attention + gated full attention + MoE with a shared expert)
against transformers: the kernels, the spec, and whole models with layers resident, streamed from
RAM and disk, the recurrent state in RAM beside disk KV, experts one by one through two cache
slots, chunked prefill, left-padded batches; the planner's count of the recurrent state; the
batch engine and speculation refused for the family, never giving other tokens."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import make_hf_model, tiny_config
from ollm import LLM, SamplingParams
from ollm.errors import RequestError
from ollm.kv.recurrent import RecurrentState
from ollm.layers import deltanet
from ollm.models.decoder import layer_weight_names
from ollm.models.registry import build_spec, supported_model_types
from test_moe import hf_greedy, hf_logprobs

PROMPT = [(7 * i + 3) % 256 for i in range(40)]  # longer than the conv kernel (4)
GREEDY = SamplingParams(max_new_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF model, its directory, cache dir, reference greedy tokens, reference log-probs)."""
    d = tmp_path_factory.mktemp("qwen3-next")
    model = make_hf_model("qwen3_next", d / "hf")
    tokens = hf_greedy(model, PROMPT, 8)
    return model, d / "hf", d / "c", tokens, hf_logprobs(model, PROMPT + tokens)


def _check(llm: LLM, tiny, score: bool = True) -> None:
    """Greedy tokens equal transformers'; log-probs of the whole sequence within 1e-4."""
    _, _, _, tokens, ref = tiny
    assert llm.generate(PROMPT, GREEDY).token_ids == tokens
    if score:
        got = llm.score(PROMPT + tokens).cpu()
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_spec_follows_the_config():
    """Layer kinds from ``layer_types``, HF's sparse-layer rule, partial rotary (a quarter of
    each head rotates), zero-centred norms, and per layer the tensors its kind needs."""
    cfg = tiny_config("qwen3_next")
    spec = build_spec(cfg)
    assert "qwen3_next" in supported_model_types()
    assert [layer.linear for layer in spec.layers] == [True, True, True, False]
    assert spec.moe.sparse_layers == {0, 2, 3} and spec.moe.shared_expert_size == 32
    assert len(spec.layers[3].rope.inv_freq) == 16 // 4 // 2
    assert spec.norm_unit_offset and spec.qk_norm and spec.attn_output_gate
    linear, full, dense = (set(layer_weight_names(spec, set(), i)) for i in (0, 3, 1))
    assert "linear_attn.conv1d.weight" in linear and "self_attn.q_proj.weight" not in linear
    assert "self_attn.q_norm.weight" in full and "linear_attn.A_log" not in full
    assert "mlp.shared_expert_gate.weight" in linear and "mlp.gate_proj.weight" in dense


def _rule_inputs(t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, h, dk, dv = 2, 4, 16, 8
    q, k = torch.randn(b, t, h, dk, generator=g), torch.randn(b, t, h, dk, generator=g)
    v = torch.randn(b, t, h, dv, generator=g)
    decay = -torch.rand(b, t, h, generator=g) * 2
    beta = torch.rand(b, t, h, generator=g)
    state = torch.randn(b, h, dk, dv, generator=g)
    return q, k, v, decay, beta, state


@pytest.mark.parametrize("t", [1, 5, 64, 150])
def test_delta_rule_kernels_match_transformers(t):
    """Both forms of the gated delta rule equal transformers' torch fallbacks, from zeros and from
    a given state, and agree with each other (the chunked form over several 64-token chunks)."""
    from transformers.models.qwen3_next import modeling_qwen3_next as ref

    q, k, v, decay, beta, state = _rule_inputs(t)
    kw = dict(output_final_state=True, use_qk_l2norm_in_kernel=True)
    for init in (None, state):
        want, want_s = ref.torch_chunk_gated_delta_rule(
            q, k, v, g=decay, beta=beta, initial_state=init, **kw
        )
        got, got_s = deltanet.chunk_delta_rule(q, k, v, decay, beta, init)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got_s, want_s, atol=1e-6, rtol=1e-6)
        want, want_s = ref.torch_recurrent_gated_delta_rule(
            q, k, v, g=decay, beta=beta, initial_state=init, **kw
        )
        rec, rec_s = deltanet.recurrent_delta_rule(q, k, v, decay, beta, init)
        torch.testing.assert_close(rec, want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(rec_s, want_s, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(rec, got, atol=1e-4, rtol=1e-4)


def test_causal_conv_continues_across_calls():
    """The convolution over a sequence in pieces (its past carried between calls, one token at a
    time included) equals transformers' convolution over the whole sequence."""
    from transformers.models.qwen3_next import modeling_qwen3_next as ref

    torch.manual_seed(0)
    c, kernel, t = 12, 4, 11
    x, w = torch.randn(2, c, t), torch.randn(c, 1, kernel)
    want = ref.causal_conv1d_fn(x, w.squeeze(1), None, activation="silu")
    past = torch.zeros(2, c, kernel - 1)
    pieces = []
    for a, b in ((0, 2), (2, 3), (3, 9), (9, 10), (10, 11)):
        out, past = deltanet.causal_conv(x[..., a:b], past, w)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, -1), want)
    assert torch.equal(past, x[..., -(kernel - 1) :])


def test_resident_and_chunked_prefill_match_transformers(tiny):
    """Every layer resident: the 40-token prompt in one forward, then a 150-token prompt in
    prefill chunks of 32 rows (the state carried from chunk to chunk; the rule's own 64-token
    chunks straddle them): tokens equal transformers', log-probs within 1e-4."""
    model, path, cache, *_ = tiny
    with LLM(path, device="cpu", cache_dir=cache, progress=False) as llm:
        assert llm.spec.family == "qwen3_next"
        _check(llm, tiny)
    prompt = [(5 * i + 1) % 256 for i in range(150)]
    with LLM(path, device="cpu", cache_dir=cache, progress=False, prefill_chunk=32) as llm:
        assert llm.plan.prefill_chunk_tokens == 32
        res = llm.generate(prompt, GREEDY)
        assert res.token_ids == hf_greedy(model, prompt, 8)
        seq = prompt + res.token_ids
        torch.testing.assert_close(llm.score(seq), hf_logprobs(model, seq), atol=1e-4, rtol=1e-4)


def test_layers_streamed_from_ram_and_disk(tiny):
    """A RAM budget of three layers: some layers resident in RAM, the rest read from disk each
    pass (whole MoE layers); then every attention layer's KV on disk, the linear layers' state
    in RAM beside it. Same tokens and log-probs as transformers."""
    _, path, cache, *_ = tiny
    kw = dict(device="cpu", cache_dir=cache, progress=False, moe_offload="layer", prefill_chunk=16)
    with LLM(path, **kw) as probe:
        r, layer = probe.plan.reserved, probe.plan.layer_bytes
        budget = r["globals"] + r["kv cache"] + r["activations"] + 3 * layer
    with LLM(path, cpu_memory=budget, **kw) as llm:
        tiers = [p.tier for p in llm.plan.layers]
        assert "cpu" in tiers and "disk" in tiers, tiers
        _check(llm, tiny)
    with LLM(path, kv_cache="disk", **kw) as llm:
        assert all(p.kv_tier == "disk" for p in llm.plan.layers)
        kv, disk = llm._engine._new_kv(1, 64, None)
        try:
            states = [c for c in kv if isinstance(c, RecurrentState)]
            assert len(states) == 3 and all(s.ssm.device.type == "cpu" for s in states)
            assert type(kv[3]).__name__ == "OffloadedKVCache"
        finally:
            llm._engine._release(kv, disk)
        _check(llm, tiny)


def test_experts_one_by_one_through_two_slots(tiny):
    """Experts placed one by one: every expert on disk read through a cache of two slots (the
    shared expert stays with the dense part); same tokens and log-probs; experts read from disk."""
    _, path, cache, *_ = tiny
    kw = dict(device="cpu", cache_dir=cache, progress=False, offload="disk")
    with LLM(path, moe_offload="expert", expert_slots=2, **kw) as llm:
        e = llm.plan.experts
        assert e.cache_slots == 2 and e.tier_counts()["disk"] == e.total == 3 * 8
        _check(llm, tiny)
        assert llm.stats.expert_misses > 0 and llm.stats.bytes_disk > 0


def test_experts_in_ram_and_on_disk_and_a_stand_in_accelerator(tiny):
    """The CPU under a RAM budget: half the experts in RAM (computed in place), the rest on disk
    through two slots; then a stand-in accelerator ("cpu:1", as in tests/test_moe_experts.py)
    whose layers, recurrent states and expert slots are on it, RAM misses computed by the CPU.
    Same tokens as transformers, log-probs within 1e-4."""
    from ollm.planning.experts import plan_experts
    from ollm.planning.placement import plan_placement
    from ollm.storage.experts import StoreExperts
    from test_moe_experts import _stand_in

    _, path, cache, *_ = tiny
    kw = dict(device="cpu", cache_dir=cache, progress=False, prefill_chunk=32)
    kw["moe_offload"] = "expert"
    with LLM(path, cpu_memory=400 << 20, **kw) as probe:
        rest = probe.plan.peak_device_bytes - probe.plan.reserved["experts"]
        assert probe.plan.experts.resident
        st = StoreExperts(probe.store)
    slot = st.expert_bytes
    n_exp = len(st.regions) * st.num_experts(next(iter(st.regions)))
    with LLM(path, cpu_memory=rest + 2 * slot + n_exp // 2 * slot, **kw) as llm:
        t = llm.plan.experts.tier_counts()
        assert t["cpu"] and t["disk"] and llm.plan.experts.cache_slots == 2
        _check(llm, tiny)
        spec, store, work = llm.spec, llm.store, llm.workload

        def dense(s, gpu, cpu):
            return plan_placement(spec, s, "cuda:0", gpu, cpu, "auto", work, 4, hybrid="off")

        plan = plan_experts(spec, store, StoreExperts(store), "cuda:0", None, n_exp // 2 * slot,
                            "auto", work, 4, slots=2, cpu_compute="on", plan_dense=dense)  # fmt: skip
        _stand_in(llm, llm.store_path, plan)
        kv, disk = llm._engine._new_kv(1, 64, None)
        states = [c for c in kv if isinstance(c, RecurrentState)]
        assert states and all(str(c.ssm.device) == "cpu" for c in states)  # "cpu:1" is the CPU
        llm._engine._release(kv, disk)
        before = llm.stats.expert_cpu
        _check(llm, tiny)
        assert llm.stats.expert_cpu > before


def test_mtp_head_tensors_are_left_out(tiny, tmp_path):
    """Released Qwen3-Next checkpoints carry a multi-token-prediction head (``mtp.*``, with its
    own ``layers.0`` and ``norm``) that transformers does not load: conversion leaves it out
    rather than letting it overwrite layer 0 or the final norm (same tokens as transformers)."""
    import shutil

    from safetensors.torch import load_file, save_file

    _, path, _, tokens, _ = tiny
    hf = tmp_path / "hf"
    shutil.copytree(path, hf)
    tensors = load_file(str(hf / "model.safetensors"))
    for name in [n for n in tensors if n.startswith("model.layers.0.") or n == "model.norm.weight"]:
        tensors["mtp." + name.removeprefix("model.")] = torch.randn_like(tensors[name])
    tensors["mtp.fc.weight"] = torch.randn(64, 128)
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with LLM(hf, device="cpu", cache_dir=tmp_path / "c", progress=False) as llm:
        assert not any(n.startswith("mtp") for f in llm.store.files.values() for n in f.tensors)
        assert llm.generate(PROMPT, GREEDY).token_ids == tokens


def test_padded_batch_and_refused_batch_engine(tiny, caplog):
    """Several prompts run as one left-padded batch (padding rows zeroed before the linear
    layers, so their state stays zero): each equals transformers alone. The batch engine and
    speculation are refused for the family with one reason, and a speculative request still
    gives the greedy tokens (without drafts)."""
    from ollm.engine.kvpools import batch_supported, batch_unsupported

    model, path, cache, tokens, _ = tiny
    prompts = [[(3 * i + 2 + n) % 256 for i in range(n)] for n in (40, 17, 29)]
    with LLM(path, device="cpu", max_batch=3, cache_dir=cache, progress=False) as llm:
        assert not batch_supported(llm.runner)
        assert "recurrent state" in batch_unsupported(llm.runner)
        batch = llm.generate(prompts, GREEDY)
        for p, r in zip(prompts, batch, strict=True):
            assert r.token_ids == hf_greedy(model, p, 8)
        with caplog.at_level(logging.WARNING, logger="ollm"):
            spec = SamplingParams(max_new_tokens=8, temperature=0, speculate="lookup")
            assert llm.generate(PROMPT, spec).token_ids == tokens
        assert "speculative decoding is off" in caplog.text and "recurrent state" in caplog.text
        with pytest.raises(RequestError, match="recurrent state"):
            llm.submit(PROMPT, GREEDY)


def test_state_cannot_roll_back():
    """A recurrent state refuses to forget tokens (what a rejected draft would need)."""
    spec = build_spec(tiny_config("qwen3_next"))
    s = RecurrentState(2, spec.linear_attn, torch.float32, "cpu")
    s.store(s.conv + 1, s.ssm + 1, 5)
    s.trim(5)
    with pytest.raises(RuntimeError, match="cannot roll back"):
        s.trim(4)
    assert s.nbytes == spec.linear_attn.state_bytes(2, 4) and len(s) == 5


def test_planner_counts_the_recurrent_state(tiny):
    """The plan's KV reservation is the full-attention layers' KV at the planned context plus the
    linear layers' fixed state, and equals what ``Runner.new_kv`` allocates for that workload."""
    _, path, cache, *_ = tiny
    with LLM(path, device="cpu", cache_dir=cache, progress=False, max_context=96) as llm:
        w, spec = llm.workload, llm.spec
        per_token = spec.kv_bytes_per_token(4)
        assert per_token == 2 * 1 * spec.num_kv_heads * spec.head_dim * 4  # one full layer
        state = spec.state_bytes(w.batch, 4)
        assert state == 3 * spec.linear_attn.state_bytes(w.batch, 4) > 0
        assert llm.plan.reserved["kv cache"] == w.batch * w.context * per_token + state
        kv = llm.runner.new_kv(w.batch, w.context)
        assert sum(c.nbytes for c in kv) == llm.plan.reserved["kv cache"]


def test_real_config_parameter_counts():
    """Qwen3-Next-80B-A3B's shapes (transformers' defaults are its config): 80B parameters,
    3B activated besides the embeddings (its model card's round figures)."""
    import transformers as tf

    spec = build_spec(tf.Qwen3NextConfig())
    embed = 2 * spec.vocab_size * spec.hidden_size
    n = spec.num_layers
    lin, linear_layers = spec.linear_attn, spec.num_layers - spec.kv_layers
    assert (lin.num_k_heads, lin.num_v_heads, lin.k_dim, lin.conv_kernel) == (16, 32, 128, 4)
    assert linear_layers == 36 and spec.moe.num_experts == 512 and spec.moe.top_k == 10
    assert n * spec.layer_param_count() + embed == pytest.approx(80e9, rel=0.01)
    assert n * spec.layer_param_count(active=True) == pytest.approx(3e9, rel=0.1)


def test_synthetic_preset_has_the_real_shapes(tmp_path):
    """``ollm bench --synthetic qwen3-next-80b-a3b``: the shape fields equal transformers'
    Qwen3NextConfig defaults (the 80B-A3B shapes), every tensor the store writes has the shape
    HF's module holds (the routed experts per expert), and a shrunken store runs end to end."""
    import transformers as tf

    from ollm.models.registry import STORE_FAMILIES
    from ollm.storage.synthetic import PRESETS, SyntheticSource, make_synthetic_store

    cls_name, fields = PRESETS["qwen3-next-80b-a3b"]
    default = tf.Qwen3NextConfig()
    shape_fields = [k for k in fields if k not in ("intermediate_size", "max_position_embeddings",
                                                   "rope_parameters", "layer_types")]  # fmt: skip
    for k in shape_fields:
        assert getattr(default, k) == fields[k], k
    assert default.layer_types[:4] == fields["layer_types"]
    small = dict(hidden_size=64, num_hidden_layers=4, num_experts=12, vocab_size=128)
    source = SyntheticSource("qwen3-next-80b-a3b", families=STORE_FAMILIES, **small)
    with torch.device("meta"):
        hf = tf.AutoModelForCausalLM.from_config(source.config)
    want = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    for name in source.names():
        if ".experts." in name:  # HF fuses them: [E, 2I, H] and [E, H, I]
            e = int(name.split(".experts.")[1].split(".")[0])
            prefix = name.split(".experts.")[0]
            fused = want[f"{prefix}.experts.{'down_proj' if 'down' in name else 'gate_up_proj'}"]
            rows = fused[1] // (1 if "down" in name else 2)
            assert source.shape(name) == (rows, fused[2]) and e < fused[0], name
        else:
            assert source.shape(name) == want[name], name
    store = make_synthetic_store(
        "qwen3-next-80b-a3b", tmp_path / "s", progress=False, families=STORE_FAMILIES, **small
    )
    with LLM(store, device="cpu", dtype="float32", progress=False) as llm:
        res = llm.generate([1, 2, 3, 4, 5, 6], SamplingParams(max_new_tokens=4, temperature=0))
        assert len(res.token_ids) == 4 and llm.spec.linear_attn.num_v_heads == 32


@pytest.mark.parametrize(
    ("dtype", "batch", "shape"),
    [
        (torch.float32, 1, (512, 4, 8, 64)),
        (torch.bfloat16, 2, (512, 4, 8, 64)),
        (torch.float32, 1, (2048, 16, 32, 128)),  # Qwen3-Next-80B's linear layers
    ],
)
def test_linear_layer_temporaries_within_the_plan(dtype, batch, shape):
    """A chunked prefill through a real linear-attention block (two chunks of 128 rows, the
    state carried, left padding with two sequences) allocates no more than the planner's chunk
    temporaries and MLP rows, which count the delta rule's float32 temporaries
    (``linear_temp_bytes``)."""
    import transformers as tf

    from ollm.layers.attention import AttentionMask
    from ollm.models.decoder import decoder_block, required_layer_tensors
    from ollm.planning.accounting import activation_parts
    from ollm.planning.placement import Workload
    from ollm.storage.synthetic import SyntheticSource
    from test_budget import LiveBytes

    h, nk, nv, d = shape
    cfg = tf.Qwen3NextConfig(
        hidden_size=h, intermediate_size=2 * h, num_hidden_layers=1, num_experts=0,
        layer_types=["linear_attention"], linear_num_key_heads=nk, linear_num_value_heads=nv,
        linear_key_head_dim=d, linear_value_head_dim=d, vocab_size=64, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64,
    )  # fmt: skip
    spec = build_spec(cfg)
    src = SyntheticSource.__new__(SyntheticSource)
    src.spec = spec
    w = {
        n: (torch.randn(src.shape(f"model.layers.0.{n}")) * 0.05).to(dtype)
        for n in required_layer_tensors(spec, 0)
    }
    chunk, t = 128, 256
    x = torch.randn(batch, t, h, dtype=dtype)
    keep = torch.ones(batch, t, dtype=torch.bool)
    keep[0, :100] = False  # the first sequence left-padded
    state = RecurrentState(batch, spec.linear_attn, dtype, "cpu")
    with LiveBytes() as live:
        for c0 in range(0, t, chunk):
            m = AttentionMask(c0, chunk, c0 + chunk, keep if batch > 1 else None)
            out = decoder_block(spec, x[:, c0 : c0 + chunk], w, state, None, None, m, None, 64)
            x[:, c0 : c0 + chunk] = out
            del out
    e = torch.finfo(dtype).bits // 8
    parts = activation_parts(spec, Workload(batch, t, t), e, 64, chunk, on_gpu=True)
    planned = parts["chunk temporaries"] + parts["mlp"]  # no attention kernel, no masks
    assert live.peak <= planned, (live.peak, parts)
    assert live.peak >= planned // 2  # the model is an estimate, not a blanket


def test_cost_model_layer_and_floors_know_linear_layers():
    """The calibration's decoder layer runs for the family (q_proj doubled for the output gate);
    the benchmark floors read a linear layer's fixed state instead of per-token KV, and count
    the delta rule's FLOPs per token instead of attention over the context."""
    from types import SimpleNamespace

    from ollm.bench.floors import _attention_flops, _kv_bytes
    from ollm.engine.calibrate import _layer_workload

    spec = build_spec(tiny_config("qwen3_next"))
    step, nbytes = _layer_workload(spec, 64, torch.float32)
    step()
    assert nbytes > 0
    store = SimpleNamespace(dtype=torch.bfloat16)
    state = spec.linear_attn.state_bytes(1, 2)
    assert _kv_bytes(spec, store, [0], 10) == _kv_bytes(spec, store, [0], 10_000) == state
    assert _kv_bytes(spec, store, [3], 1000) == 2 * spec.num_kv_heads * spec.head_dim * 2 * 1000
    short, long = _attention_flops(spec, 1, 100, False), _attention_flops(spec, 1, 10_000, False)
    assert long - short == 4 * spec.num_heads * spec.head_dim * 9900  # the one full layer


def test_lossy_kv_options_are_refused(tiny):
    """KV codecs (and eviction, attention routing) act on KV, not on a recurrent state: a request
    is refused with one line naming them, and routing calibration refuses the family."""
    from ollm.engine.routing_calibration import calibrate
    from ollm.errors import OllmError, UnsupportedModelError

    _, path, cache, *_ = tiny
    kw = dict(device="cpu", cache_dir=cache, progress=False)
    with LLM(path, kv_codec="int8", **kw) as llm:
        with pytest.raises(UnsupportedModelError, match="KV codecs, KV eviction and attention"):
            llm.generate(PROMPT, GREEDY)
    with LLM(path, **kw) as llm:
        with pytest.raises(OllmError, match="routing does not apply"):
            calibrate(llm, tokens=64, window=8, sinks=4, ids=PROMPT * 2)


def test_serve_refuses_the_family_with_the_reason(tiny):
    """``ollm serve`` runs on the batch engine: refused up front, naming the recurrent state."""
    pytest.importorskip("uvicorn")
    from ollm.cli.common import CliError
    from ollm.cli.serve import _run

    _, path, cache, *_ = tiny
    with LLM(path, device="cpu", cache_dir=cache, progress=False) as llm:
        with pytest.raises(CliError, match="batch engine, and qwen3_next's linear-attention"):
            _run(llm, None, None, 0.0)  # type: ignore[arg-type]


def test_linear_layer_in_bfloat16_follows_transformers(tmp_path):
    """One bf16 linear-attention mixer against transformers' module with its cache: a 70-token
    prompt (two rule chunks), a 5-token continuation (chunked from a state) and 3 decode
    tokens (recurrent form) agree to bf16 rounding; the state stays float32."""
    from transformers import DynamicCache

    from ollm.layers.attention import AttentionMask
    from ollm.models.qwen3_next import linear_attention

    model = make_hf_model("qwen3_next", tmp_path, dtype=torch.bfloat16)
    spec = build_spec(model.config)
    mod = model.model.layers[0].linear_attn
    w = {f"linear_attn.{k}": v for k, v in mod.state_dict().items()}
    cache = DynamicCache(config=model.config)
    state = RecurrentState(1, spec.linear_attn, torch.bfloat16, "cpu")
    torch.manual_seed(0)
    start = 0
    for t in (70, 5, 1, 1, 1):
        x = torch.randn(1, t, spec.hidden_size, dtype=torch.bfloat16)
        with torch.no_grad():
            want = mod(x, cache_params=cache)
        got = linear_attention(spec, x, w, state, AttentionMask(start, t, start + t))
        start += t
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        assert state.length == start and state.ssm.dtype == torch.float32
    torch.testing.assert_close(state.ssm, cache.layers[0].recurrent_states[0], atol=1e-2, rtol=1e-2)


def test_prefill_chunk_sized_for_the_linear_layers():
    """On an 8 GiB GPU budget at 32k context the 80B's prefill chunk keeps the linear layers'
    temporaries (about 8x an attention row's) within the eighth of the budget the chunk gets."""
    import transformers as tf

    from ollm.planning.accounting import linear_temp_bytes
    from ollm.planning.placement import Workload
    from ollm.planning.sizing import prefill_chunk

    spec = build_spec(tf.Qwen3NextConfig())
    work, budget = Workload(1, 32768, 32768), 8 << 30
    chunk = prefill_chunk(spec, work, 2, budget)
    assert 0 < chunk < 8192
    assert (
        linear_temp_bytes(spec, 1, chunk, 2)
        <= budget // 8
        < linear_temp_bytes(spec, 1, 2 * chunk, 2)
    )
