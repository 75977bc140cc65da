"""How many streamed layers should run their MLP on the CPU in decode (``planning/mlp_cpu.py``)?

    PYTHONPATH=src:tests python3 scripts/gpu/mlp_cpu_sweep.py [--out FILE] [--counts 0,4,7,10,14,21]
        [--rounds 2] [--budget 8GiB] [--prompt 6176] [--new 16] [--device cuda] [--distinct]

The shared-prefix bench case (16 requests sharing all but 32 of ``--prompt`` tokens, ``--new``
tokens each) on Llama-3.1-8B shapes (random bf16 weights) at ``--budget``: the planner's plan
with ``k`` of its streamed RAM layers (spread by ``costmodel.interleave``) marked ``mlp_cpu``,
for each ``k`` of ``--counts`` (capped at the streamed layers), every decode step in that mode
(no probes of streaming every layer). Per count: the median round's wall, its decode steps and
their median, and whether its tokens equal the count-0 run's (bf16: the CPU's MLP may round
otherwise). Also the planner's own choice. The LLM's prefetcher is closed first; each count
gets its own (resident layers reloaded), so the peak is the plan's. The eleventh session's
model priced a CPU MLP at ~9 ms (weight read at ``cpu_mem``); the twelfth session's prefix runs
(7 layers, steps 0.125 s against 0.166 s) hid it under the copies, so more layers may pay.
``--distinct``: prompts sharing nothing (``--prompt 2080``: the batch-16 bench, whose KV sits in
RAM and is attended on the CPU while the MLPs run there too; a layout of that kind with 14
layers marked stepped at 0.57 s against a predicted 0.19 s).

``--device cpu``: a dry run on a tiny llama whose accelerator the CPU plays (streamed layers
through the ring, counts 0..2; ``tests/test_mlp_cpu.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

REQUESTS, TAIL = 16, 32


def prompts(seed: int, tokens: int, n: int = REQUESTS, shared: bool = True) -> list[list[int]]:
    """``n`` prompts of ``tokens`` tokens sharing all but the last ``TAIL`` (or nothing)."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(0, 256, (tokens - TAIL,), generator=g).tolist()
    own = TAIL if shared else tokens
    return [head[: tokens - own] + torch.randint(0, 256, (own,), generator=g).tolist()
            for _ in range(n)]  # fmt: skip


def marked(plan, k: int, rows: int):
    """``plan`` with ``k`` of its streamed RAM layers, spread, marked ``mlp_cpu`` (none else)."""
    from ollm.planning.costmodel import interleave
    from ollm.tiers import Tier

    cands = [i for i, p in enumerate(plan.layers) if p.tier == Tier.CPU]
    chosen = set(interleave(cands, k)) if k else set()
    layers = tuple(replace(p, mlp_cpu=i in chosen) for i, p in enumerate(plan.layers))
    return replace(plan, layers=layers, cpu_max_tokens=max(plan.cpu_max_tokens, rows))


def run(llm, plan, batch: list[list[int]], new: int) -> dict:
    """The batch through a batch engine on ``plan``, every decode step in the plan's mode; the
    wall, each step's seconds and query rows, and the tokens."""
    from ollm import SamplingParams
    from ollm.engine.batch import BatchEngine
    from ollm.engine.runner import Runner
    from ollm.engine.step_mode import StepMode
    from ollm.runtime.prefetch import Prefetcher
    from ollm.storage.store import LayerStore

    params = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    prefetcher = Prefetcher(LayerStore(llm.store_path), plan, llm.stats)
    eng = None
    try:
        runner = Runner(llm.spec, plan, prefetcher, llm.dtype)
        eng = BatchEngine.for_plan(runner, None, (), len(batch), len(batch[0]) + new)
        eng.step_mode = StepMode(None)  # the plan's choice in every decode step
        t0 = time.perf_counter()
        ids = [eng.add(q, params) for q in batch]
        steps = []
        while eng.has_work():
            rows, ts = eng.step_tokens, time.perf_counter()
            eng.step()
            steps.append([round(time.perf_counter() - ts, 4), eng.step_tokens - rows])
        wall = time.perf_counter() - t0
        tokens = [eng.finished[r].token_ids for r in ids]
    finally:
        if eng is not None:
            eng.close()
        prefetcher.close()
    decode = [s for s, rows in steps if rows <= len(batch)]
    return {"wall_s": wall, "steps": steps, "tokens": tokens,
            "median_decode_step_s": statistics.median(decode) if decode else None}  # fmt: skip


