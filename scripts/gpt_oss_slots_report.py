"""gpt-oss-20b's expert cache at 8 GiB, planner only (issue 19): slots decoded in the slot
(raw + bf16 row) vs slots computed from their MXFP4 codes (stored bytes only):

    PYTHONPATH=src .venv/bin/python scripts/gpt_oss_slots_report.py [--json out.json]

Writes a one-layer synthetic store of the real gpt-oss-20b shapes (MXFP4 experts, ~45 s) and
runs ``scripts/gpu/moe.py``'s ``_scaled_slots`` (the fraction of the experts the full 24-layer
model's cache holds under 8 GiB, its dense parts, an 8k context's KV and the activations counted
per layer) for ``cuda:0`` with ``planning.experts.from_codes`` answered False, then True (this
machine need not have CUDA or Triton). Prints slot bytes, the full model's slots and the
4-layer device bench's slots for each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def report() -> dict:
    sys.path.insert(0, str(ROOT / "scripts" / "gpu"))
    import moe as bench

    import ollm.planning.experts as planning
    from ollm.models.registry import STORE_FAMILIES
    from ollm.storage.synthetic import make_synthetic_store

    out: dict = {"preset": "gpt-oss-20b", "budget": "8GiB", "context": 8192, "layers": 24}
    with tempfile.TemporaryDirectory() as d:
        store = make_synthetic_store("gpt-oss-20b", Path(d) / "s", progress=False,
                                     families=STORE_FAMILIES, mxfp4=True, num_hidden_layers=1)  # fmt: skip
        kw = dict(device="cuda", max_context=8192 + 64, offload="cpu")
        for codes in (False, True):
            planning.from_codes = lambda device, c=codes: c
            _, frac, e = bench._scaled_slots(store, kw, 1, 8 << 30, 24)
            out["coded_slots" if codes else "decoded_in_slot"] = dict(
                slot_bytes=e.slot_bytes, expert_bytes=e.expert_bytes,
                decoded_bytes=e.decoded_bytes, cache_fraction=frac,
                full_model_slots=int(frac * e.num_experts * 24),
                bench_4_layer_slots=max(2, int(frac * e.num_experts * 4)),
            )  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = report()
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
