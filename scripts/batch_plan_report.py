"""The batch bench's plan (``--bench-synthetic llama3-8b --bench-budget 8GiB``), without a GPU:

    PYTHONPATH=src .venv/bin/python scripts/batch_plan_report.py [--batches 64,16]
        [--prompt 2048] [--new 32] [--budget 8] [--cpu-attn-batch 50e9] [--json out.json]

Plans Llama-3.1-8B shapes for ``cuda:0`` as ``bench.batching.run_batch_bench`` does (``LLM(...,
max_batch=B, max_context=prompt + new)`` -> ``Workload(B, ctx, ctx)``, offload and hybrid auto,
no cpu_memory limit) over a sizes-only store with the H200 host's fixed rates
(``scripts/plan_report.py``), twice: *before*, sized for the padded single-request batch
(``plan_placement(batch_engine=False)``, the accounting the H200 bench ran under), and *after*,
sized for the batch engine that runs it (``planning/batch_step.py``: paged pools, no prefill
scratch / fetch buffers / split blocks at batch size, activations of ``prefill_chunk_tokens``-row
chunks of the packed row). Per part what each reserves on the GPU, the layers and KV layers on
the GPU and the cost model's decode step. A third plan, *batched*, is the batch engine's plan
with the rates plus ``cpu_attn_batch`` (the CPU's batched decode attention over strided views
of a head-major pool in RAM; default ``H200_CPU_ATTN_BATCH``), and every plan's batch-engine
step is also priced at those rates (``engine_step_s_batched``). Planner only, seconds on a CPU.
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
# The H200 host's CPU attention of a decode batch over strided views of a head-major pool
# (scripts/gpu/cpu_attn_micro.py, 16 threads, docs/runs/2026-12-02/cpu_attn_micro2_h200host.json):
# 50 GB/s at batch 64 x 2080 tokens (545 MB of K+V, beyond the caches), 78 GB/s at batch 16
# (136 MB, re-read by each repetition: cache-assisted). A step reads every layer's pool once
# (32 x 136 MB at batch 16), so the DRAM-bound 50 GB/s is the rate for both.
H200_CPU_ATTN_BATCH = 50e9
H200_BATCH_SEQS = 8  # engine.calibrate.batch_attention_seqs(8 KV heads, 16 threads)


def batched_rates(rates, cpu_attn_batch: float = H200_CPU_ATTN_BATCH):
    """``rates`` with the batched CPU decode attention rate."""
    from dataclasses import replace

    return replace(rates, cpu_attn_batch=cpu_attn_batch, cpu_attn_batch_seqs=H200_BATCH_SEQS)


def plan_for(spec, store, batch: int, context: int, budget: int, rates, engine: bool):
    """The plan ``run_batch_bench`` gets for its largest batch (``EngineConfig`` defaults),
    sized for the batch engine or (``engine`` False) for the padded batch."""
    from ollm.planning.placement import Workload, plan_placement

    work = Workload(batch, context, context)
    plan = plan_placement(spec, store, "cuda:0", budget, None, "auto", work, 2, rates,
                          batch_engine=engine)  # fmt: skip
    return work, plan


def planned_parts(spec, store, work, plan) -> dict[str, int]:
    """The plan's reservations, ``kv cache`` and ``activations`` split by part: as
    ``device_kv_bytes`` and ``activation_parts`` count them for the padded batch, or the paged
    pools, the batch-1 scratch and ``plan.batch_parts`` for the batch engine."""
    from ollm.planning.accounting import activation_parts, kv_scratch_bytes
    from ollm.planning.placement import Workload
    from ollm.planning.sizing import PlanSizes
    from ollm.tiers import KvTier

    engine = bool(plan.batch_parts)
    sz = PlanSizes.of(spec, store, work, 2, "cuda:0", plan.budget, None, plan.prefill_chunk_tokens,
                      engine=engine)  # fmt: skip
    dev = [p.kv_tier == KvTier.DEVICE for p in plan.layers]
    out = {"globals (head + norm)": plan.reserved["globals"]}
    out["weights: resident layers"] = plan.reserved["resident layers"]
    out["weights: ring slots"] = plan.reserved["stream buffers"]
    out["KV: device-tier layers"] = sum(kv for d, kv in zip(dev, sz.layer_kv, strict=True) if d)
    out["KV: split layer's device blocks"] = sum(sz.per_token * p.kv_device_tokens
                                                 for p in plan.layers)  # fmt: skip
    scratch = kv_scratch_bytes(spec, Workload(1 if engine else work.batch, work.context), 2)
    out["KV: prefill scratch (KVScratch)"] = scratch if not all(dev) else 0
    out["KV: fetch buffers"] = 2 * sz.scratch if any(p.kv_fetch for p in plan.layers) else 0
    rows = plan.prefill_chunk_tokens or work.prefill_tokens
    act = plan.batch_parts or activation_parts(spec, work, 2, sz.mlp_chunk, rows, True)
    out.update({f"act: {k}": v for k, v in act.items()})
    total = sum(plan.reserved.values())
    assert abs(sum(out.values()) - total) < MIB, (sum(out.values()), total)
    return out


def engine_step_s(store, plan, work, rates) -> float:
    """The batch engine's decode step on ``plan`` as the cost model sees it, the same for both
    plans: every layer computed on the GPU (``StepMode`` streams all at these batches), no KV
    fetched (``PackedLayerKV.fetcher`` is None), a layer whose KV is in RAM stalls the chain
    while the CPU attends every sequence's KV (a split layer's device blocks are not used); the
    engine's chain (``costmodel.decode_chain``)."""
    from dataclasses import replace

    from ollm.planning.decode_split import choose_kv_fetch

    layers = [replace(p, decode_device=None, kv_fetch=False, kv_device_tokens=0)
              for p in plan.layers]  # fmt: skip
    per_token = 2 * work.batch * 8 * 128 * 2  # Llama-3.1-8B: 8 KV heads of 128, bf16
    return choose_kv_fetch(store, layers, rates, work, per_token, {}, plan.ring_slots,
                           fetch=False, engine=True)[2]  # fmt: skip


