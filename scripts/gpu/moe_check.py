"""The correctness rows of ``scripts/gpu/moe.py`` (issue 19, part 1 of its docstring): tiny random
configs of the MoE families (tests/conftest.py), float32 (or bf16) on CUDA, in every mode of
``MODES`` (whole layers from RAM / disk, experts one by one through two slots from RAM / disk,
RAM misses computed by the CPU): greedy tokens equal transformers' and log-probs within 1e-4."""

from __future__ import annotations

from pathlib import Path

import torch

from ollm.layers.moe_mxfp4 import path_counts as mxfp4_paths

FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss", "gpt_oss_mxfp4")
PROMPT = [(7 * i + 3) % 256 for i in range(150)]
NEW = 24


def _hf(model, seq: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation of ``PROMPT`` and the log-probs of ``seq``."""
    from test_moe import hf_greedy

    with torch.no_grad():
        logits = model(torch.tensor([seq], device=model.device)).logits[0, :-1].float().cpu()
    lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
    return hf_greedy(model, PROMPT, NEW), lp


# -- 1. correctness ------------------------------------------------------------------------------
MODES = {  # name -> LLM options (besides the budget)
    "layers-ram": dict(offload="cpu", moe_offload="layer"),
    "layers-disk": dict(offload="disk", moe_offload="layer"),
    "experts-ram-2slots": dict(
        offload="cpu", moe_offload="expert", expert_slots=2, expert_cpu="off"
    ),
    "experts-disk-2slots": dict(offload="disk", moe_offload="expert", expert_slots=2),
    "experts-ram-cpu": dict(offload="cpu", moe_offload="expert", expert_slots=2, expert_cpu="on"),
}


def case(tmp: Path, family: str, dtype: torch.dtype, device: str = "cuda") -> list[dict]:
    """One family and dtype in every mode of ``MODES``."""
    from conftest import make_hf_model
    from ollm import LLM

    name = str(dtype).removeprefix("torch.")
    path = tmp / f"{family}-{name}"
    if family == "gpt_oss_mxfp4":  # MXFP4 experts; the reference holds them dequantized
        if dtype != torch.float32:
            return []
        from test_mxfp4 import _mxfp4_hf

        model = _mxfp4_hf(path).to(device)
    else:
        model = make_hf_model(family, path, dtype=dtype).to(device)
    kw = dict(device=device, dtype=name, hybrid="off", cache_dir=tmp / "c", progress=False)
    with LLM(path, moe_offload="layer", **kw) as probe:
        r, layer = probe.plan.reserved, probe.plan.layer_bytes
        budget = r["globals"] + r["kv cache"] + r["activations"] + 3 * layer
    rows, ref = [], []
    for mode, opts in MODES.items():
        # experts one by one reserve their rows' temporaries beside the dense parts: headroom,
        # while their two slots stay forced (a larger budget does not make them resident)
        extra = 64 << 20 if opts["moe_offload"] == "expert" else 0
        limit = {"gpu_memory" if device != "cpu" else "cpu_memory": budget + extra}
        head = dict(family=family, dtype=name, mode=mode)
        try:
            row = head | _mode_row(path, model, ref, {**limit, **opts, **kw})
            placed = (row["experts"] is not None) == (opts["moe_offload"] == "expert")
            exact = row["tokens_equal"] and row["max_logprob_diff"] < 1e-4
            row["ok"] = placed and (exact if dtype == torch.float32 else True)
        except Exception:  # noqa: BLE001 - reported; the other modes still run
            import traceback

            row = head | {"ok": False, "error": traceback.format_exc()[-3000:]}
        rows.append(row)
        print(row, flush=True)
    return rows


def _mode_row(path: Path, model, ref: list, options: dict) -> dict:
    """One mode's tokens and log-probs vs transformers (``ref``: filled once, then reused)."""
    from ollm import LLM, SamplingParams

    paths = dict(mxfp4_paths)
    with LLM(path, **options) as llm:
        res = llm.generate(PROMPT, SamplingParams(max_new_tokens=NEW, temperature=0))
        seq = PROMPT + res.token_ids
        if not ref:
            ref += _hf(model, seq)
        lp = llm.score(seq).float().cpu()
        same = res.token_ids == ref[0]
        diff = (lp - ref[1]).abs().max().item() if same else float("inf")
        e = llm.plan.experts
        return dict(
            experts=None if e is None else e.tier_counts() | {"slots": e.cache_slots},
            expert_hit_rate=res.metrics.expert_hit_rate,
            expert_cpu=res.metrics.expert_cpu,
            tokens_equal=same,
            max_logprob_diff=diff,
            coded_slots=None if e is None else e.coded_slots,
            mxfp4_paths={k: v - paths[k] for k, v in mxfp4_paths.items()},
        )


# -- 2. benchmark -------------------------------------------------------------------------------
