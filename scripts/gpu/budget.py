"""Budget matrix (issue 11): is "peak GPU memory never exceeds ``gpu_memory``" kept on every path?

    PYTHONPATH=src python scripts/gpu/budget.py [--out DIR] [--quick] [--kinds exact,codec,batch,moe,resident,shared]

Kind ``exact`` (the rows issue 11 began with): a Llama-3.2-1B-shaped random model (``llama3-1b``
preset, made on the device) in float32, float16 and bfloat16; prompts of 2k / 12k / 32k random
tokens, 16 new tokens; budgets from the smallest the planner accepts upward, plus one just below
it (which must be refused with a BudgetError naming the minimum before anything runs) and a
padded batch of two (the masked attention path). Kinds ``codec`` (compressed KV: int4, int8,
auto), ``batch`` (the paged batch engine, exact and int4 pools), ``moe`` (experts one by one
through the GPU expert cache with lookahead), ``resident`` (a long prompt with the opt-in
decode-resident layers held in decode) and ``shared`` (8 prompts sharing 7/8 of their tokens on
a ``shared_prefix`` plan, decode attending the prefix once over GPU pools) are planned in
``budget_kinds.py`` (bf16 stores): one budget just below the minimum, the least budget on the
kind's path and (not with ``--quick``, except ``resident``) one above it.
Each cell runs in a fresh Python process and reports ``torch.cuda.max_memory_reserved()`` over
its whole life (construction included) next to the budget and the plan's reservations; a cell
with ``device`` "cpu" is a dry run (tests/test_budget.py). ``run`` writes ``budget_matrix.json``
and ``cells.jsonl`` under ``out``. ``--quick --kinds codec,batch,moe`` (14 cells, 4-layer
stores) should take about a minute on an H200 (estimated from the exact cells' ~20 s each, not
yet measured); the full run's stores have 16 layers, MoE 8 layers of 128 experts.
``--quick --kinds resident`` (3 cells, 8k prompt, 4 layers) checks the opt-in decode-resident
layers' peak (the H200 measured 8.018 GiB at 8 GiB before the allocator allowance).
``--quick --kinds shared`` (2 cells, 2k prompts, 4 layers) checks a ``shared_prefix`` plan's
peak, whose pools hold the prefix once (not yet measured on a device).
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
    """Child process body: build the LLM under the budget, generate, report the peak. A cell
    with ``device`` "cpu" is a dry run (the budget is RAM; no CUDA peak, ``peak_reserved`` 0)."""
    import torch

    from ollm import LLM, SamplingParams
    from ollm.errors import BudgetError

    kinds = _kinds_module()
    device = cell.get("device", "cuda:0")
    cuda = device.startswith("cuda")
    dev = torch.device(device)
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(dev)

    def peak(what=None) -> int:
        what = what or torch.cuda.max_memory_reserved
        return what(dev) if cuda else 0

    row = dict(cell)
    t0 = time.perf_counter()
    limit = {"gpu_memory" if cuda else "cpu_memory": cell["budget"]}
    try:
        llm = LLM(cell["store"], device=device, max_context=cell["prompt"] + NEW_TOKENS,
                  max_batch=cell["batch"], cache_dir=cell["cache"], progress=False,
                  **limit, **kinds.options(cell))  # fmt: skip
    except BudgetError as exc:
        row.update(refused=True, error=str(exc)[:400], peak_reserved=peak())
        return row
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    if cell.get("kind", "exact") == "exact":
        gen = torch.Generator().manual_seed(cell["prompt"])
        ids = torch.randint(0, 128000, (cell["batch"], cell["prompt"]), generator=gen).tolist()
        if cell["batch"] > 1:
            ids[1] = ids[1][97:]  # a shorter second prompt: left padding, so masks in every layer
        res = llm.generate(ids if cell["batch"] > 1 else ids[0], params)
    else:  # budget_kinds.generate: the shared kind's first prompt prefilled before the rest
        res = kinds.generate(llm, cell, params)
    if cuda:
        torch.cuda.synchronize(dev)
    results = res if isinstance(res, list) else [res]
    plan = llm.plan
    row.update(
        refused=False,
        seconds=round(time.perf_counter() - t0, 2),
        peak_reserved=peak(),
        peak_allocated=peak(torch.cuda.max_memory_allocated),
        planned=plan.peak_device_bytes,
        reserved={k: int(v) for k, v in plan.reserved.items()},
        prefill_chunk=plan.prefill_chunk_tokens,
        gpu_layers=plan.count("gpu"),
        kv_offloaded_layers=sum(p.kv_tier != "device" for p in plan.layers),
        kv_fetch_layers=sum(p.kv_fetch for p in plan.layers),
        # Layers held on the GPU in decode only, in decode's reservations (activations of a
        # decode-size forward): the peak must hold for both phases.
        decode_resident_layers=len(plan.decode_resident),
        reserved_decode={k: int(v) for k, v in plan.decode_reserved.items()},
        tokens=len(results[0].token_ids),
    )
    if cell.get("kind", "exact") != "exact":
        row.update(kinds.report(llm, cell, results))
    llm.close()
    return row


def _kinds_module():
    """``budget_kinds.py`` beside this file (scripts/gpu is not a package)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import budget_kinds

    return budget_kinds


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


