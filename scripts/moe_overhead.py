"""Host time and torch ops per MoE layer in decode, measured on the CPU (issue 19):

    PYTHONPATH=src python scripts/moe_overhead.py [--out FILE] [--steps 300] [--slots N] [--dtype float32|bfloat16]
        [--zipf A] [--policy lru|lfu] [--one-batch trial|on|off] [--cpu-compute off|on] [--lookahead] [--family qwen3_moe|gpt_oss] [--resident]

A qwen3_moe of tiny dimensions (hidden 64, experts of 32, so the arithmetic is ~0 and what is
left is Python, dispatch and bookkeeping) with Qwen3-30B-A3B's routing shape (128 experts,
top-8), float32, its experts in RAM and copied through an expert cache of ``--slots`` slots on
a stand-in accelerator (the CPU under the name "cpu:1", as in the tests: every slot copy and
the batched decode path run as on a GPU, with the copies synchronous). One token per call,
a random row per layer (each layer routes its own input), the sparse layers in turn as
decode visits them. Measured per MoE call:

* ``host_us``: wall microseconds of ``moe_mlp`` (median, p10, p90, mean) with one intra-op
  thread; on a GPU the kernels would be queued, so this is what the host spends per layer;
  ``host_cpu_us``: the same call's CPU time of this thread (steadier on a shared machine);
* ``ops``: aten ops per call other than views and allocations (each a kernel launch on a GPU;
  ``copy_`` also counts the slot fills), counted by a ``TorchDispatchMode``, and host reads
  (``tolist``/``item``: a sync each on a GPU);
* ``top``: the Python functions with the most own time (cProfile), per call;
* ``hit_rate`` of the cache and ``max_abs_diff`` against the resident per-expert path;
* with ``--engine``: whole decode steps through the engine on the same stand-in and cache
  size (``engine``: microseconds per layer and step, and the MoE call's share of it).

``--family gpt_oss``: gpt-oss-20b's routing (32 experts, top-4, router bias) at tiny widths, its
experts MXFP4 in the slots as stored bytes (``coded_slots``, the device's path), a decode batch
taking the Triton kernel's branch with a stand-in (two ops counted; no CUDA here); default 51
slots of 128, as the device's run. ``gpu_ops_per_call`` adds what only a GPU launches (index
copies, the ids' read-back, the kernel wrapper's copy of a misaligned index). ``--resident``:
every expert on the device, no slots.

With ``--lookahead`` (where the code under test has it) the cache predicts each next layer's
experts and prefetches them; its prediction precision is reported. ``--zipf A`` skews the
random router's uniform routing with a router bias of -A log(rank) (a random ranking per layer,
as scripts/gpu/moe.py does). The output is one JSON object (stdout, and ``--out``). To compare
two versions of the code run the same script with each on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import dataclasses
import json
import os
import pstats
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SHAPES = dict(  # Qwen3-30B-A3B's routing, tiny widths
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=128,
    num_experts_per_tok=8,
    vocab_size=256,
)
GPT_OSS = dict(  # gpt-oss-20b's routing (32 experts, top-4, router bias), tiny widths, MXFP4
    hidden_size=64,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
)
PRESET = {"qwen3_moe": "qwen3-30b-a3b", "gpt_oss": "gpt-oss-20b"}
VIEWS = {
    "view", "_unsafe_view", "slice", "select", "expand", "t", "transpose", "as_strided", "alias",
    "unsqueeze", "squeeze", "reshape", "detach", "permute", "split", "chunk", "unbind",
    "split_with_sizes", "lift_fresh", "_reshape_alias", "empty", "promote_types", "empty_like",
}  # fmt: skip
NO_OPS = {"to", "narrow", "resolve_conj", "resolve_neg"}  # no kernel: their input handed back


class Ops(TorchDispatchMode):
    """Counts aten ops bar views, allocations and no-op casts (kernel launches on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        out = func(*args, **(kwargs or {}))
        st = torch.Tensor.untyped_storage
        same = name in NO_OPS and st(out).data_ptr() == st(args[0]).data_ptr()
        if name not in VIEWS and not same:
            self.ops[name] += 1
        return out


def _shapes(family: str, layers: int) -> dict:
    if family == "qwen3_moe":
        return SHAPES
    return GPT_OSS | {"layer_types": ["sliding_attention", "full_attention"] * (layers // 2)
                      + ["sliding_attention"] * (layers % 2)}  # fmt: skip


def _store(tmp: Path, layers: int, family: str = "qwen3_moe", dtype=torch.float32) -> Path:
    from ollm.models.registry import STORE_FAMILIES
    from ollm.storage.convert import convert
    from ollm.storage.synthetic import SyntheticSource

    src = SyntheticSource(
        PRESET[family], families=STORE_FAMILIES, num_hidden_layers=layers,
        **_shapes(family, layers),
    )  # fmt: skip
    return convert(src, tmp / "store", dtype=dtype, progress=False, families=STORE_FAMILIES)


def _kernel_stand_in(state: dict) -> None:
    """gpt-oss: the slots hold the stored MXFP4 bytes (``coded_slots``, the device's path) and
    a decode batch takes the Triton kernel's branch (``moe_mxfp4.coded_forward``). Without
    CUDA the kernel is played by its two output allocations while timing (its launches' host
    cost, a few us each on a GPU, not counted in ``host_us``), counted as two ops
    (``mxfp4_kernel``) under ``state["ops"]``, and by decode-then-matmul, exact, outside the
    count, when ``state["exact"]`` (the ``max_abs_diff`` check)."""
    from torch.utils._python_dispatch import _disable_current_modes

    import ollm.layers.moe_mxfp4 as mm
    from ollm.layers.moe_batched import forward_stacked

    def kernel_forward(x, stacks, idx):
        if state["ops"] is not None:
            state["ops"].ops["mxfp4_kernel"] += 2
            if idx.data_ptr() % 16:  # the kernel's wrapper copies a misaligned index first
                state["ops"].ops["gpu: idx clone"] += 1
        if not state["exact"]:
            g, m, h = x.shape
            torch.empty(g, m, stacks["down_proj_blocks"].shape[2] * 32, dtype=x.dtype)
            return torch.empty(g, m, h, dtype=x.dtype)
        with _disable_current_modes():
            fwd = lambda a, w: forward_stacked(a, w, state["moe"], "")  # noqa: E731
            y = mm.decoded_forward(x, stacks, idx, fwd)
        mm.path_counts["decoded"] -= 1
        return y

    mm.kernel_applies = lambda x: x.shape[1] <= 16
    mm.kernel_forward = kernel_forward
    mm._STATE[(torch.float32, "cpu")] = True


def _device_copies(state: dict) -> None:
    """Counts, under ``state["ops"]``, what the stand-in skips but a GPU launches: each index
    list's copy to the device (``layers.moe._index``), a CPU batch's outputs with their index
    (``_hand_back``) and the expert ids' copy to the host (``_to_host``), as ``gpu: ...``
    ops."""
    import ollm.layers.moe as moe_mod

    def counted(name: str, fn):
        def wrapper(*a, **k):
            if state["ops"] is not None:
                state["ops"].ops[f"gpu: {name}"] += 1
            return fn(*a, **k)

        return wrapper

    moe_mod._index = counted("h2d index", moe_mod._index)
    moe_mod._to_host = counted("d2h ids", moe_mod._to_host)
    if hasattr(moe_mod, "_hand_back"):  # a CPU batch's outputs and index: one transfer
        moe_mod._hand_back = counted("h2d cpu outputs", moe_mod._hand_back)


def _cache(llm, slots: int, cpu_compute: str, lookahead: bool, resident: bool = False,
           policy: str = "lru"):  # fmt: skip
    from ollm.layers.moe import sparse_weights
    from ollm.planning.experts import ExpertPlan
    from ollm.runtime.experts import ExpertCache
    from ollm.storage.experts import StoreExperts
    from ollm.telemetry.stats import IOStats

    st = StoreExperts(llm.store)
    layers = tuple(sorted(st.regions))
    n = st.num_experts(layers[0])
    plan = ExpertPlan(
        device="cpu:1", layers=layers, num_experts=n, expert_bytes=st.expert_bytes,
        resident=False, ram=(n,) * len(layers), cache_slots=slots, group_rows=64,
        policy=policy, cpu_compute=cpu_compute, decoded_bytes=st.decoded_bytes if st.coded else 0,
        coded_slots=st.coded,
    )  # fmt: skip
    if lookahead:  # the code under test must have it (ExpertPlan.lookahead)
        plan = dataclasses.replace(plan, lookahead=True)
    if resident:  # every expert on the device (decoded at load when coded): no slots
        plan = dataclasses.replace(plan, resident=True, ram=(0,) * len(layers), cache_slots=0,
                                   coded_slots=False)  # fmt: skip
    return ExpertCache(st, plan, "cpu:1", IOStats(), sparse_weights)


def _zipf(llm, w: dict, a: float, g: torch.Generator) -> None:
    moe = llm.spec.moe
    rank = torch.randperm(moe.num_experts, generator=g) + 1
    key = f"{moe.prefix}.{moe.router}.bias"
    w[key] = (-a * torch.log(rank.float())).to(w[moe.router_key]) + w.get(key, 0)


@contextlib.contextmanager
def _host_reads(names: tuple[str, ...] = ("tolist", "item")):
    """Counts calls of the ``names`` methods of tensors (a host sync each on a GPU)."""
    reads: collections.Counter = collections.Counter()
    real = {n: getattr(torch.Tensor, n) for n in names}

    def wrap(name, fn):
        def counted(self, *a, **k):
            reads[name] += 1
            return fn(self, *a, **k)

        return counted

    for n, fn in real.items():
        setattr(torch.Tensor, n, wrap(n, fn))
    try:
        yield reads
    finally:
        for n, fn in real.items():
            setattr(torch.Tensor, n, fn)


def _commit() -> str | None:
    import ollm

    try:
        root = Path(ollm.__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True)  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "src"],
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - a report field only
        return None


def measure(args) -> dict:
    import ollm
    from ollm import LLM
    from ollm.layers.moe import moe_mlp

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="moe-overhead-"))
    dt = getattr(torch, args.dtype)
    path = _store(tmp, args.layers, args.family, dt)
    llm = LLM(path, device="cpu", dtype=args.dtype, cache_dir=tmp / "c", progress=False)
    moe, act = llm.spec.moe, llm.spec.act
    kernel = {"ops": None, "moe": moe, "exact": False}  # the kernel stand-in's state
    if args.family == "gpt_oss":
        _kernel_stand_in(kernel)
    _device_copies(kernel)
    cache = _cache(llm, args.slots, args.cpu_compute, args.lookahead, args.resident, args.policy)
    if args.one_batch != "trial" and getattr(cache, "merge", None) is not None:
        cache.merge.decided = args.one_batch == "on"  # hits and copied misses as one batch
    g = torch.Generator().manual_seed(0)
    layers = cache.plan.layers
    dense, bound = {}, {}
    for i in layers:
        dense[i] = dict(llm.prefetcher.get(i))
        if args.zipf:
            _zipf(llm, dense[i], args.zipf, g)
        bound[i] = cache.bind(i, dense[i])
    h = llm.spec.hidden_size
    # one random row per layer and step: each layer routes its own input (the same row for all
    # would let lookahead predict the next layer exactly)
    xs = [(torch.randn(len(layers), 1, 1, h, generator=g) * 4).to(dt) for _ in range(args.steps)]

    def step(x, record=None, cpu=None):
        for j, i in enumerate(layers):
            c0, t0 = time.thread_time(), time.perf_counter()
            y = moe_mlp(x[j], bound[i], moe, act)
            if record is not None:
                record.append(time.perf_counter() - t0)
                cpu.append(time.thread_time() - c0)
        return y

    for x in xs[:20]:  # warm-up (kernel selection, first-use allocations, a partly filled cache)
        step(x)
    cache.counts = {k: 0 for k in cache.counts}
    times: list[float] = []
    cpu: list[float] = []
    for x in xs:
        step(x, times, cpu)
    calls = len(times)
    hits, misses = cache.counts["hits"], cache.counts["misses"]
    ops_steps = xs[:20]
    with Ops() as counter, _host_reads() as reads:
        kernel["ops"] = counter
        for x in ops_steps:
            step(x)
        kernel["ops"] = None
    ncalls = len(ops_steps) * len(layers)
    prof = cProfile.Profile()
    prof.enable()
    for x in xs[:50]:
        step(x)
    prof.disable()
    top = _top(prof, 50 * len(layers), args.top)
    diff = 0.0
    kernel["exact"] = True
    for x in xs[:10]:
        for j, i in enumerate(layers):
            ref = moe_mlp(x[j], dense[i], moe, act)
            diff = max(diff, (moe_mlp(x[j], bound[i], moe, act) - ref).abs().max().item())
    ms = sorted(t * 1e6 for t in times)
    cs = sorted(t * 1e6 for t in cpu)
    out = dict(
        machine=args.machine,
        commit=_commit(),
        ollm=str(Path(ollm.__file__).resolve().parent),
        torch=torch.__version__,
        family=args.family,
        dtype=args.dtype,
        shapes=_shapes(args.family, args.layers) | {"layers": len(layers)},
        slots=0 if args.resident else args.slots,
        total_experts=cache.plan.total,
        cpu_compute=args.cpu_compute,
        zipf=args.zipf,
        policy=args.policy,
        one_batch=args.one_batch,
        calls=calls,
        host_us=dict(
            min=round(ms[0], 1),
            median=round(statistics.median(ms), 1),
            p10=round(ms[len(ms) // 10], 1),
            p90=round(ms[9 * len(ms) // 10], 1),
            mean=round(statistics.fmean(ms), 1),
        ),  # fmt: skip
        host_cpu_us=dict(  # this thread's CPU time (waits for a core under load excluded)
            median=round(statistics.median(cs), 1),
            p10=round(cs[len(cs) // 10], 1),
            mean=round(statistics.fmean(cs), 1),
        ),
        hit_rate=round(hits / max(1, hits + misses), 4),
        ops_per_call=round(sum(v for k, v in counter.ops.items() if "gpu:" not in k) / ncalls, 2),
        ops_per_call_without_copies=round(
            sum(v for k, v in counter.ops.items() if k != "copy_" and "gpu:" not in k) / ncalls, 2
        ),
        gpu_ops_per_call=round(  # with what only a GPU launches (``gpu: ...``)
            sum(counter.ops.values()) / ncalls, 2
        ),
        ops=dict(
            sorted(
                ((k, round(v / ncalls, 2)) for k, v in counter.ops.items()), key=lambda kv: -kv[1]
            )
        ),  # fmt: skip
        host_reads_per_call={k: round(v / ncalls, 2) for k, v in reads.items()},
        top=top,
        max_abs_diff=diff,
    )
    ahead = getattr(cache, "ahead", None)
    if ahead is not None:  # counted over every pass above (timing, ops, profile, check)
        out["lookahead"] = ahead.counts | {
            "precision": round(ahead.precision, 4),
            "chance": moe.top_k / moe.num_experts,
        }
    cache.close()
    llm.close()
    if args.engine:
        out["engine"] = engine_decode(path, tmp, args, kernel)
        out["engine"]["moe_share"] = round(
            out["host_us"]["median"] / out["engine"]["us_per_layer_step"], 3
        )
    return out


def engine_decode(path: Path, tmp: Path, args, kernel: dict) -> dict:
    """Whole decode steps through the engine (embedding, attention, MoE, head) with the
    accelerator played by the CPU and the same cache: wall microseconds per layer and step
    (median of ``--engine-runs`` requests of ``--engine-tokens`` tokens), the MoE share
    being ``host_us`` over it; aten ops per layer and decode step (a request of
    ``--engine-tokens`` more tokens than a 2-token one, over the tokens and layers; the stand-in
    runs as the device would; a ``to`` that hands back its input, a no-op cast, is not counted)."""
    from dataclasses import replace

    from ollm import LLM, SamplingParams
    from ollm.engine.moe_offload import make_prefetcher
    from ollm.engine.runner import Runner
    from ollm.planning.experts import plan_experts
    from ollm.planning.placement import plan_placement
    from ollm.storage.experts import StoreExperts
    from ollm.storage.store import LayerStore

    llm = LLM(path, device="cpu", dtype=args.dtype, cache_dir=tmp / "c", progress=False)
    spec, work, st = llm.spec, llm.workload, StoreExperts(llm.store)

    def dense(s, gpu, cpu):
        return plan_placement(spec, s, "cuda:0", gpu, cpu, "auto", work, 4, hybrid="off")

    extra = {"lookahead": True} if args.lookahead else {}
    if st.coded:
        extra["coded_slots"] = True
    plan = plan_experts(spec, llm.store, st, "cuda:0", None, None, "auto", work, 4,
                        slots=args.slots, cpu_compute="off", plan_dense=dense, **extra)  # fmt: skip

    def swap(d):
        return "cpu:1" if d == plan.device else d

    fake = replace(
        plan, device="cpu:1", embed_device=swap(plan.embed_device),
        head_device=swap(plan.head_device), experts=replace(plan.experts, device="cpu:1"),
        layers=tuple(replace(p, exec_device=swap(p.exec_device)) for p in plan.layers),
    )  # fmt: skip
    llm.prefetcher.close()
    llm.prefetcher = make_prefetcher(LayerStore(llm.store_path), fake, llm.stats, False)
    llm.plan = fake
    llm.runner = llm._engine.runner = Runner(llm.spec, fake, llm.prefetcher, llm.dtype)
    prompt = [(7 * i + 3) % 256 for i in range(16)]
    sp = SamplingParams(max_new_tokens=args.engine_tokens, temperature=0)
    llm.generate(prompt, sp)  # warm-up
    per_layer = []
    for _ in range(args.engine_runs):
        m = llm.generate(prompt, sp).metrics
        per_layer.append(1e6 / m.decode_tokens_per_second / spec.num_layers)
    cache = llm.prefetcher.experts
    out = dict(
        us_per_layer_step=round(statistics.median(per_layer), 1),
        runs=[round(v, 1) for v in per_layer],
        layers=spec.num_layers,
        hit_rate=round(cache.hit_rate, 4),
    )

    def count(n: int) -> collections.Counter:
        with Ops() as c, _host_reads() as reads:
            kernel["ops"] = c
            llm.generate(prompt, SamplingParams(max_new_tokens=n, temperature=0))
            kernel["ops"] = None
        return c.ops + collections.Counter({f"host: read {k}": v for k, v in reads.items()})

    a, b = count(2), count(2 + args.engine_tokens)
    per = args.engine_tokens * spec.num_layers
    ops = {k: round((b[k] - a.get(k, 0)) / per, 2) for k in b if b[k] != a.get(k, 0)}
    out["ops_per_layer_step"] = round(sum(v for k, v in ops.items() if ":" not in k), 2)
    out["gpu_ops_per_layer_step"] = round(sum(v for k, v in ops.items() if "host" not in k), 2)
    out["ops_by_name"] = dict(sorted(ops.items(), key=lambda kv: -kv[1]))
    llm.close()
    return out


def _top(prof: cProfile.Profile, calls: int, n: int) -> list[dict]:
    """The ``n`` functions with the most own time, in microseconds per MoE call."""
    st = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_, nc, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(file).name}:{line}({func})" if line else func
        rows.append(dict(fn=where, own_us=round(tt / calls * 1e6, 1),
                         cum_us=round(ct / calls * 1e6, 1), ncalls=round(nc / calls, 2)))  # fmt: skip
    rows.sort(key=lambda r: -r["own_us"])
    return rows[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--family", default="qwen3_moe", choices=sorted(PRESET))
    ap.add_argument("--slots", type=int, help="cache slots (default: 384 of 128 x 4 layers "
                    "for qwen3_moe, 51 of 32 x 4 for gpt_oss, as the device's run)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=300, help="decode tokens timed")
    ap.add_argument("--zipf", type=float, default=0.0)
    ap.add_argument("--policy", default="lru", choices=["lru", "lfu"])
    ap.add_argument("--one-batch", default="trial", choices=["trial", "on", "off"],
                    help="a decode call's hits and copied misses as one batch (the cache's "
                    "merge trial decides, or forced)")  # fmt: skip
    ap.add_argument("--cpu-compute", default="off", choices=["off", "on"])
    ap.add_argument("--lookahead", action="store_true")
    ap.add_argument("--resident", action="store_true", help="every expert resident (no slots)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="store and activations (bfloat16: the casts a GPU runs)")  # fmt: skip
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--engine", action="store_true", help="also whole decode steps per layer")
    ap.add_argument("--engine-tokens", type=int, default=48)
    ap.add_argument("--engine-runs", type=int, default=3)
    ap.add_argument("--machine", default="2-core CPU VM")
    args = ap.parse_args()
    if args.slots is None:
        args.slots = 384 if args.family == "qwen3_moe" else 51
    write_report(measure(args), args.out)


def write_report(out: dict, path: Path | None) -> None:
    """``out`` as indented JSON on stdout and, with ``path``, into that file."""
    text = json.dumps(out, indent=1)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


if __name__ == "__main__":
    main()
