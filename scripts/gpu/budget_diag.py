"""What is live on the GPU at a budget run's allocated peak (diagnostic for scripts/gpu/budget.py).

    PYTHONPATH=src python scripts/gpu/budget_diag.py STORE BUDGET_MIB PROMPT [OUT.json]

Records the CUDA allocator's history over one request in a fresh process, replays it to the
moment of the allocated peak and prints the live blocks there, largest first, each with the
innermost ollm frame that allocated it, plus reserved vs allocated at the end.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

MIB = 1 << 20


def where(frames: list[dict]) -> str:
    """The innermost frames inside ollm (else the first Python frame)."""
    own = [f for f in frames if "/ollm/" in f.get("filename", "")]
    pick = own[:3] or frames[:2]
    return " < ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']}:{f['name']}" for f in pick)


def main() -> None:
    import torch

    from ollm import LLM, SamplingParams

    store, budget, prompt = sys.argv[1], int(sys.argv[2]) * MIB, int(sys.argv[3])
    torch.cuda.init()
    torch.cuda.memory._record_memory_history(max_entries=400000)
    llm = LLM(store, device="cuda:0", gpu_memory=budget, max_context=prompt + 16, progress=False,
              cache_dir=f"/tmp/diag-cache-{prompt}")  # fmt: skip
    ids = torch.randint(0, 128000, (prompt,)).tolist()
    llm.generate(ids, SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True))
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    trace = snap["device_traces"][0]
    live: dict[int, tuple[int, list]] = {}
    total = peak = peak_at = 0
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], ev.get("frames", []))
            total += ev["size"]
        elif ev["action"] in ("free_requested",) and ev["addr"] in live:
            total -= live.pop(ev["addr"])[0]
        if total > peak:
            peak, peak_at = total, i
    live.clear()
    for ev in trace[: peak_at + 1]:  # replay to the peak
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], ev.get("frames", []))
        elif ev["action"] == "free_requested":
            live.pop(ev["addr"], None)
    by_site: dict[str, list[int]] = defaultdict(list)
    for size, frames in live.values():
        by_site[where(frames)].append(size)
    rows = sorted(by_site.items(), key=lambda kv: -sum(kv[1]))
    out = {
        "plan": {k: v // MIB for k, v in llm.plan.reserved.items()},
        "chunk": llm.plan.prefill_chunk_tokens,
        "peak_allocated_traced_mib": peak / MIB,
        "max_allocated_mib": torch.cuda.max_memory_allocated() / MIB,
        "max_reserved_mib": torch.cuda.max_memory_reserved() / MIB,
        "trace_events": len(trace),
        "at_peak": [
            {"site": site, "mib": round(sum(s) / MIB, 1), "n": len(s)} for site, s in rows[:25]
        ],
        "segments_end": [
            {"mib": s["total_size"] / MIB, "stream": s["stream"], "blocks": len(s["blocks"])}
            for s in snap["segments"]
        ],
    }
    text = json.dumps(out, indent=1)
    print(text)
    if len(sys.argv) > 4:
        open(sys.argv[4], "w").write(text)


if __name__ == "__main__":
    main()
