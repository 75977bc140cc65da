"""Host cost per prefill row chunk of the batch engine, measured on the CPU (issue 13):

    PYTHONPATH=src python scripts/batch_prefill_overhead.py [--out FILE] [--batch 16]
        [--prompt 512] [--chunk 64] [--layers 32] [--ram-layers 24] [--repeats 3]

The H200's batch-64 x 2k prefill took 28.6 s where its compute is ~3 s: 512 row chunks per
layer x 32 layers, ~1.5 ms each. This reproduces the structure with the arithmetic taken away:
a llama of tiny widths (``batch_overhead.SHAPES``) with Llama-3.1-8B's depth, float32, every
layer computed on the CPU, the last ``--ram-layers`` layers' KV in the RAM tier (as the 8 GiB
plan keeps 24 of 32), ``--batch`` prompts of ``--prompt`` tokens prefilled in one step packed
into one row cut into ``--chunk``-row chunks (``plan.prefill_chunk_tokens``). Reported per
chunk and layer (``Runner._chunked_block`` iterations; a chunk cut at sequence boundaries counts
once): wall and CPU microseconds of the step, aten ops other than views (kernel launches on a
GPU), host reads (``tolist``/``item``/...: syncs on a GPU), and calls of the packed KV's
earlier-key reads (``_gather``, ``_run_kv``: the link crossings of a RAM pool on a GPU) and
pool writes. One JSON object (stdout, and ``--out``); compare versions by running each
checkout's script under ``nice``, alternated.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from batch_overhead import SHAPES, _store  # noqa: E402
from moe_overhead import Ops, _commit, _host_reads, write_report  # noqa: E402

READS = ("tolist", "item", "__int__", "__float__", "__bool__", "cpu")
COUNTED = ("attend", "_gather", "_run_kv")  # PackedLayerKV methods counted


def _runner(llm, chunk: int, ram_layers: int):
    """``llm``'s runner with the last ``ram_layers`` layers' KV in the RAM tier and prefill
    cut into ``chunk``-row chunks."""
    from ollm.engine.runner import Runner

    plan = llm.plan
    n = len(plan.layers)
    layers = tuple(
        replace(p, kv_tier="cpu" if i >= n - ram_layers else p.kv_tier)
        for i, p in enumerate(plan.layers)
    )
    plan = replace(plan, layers=layers, prefill_chunk_tokens=chunk)
    return Runner(llm.spec, plan, llm.prefetcher, llm.dtype)


def _counting():
    """Counters of the `COUNTED` methods of ``PackedLayerKV`` (those that exist here)."""
    from ollm.kv import packed

    calls: collections.Counter = collections.Counter()
    real = {}
    for name in COUNTED:
        fn = getattr(packed.PackedLayerKV, name, None)
        if fn is None:
            continue
        real[name] = fn

        def wrap(fn=fn, name=name):
            def counted(self, *a, **k):
                calls[name] += 1
                return fn(self, *a, **k)

            return counted

        setattr(packed.PackedLayerKV, name, wrap())
    return calls, real


def _prefill(runner, batch: int, prompt: int, seed: int, count: bool) -> dict:
    """One engine step that prefills ``batch`` prompts; its wall and CPU seconds (and, with
    ``count``, ops, host reads and packed-KV calls)."""
    from ollm import SamplingParams
    from ollm.engine.batch import BatchEngine
    from ollm.kv import packed

    sp = SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True)
    eng = BatchEngine(runner, None, (), block_tokens=16, max_batch=batch,
                      max_context=prompt + 16, max_step_tokens=batch * prompt)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    for _ in range(batch):
        eng.add(torch.randint(0, SHAPES["vocab_size"], (prompt,), generator=g).tolist(), sp)
    out: dict = {}
    real: dict = {}
    try:
        if count:
            calls, real = _counting()
            with Ops() as ops, _host_reads(READS) as reads:
                eng.step()
            out = dict(ops=ops.ops, reads=reads, calls=calls)
        else:
            c0, t0 = time.thread_time(), time.perf_counter()
            eng.step()
            out = dict(wall=time.perf_counter() - t0, cpu=time.thread_time() - c0)
        assert eng.steps == 1 and eng.sampled == batch, "the prefill took more than one step"
    finally:
        for name, fn in real.items():
            setattr(packed.PackedLayerKV, name, fn)
        eng.close()
    return out


def measure(llm, args) -> dict:
    """The numbers of the module docstring for one configuration."""
    runner = _runner(llm, args.chunk, args.ram_layers)
    layers = llm.spec.num_layers
    _prefill(runner, args.batch, args.prompt, 0, False)  # warm-up
    walls, cpus = [], []
    for r in range(args.repeats):
        t = _prefill(runner, args.batch, args.prompt, r + 1, False)
        walls.append(t["wall"])
        cpus.append(t["cpu"])
    c = _prefill(runner, args.batch, args.prompt, 99, True)
    iters = c["calls"]["attend"]  # one attend per chunk and layer
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    ops = sum(c["ops"].values())
    top = sorted(c["ops"].items(), key=lambda kv: -kv[1])[:15]
    return dict(
        step_s=dict(median=round(wall, 4), all=[round(w, 4) for w in walls]),
        cpu_s=round(cpu, 4),
        chunk_layer_iterations=iters,
        chunks_per_layer=round(iters / layers, 2),
        us_per_chunk_layer=round(wall / iters * 1e6, 1),
        cpu_us_per_chunk_layer=round(cpu / iters * 1e6, 1),
        ops_per_step=ops,
        ops_per_chunk_layer=round(ops / iters, 2),
        top_ops_per_chunk_layer={k: round(v / iters, 2) for k, v in top},
        host_reads_per_step=dict(c["reads"]),
        packed_calls_per_step=dict(c["calls"]),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--ram-layers", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--run-writes",
        action="store_true",
        help="write new K/V into the RAM pools as from a GPU (one copy per run)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--machine", default="2-core CPU VM")
    args = ap.parse_args()
    import ollm
    from ollm import LLM

    torch.set_num_threads(args.threads)
    if args.run_writes:  # the path a GPU takes into pinned pools (kv/prefill_rows.py)
        from ollm.kv.packed import PackedLayerKV

        PackedLayerKV.run_writes = True
    tmp = Path(tempfile.mkdtemp(prefix="batch-prefill-"))
    path = _store(tmp, args.layers)
    llm = LLM(path, device="cpu", dtype="float32", max_batch=args.batch,
              max_context=args.prompt + 16, cache_dir=tmp / "c", progress=False)  # fmt: skip
    try:
        out = dict(
            machine=args.machine, commit=_commit(), ollm=str(Path(ollm.__file__).resolve().parent),
            torch=torch.__version__, threads=args.threads, load_before=os.getloadavg()[0],
            shapes=SHAPES | {"layers": args.layers}, batch=args.batch, prompt=args.prompt,
            chunk=args.chunk, ram_layers=args.ram_layers, run_writes=args.run_writes,
            **measure(llm, args),
        )  # fmt: skip
    finally:
        llm.close()
    write_report(out, args.out)


if __name__ == "__main__":
    main()
