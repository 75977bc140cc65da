"""The 100k-token device rows of issues 17 and 18 in one call, sharing one synthetic store:

    PYTHONPATH=src:tests python scripts/gpu/long_context.py --out $OUT [--context 100000]

Builds the Llama-3.1-8B-shaped store once, then runs ``kv_codec.bench`` (bf16 / int8 / int4 KV)
and ``routing.bench`` (full vs top-k pages) at one context, each exactly as their own scripts do
it (``--parts routing_micro,routing``: ``routing_micro.bench``, one layer's routed read, first;
``capacity``: ``kv_codec.capacity``, the planner alone, the longest context per codec in 8 GiB
plus the RAM bf16 KV pins at this context, issue 17's 3x target), and writes
``long_context.json`` after each part (a call cut short keeps what finished).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
HERE = Path(__file__).parent


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(
    out: Path, context: int = 100000, parts: tuple[str, ...] = ("capacity", "kv_codec", "routing")
) -> dict:
    """One store, then each part at ``context``; the report (also saved under ``out``)."""
    from ollm.bench.models import synthetic_store

    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("OLLM_WORKDIR", "/tmp/ollm-gpu"))  # the store, kept between runs
    t = time.perf_counter()
    store = synthetic_store("llama3-8b", work, progress=False, device="cuda:0")
    report: dict = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "store_build_s": round(time.perf_counter() - t, 1),
        "context": context,
        "budget": "8GiB",
    }

    def save() -> None:
        (out / "long_context.json").write_text(json.dumps(report, indent=1, default=str))

    for part in parts:
        t = time.perf_counter()
        mod = _module("kv_codec" if part == "capacity" else part)
        try:
            if part == "capacity":  # the planner alone (seconds): longest context per codec
                rows = mod.capacity(store, 8 << 30, context, "cuda:0")
                rows["target_int4_3x"] = bool((rows["ratio"]["int4"] or 0) >= 3)
            elif part == "routing_micro":  # one layer's routed read, no model (< 1 min)
                rows = mod.bench(context, device="cuda:0")
            elif part == "kv_codec":
                rows = mod.bench(store, (context,), device="cuda:0", gpu_memory="8GiB")
            else:  # as routing.run: layers stream from pinned RAM, none computed on the CPU
                rows = mod.bench(
                    store, (context,), device="cuda:0", gpu_memory="8GiB", offload="cpu",
                    hybrid="off",
                )  # fmt: skip
            report[part] = {"rows": rows, "seconds": round(time.perf_counter() - t, 1)}
        except Exception as exc:  # noqa: BLE001 - reported, the other part still runs
            report[part] = {"error": repr(exc), "seconds": round(time.perf_counter() - t, 1)}
        print(json.dumps({part: report[part].get("error", "done")}), flush=True)
        save()
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--context", type=int, default=100000)
    ap.add_argument("--parts", default="capacity,kv_codec,routing")
    args = ap.parse_args()
    run(args.out, args.context, tuple(filter(None, args.parts.split(","))))


if __name__ == "__main__":
    main()
