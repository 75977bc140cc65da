"""MXFP4 checkpoints (gpt-oss's released format): dequantized at conversion exactly as
transformers does, and a tiny gpt-oss saved with MXFP4 experts runs like transformers' model
holding the same (dequantized) weights."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from conftest import make_hf_model
from ollm import LLM, SamplingParams
from ollm.storage.mxfp4 import dequantize_mxfp4


def random_mxfp4(e: int, rows: int, cols: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random codes [E, rows, cols / 32, 16] and scales (2^-4 .. 2^1) [E, rows, cols / 32]."""
    blocks = torch.randint(0, 256, (e, rows, cols // 32, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(123, 129, (e, rows, cols // 32), generator=gen, dtype=torch.uint8)
    return blocks, scales


def test_dequantize_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    blocks, scales = random_mxfp4(3, 40, 64, gen)
    for dtype in (torch.bfloat16, torch.float32):
        ref = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        ours = dequantize_mxfp4(blocks, scales, dtype)
        assert ours.shape == (3, 64, 40) and torch.equal(ours, ref)


def test_mxfp4_checkpoint_runs_like_transformers(tmp_path):
    """gpt-oss experts stored as ``*_blocks`` / ``*_scales`` with ``quant_method: mxfp4``: the
    store holds them dequantized (split per expert), its config is not quantized, and
    greedy tokens and log-probs equal transformers' model with the dequantized weights."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf = tmp_path / "hf"
    model = make_hf_model("gpt_oss", hf)
    cfg = model.config
    e, h, inter = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    gen = torch.Generator().manual_seed(1)
    tensors = load_file(str(hf / "model.safetensors"))
    for i, layer in enumerate(model.model.layers):
        for proj, rows, cols in (("gate_up_proj", 2 * inter, h), ("down_proj", h, inter)):
            blocks, scales = random_mxfp4(e, rows, cols, gen)
            with torch.no_grad():  # the reference holds the dequantized values
                deq = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
                getattr(layer.mlp.experts, proj).copy_(deq)
            name = f"model.layers.{i}.mlp.experts.{proj}"
            del tensors[name]
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((hf / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": []}
    (hf / "config.json").write_text(json.dumps(raw))

    prompt = [5, 17, 99, 3, 42, 7, 250, 11]
    with LLM(hf, device="cpu", offload="disk", cache_dir=tmp_path / "c", progress=False) as llm:
        assert getattr(llm.store.hf_config(), "quantization_config", None) is None
        stored = llm.store.files["layers/layer_0000.bin"].tensors
        # split per expert by the converter (each expert one range of the layer file)
        assert "mlp.experts.gate_up_proj" not in stored
        assert all(
            stored[f"mlp.experts.{x}.gate_up_proj"].shape == (h, 2 * inter) for x in range(e)
        )
        res = llm.generate(prompt, SamplingParams(max_new_tokens=16, temperature=0))
        seq = prompt + res.token_ids
        ours = llm.score(seq)
    ids = torch.tensor([prompt])
    ref_tokens = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )[0, len(prompt):].tolist()  # fmt: skip
    assert res.token_ids == ref_tokens
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0, :-1].float()
    ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