def summary(plan, store, work, rates, batch_rates=None) -> dict:
    """Layers and KV layers on the GPU, the reservation and the cost model's decode steps: the
    plan's own prediction and the batch engine's step (``engine_step_s``), also at
    ``batch_rates`` (``engine_step_s_batched``)."""
    from ollm.tiers import KvTier, Tier

    return {
        "layers_on_gpu": plan.count(Tier.GPU),
        "kv_layers_on_gpu": sum(p.kv_tier == KvTier.DEVICE for p in plan.layers),
        "cpu_layers": len(plan.cpu_layers),
        "reserved_total": plan.peak_device_bytes,
        "plan_decode_step_s": plan.predicted.get("decode s (KV split)"),
        "engine_step_s": engine_step_s(store, plan, work, rates),
        "engine_step_s_batched": engine_step_s(store, plan, work, batch_rates or rates),
    }


def case(spec, store, batch: int, prompt: int, new: int, budget: int, rates, batch_rates) -> dict:
    """One batch size: the three plans, their parts and summaries."""
    out: dict = {"batch": batch}
    for name, engine, r in (("before", False, rates), ("after", True, rates),
                            ("batched", True, batch_rates)):  # fmt: skip
        work, plan = plan_for(spec, store, batch, prompt + new, budget, r, engine)
        out[name] = {"plan": dict(plan.describe()), "reserved": planned_parts(spec, store, work, plan),
                     **summary(plan, store, work, r, batch_rates)}  # fmt: skip
    out["layer_bytes"] = plan.layer_bytes
    return out


def report(batches=(64, 16), prompt: int = 2048, new: int = 32, budget_gib: float = 8.0,
           cpu_attn_batch: float = H200_CPU_ATTN_BATCH, rates=None) -> dict:  # fmt: skip
    """The cases at ``rates`` (default: the fixed H200 rates of ``plan_report``)."""
    from plan_report import h200_rates, llama8b

    spec, store = llama8b()
    budget = int(budget_gib * GIB)
    rates = rates or h200_rates()
    fast = batched_rates(rates, cpu_attn_batch)
    cases = [case(spec, store, b, prompt, new, budget, rates, fast) for b in batches]
    return {"model": "llama3-8b (bf16, meta store)", "prompt": prompt, "new": new,
            "budget": budget, "cpu_attn_batch": cpu_attn_batch, "cases": cases}  # fmt: skip


def print_report(rep: dict) -> None:
    for c in rep["cases"]:
        cols = [c[n] for n in ("before", "after", "batched")]
        print(f"== batch {c['batch']} (MiB)   before    after  batched")
        for k in dict.fromkeys(k for x in cols for k in x["reserved"]):
            print(f"   {k:<46}" + "".join(f" {x['reserved'].get(k, 0) / MIB:8.1f}" for x in cols))
        print(f"   {'total':<46}" + "".join(f" {x['reserved_total'] / MIB:8.1f}" for x in cols))
        for k in ("layers_on_gpu", "kv_layers_on_gpu", "cpu_layers"):
            print(f"   {k:<46}" + "".join(f" {x[k]:8d}" for x in cols))
        for k in ("plan_decode_step_s", "engine_step_s", "engine_step_s_batched"):
            print(f"   {k:<46}" + "".join(f" {x[k] or 0:8.3f}" for x in cols))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="64,16")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--budget", type=float, default=8.0, help="GPU budget in GiB")
    ap.add_argument("--cpu-attn-batch", type=float, default=H200_CPU_ATTN_BATCH,
                    help="the batched CPU decode attention rate, KV bytes/s")  # fmt: skip
    ap.add_argument("--rates-from", type=Path, default=None,
                    help="a bench JSON whose 'rates' (MachineRates) replace the fixed ones")  # fmt: skip
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    batches = tuple(int(x) for x in args.batches.split(","))
    rates = None
    if args.rates_from is not None:
        from ollm.planning.costmodel import MachineRates

        rates = MachineRates(**json.loads(args.rates_from.read_text())["rates"])
    rep = report(batches, args.prompt, args.new, args.budget, args.cpu_attn_batch, rates)
    rep["rates_from"] = str(args.rates_from) if args.rates_from else "plan_report.h200_rates"
    print_report(rep)
    if args.json is not None:
        args.json.write_text(json.dumps(rep, indent=1, default=str))


if __name__ == "__main__":
    main()
