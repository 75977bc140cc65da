"""Device check of KV compression (issue 17), run on the device machine:

    PYTHONPATH=src:tests python scripts/gpu/kv_codec.py --out $OUT [--quick]

Llama-3.1-8B shapes (random bf16 weights), 8 GiB GPU budget, prompts of 32k and 100k tokens
(32k only with ``--quick``): greedy decode with bf16 KV, int8 KV and int4 KV (keys per channel,
values per token, 128 recent tokens exact), same process, each planned by the planner with its
compressed bytes (compressed layers homed on the GPU when they fit, else in pinned RAM, their
encoded bytes copied to the GPU and decoded there each step). Reports per setting decode tok/s,
prefill s, bytes of KV read per decode step, host->GPU bytes per token, where the KV sits, the
speed-up over bf16 KV; and from the planner alone (no GPU work) the longest context that fits
8 GiB of GPU plus the host RAM bf16 KV needs at 100k (pinned weights + RAM KV), bf16 vs int8 vs
int4. Targets (issue 17): int4 decode >= 1.6x bf16 at 100k; longest context >= 3x.
~3-4 min on an H200 host (store build ~40 s once; per context three prefills, 100k ~20 s each,
and 12 decode steps each).

``bench(store, ...)`` and ``longest_context(store, ...)`` are the measurements on any device
(tests run them on the CPU with a tiny model); ``run(out, quick)`` is the device case; writes
``kv_codec.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CONTEXTS = (32768, 100000)
NEW_TOKENS = 12
RECENT = 128
CODECS = ("none", "int8", "int4")
GIB = 1 << 30


def kv_read_bytes(spec, codec: str, context: int, elem: int = 2) -> int:
    """Bytes of KV one decode step reads at ``context`` tokens (full-attention layers: encoded
    blocks and the exact tail under a codec, K and V otherwise; windowed layers their window)."""
    from ollm.kv.codecs import kv_format

    fmt = kv_format(codec, RECENT, spec.head_dim, elem)
    total = 0
    for layer in spec.layers:
        if layer.window is None and fmt is not None:
            total += fmt.layer_bytes(1, spec.num_kv_heads, spec.head_dim, elem, context)
        else:
            keys = context if layer.window is None else min(context, layer.window)
            total += 2 * spec.num_kv_heads * spec.head_dim * elem * keys
    return total


def _one(store, codec: str, context: int, new: int, llm_kwargs: dict) -> dict:
    """One LLM with ``codec``: a short warm-up, then the measured request."""
    from ollm import LLM, SamplingParams

    params = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    kwargs = {"verify_checksums": False, "progress": False, **llm_kwargs}
    with LLM(
        store, kv_codec=codec, kv_recent=RECENT, max_context=context + new + 8, **kwargs
    ) as llm:
        g = torch.Generator().manual_seed(context)
        prompt = torch.randint(0, llm.spec.vocab_size, (context,), generator=g).tolist()
        llm.generate(prompt[: min(context, 1024)], SamplingParams(max_new_tokens=3, temperature=0))
        t = time.perf_counter()
        res = llm.generate(prompt, params)
        m = res.metrics
        plan = llm.plan
        elem = torch.finfo(llm.dtype).bits // 8
        return {
            "codec": codec,
            "context": context,
            "new_tokens": new,
            "wall_s": time.perf_counter() - t,
            "prefill_s": m.prefill_seconds,
            "decode_tok_s": m.decode_tokens_per_second,
            "kv_bytes_read_per_step": kv_read_bytes(llm.spec, codec, context, elem),
            "bytes_h2d_per_tok": m.bytes_copied_h2d / max(1, m.generated_tokens),
            "peak_gpu_GiB": (m.peak_gpu_memory or 0) / GIB,
            "reserved_kv_GiB": plan.reserved.get("kv cache", 0) / GIB,
            "streamed_layers": len(plan.streamed_for("decode")),
            "kv_device_layers": sum(p.kv_tier == "device" for p in plan.layers),
            "kv_ram_layers": sum(p.kv_tier == "cpu" for p in plan.layers),
            "kv_fetch_layers": sum(p.kv_fetch for p in plan.layers),
            "decode_resident_layers": plan.decode_resident,  # held on the GPU in decode only
            "reserved_GiB": sum(plan.reserved.values()) / GIB,
            "reserved_decode_GiB": sum(plan.decode_reserved.values()) / GIB,
            "predicted_decode_s": plan.predicted.get("decode s (KV split)"),
            "tokens": res.token_ids,
        }


def bench(store, contexts=CONTEXTS, new: int = NEW_TOKENS, codecs=CODECS, **llm_kwargs) -> list:
    """Per context: one run per codec (bf16 first); the speed-up of each over bf16 KV."""
    rows = []
    for context in contexts:
        runs = {}
        for c in codecs:  # each run printed as it ends: a call cut short keeps what finished
            runs[c] = _one(store, c, context, new, llm_kwargs)
            brief = {k: runs[c].get(k) for k in ("decode_tok_s", "prefill_s")}
            print(json.dumps({"context": context, "codec": c, **brief}), flush=True)
        base = runs[codecs[0]]["decode_tok_s"]
        speed = {c: (r["decode_tok_s"] / base if base else None) for c, r in runs.items()}
        rows.append({"context": context, "runs": runs, "speedup": speed})
        brief = {c: round(r["decode_tok_s"] or 0, 3) for c, r in runs.items()}
        print(json.dumps({"context": context, "decode_tok_s": brief, "speedup": speed}), flush=True)
    return rows


def _plan(store, spec, codec: str, context: int, gpu_memory: int | None, device: str,
          residual: str = "auto", segment="auto", ram: int | None = None):  # fmt: skip
    """The planner's plan for one request of ``context`` tokens (None when it does not fit), as
    the engine makes it (``engine/replan.py``): ``residual``, where prefill keeps the prompt's
    hidden states (``prefill_residual``); ``segment``, prefill segments (``prefill_segment``:
    auto segments when one forward is refused or pins more than ``ram``, the engine's
    ``cpu_memory``)."""
    from ollm.errors import BudgetError
    from ollm.kv.codecs import kv_format
    from ollm.planning.placement import Workload, plan_placement
    from ollm.planning.segments import plan_segmented

    fmt = kv_format(codec, RECENT, spec.head_dim, 2)

    def at(work):
        return plan_placement(
            spec, store, device, gpu_memory, None, "auto", work, 2, kv_format=fmt,
            prefill_residual=residual,
        )  # fmt: skip

    def pinned(plan) -> int:
        return host_bytes(store, spec, plan, codec, context)

    try:
        return plan_segmented(at, Workload(1, context, context), segment, ram, pinned)
    except BudgetError:
        return None


def host_bytes(store, spec, plan, codec: str, context: int) -> int:
    """Host RAM the plan pins (``planning/segments.pinned_host_bytes``): weights of RAM layers,
    the KV of RAM-tier layers (stored bytes under a codec; an exact split layer's device blocks
    excluded) and, when prefill keeps it there, one forward's residual stream."""
    from ollm.kv.codecs import kv_format
    from ollm.planning.segments import pinned_host_bytes

    fmt = kv_format(codec, RECENT, spec.head_dim, 2)
    return pinned_host_bytes(spec, store, plan, fmt, context)


