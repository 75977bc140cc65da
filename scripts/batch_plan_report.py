"""The batch bench's plan (``--bench-synthetic llama3-8b --bench-budget 8GiB``), without a GPU:

    PYTHONPATH=src .venv/bin/python scripts/batch_plan_report.py [--batches 64,16]
        [--prompt 2048] [--new 32] [--budget 8] [--json out.json]

Plans Llama-3.1-8B shapes for ``cuda:0`` as ``bench.batching.run_batch_bench`` does (``LLM(...,
max_batch=B, max_context=prompt + new)`` -> ``Workload(B, ctx, ctx)``, offload and hybrid auto,
no cpu_memory limit) over a sizes-only store with the H200 host's fixed rates
(``scripts/plan_report.py``), and prints per part what the plan reserves on the GPU next to what
the batch engine (``BatchEngine.for_plan``: one packed row per step, every prompt in one step,
the runner's prefill chunks of ``prefill_chunk_tokens`` rows) allocates there, estimated from the
code (``engine/batch.py``, ``engine/kvpools.py``, ``kv/packed.py``, ``engine/runner.py``,
``layers/rope.py``). Planner only, seconds on a CPU; the estimate is not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

GIB, MIB = 1 << 30, 1 << 20
# Decode steps allocate far less than this prefill step: kv/packed.py's batched gather of
# device-pool K/V (GATHER_BYTES, 64 MiB, not reserved by name) and its attention, a few rows.


def plan_for(spec, store, batch: int, context: int, budget: int, rates):
    """The plan ``run_batch_bench`` gets for its largest batch (``EngineConfig`` defaults)."""
    from ollm.planning.placement import Workload, plan_placement

    work = Workload(batch, context, context)
    return work, plan_placement(spec, store, "cuda:0", budget, None, "auto", work, 2, rates)


def planned_parts(spec, store, work, plan) -> dict[str, int]:
    """The plan's reservations, ``kv cache`` and ``activations`` split as ``device_kv_bytes``
    and ``activation_parts`` count them."""
    from ollm.planning.accounting import activation_parts
    from ollm.planning.sizing import PlanSizes
    from ollm.tiers import KvTier

    sz = PlanSizes.of(spec, store, work, 2, "cuda:0", plan.budget, None, plan.prefill_chunk_tokens)
    dev = [p.kv_tier == KvTier.DEVICE for p in plan.layers]
    out = {"globals (head + norm)": plan.reserved["globals"]}
    out["weights: resident layers"] = plan.reserved["resident layers"]
    out["weights: ring slots"] = plan.reserved["stream buffers"]
    out["KV: device-tier layers"] = sum(kv for d, kv in zip(dev, sz.layer_kv, strict=True) if d)
    out["KV: split layer's device blocks"] = sum(sz.per_token * p.kv_device_tokens
                                                 for p in plan.layers)  # fmt: skip
    out["KV: prefill scratch (KVScratch)"] = sz.scratch if not all(dev) else 0
    out["KV: fetch buffers"] = 2 * sz.scratch if any(p.kv_fetch for p in plan.layers) else 0
    rows = plan.prefill_chunk_tokens or work.prefill_tokens
    for k, v in activation_parts(spec, work, 2, sz.mlp_chunk, rows, True).items():
        out[f"act: {k}"] = v
    total = sum(plan.reserved.values())
    assert abs(sum(out.values()) - total) < MIB, (sum(out.values()), total)
    return out


def engine_parts(spec, work, plan, prompt: int) -> dict[str, int]:
    """What ``BatchEngine.for_plan(runner, ..., batch, context)`` allocates on the GPU in its
    largest step (every prompt's prefill in one packed row: ``max_step_tokens`` = batch x
    context), by the same parts; see the module docstring for the code it follows."""
    from ollm.planning.accounting import PAGE_TOKENS, chunk_temp_bytes, kv_pool_bytes
    from ollm.planning.footprint import score_block_bytes
    from ollm.tiers import KvTier

    e, h, d = 2, spec.hidden_size, spec.head_dim
    heads, kvh = spec.num_heads, spec.num_kv_heads
    n = work.batch * prompt  # packed rows of the prefill step
    rows = min(plan.prefill_chunk_tokens or n, n)  # Runner._chunked_block: b = 1 row of n
    pools = kv_pool_bytes(spec, plan.layers, plan.kv_pools, PAGE_TOKENS, e)
    out = {"globals (head + norm)": plan.reserved["globals"]}
    out["weights: resident layers"] = plan.reserved["resident layers"]
    out["weights: ring slots"] = plan.reserved["stream buffers"]
    out["KV: device-tier layers"] = pools[KvTier.DEVICE]  # paged pools, plan.kv_pools blocks
    out["KV: split layer's device blocks"] = 0  # kvpools: kv_device_tokens not used
    out["KV: prefill scratch (KVScratch)"] = 0  # only Runner.new_kv (single-request path)
    out["KV: fetch buffers"] = 0  # PackedLayerKV.fetcher is None
    out["act: residual stream"] = n * h * e
    # rope_cos_sin: float32 freqs, emb, cos, sin, then the two tables (before any chunk runs)
    rope_peak = n * (d // 2 * 4 + 3 * d * 4 + 2 * d * e)
    out["act: rope tables"] = 2 * n * d * e
    out["act: rope float32 transient (before chunks)"] = rope_peak - 2 * n * d * e
    out["act: chunk temporaries"] = rows * chunk_temp_bytes(spec, e)
    out["act: mlp"] = min(rows, plan.mlp_chunk_tokens) * spec.intermediate_size * e * 3
    # PackedLayerKV.attend: the output, the new K/V (cat), one sequence's gathered K/V of a
    # host pool ([1, kvh, <= context, D] x 2) and the kernel's score block over it
    # host pool: gathered on the CPU, one copy to the GPU; device pool: index_select, reshape
    gather = 2 * 2 * kvh * work.context * d * e
    out["act: attention"] = (
        score_block_bytes(1, heads, work.context, e)  # blocked_attention, one sequence
        + 2 * rows * heads * d * e
        + 2 * kvh * rows * d * e
        + gather
    )
    out["act: masks"] = 5 * rows * work.context
    out["act: logits"] = work.batch * spec.vocab_size * (e + 4) + work.batch * h * e * 2
    # PackedStep: the flat index tensor, and write_slots' per-chunk indices kept for the step
    out["act: step index tensors"] = 8 * (2 * n + plan.kv_pools.get("full", 0)) + 8 * 2 * kvh * n
    out["act: slack"] = 96 * MIB
    return out


def peak(parts: dict[str, int]) -> int:
    """The step's peak from the estimated parts: the rope tables' float32 transient happens
    before the chunk work, so the larger of the two counts (an upper bound: the chunk's parts
    are summed though they are not all live at once)."""
    transient = parts.get("act: rope float32 transient (before chunks)", 0)
    chunk = (
        sum(v for k, v in parts.items() if k.startswith("act: "))
        - parts.get("act: residual stream", 0)
        - parts.get("act: rope tables", 0)
        - transient
    )
    fixed = sum(v for k, v in parts.items() if not k.startswith("act: "))
    act = parts.get("act: residual stream", 0) + parts.get("act: rope tables", 0)
    return fixed + act + max(transient, chunk)


def case(spec, store, batch: int, prompt: int, new: int, budget: int, rates) -> dict:
    """One batch size: the plan's description, both columns and their totals."""
    work, plan = plan_for(spec, store, batch, prompt + new, budget, rates)
    want, have = planned_parts(spec, store, work, plan), engine_parts(spec, work, plan, prompt)
    over = sum(want.values()) - peak(have)
    return {
        "batch": batch,
        "plan": dict(plan.describe()),
        "reserved": want,
        "engine_estimate": have,
        "reserved_total": sum(want.values()),
        "engine_peak_estimate": peak(have),
        "unused": over,
        "more_resident_layers_if_counted": max(0, over // plan.layer_bytes),
        "layer_bytes": plan.layer_bytes,
    }


def report(batches=(64, 16), prompt: int = 2048, new: int = 32, budget_gib: float = 8.0) -> dict:
    from plan_report import h200_rates, llama8b

    spec, store = llama8b()
    budget = int(budget_gib * GIB)
    cases = [case(spec, store, b, prompt, new, budget, h200_rates()) for b in batches]
    return {"model": "llama3-8b (bf16, meta store)", "prompt": prompt, "new": new,
            "budget": budget, "cases": cases}  # fmt: skip


def print_report(rep: dict) -> None:
    for c in rep["cases"]:
        p = dict(c["plan"])
        print(f"== batch {c['batch']}: {p['layers']}; KV in RAM {p['KV in pinned RAM / on disk']}"
              f"; prefill chunk {p['prefill chunk']}")  # fmt: skip
        print(f"   {'part':<46} {'reserved':>10} {'allocated':>10}  (MiB)")
        for k in dict.fromkeys([*c["reserved"], *c["engine_estimate"]]):
            a, b = c["reserved"].get(k, 0), c["engine_estimate"].get(k, 0)
            print(f"   {k:<46} {a / MIB:10.1f} {b / MIB:10.1f}")
        print(f"   {'total (allocated: peak, see peak())':<46} {c['reserved_total'] / MIB:10.1f}"
              f" {c['engine_peak_estimate'] / MIB:10.1f}")  # fmt: skip
        print(f"   reserved but never allocated: {c['unused'] / GIB:.2f} GiB = "
              f"{c['more_resident_layers_if_counted']} more resident layers of "
              f"{c['layer_bytes'] / MIB:.0f} MiB")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="64,16")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--budget", type=float, default=8.0, help="GPU budget in GiB")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    batches = tuple(int(x) for x in args.batches.split(","))
    rep = report(batches, args.prompt, args.new, args.budget)
    print_report(rep)
    if args.json is not None:
        args.json.write_text(json.dumps(rep, indent=1, default=str))


if __name__ == "__main__":
    main()
