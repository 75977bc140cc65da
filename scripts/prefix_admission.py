"""The step that admits requests over a cached shared prefix, against a decode step (issue 13):

    PYTHONPATH=src python scripts/prefix_admission.py [--out FILE] [--layers 4]
        [--prefix 6144] [--tail 32] [--requests 16] [--repeats 3] [--head-dim 16]

The bench's ``prefix`` case (`ollm.bench.batching.prefix_run`) on the CPU, as a stand-in for the
H200's shared_prefix plan (every KV pool on the compute device): request A (``--prefix`` +
``--tail`` tokens) is prefilled in step 1; then ``--requests - 1`` requests whose first
``--prefix`` tokens equal A's (``--tail`` tokens of their own) arrive, and step 2 carries A's
decode token and their tails (a prefix hit each); later steps decode one token per sequence.
A random-weight llama of tiny widths (``batch_overhead.SHAPES``, ``--head-dim``), float32, one
thread, 16-token blocks. Per repeat a fresh engine. Reported for step 2 and for a decode step:

* ``wall_ms`` (median over repeats) and ``cpu_ms`` (this thread); ``schedule_ms`` and
  ``attend_ms``: wall time in ``Scheduler.schedule`` (admission: prefix keys and hits) and in
  ``PackedLayerKV.attend`` (every layer's attention), without a profiler;
* ``ops``: aten ops other than views (kernel launches on a GPU), the most frequent by name;
  ``host_reads`` (``tolist``/``item``/...: syncs on a GPU);
* ``python_ms`` / ``builtin_ms`` (cProfile own time in Python code vs built-in calls) and the
  engine stages' cumulative time (``cum``), ``top`` functions by own time;
* ``torch_profile``: `ollm.bench.stepprof.profile_steps` (top aten ops).

On the CPU the attention arithmetic of step 2 (tails x prefix keys) is real work the H200 does
in a few ms; ops and Python time are the host costs that a GPU step pays in full.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from batch_overhead import SHAPES, _split, _stages, _stepprof, _store  # noqa: E402
from moe_overhead import Ops, _commit, _host_reads, _top, write_report  # noqa: E402

READS = ("tolist", "item", "__int__", "__float__", "__bool__", "cpu")


def _admitted(llm, args, seed: int):
    """A fresh engine after step 1 (A prefilled) with the other requests added: its next step
    is the admission step."""
    from ollm import SamplingParams
    from ollm.engine.batch import BatchEngine

    n = args.prefix + args.tail
    sp = SamplingParams(temperature=0, max_new_tokens=args.new_tokens, ignore_eos=True)
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(0, SHAPES["vocab_size"], (args.prefix,), generator=g).tolist()
    tails = torch.randint(0, SHAPES["vocab_size"], (args.requests, args.tail), generator=g)
    eng = BatchEngine(llm.runner, None, (), block_tokens=16, max_batch=args.requests,
                      max_context=n + args.new_tokens, max_step_tokens=n)  # fmt: skip
    eng.add(head + tails[0].tolist(), sp)
    eng.step()
    for t in tails[1:]:
        eng.add(head + t.tolist(), sp)
    return eng


def _timing(eng) -> tuple[dict, dict]:
    """Wall seconds spent in the scheduler's ``schedule`` and in ``PackedLayerKV.attend``
    during the next step (without a profiler's overhead): (the totals, what to restore)."""
    from ollm.kv import packed

    spent = {"schedule": 0.0, "attend": 0.0}
    real = {"schedule": eng.scheduler.schedule, "attend": packed.PackedLayerKV.attend}

    def timed(name, fn):
        def call(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0

        return call

    eng.scheduler.schedule = timed("schedule", real["schedule"])
    packed.PackedLayerKV.attend = timed("attend", real["attend"])
    return spent, real


def _untime(eng, real: dict) -> None:
    from ollm.kv import packed

    del eng.scheduler.schedule  # the instance attribute: the method again
    packed.PackedLayerKV.attend = real["attend"]


def _measure(eng, kind: str, args) -> dict:
    """One step of ``eng`` measured ``kind`` way."""
    if kind == "time":
        spent, real = _timing(eng)
        try:
            c0, t0 = time.thread_time(), time.perf_counter()
            eng.step()
            wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        finally:
            _untime(eng, real)
        return dict(wall=wall, cpu=cpu, **spent)
    if kind == "ops":
        with Ops() as ops, _host_reads(READS) as reads:
            eng.step()
        top = sorted(ops.ops.items(), key=lambda kv: -kv[1])[:12]
        return dict(ops=sum(ops.ops.values()), top_ops=dict(top), host_reads=dict(reads))
    if kind == "cprofile":
        prof = cProfile.Profile()
        prof.enable()
        eng.step()
        prof.disable()
        return dict(**_split(prof, 1), cum=_stages(prof, 1), top=_top(prof, 1, args.top))
    return dict(torch_profile=_stepprof()[1](eng, 1, top=10))


def measure(llm, args) -> dict:
    """Step 2 and a decode step (step ``2 + --decode-at``), each measured every way."""
    out: dict = {"admission": {}, "decode": {}}
    times: dict = {"admission": [], "decode": []}
    for r, kind in enumerate(["time"] * args.repeats + ["ops", "cprofile", "torch"]):
        eng = _admitted(llm, args, r)
        try:
            tokens = eng.step_tokens
            res = _measure(eng, kind, args)
            res["tokens"] = eng.step_tokens - tokens
            for _ in range(args.decode_at - 1):
                eng.step()
            tokens = eng.step_tokens
            dec = _measure(eng, kind, args)
            dec["tokens"] = eng.step_tokens - tokens
        finally:
            eng.close()
        for name, m in (("admission", res), ("decode", dec)):
            if kind == "time":
                times[name].append(m)
            else:
                out[name].update(m)
    for name, ts in times.items():
        out[name]["wall_ms"] = round(statistics.median(t["wall"] for t in ts) * 1e3, 2)
        out[name]["wall_all_ms"] = [round(t["wall"] * 1e3, 2) for t in ts]
        out[name]["cpu_ms"] = round(statistics.median(t["cpu"] for t in ts) * 1e3, 2)
        for part in ("schedule", "attend"):
            out[name][f"{part}_ms"] = round(statistics.median(t[part] for t in ts) * 1e3, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prefix", type=int, default=6144, help="shared tokens")
    ap.add_argument("--tail", type=int, default=32, help="own tokens per request")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--decode-at", type=int, default=2, help="decode step measured: 2 + this")
    ap.add_argument("--head-dim", type=int, default=SHAPES["head_dim"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--machine", default="2-core CPU VM")
    args = ap.parse_args()
    import ollm
    from ollm import LLM

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="prefix-admission-"))
    path = _store(tmp, args.layers, SHAPES | {"head_dim": args.head_dim})
    n = args.prefix + args.tail
    llm = LLM(path, device="cpu", dtype="float32", max_batch=args.requests,
              max_context=n + args.new_tokens, cache_dir=tmp / "c", progress=False)  # fmt: skip
    shapes = SHAPES | {"head_dim": args.head_dim, "layers": args.layers}
    out = dict(
        machine=args.machine, commit=_commit(), ollm=str(Path(ollm.__file__).resolve().parent),
        torch=torch.__version__, threads=args.threads, shapes=shapes,
        workload=dict(prefix=args.prefix, tail=args.tail, requests=args.requests),
        load_before=os.getloadavg()[0], **measure(llm, args),
    )  # fmt: skip
    llm.close()
    write_report(out, args.out)


if __name__ == "__main__":
    main()