def longest_context(store, spec, codec: str, gpu_memory: int, ram: int, device: str,
                    residual: str = "auto", segment="auto") -> tuple[int, int]:  # fmt: skip
    """The longest context (to 1k tokens) whose plan fits ``gpu_memory`` and pins at most
    ``ram`` bytes of host memory (``host_bytes``), and that plan's prefill segment (0: one
    forward); (0, 0) when not even 1k does."""

    def plan(c: int):
        p = _plan(store, spec, codec, c, gpu_memory, device, residual, segment, ram)
        return p if p is not None and host_bytes(store, spec, p, codec, c) <= ram else None

    lo, hi = 0, 1024
    while plan(hi) is not None and hi < 1 << 24:
        lo, hi = hi, hi * 2
    while hi - lo > 1024:
        mid = (lo + hi) // 2 // 1024 * 1024
        lo, hi = (mid, hi) if plan(mid) is not None else (lo, mid)
    best = plan(lo) if lo else None
    return lo, (best.prefill_segment if best is not None else 0)


def capacity(store, gpu_memory: int, ref_context: int, device: str, codecs=CODECS,
             residual: str = "auto", segment="auto") -> dict:  # fmt: skip
    """Longest contexts per codec in ``gpu_memory`` plus the RAM bf16 KV pins at
    ``ref_context`` (its default plan's); the ratio of each to bf16's. ``residual``: where the
    codecs' plans keep prefill's residual stream (``prefill_residual``; "ram" pins it);
    ``segment``: prefill segments (``prefill_segment``; "auto" as the engine given that RAM as
    ``cpu_memory``, 0: one forward)."""
    from ollm.kv.codecs import kv_format
    from ollm.models.registry import build_spec
    from ollm.planning.placement import Workload
    from ollm.planning.segments import segment_copy_bytes
    from ollm.storage.store import LayerStore

    store = LayerStore(store) if not hasattr(store, "layer_nbytes") else store
    spec = build_spec(store.hf_config())
    ref = _plan(store, spec, codecs[0], ref_context, gpu_memory, device)
    ram = host_bytes(store, spec, ref, codecs[0], ref_context) if ref is not None else 0
    found = {
        c: longest_context(store, spec, c, gpu_memory, ram, device, residual, segment)
        for c in codecs
    }
    longest = {c: n for c, (n, _) in found.items()}
    base = longest[codecs[0]]
    copies = {}  # the extra host->GPU bytes of prefilling the longest prompt in segments
    for c, (n, _) in found.items():
        plan = _plan(store, spec, c, n, gpu_memory, device, residual, segment, ram) if n else None
        copies[c] = segment_copy_bytes(
            spec, store, plan, kv_format(c, RECENT, spec.head_dim, 2), Workload(1, n, n)
        ) if plan is not None else 0  # fmt: skip
    return {
        "gpu_memory_GiB": gpu_memory / GIB,
        "ram_GiB": ram / GIB,
        "ram_is": f"pinned weights + RAM KV of bf16 KV at {ref_context} tokens",
        "prefill_residual": residual,
        "prefill_segment": segment,
        "longest_context": longest,
        "segment_at_longest": {c: seg for c, (_, seg) in found.items()},
        "segment_extra_copy_GB": {c: b / 1e9 for c, b in copies.items()},
        "ratio": {c: (n / base if base else None) for c, n in longest.items()},
    }


