"""Host time per decode step of the continuous-batching engine, measured on the CPU (issue 13):

    PYTHONPATH=src python scripts/batch_overhead.py [--out FILE] [--batches 1,16,64]
        [--steps 30] [--layers 32]

A llama of tiny widths (hidden 64, 4 heads, 2 KV heads of 16, vocab 256: the arithmetic is ~0)
with Llama-3.1-8B's depth (``--layers``, 32), float32, every layer and KV pool on the CPU, so
what a step costs is Python, dispatch and bookkeeping: the part of a GPU step that grows with
the batch while the weights stream. ``B`` prompts of 20-59 tokens (``--prompt``, ``--spread``:
short ones leave less KV to gather and attend, which is real work on the CPU) go through
`BatchEngine` (16-token blocks) in one prefill step; then, per batch size, over pure decode
steps:

* ``step_ms``: wall ms per step (median, p10, p90, mean) and ``cpu_ms`` (this thread's CPU time,
  steadier on a shared machine); ``per_layer_us``: the median over the layers;
* ``ops_per_step``: aten ops other than views and allocations (each a kernel launch on a GPU),
  per step and per layer, by name; ``host_reads_per_step``: ``tolist``/``item``/``__int__``/
  ``__float__``/``__bool__``/``cpu`` calls on tensors (each a sync on a GPU for a device tensor);
* ``top``: Python functions with the most own time, and ``cum``: the engine's main stages'
  cumulative time (cProfile), microseconds per step; ``profile_split``: own ms per step in
  Python code vs in built-in calls (torch ops; on a GPU those would be kernel launches);
* ``torch_profile``: `ollm.bench.stepprof.profile_steps` over a few steps (top aten ops).

One JSON object (stdout, and ``--out``). To compare two versions run the script with each on
``PYTHONPATH`` (e.g. a ``git archive`` of the base commit's ``src``), under ``nice``.
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

from moe_overhead import Ops, _commit, _host_reads, _top, write_report  # noqa: E402

SHAPES = dict(  # Llama-3.1-8B's depth, tiny widths
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
)
READS = ("tolist", "item", "__int__", "__float__", "__bool__", "cpu")
STAGES = (  # cumulative time of these (cProfile function names) is reported per step
    "step", "schedule", "update", "_forward", "forward", "attend", "_attend_decodes",
    "layer_kv", "layout", "_layout", "_verify", "sample", "_accept", "sweep", "_drafts",
    "input_ids", "positions",
)  # fmt: skip


def _store(tmp: Path, layers: int, shapes: dict | None = None) -> Path:
    """A float32 synthetic store of ``llama3-8b`` with ``layers`` layers at ``shapes`` (default
    ``SHAPES``); shared by scripts/step_overhead.py and scripts/prefix_admission.py."""
    from ollm.models.registry import STORE_FAMILIES
    from ollm.storage.convert import convert
    from ollm.storage.synthetic import SyntheticSource

    kw = SHAPES if shapes is None else shapes
    src = SyntheticSource("llama3-8b", families=STORE_FAMILIES, num_hidden_layers=layers, **kw)
    return convert(src, tmp / "store", dtype=torch.float32, progress=False, families=STORE_FAMILIES)


def _stages(prof: cProfile.Profile, steps: int, stages: tuple = STAGES) -> dict:
    """Cumulative microseconds per step of the ``stages`` functions (ollm's own files)."""
    import pstats

    out: dict = {}
    for (file, _line, func), (_, nc, _, ct, _) in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
        if func in stages and "ollm" in file:
            key = f"{Path(file).stem}.{func}"
            out[key] = dict(cum_us=round(ct / steps * 1e6, 1), calls=round(nc / steps, 2))
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["cum_us"]))


def _stepprof():
    """`ollm.bench.stepprof`'s helpers; this checkout's file when the ``ollm`` on the path is
    older (an A/B against a base commit's ``src``)."""
    try:
        from ollm.bench import stepprof
    except ImportError:
        import importlib.util

        path = Path(__file__).resolve().parents[1] / "src/ollm/bench/stepprof.py"
        spec = importlib.util.spec_from_file_location("stepprof", path)
        assert spec is not None and spec.loader is not None
        stepprof = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(stepprof)
    return stepprof.decode_ready, stepprof.profile_steps