def run(out: Path, quick: bool = False, prompts: tuple[int, ...] | None = None,
        kinds: tuple[str, ...] | None = None) -> dict:  # fmt: skip
    """Make the stores, run every cell in its own process (a few at a time), check and save.
    ``kinds``: which cell kinds (``budget_kinds.KINDS``, default all)."""
    bk = _kinds_module()
    kinds = kinds or bk.KINDS
    if set(kinds) - set(bk.KINDS):
        raise SystemExit(f"unknown kinds {sorted(set(kinds) - set(bk.KINDS))}; known: {bk.KINDS}")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ollm-budget-"))
    todo = []
    if "exact" in kinds:
        stores = make_stores(work, 4 if quick else None)
        todo = cells(stores, quick, prompts)
        for c in todo:  # one machine-rates cache per dtype: measured once, never raced
            c["cache"] = str(work / f"cache-{c['dtype']}")
    new = tuple(k for k in kinds if k != "exact")
    if new:  # planned in this process (any calibration too): the cells read its cache
        stores = bk.make_kind_stores(work, new, quick)
        todo += bk.kind_cells(new, stores, quick, "cuda:0", str(work / "cache-kinds"))
    rows = run_cells(todo, out)
    report = {
        "model": "llama3-1b (random weights); moe kind: qwen3-30b-a3b shapes, few layers",
        "kinds": list(kinds),
        "new_tokens": NEW_TOKENS,
        "seconds": round(time.perf_counter() - t0, 1),
        "all_ok": all(r["ok"] for r in rows),
        "cells": rows,
    }
    (out / "budget_matrix.json").write_text(json.dumps(report, indent=1))
    return report


def run_cells(todo: list[dict], out: Path, spawn=None) -> list[dict]:
    """Each cell in its own process, six at a time; rows judged (``judge``) and logged as they
    come to ``cells.jsonl`` (a run cut short keeps them)."""
    rows = []
    with ThreadPoolExecutor(6) as pool, (out / "cells.jsonl").open("w") as log:
        for r in pool.map(spawn or _spawn, todo):
            rows.append(judge(r))
            log.write(json.dumps(r) + "\n")
            log.flush()
            print(r.get("kind", "exact"), r.get("codec", ""), r["dtype"], r["prompt"],
                  r["batch"], r["budget"] // MIB, "MiB ->",
                  "failed" if r.get("failed") else "refused" if r["refused"] else
                  f"peak {r['peak_reserved'] // MIB} MiB", "ok" if r["ok"] else "NOT OK",
                  flush=True)  # fmt: skip
    return rows


def judge(r: dict) -> dict:
    """``ok``: below the minimum refused with the one-line error naming it; from the minimum
    up, ran within the budget (peak reserved; 0 on a CPU dry run) on the cell's path."""
    if r.get("failed"):
        r["ok"] = False
    elif r["budget"] < r["minimum"]:
        err = r.get("error", "")
        r["ok"] = bool(r["refused"]) and "at least" in err and "\n" not in err
    else:
        ran = not r["refused"] and r["peak_reserved"] <= r["budget"]
        r["ok"] = ran and r.get("path_ok", True) and r["tokens"] == NEW_TOKENS
    r.pop("store", None)
    r.pop("cache", None)
    return r


def table(report: dict) -> str:
    """Markdown rows: dtype, prompt, batch, budget, peak, ok."""
    lines = ["| kind | dtype | prompt | batch | budget MiB | min MiB | peak reserved MiB | result |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["cells"]:
        peak = r.get("peak_reserved", 0) / MIB
        what = "refused" if r.get("refused") else ("FAILED" if r.get("failed") else "ran")
        lines.append(
            f"| {r.get('kind', 'exact')} {r.get('codec', '')} | {r['dtype']} | {r['prompt']} | {r['batch']} | {r['budget'] / MIB:.0f} | "
            f"{r['minimum'] / MIB:.0f} | {peak:.0f} | {what}{'' if r['ok'] else ' (NOT OK)'} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompts", help="comma-separated prompt lengths (default 2048,12000,32768)")
    ap.add_argument(
        "--kinds",
        help="comma-separated cell kinds: exact,codec,batch,moe,resident,shared (default all)",
    )
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))))
        return 0
    prompts = tuple(int(x) for x in args.prompts.split(",")) if args.prompts else None
    kinds = tuple(k.strip() for k in args.kinds.split(",")) if args.kinds else None
    report = run(Path(args.out), args.quick, prompts, kinds)
    print(table(report))
    print(f"all ok: {report['all_ok']} ({report['seconds']} s)")
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