def run(out: Path, quick: bool = False, decode_resident: bool = False) -> dict:
    """The device case: Llama-3.1-8B shapes, 8 GiB, 32k (and 100k unless ``quick``);
    ``decode_resident``: the engine's opt-in decode-resident layers (default off)."""
    from ollm.bench.models import synthetic_store

    work = Path(os.environ.get("OLLM_WORKDIR", "/tmp/ollm-gpu"))  # the store, kept between runs
    t = time.perf_counter()
    store = synthetic_store("llama3-8b", work, progress=False, device="cuda:0")
    report: dict = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "store_build_s": time.perf_counter() - t,
        "budget": "8GiB",
        "decode_resident": decode_resident,
        "recent": RECENT,
    }
    report["capacity"] = capacity(store, 8 * GIB, 100000, "cuda:0")
    print(json.dumps({"capacity": report["capacity"]}), flush=True)
    contexts = CONTEXTS[:1] if quick else CONTEXTS
    report["rows"] = bench(store, contexts, device="cuda:0", gpu_memory="8GiB",
                           decode_resident=decode_resident)  # fmt: skip
    last = report["rows"][-1]
    first = {c: r["tokens"] for c, r in report["rows"][0]["runs"].items()}
    report["int8_tokens_equal_bf16_32k"] = first["int8"] == first["none"]
    report["target_int4_1_6x_at_100k"] = (
        None if last["context"] != 100000 else bool((last["speedup"]["int4"] or 0) >= 1.6)
    )
    report["target_int4_3x_context"] = bool((report["capacity"]["ratio"]["int4"] or 0) >= 3)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_codec.json").write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="32k only")
    ap.add_argument("--decode-resident", action="store_true",
                    help="hold decode-resident layers (the engine's opt-in; default off)")  # fmt: skip
    args = ap.parse_args()
    report = run(Path(args.out), quick=args.quick, decode_resident=args.decode_resident)
    summary = {k: v for k, v in report.items() if k != "rows"}
    summary["rows"] = [
        {
            "context": r["context"],
            "decode_tok_s": {c: x["decode_tok_s"] for c, x in r["runs"].items()},
            "speedup": r["speedup"],
            "kv_GB_read_per_step": {
                c: x["kv_bytes_read_per_step"] / 1e9 for c, x in r["runs"].items()
            },
            "h2d_GB_per_tok": {c: x["bytes_h2d_per_tok"] / 1e9 for c, x in r["runs"].items()},
        }
        for r in report["rows"]
    ]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
