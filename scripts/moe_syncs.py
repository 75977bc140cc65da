"""Host syncs per MoE decode layer counted on the CPU stand-in accelerator (issue 19):

    PYTHONPATH=src:tests python scripts/moe_syncs.py [--out FILE] [--new N] [--cpu-compute on]

Tiny random-weight qwen3_moe (Qwen3-30B-A3B's routing: 128 experts, top-8, every layer
sparse) and gpt_oss (gpt-oss-20b's: 32 experts, top-4) decode greedily with their experts in
RAM through an expert cache of fewer slots than experts (LRU; RAM misses copied into slots,
or with ``--cpu-compute on`` computed by the CPU) on the stand-in ("cpu:1"), tokens checked
against transformers'. Syncs are counted as ``tests/sync_count.py`` says (the expert ids'
read; event and stream waits of ``runtime/uva``'s ``to_device`` and ring, run with fake CUDA
primitives; host reads of tensors; data-dependent ops), per decode layer by kind, with the
transfers through the ring per sparse layer and the cache's hit rate. To compare two versions
of the code run it with each on ``PYTHONPATH`` (the counter patches ``layers.moe._index``,
``_to_host`` and ``_hand_back`` where it exists, and ``runtime/uva``'s ``torch``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# family -> (config overrides, expert slots)
CASES = {
    "qwen3_moe": (dict(num_experts=128, num_experts_per_tok=8, mlp_only_layers=[]), 64),
    "gpt_oss": (dict(num_local_experts=32, num_experts_per_tok=4), 51),
}


def count(family: str, new: int, cpu_compute: str = "off") -> dict:
    import test_moe_syncs as t
    from conftest import make_hf_model
    from ollm import LLM

    kw, slots = CASES[family]
    t.NEW = new
    with tempfile.TemporaryDirectory() as d:
        model = make_hf_model(family, Path(d) / "hf", **kw)
        opts = dict(device="cpu", cache_dir=Path(d) / "c", progress=False, prefill_chunk=32)
        with LLM(Path(d) / "hf", **opts) as llm, pytest.MonkeyPatch.context() as mp:
            layers, steps, c = t._decode_syncs(llm, model, mp, slots, cpu_compute=cpu_compute)
            hit_rate = llm.prefetcher.experts.hit_rate
            spec = llm.spec
    sparse = [s for is_sparse, s, _ in layers if is_sparse]
    dense = [s for is_sparse, s, _ in layers if not is_sparse]
    puts = sum(p for is_sparse, _, p in layers if is_sparse)
    late = sparse[len(sparse) // 2 :]  # the ring long wrapped: every reuse a possible wait
    total = sum(sparse, collections.Counter())
    return dict(
        family=family,
        cpu_compute=cpu_compute,
        layers=spec.num_layers,
        sparse_layers=len(spec.moe.sparse_layers),
        experts=spec.moe.num_experts,
        top_k=spec.moe.top_k,
        slots=slots,
        hit_rate=round(hit_rate, 4),
        decode_steps=len(steps),
        syncs_per_sparse_layer=round(sum(total.values()) / len(sparse), 3),
        by_kind={k: round(v / len(sparse), 3) for k, v in sorted(total.items())},
        syncs_per_sparse_layer_second_half=round(sum(sum(x.values()) for x in late) / len(late), 3),
        syncs_per_dense_layer=round(sum(sum(s.values()) for s in dense) / max(1, len(dense)), 3),
        ring_puts_per_sparse_layer=round(puts / len(sparse), 3),
        max_syncs_in_a_sparse_layer=max(sum(s.values()) for s in sparse),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--new", type=int, default=12, help="tokens generated (decode steps + 1)")
    ap.add_argument("--cpu-compute", choices=("off", "on"), default="off",
                    help="RAM misses computed by the CPU (on) or copied into slots (off)")  # fmt: skip
    args = ap.parse_args()
    runs = [count(f, args.new, args.cpu_compute) for f in CASES]
    out = {"device": "cpu stand-in ('cpu:1')", "runs": runs}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
