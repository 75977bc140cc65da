"""The 100k-token device rows of issues 17 and 18 in one call, sharing one synthetic store:

    PYTHONPATH=src:tests python scripts/gpu/long_context.py --out $OUT [--context 100000]

Builds the Llama-3.1-8B-shaped store once, then runs ``kv_codec.bench`` (bf16 / int8 / int4 KV)
and ``routing.bench`` (full vs top-k pages) at one context, each exactly as their own scripts do
it (``--parts routing_micro,routing``: ``routing_micro.bench``, one layer's routed read, first;
``capacity``: ``kv_codec.capacity``, the planner alone, the longest context per codec in 8 GiB
plus the RAM bf16 KV pins at this context, issue 17's 3x target), and writes
``long_context.json`` after each part (a call cut short keeps what finished).
``--decode-resident on`` runs kv_codec and routing with decode-resident layers (opt-in, engine
default off) under ``<part>_decode_resident``; ``ab`` runs each both ways in the same call.
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


HELD = {"off": (False,), "on": (True,), "ab": (False, True)}  # --decode-resident


def run(
    out: Path,
    context: int = 100000,
    parts: tuple[str, ...] = ("capacity", "kv_codec", "routing"),
    decode_resident: str = "off",
) -> dict:
    """One store, then each part at ``context``; the report (also saved under ``out``).
    ``decode_resident``: off (the engine's default), on, or ab (kv_codec and routing both ways,
    the held runs under ``<part>_decode_resident``)."""
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

    report["decode_resident"] = decode_resident
    todo = [(p, h) for p in parts
            for h in (HELD[decode_resident] if p in ("kv_codec", "routing") else (False,))]  # fmt: skip
    for part, held in todo:
        name = f"{part}_decode_resident" if held else part
        t = time.perf_counter()
        report[name] = _part(part, store, context, {"decode_resident": held})
        report[name]["seconds"] = round(time.perf_counter() - t, 1)
        print(json.dumps({name: report[name].get("error", "done")}), flush=True)
        save()
    return report


def _part(part: str, store, context: int, held: dict) -> dict:
    """One part's rows (``held``: the engine's decode_resident option), or its error."""
    mod = _module("kv_codec" if part == "capacity" else part)
    try:
        if part == "capacity":  # the planner alone (seconds): longest context per codec
            rows = mod.capacity(store, 8 << 30, context, "cuda:0")
            rows["target_int4_3x"] = bool((rows["ratio"]["int4"] or 0) >= 3)
        elif part == "routing_micro":  # one layer's routed read, no model (< 1 min)
            rows = mod.bench(context, device="cuda:0")
        elif part == "kv_codec":
            rows = mod.bench(store, (context,), device="cuda:0", gpu_memory="8GiB", **held)
        else:  # as routing.run: layers stream from pinned RAM, none computed on the CPU
            rows = mod.bench(
                store, (context,), device="cuda:0", gpu_memory="8GiB", offload="cpu",
                hybrid="off", **held,
            )  # fmt: skip
        return {"rows": rows}
    except Exception as exc:  # noqa: BLE001 - reported, the other part still runs
        return {"error": repr(exc)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--context", type=int, default=100000)
    ap.add_argument("--parts", default="capacity,kv_codec,routing")
    ap.add_argument("--decode-resident", choices=tuple(HELD), default="off",
                    help="kv_codec and routing with decode-resident layers: off, on, ab (both)")  # fmt: skip
    args = ap.parse_args()
    run(args.out, args.context, tuple(filter(None, args.parts.split(","))), args.decode_resident)


if __name__ == "__main__":
    main()
