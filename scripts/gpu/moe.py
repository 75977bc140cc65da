"""Device check of the mixture-of-experts families (issue 19), run on the device machine:

    PYTHONPATH=src:tests python scripts/gpu/moe.py --out $OUT

For ``qwen3_moe``, ``mixtral`` and ``gpt_oss`` (tiny random configs of tests/conftest.py), in
float32 and bfloat16, on CUDA: layers streamed from pinned RAM (``offload="cpu"``, a budget of
three layers) and from disk; greedy tokens vs transformers on the same device and dtype, and
the largest log-prob difference over the sequence. float32 must match (``ok``); bfloat16 is
reported (another kernel order may flip a near tie). Writes ``moe.json`` under ``--out``.
``--device cpu`` is a dry run here: there bfloat16 matched transformers to 1e-6 for qwen3_moe
and mixtral; gpt_oss's tokens matched but log-probs differed by up to 0.66, since transformers'
eager attention (its only CPU path for sinks) rounds scores and probabilities to bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss")
PROMPT = [(7 * i + 3) % 256 for i in range(150)]
NEW = 24


def _hf(model, seq: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation of ``PROMPT`` and the log-probs of ``seq``."""
    ids = torch.tensor([PROMPT], device=model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    with torch.no_grad():
        logits = model(torch.tensor([seq], device=model.device)).logits[0, :-1].float().cpu()
    lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
    return out[0, len(PROMPT) :].tolist(), lp


def case(tmp: Path, family: str, dtype: torch.dtype, device: str = "cuda") -> list[dict]:
    """One family and dtype, streamed from RAM and from disk (on the CPU device: from disk, RAM
    being the device's own memory)."""
    from conftest import make_hf_model
    from ollm import LLM, SamplingParams

    name = str(dtype).removeprefix("torch.")
    path = tmp / f"{family}-{name}"
    model = make_hf_model(family, path, dtype=dtype).to(device)
    kw = dict(device=device, dtype=name, hybrid="off", cache_dir=tmp / "c", progress=False)
    with LLM(path, **kw) as probe:
        r, layer = probe.plan.reserved, probe.plan.layer_bytes
        budget = r["globals"] + r["kv cache"] + r["activations"] + 3 * layer
    rows = []
    for offload in ("cpu", "disk"):
        limit = {"gpu_memory" if device != "cpu" else "cpu_memory": budget}
        with LLM(path, offload=offload, **limit, **kw) as llm:
            tiers = [p.tier for p in llm.plan.layers]
            res = llm.generate(PROMPT, SamplingParams(max_new_tokens=NEW, temperature=0))
            seq = PROMPT + res.token_ids
            ref_tokens, ref_lp = _hf(model, seq)
            diff = (llm.score(seq).float().cpu() - ref_lp).abs().max().item()
        same = res.token_ids == ref_tokens
        rows.append(
            dict(
                family=family,
                dtype=name,
                offload=offload,
                tiers=tiers,
                tokens_equal=same,
                max_logprob_diff=diff,
                ok=(same and diff < 1e-4) if dtype == torch.float32 else True,
            )
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for family in FAMILIES:
            for dtype in (torch.float32, torch.bfloat16):
                rows += case(Path(d), family, dtype, args.device)
    dev = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    report = {"ok": all(r["ok"] for r in rows), "rows": rows, "device": dev}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "moe.json").write_text(json.dumps(report, indent=1))
    print("ok" if report["ok"] else "FAILED")


if __name__ == "__main__":
    main()