def _split(prof: cProfile.Profile, steps: int) -> dict:
    """Own ms per step in Python functions vs in built-in calls (torch ops, C helpers): the
    first is host time a GPU would add to its kernels' whatever their size (under cProfile,
    which inflates it; compare like with like)."""
    import pstats

    py = builtin = 0.0
    for (file, line, _), (_, _, tt, _, _) in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
        if line and file != "~":
            py += tt
        else:
            builtin += tt
    return dict(python_ms=round(py / steps * 1e3, 2), builtin_ms=round(builtin / steps * 1e3, 2))


def _q(xs: list[float]) -> dict:
    s = sorted(x * 1e3 for x in xs)
    return dict(median=round(statistics.median(s), 3), p10=round(s[len(s) // 10], 3),
                p90=round(s[9 * len(s) // 10], 3), mean=round(statistics.fmean(s), 3))  # fmt: skip


def measure_batch(llm, batch: int, args) -> dict:
    """Every measurement above for ``batch`` sequences decoding together."""
    from ollm import SamplingParams
    from ollm.engine.batch import BatchEngine

    decode_ready, profile_steps = _stepprof()

    layers = llm.spec.num_layers
    ops_steps, prof_steps, torch_steps = 5, 10, 3
    need = 2 + args.warmup + args.steps + ops_steps + prof_steps + torch_steps + 2
    sp = SamplingParams(temperature=0, max_new_tokens=need, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    eng = BatchEngine(llm.runner, None, (), block_tokens=16, max_batch=batch, max_context=256)
    for i in range(batch):
        n = args.prompt + (7 * i) % args.spread
        eng.add(torch.randint(0, 256, (n,), generator=g).tolist(), sp)
    decode_ready(eng)
    for _ in range(args.warmup):
        eng.step()
    wall, cpu = [], []
    for _ in range(args.steps):
        c0, t0 = time.thread_time(), time.perf_counter()
        eng.step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    with Ops() as counter, _host_reads(READS) as reads:
        for _ in range(ops_steps):
            eng.step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(prof_steps):
        eng.step()
    prof.disable()
    tprof = profile_steps(eng, torch_steps, top=10)
    assert len(eng.scheduler.seqs) == batch, "a sequence ended while measured"
    eng.close()
    ops = sum(counter.ops.values()) / ops_steps
    step = _q(wall)
    return dict(
        batch=batch,
        step_ms=step,
        cpu_ms=_q(cpu),
        per_layer_us=round(step["median"] / layers * 1e3, 1),
        ops_per_step=round(ops, 1),
        ops_per_layer=round(ops / layers, 2),
        ops=dict(
            sorted(
                ((k, round(v / ops_steps, 1)) for k, v in counter.ops.items()),
                key=lambda kv: -kv[1],
            )[:20]
        ),  # fmt: skip
        host_reads_per_step={k: round(v / ops_steps, 1) for k, v in sorted(reads.items())},
        profile_split=_split(prof, prof_steps),
        cum=_stages(prof, prof_steps),
        top=_top(prof, prof_steps, args.top),
        torch_profile=tprof,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30, help="decode steps timed per batch")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=20, help="shortest prompt (tokens)")
    ap.add_argument("--spread", type=int, default=40, help="prompt i: --prompt + 7i mod this")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--machine", default="2-core CPU VM")
    args = ap.parse_args()
    import ollm
    from ollm import LLM

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="batch-overhead-"))
    path = _store(tmp, args.layers)
    batches = [int(b) for b in args.batches.split(",")]
    llm = LLM(path, device="cpu", dtype="float32", max_batch=max(batches), max_context=256,
              cache_dir=tmp / "c", progress=False)  # fmt: skip
    out = dict(
        machine=args.machine, commit=_commit(), ollm=str(Path(ollm.__file__).resolve().parent),
        torch=torch.__version__, threads=args.threads, shapes=SHAPES | {"layers": args.layers},
        load_before=os.getloadavg()[0], cases=[measure_batch(llm, b, args) for b in batches],
    )  # fmt: skip
    llm.close()
    write_report(out, args.out)


if __name__ == "__main__":
    main()
