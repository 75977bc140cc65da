"""Budget matrix (issue 11): is "peak GPU memory never exceeds ``gpu_memory``" kept on every path?

    PYTHONPATH=src python scripts/gpu/budget.py [--out DIR] [--quick]

A Llama-3.2-1B-shaped random model (``llama3-1b`` preset, made on the device) in float32,
float16 and bfloat16; prompts of 2k / 12k / 32k random tokens, 16 new tokens; budgets from the
smallest the planner accepts upward, plus one just below it (which must be refused with a
BudgetError naming the minimum before anything runs) and a padded batch of two (the masked
attention path). Each cell runs in a fresh Python process and reports
``torch.cuda.max_memory_reserved()`` over its whole life (construction included) next to the
budget and the plan's reservations. ``run`` writes ``budget_matrix.json`` under ``out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
DTYPES = ("float32", "float16", "bfloat16")
NEW_TOKENS = 16


def minimum_budget(store_dir: Path, context: int, batch: int = 1) -> int:
    """The smallest ``gpu_memory`` (MiB granularity) the planner accepts for this request."""
    import torch

    from ollm.errors import BudgetError
    from ollm.models.registry import build_spec
    from ollm.planning.placement import Workload, plan_placement
    from ollm.storage.store import LayerStore

    store = LayerStore(store_dir)
    spec = build_spec(store.hf_config())
    elem = torch.finfo(store.dtype).bits // 8
    work = Workload(batch, context, context)

    def fits(mib: int) -> bool:
        try:
            plan_placement(spec, store, "cuda:0", mib * MIB, None, "auto", work, elem)
            return True
        except BudgetError:
            return False

    lo, hi = 1, 1 << 18  # MiB: lo refused, hi accepted
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    store.close()
    return hi * MIB


def make_stores(root: Path, layers: int | None) -> dict[str, Path]:
    """One random-weight store per dtype (the same weights, converted)."""
    import torch

    from ollm.models.registry import STORE_FAMILIES as FAM
    from ollm.storage.convert import convert
    from ollm.storage.synthetic import SyntheticSource

    over = {} if layers is None else {"num_hidden_layers": layers}
    out = {}
    for name in DTYPES:
        dst = root / f"llama3-1b-{name}"
        src = SyntheticSource("llama3-1b", families=FAM, **over)
        convert(src, dst, dtype=getattr(torch, name), progress=False, families=FAM)
        out[name] = dst
    return out


def cells(
    stores: dict[str, Path], quick: bool, prompts: tuple[int, ...] | None = None
) -> list[dict]:
    """The matrix: per dtype and prompt, one budget below the minimum and three from it up."""
    prompts = prompts or ((2048,) if quick else (2048, 12000, 32768))
    rows = []
    for dtype, store in stores.items():
        for prompt in prompts:
            low = minimum_budget(store, prompt + NEW_TOKENS)
            for budget in (low - MIB, low, int(low * 1.25), 2 * low):
                rows.append(dict(dtype=dtype, store=str(store), prompt=prompt, batch=1,
                                 budget=budget, minimum=low))  # fmt: skip
        # A padded batch of two: the masked attention path (blocked kernel on every dtype).
        low = minimum_budget(store, 2048 + NEW_TOKENS, batch=2)
        rows.append(dict(dtype=dtype, store=str(store), prompt=2048, batch=2, budget=low,
                         minimum=low))  # fmt: skip
    return rows


def run_cell(cell: dict) -> dict:
    """Child process body: build the LLM under the budget, generate, report the peak."""
    import torch

    from ollm import LLM, SamplingParams
    from ollm.errors import BudgetError

    dev = torch.device("cuda:0")
    torch.cuda.init()
    torch.cuda.reset_peak_memory_stats(dev)
    row = dict(cell)
    t0 = time.perf_counter()
    try:
        llm = LLM(cell["store"], device="cuda:0", gpu_memory=cell["budget"],
                  max_context=cell["prompt"] + NEW_TOKENS, max_batch=cell["batch"],
                  cache_dir=cell["cache"], progress=False)  # fmt: skip
    except BudgetError as exc:
        row.update(refused=True, error=str(exc)[:400])
        row["peak_reserved"] = torch.cuda.max_memory_reserved(dev)
        return row
    gen = torch.Generator().manual_seed(cell["prompt"])
    ids = torch.randint(0, 128000, (cell["batch"], cell["prompt"]), generator=gen).tolist()
    if cell["batch"] > 1:
        ids[1] = ids[1][97:]  # a shorter second prompt: left padding, so masks in every layer
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    res = llm.generate(ids if cell["batch"] > 1 else ids[0], params)
    torch.cuda.synchronize(dev)
    plan = llm.plan
    row.update(
        refused=False,
        seconds=round(time.perf_counter() - t0, 2),
        peak_reserved=torch.cuda.max_memory_reserved(dev),
        peak_allocated=torch.cuda.max_memory_allocated(dev),
        planned=plan.peak_device_bytes,
        reserved={k: int(v) for k, v in plan.reserved.items()},
        prefill_chunk=plan.prefill_chunk_tokens,
        gpu_layers=plan.count("gpu"),
        kv_offloaded_layers=sum(p.kv_tier != "device" for p in plan.layers),
        kv_fetch_layers=sum(p.kv_fetch for p in plan.layers),
        tokens=len((res[0] if isinstance(res, list) else res).token_ids),
    )
    llm.close()
    return row


def _spawn(cell: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, __file__, "--cell", json.dumps(cell)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode or not lines:
        return dict(cell, failed=True, rc=proc.returncode, stderr=proc.stderr[-1500:])
    return json.loads(lines[-1])


def run(out: Path, quick: bool = False, prompts: tuple[int, ...] | None = None) -> dict:
    """Make the stores, run every cell in its own process (a few at a time), check and save."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ollm-budget-"))
    stores = make_stores(work, 4 if quick else None)
    todo = cells(stores, quick, prompts)
    for c in todo:  # one machine-rates cache per dtype: measured once, never raced
        c["cache"] = str(work / f"cache-{c['dtype']}")
    rows = []
    with ThreadPoolExecutor(6) as pool, (out / "cells.jsonl").open("w") as log:
        for r in pool.map(_spawn, todo):  # each row kept as it comes (a run cut short)
            rows.append(r)
            log.write(json.dumps(r) + "\n")
            log.flush()
            print(r["dtype"], r["prompt"], r["batch"], r["budget"] // MIB, "MiB ->",
                  "failed" if r.get("failed") else "refused" if r["refused"] else
                  f"peak {r['peak_reserved'] // MIB} MiB", flush=True)  # fmt: skip
    for r in rows:
        below = r["budget"] < r["minimum"]
        if r.get("failed"):
            r["ok"] = False
        elif below:
            r["ok"] = bool(r["refused"]) and "at least" in r.get("error", "")
        else:
            r["ok"] = not r["refused"] and r["peak_reserved"] <= r["budget"]
        r.pop("store", None)
        r.pop("cache", None)
    report = {
        "model": "llama3-1b (random weights)",
        "new_tokens": NEW_TOKENS,
        "seconds": round(time.perf_counter() - t0, 1),
        "all_ok": all(r["ok"] for r in rows),
        "cells": rows,
    }
    (out / "budget_matrix.json").write_text(json.dumps(report, indent=1))
    return report


def table(report: dict) -> str:
    """Markdown rows: dtype, prompt, batch, budget, peak, ok."""
    lines = ["| dtype | prompt | batch | budget MiB | min MiB | peak reserved MiB | result |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["cells"]:
        peak = r.get("peak_reserved", 0) / MIB
        what = "refused" if r.get("refused") else ("FAILED" if r.get("failed") else "ran")
        lines.append(
            f"| {r['dtype']} | {r['prompt']} | {r['batch']} | {r['budget'] / MIB:.0f} | "
            f"{r['minimum'] / MIB:.0f} | {peak:.0f} | {what}{'' if r['ok'] else ' (NOT OK)'} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompts", help="comma-separated prompt lengths (default 2048,12000,32768)")
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))))
        return 0
    prompts = tuple(int(x) for x in args.prompts.split(",")) if args.prompts else None
    report = run(Path(args.out), args.quick, prompts)
    print(table(report))
    print(f"all ok: {report['all_ok']} ({report['seconds']} s)")
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
