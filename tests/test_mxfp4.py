"""MXFP4 checkpoints (gpt-oss's released format) kept as MXFP4 end to end: the store holds each
expert's codes and scales (~3.8x fewer bytes than bf16), RAM and the copies carry them, and they
are dequantized where they are computed, exactly as transformers dequantizes them; a tiny
gpt-oss with MXFP4 experts runs like transformers' model holding the dequantized weights, with
experts resident, streamed as whole layers, in RAM and on disk, and through two cache slots."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_hf_model
from ollm import LLM
from ollm.storage.expert_codec import decode_expert, decode_into, decoded_layout
from ollm.storage.experts import StoreExperts
from ollm.storage.mxfp4 import dequantize_mxfp4, dequantize_rows
from test_moe_experts import _check, _stand_in


def random_mxfp4(e: int, rows: int, cols: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random codes [E, rows, cols / 32, 16] and scales (2^-4 .. 2^1) [E, rows, cols / 32]."""
    blocks = torch.randint(0, 256, (e, rows, cols // 32, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(123, 129, (e, rows, cols // 32), generator=gen, dtype=torch.uint8)
    return blocks, scales


def test_dequantize_matches_transformers():
    """The per-expert loop and the batched rows decode equal transformers' dequantization
    bit for bit, in bf16 and float32 (scales down to 2^-127 included)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    blocks, scales = random_mxfp4(3, 40, 64, gen)
    scales[0, 0, 0], scales[1, 2, 1] = 0, 140
    for dtype in (torch.bfloat16, torch.float32):
        ref = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        ours = dequantize_mxfp4(blocks, scales, dtype)
        assert ours.shape == (3, 64, 40) and torch.equal(ours, ref)
        assert torch.equal(dequantize_rows(blocks, scales, dtype), ref)


def test_pack_unpack_round_trip():
    """Values MXFP4 can hold (transformers' dequantization of random codes) pack and unpack to
    themselves; random normals come back within a quarter of their block's largest value."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from ollm.storage.mxfp4 import quantize_mxfp4

    gen = torch.Generator().manual_seed(3)
    blocks, scales = random_mxfp4(2, 24, 96, gen)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [2, 96, 24]
    b2, s2 = quantize_mxfp4(ref)
    assert b2.shape == blocks.shape and s2.shape == scales.shape and b2.dtype == torch.uint8
    assert torch.equal(dequantize_mxfp4(b2, s2, torch.float32), ref)
    w = torch.randn(2, 96, 24, generator=gen) * 0.02
    back = dequantize_mxfp4(*quantize_mxfp4(w), torch.float32)
    amax = w.transpose(1, 2).reshape(2, 24, 3, 32).abs().amax(-1)  # per block
    bound = amax.repeat_interleave(32, dim=-1).transpose(1, 2) / 4
    assert ((back - w).abs() <= bound).all()


def _mxfp4_hf(hf, seed: int = 1):
    """A tiny gpt-oss saved with MXFP4 experts (``quant_method: mxfp4``); the returned
    transformers model holds the dequantized weights (the reference)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    model = make_hf_model("gpt_oss", hf)
    cfg = model.config
    e, h, inter = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(str(hf / "model.safetensors"))
    for i, layer in enumerate(model.model.layers):
        for proj, rows, cols in (("gate_up_proj", 2 * inter, h), ("down_proj", h, inter)):
            blocks, scales = random_mxfp4(e, rows, cols, gen)
            with torch.no_grad():
                deq = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
                getattr(layer.mlp.experts, proj).copy_(deq)
            name = f"model.layers.{i}.mlp.experts.{proj}"
            del tensors[name]
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((hf / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": []}
    (hf / "config.json").write_text(json.dumps(raw))
    return model


@pytest.fixture(scope="module")
def mxfp4_model(tmp_path_factory):
    """(reference model, HF dir, LLM on the CPU, layers resident) made once."""
    d = tmp_path_factory.mktemp("mxfp4")
    model = _mxfp4_hf(d / "hf")
    llm = LLM(d / "hf", device="cpu", cache_dir=d / "c", progress=False)
    yield model, d / "hf", llm
    llm.close()


def test_store_keeps_each_expert_as_mxfp4(mxfp4_model):
    """Each expert's codes and scales are its own range of the layer file (store version 2),
    its config unquantized; reading an expert alone and decoding it gives transformers'
    dequantized weights, one at a time and through the batched decode into stacked rows."""
    model, hf, llm = mxfp4_model
    store = llm.store
    assert store.meta["version"] == 2 and store.meta["converter"] >= 4
    assert getattr(store.hf_config(), "quantization_config", None) is None
    st = StoreExperts(store)
    assert st.coded and st.decoded_bytes > st.expert_bytes
    assert st.slot_bytes == st.decoded_bytes + st.expert_bytes
    for i, layer in enumerate(model.model.layers):
        ref = layer.mlp.experts
        r = st.regions[i]
        buf = torch.empty(st.range_bytes(i, 0, r.num_experts), dtype=torch.uint8)
        st.read_range(i, 0, r.num_experts, buf)
        views = st.views(i, 0, buf)
        assert views["gate_up_proj_blocks"].dtype == torch.uint8
        assert "gate_up_proj" not in views
        layout, size = decoded_layout(st.tensors[i][0], torch.float32)
        out = torch.zeros(r.num_experts, size, dtype=torch.uint8)
        from ollm.runtime.expert_stacks import stacked_views, uniform_rows

        rows = uniform_rows(buf, r.offsets, r.sizes)
        stacks = stacked_views(out, layout)
        order = list(range(r.num_experts))[::-1]  # rows land where asked
        decode_into(rows, order, st.tensors[i][0], stacks, order, torch.float32, chunk=2)
        for e in range(r.num_experts):
            a = r.offsets[e] - r.offsets[0]
            one = decode_expert(buf[a : a + r.sizes[e]], st.tensors[i][e], torch.float32)
            for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
                want = getattr(ref, name)[e]
                assert torch.equal(one[name], want) and torch.equal(stacks[name][e], want)


def test_mxfp4_checkpoint_runs_like_transformers(mxfp4_model, tmp_path):
    """Whole layers read from the store on every pass (``offload="disk"``): the MXFP4 experts
    are decoded per call; greedy tokens and log-probs equal transformers'."""
    model, hf, base = mxfp4_model
    with LLM(hf, device="cpu", offload="disk", cache_dir=base.config.cache_dir,
             progress=False) as llm:  # fmt: skip
        assert llm.plan.experts is None
        _check(llm, model)


def test_mxfp4_experts_resident_ram_disk_and_two_slots_match_transformers(mxfp4_model):
    """Experts one by one: all resident (decoded at load); the CPU device with part of them in
    RAM (decoded once at load, computed in place) and the rest on disk (MXFP4, read into two
    slots and decoded there); a stand-in
    accelerator whose RAM and disk experts all pass through two slots as MXFP4 bytes (decoded
    in the slot), and the same with RAM misses computed by the CPU. Greedy tokens equal
    transformers', log-probs within 1e-4; the copies move the stored (MXFP4) bytes."""
    from ollm.planning.experts import plan_experts
    from ollm.planning.placement import plan_placement

    model, path, base = mxfp4_model
    kw = dict(device="cpu", cache_dir=base.config.cache_dir, progress=False, prefill_chunk=32)
    kw["moe_offload"] = "expert"
    st = StoreExperts(base.store)
    with LLM(path, cpu_memory=400 << 20, **kw) as probe:
        rest = probe.plan.peak_device_bytes - probe.plan.reserved["experts"]
        assert probe.plan.experts.resident and probe.plan.experts.decoded_bytes
        _check(probe, model)
    n_exp = len(st.regions) * st.num_experts(next(iter(st.regions)))
    # the CPU device holds its RAM experts decoded (decoded once at load, computed in place)
    budget = rest + 2 * st.slot_bytes + (n_exp // 2) * st.decoded_bytes
    with LLM(path, cpu_memory=budget, **kw) as llm:
        t = llm.plan.experts.tier_counts()
        assert t["cpu"] and t["disk"] and llm.plan.experts.cache_slots == 2
        cache = llm.prefetcher.experts
        assert not cache._bytes and len(cache._views) == t["cpu"]  # held decoded
        _check(llm, model)
        assert llm.stats.expert_misses > 0 and llm.stats.bytes_disk > 0
        assert llm.plan.peak_device_bytes <= budget
        work, spec, store = llm.workload, llm.spec, llm.store

        def dense(s, gpu, cpu):
            return plan_placement(spec, s, "cuda:0", gpu, cpu, "auto", work, 4, hybrid="off")

        for cpu_mode, codes in (("off", False), ("on", False), ("off", True)):
            plan = plan_experts(spec, store, st, "cuda:0", None, n_exp // 2 * st.expert_bytes,
                                "auto", work, 4, slots=2, cpu_compute=cpu_mode,
                                plan_dense=dense, coded_slots=codes)  # fmt: skip
            e = plan.experts
            assert e.cache_slots == 2 and e.tier_counts()["disk"] and e.coded_slots == codes
            # computed from their codes, a slot holds the stored bytes only
            slot = st.expert_bytes + (0 if codes else st.decoded_bytes)
            assert plan.reserved["experts"] == 2 * slot == 2 * e.slot_bytes
            _stand_in(llm, llm.store_path, plan)
            cache = llm.prefetcher.experts
            assert cache.slots.shape == (2, e.expert_bytes if codes else st.decoded_bytes)
            assert cache.raw.shape[0] == (0 if codes else 2)
            before = llm.stats.snapshot()
            _check(llm, model)
            misses = llm.stats.expert_misses - before["expert_misses"]
            cpu = llm.stats.expert_cpu - before["expert_cpu"]
            assert (cpu > 0) == (cpu_mode == "on")
            copied = llm.stats.bytes_h2d - before["bytes_h2d"]
            if cpu_mode == "off":  # RAM misses copied as MXFP4 bytes (decoded in the slot, or
                # computed from their codes: decode-then-matmul on the CPU, per use)
                assert copied > 0 and copied % st.expert_bytes == 0
                assert copied < misses * st.decoded_bytes


def test_store_bytes_per_expert_about_bf16_over_3_8(tmp_path):
    """gpt-oss-20b's expert shapes (one layer, two experts): the synthetic preset's MXFP4
    experts take ~1/3.8 of the bf16 ones' bytes in the store; decoded, they are the bf16 size."""
    from ollm.models.registry import STORE_FAMILIES
    from ollm.storage.store import LayerStore
    from ollm.storage.synthetic import make_synthetic_store

    kw = dict(num_hidden_layers=1, num_local_experts=2, vocab_size=256, progress=False)
    sizes = {}
    for mx in (True, False):
        path = make_synthetic_store("gpt-oss-20b", tmp_path / str(mx), families=STORE_FAMILIES,
                                    mxfp4=mx, **kw)  # fmt: skip
        store = LayerStore(path)
        st = StoreExperts(store)
        sizes[mx] = (st.expert_bytes, st.decoded_bytes, st.coded)
        store.close()
    (mx_b, mx_dec, coded), (bf_b, bf_dec, bf_coded) = sizes[True], sizes[False]
    assert coded and not bf_coded and bf_dec == bf_b
    assert 3.7 < bf_b / mx_b < 3.85, bf_b / mx_b
    assert abs(mx_dec - bf_b) <= 4096


def test_store_versions_read_and_refused(mxfp4_model, tmp_path):
    """A store of an unknown (later) version is refused with a one-line error naming the
    versions this ollm reads; the coded store (2) and a plain one (1) read."""
    import shutil

    from ollm.errors import CorruptStoreError
    from ollm.storage.store import LayerStore

    _, _, llm = mxfp4_model
    copy = tmp_path / "store"
    shutil.copytree(llm.store_path, copy)
    manifest = copy / "manifest.json"
    raw = json.loads(manifest.read_text())
    for version, ok in ((1, True), (2, True), (3, False)):
        manifest.write_text(json.dumps(raw | {"version": version}))
        if ok:
            LayerStore(copy).close()
            continue
        with pytest.raises(CorruptStoreError, match=r"version 3 \(this ollm reads 1, 2\)") as exc:
            LayerStore(copy)
        assert "\n" not in str(exc.value)