def sweep(llm, plan, counts, rounds: int, prompt: int, new: int, n: int = REQUESTS,
          shared: bool = True) -> dict:  # fmt: skip
    """Each count ``rounds`` times (``n`` prompts of the round's seed): its median round."""
    from ollm.planning.mlp_cpu import mlp_cpu_layers

    rows = {}
    base = None
    for k in counts:
        runs = [run(llm, marked(plan, k, n), prompts(r, prompt, n, shared), new)
                for r in range(rounds)]  # fmt: skip
        mid = sorted(runs, key=lambda x: x["wall_s"])[(len(runs) - 1) // 2]
        tokens = [x["tokens"] for x in runs]
        base = tokens if base is None else base
        rows[k] = {**{key: v for key, v in mid.items() if key != "tokens"},
                   "walls_s": [x["wall_s"] for x in runs], "tokens_equal_k0": tokens == base}  # fmt: skip
        print(k, {key: v for key, v in rows[k].items() if key != "steps"}, flush=True)
    return {"planner_choice": mlp_cpu_layers(plan), "predicted": plan.predicted, "counts": rows}


def cpu_dry_run(tmp: Path, rounds: int) -> dict:
    """Counts 0..2 on a tiny llama with its accelerator played by the CPU."""
    from conftest import make_hf_model, plan_on_device, streaming_engine_plan
    from ollm import LLM
    from ollm.planning.placement import Workload

    make_hf_model("llama", tmp / "llama")
    kw = dict(device="cpu", dtype="float32", cache_dir=tmp / "cache", progress=False)
    with LLM(tmp / "llama", **kw, max_batch=4, max_context=96, shared_prefix=40) as llm:
        plan = streaming_engine_plan(llm.spec, llm.store, Workload(4, 96, 96, 40))
        return sweep(llm, plan_on_device(plan, "cpu:1"), (0, 1, 2), rounds, 72, 8, n=4)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="mlp_cpu_sweep.json")
    ap.add_argument("--counts", default="0,4,7,10,14,21")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budget", default="8GiB")
    ap.add_argument("--prompt", type=int, default=6176)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--distinct", action="store_true", help="prompts sharing nothing")
    args = ap.parse_args()
    head = 0 if args.distinct else args.prompt - TAIL
    with tempfile.TemporaryDirectory() as tmp:
        if args.device == "cpu":
            report = cpu_dry_run(Path(tmp), args.rounds)
        else:
            from ollm import LLM
            from ollm.models.registry import STORE_FAMILIES
            from ollm.storage.synthetic import make_synthetic_store

            store = make_synthetic_store("llama3-8b", Path(tmp) / "s", progress=False,
                                         families=STORE_FAMILIES)  # fmt: skip
            with LLM(store, device=args.device, gpu_memory=args.budget, max_batch=REQUESTS,
                     max_context=args.prompt + args.new, shared_prefix=head,
                     progress=False) as llm:  # fmt: skip
                llm.engine.prefetcher.close()  # each count loads its own
                streamed = sum(p.tier.name == "CPU" for p in llm.plan.layers)
                counts = sorted({min(int(c), streamed) for c in args.counts.split(",")})
                report = sweep(llm, llm.plan, counts, args.rounds, args.prompt, args.new,
                               shared=not args.distinct)  # fmt: skip
                report["plan"] = dict(llm.plan.describe())
    report["device"] = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
