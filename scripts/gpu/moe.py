"""Device check and benchmark of the mixture-of-experts families (issue 19), on the device machine:

    PYTHONPATH=src:tests python scripts/gpu/moe.py --out $OUT [--quick] [--gpt-oss [--gpt-oss-bf16]] [--bf16]
    (or scripts/gpu_check.py --checks moe; ``run(out, quick) -> dict``)

About 3-4 minutes by default (float32 rows ~1 min, writing the 8-layer store ~40 s, eight runs
~1.5 min, llama.cpp ~1 min when carried); ``--quick`` about 2; ``--gpt-oss`` +1, ``--bf16`` +1.

1. Correctness (``moe_check.py`` beside this file; tiny random configs of tests/conftest.py,
   float32 on CUDA): ``qwen3_moe``,
   ``mixtral``, ``gpt_oss`` with whole layers streamed from pinned RAM and from disk, and with
   experts placed one by one through a cache of two slots (experts in pinned RAM, on disk, and
   RAM misses run by the CPU): greedy tokens equal transformers' and log-probs within 1e-4
   (``ok``); ``gpt_oss_mxfp4``: gpt_oss saved with MXFP4 experts (as the released checkpoints),
   kept MXFP4 in the store, RAM and the copies and decoded on the GPU, against transformers'
   model holding the dequantized weights (float32 only). With ``--bf16`` also bfloat16
   (reported, not judged: kernels round differently).
2. Benchmark of Qwen3-30B-A3B shapes (``bench``): a synthetic store with the real per-layer
   shapes (128 experts of 768, hidden 2048, 32/4 heads) but 8 (4 with ``--quick``)
   of the 48 layers, since the whole model is ~61 GB of bf16 to write. The 8 GiB budget is
   scaled to those layers: every dense part, the KV of an 8k context and the activations as
   the full model needs them per layer, and an expert cache holding the same fraction of the
   experts as 8 GiB leaves the full model (``cache_fraction``). Per run: prefill of an 8k
   prompt (2k quick), decode tok/s, expert-cache hit rate, bytes copied host->GPU per decode
   token, and the projection to the whole model (decode time per layer x 48). Runs: LRU and LFU under
   the random router (uniform routing) and under a Zipf-skewed routing injected as a router
   bias (-a log rank, ``ZIPF``; bench only: added to the resident router weights; folded
   into the router's matmul, no extra kernel), CPU compute of RAM misses by the cost model
   under its online trial (``cpu_trial``: each arm's median decode step, the decision; and
   ``one_batch_trial``: hits and copied misses as one batch or two) vs off,
   lookahead (``expert_lookahead``: the next layer's predicted experts copied early; its
   ``lookahead`` counts, precision and ``active``: still predicting once judged) under both
   routings, and the whole-layer streaming baseline (every layer
   streamed from pinned RAM) in the same process. ``floor_s_per_token`` (copies only): the
   experts a token misses under uniform routing in a cache of that size at best (1 - slots /
   experts of top_k per layer) x expert bytes over the measured pinned host->GPU rate (CPU
   compute of RAM misses can beat it; ``ollm bench``'s ``experts_s`` counts that share); the
   baseline's floor: the streamed layers' bytes over the same rate. ``profile`` (each run, GPU
   only): torch.profiler over a short request with and without 6 more decode tokens: per decode
   token and per layer, CUDA kernel launches, memcpys, host syncs, event records and stream
   waits, the GPU's kernel and copy seconds and the host's wall seconds
   (``gpu_busy_fraction``: kernel time / wall time; low = bound by the host).
   ``--gpt-oss``: the same for gpt-oss-20b shapes (32 experts of 2880, 4 of its 24 layers;
   LRU, CPU compute off, the baseline) with MXFP4 experts as the real model ships them (the
   store, pinned RAM and the copies hold ~4.25 bits per weight; with Triton on CUDA a slot
   holds only those bytes and decode steps compute from the codes, ``coded_slots``, else each
   slot decodes to bf16): ``bytes_per_expert`` (stored), ``slot_bytes``, ``slots``,
   ``mxfp4_paths`` (expert batches run by the kernel / decoded, per run and correctness row)
   and h2d bytes per decode token; ``--gpt-oss-bf16`` adds the same bench with bf16 experts (``bench_gpt_oss_bf16``).
3. llama.cpp with its experts on the CPU (``-ngl 99 -ot exps=CPU``) on an F16 GGUF of the same
   shapes and layers, in the same call (``moe_llamacpp.py``; full run only, and only when the
   tools folder ``.peers/llamacpp``, a copy of ``../shared/tools/llamacpp``, is carried).

Writes ``moe.json`` under ``--out``. ``--device cpu`` is a dry run here (tiny shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from moe_check import FAMILIES, case  # the correctness rows (beside this file)

from ollm.bench.stepprof import request_calls
from ollm.layers.moe_mxfp4 import path_counts as mxfp4_paths

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

GIB = 1 << 30
# preset -> (its layers, layers benchmarked, with --quick, shapes of the CPU dry run)
PRESETS = {
    "qwen3-30b-a3b": (48, 8, 4, dict(hidden_size=256, num_experts=16, vocab_size=1024)),
    "gpt-oss-20b": (24, 4, 2, dict(hidden_size=256, num_local_experts=8, vocab_size=1024)),
}
ZIPF = 1.2


def _store(tmp: Path, preset: str, layers: int, device: str, mxfp4: bool = True) -> Path:
    """The preset's synthetic store (gpt-oss: MXFP4 experts unless ``mxfp4=False``)."""
    from ollm.models.registry import STORE_FAMILIES
    from ollm.storage.synthetic import make_synthetic_store

    tiny = {} if device != "cpu" else PRESETS[preset][3]
    return make_synthetic_store(
        preset, tmp / f"{preset}-{'mxfp4' if mxfp4 else 'bf16'}", progress=False,
        families=STORE_FAMILIES, mxfp4=mxfp4, num_hidden_layers=layers, **tiny,
    )  # fmt: skip


def _scaled_slots(store: Path, kw: dict, layers: int, budget: int, full: int) -> tuple:
    """Cache slots for ``layers`` layers holding the fraction of the experts the full model's
    cache holds under ``budget`` (its dense parts, KV and activations as counted per layer).
    Planned only (nothing loaded)."""
    from ollm.models.registry import build_spec
    from ollm.planning.experts import plan_experts
    from ollm.planning.placement import Workload, plan_placement
    from ollm.storage.experts import StoreExperts
    from ollm.storage.store import LayerStore

    st = LayerStore(store)
    spec, work = build_spec(st.hf_config()), Workload(1, kw["max_context"], kw["max_context"])
    dev = "cuda:0" if kw["device"] != "cpu" else "cpu"

    def dense(s, gpu, cpu):
        return plan_placement(spec, s, dev, gpu, cpu, "cpu", work, 2, hybrid="off")

    plan = plan_experts(spec, st, StoreExperts(st), dev, budget, None, "cpu", work, 2, slots=2,
                        plan_dense=dense)  # fmt: skip
    st.close()
    r, e = plan.reserved, plan.experts
    per_layer = (r["resident layers"] + r["kv cache"]) / layers
    fixed = sum(v for k, v in r.items() if k not in ("experts", "resident layers", "kv cache"))
    cache = budget - fixed - full * per_layer
    # a slot: the stored bytes when computed from MXFP4 codes, else decoded (+ stored)
    frac = max(0.0, cache / e.slot_bytes) / (e.num_experts * full)
    return max(2, int(frac * e.total)), frac, e


def _stream_all(store: Path, kw: dict) -> int:
    """A GPU budget under which whole layers all stream (three ring slots, none resident)."""
    from ollm.models.registry import build_spec
    from ollm.planning.placement import Workload, plan_placement
    from ollm.storage.store import LayerStore

    st = LayerStore(store)
    spec, work = build_spec(st.hf_config()), Workload(1, kw["max_context"], kw["max_context"])
    dev = "cuda:0" if kw["device"] != "cpu" else "cpu"
    r = plan_placement(spec, st, dev, None, None, "cpu", work, 2).reserved
    st.close()
    return r["globals"] + r["kv cache"] + r["activations"] + 3 * st.max_layer_nbytes


def _zipf_router(llm, a: float) -> None:
    """Bench only: add a router bias of -a log(rank) (a random ranking per layer) to every
    resident sparse layer's weights, skewing the random router's uniform routing."""
    spec, pf = llm.spec, llm.prefetcher
    g = torch.Generator().manual_seed(0)
    for i in spec.moe.sparse_layers:
        w = pf._resident[i]  # dense parts are resident under the bench's budget
        rank = torch.randperm(spec.moe.num_experts, generator=g) + 1
        bias = (-a * torch.log(rank.float())).to(llm.dtype)
        w[f"{spec.moe.prefix}.{spec.moe.router}.bias"] = bias.to(w[spec.moe.router_key].device)


def _run(*args, **opts) -> dict:
    """``_timed`` for one run; an exception is reported in its row (the other runs go on)."""
    try:
        return _timed(*args, **opts)
    except Exception:  # noqa: BLE001
        import traceback

        row = {"options": {k: str(v) for k, v in opts.items()}, "error": traceback.format_exc()}
        print(json.dumps(row), flush=True)
        return row


def _timed(store, kw, full: int, prompt_len: int, new: int, h2d: float, zipf=0.0, **opts) -> dict:
    from ollm import LLM, SamplingParams

    t0, paths = time.perf_counter(), dict(mxfp4_paths)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with LLM(store, **kw, **opts) as llm:
        load_s = time.perf_counter() - t0
        if zipf:
            _zipf_router(llm, zipf)
        prompt = [(13 * i + 5) % 1000 for i in range(prompt_len)]
        # warm-up: a few decode steps too, so kernels compile outside the timed run
        llm.generate(prompt[:64], SamplingParams(max_new_tokens=8, temperature=0))
        res = llm.generate(prompt, SamplingParams(max_new_tokens=new, temperature=0))
        m, plan, e = res.metrics, llm.plan, llm.plan.experts
        top_k = llm.spec.moe.top_k
        # bytes a decode step copies: a short request with and without its decode steps
        copied = []
        for n in (1, new):
            before = llm.stats.bytes_h2d
            one = llm.generate(prompt[:16], SamplingParams(max_new_tokens=n, temperature=0))
            copied.append(llm.stats.bytes_h2d - before)
        try:
            profiled = request_calls(llm, prompt, len(llm.plan.layers))
        except Exception as exc:  # noqa: BLE001 - the breakdown is optional
            profiled = f"failed: {exc!r}"
        cache = getattr(llm.prefetcher, "experts", None)
        ahead = getattr(cache, "ahead", None)
        lookahead = None if ahead is None else ahead.counts | {"precision": ahead.precision,
                                                               "active": ahead.active}  # fmt: skip
        trial = getattr(cache, "trial", None)  # expert_cpu="auto": the CPU kept or not, measured
        cpu_trial = None if trial is None else trial.report()
        merge = getattr(cache, "merge", None)  # hits and copied misses as one batch, measured
        one_batch = None if merge is None else merge.report()
        direct = _direct(cache)
        graphs = getattr(getattr(cache, "direct", None), "graphs", None)
        graphs = None if graphs is None else {"replays": graphs.replays, "off": graphs.off}
        peak = torch.cuda.max_memory_reserved() / GIB if torch.cuda.is_available() else None
    decode_steps = max(1, new - 1)
    step_s = 1 / max(m.decode_tokens_per_second, 1e-9)
    layers = len(plan.layers)
    row = dict(
        mode="experts" if e is not None else "layers",
        options=opts | ({"zipf": zipf} if zipf else {}),
        load_s=round(load_s, 1),
        prefill_tokens=prompt_len,
        prefill_s=m.prefill_seconds,
        prefill_tok_s=m.prefill_tokens_per_second,
        decode_tok_s=m.decode_tokens_per_second,
        projected_decode_tok_s_full_model=1 / (step_s * full / layers),
        projected_prefill_s_full_model=m.prefill_seconds * full / layers,
        expert_hit_rate=m.expert_hit_rate,
        expert_cpu_per_token=m.expert_cpu / decode_steps,
        h2d_bytes_per_decode_token=(copied[1] - copied[0]) / decode_steps,
        projected_h2d_bytes_per_decode_token_full_model=(copied[1] - copied[0])
        / decode_steps
        * full
        / layers,
        short_request_decode_tok_s=one.metrics.decode_tokens_per_second,
        gpu_stall_s=m.io_stall_gpu_seconds,
    )
    if e is not None:
        # uniform routing: a token's top_k experts per layer miss a cache of that size at best
        # with probability 1 - slots / experts (skewed routing can do better)
        miss = max(0.0, 1 - e.cache_slots / e.total)
        floor_bytes = len(e.layers) * top_k * miss * e.expert_bytes
        row |= dict(slots=e.cache_slots, total_experts=e.total, tiers=e.tier_counts())
        row |= dict(bytes_per_expert=e.expert_bytes, decoded_bytes_per_expert=e.device_expert_bytes)
        # MXFP4: slots of stored bytes computed by the Triton kernel (``coded_slots``), or
        # decoded in the slot; expert batches by path over the whole run
        row |= dict(coded_slots=e.coded_slots, slot_bytes=e.slot_bytes,
                    mxfp4_paths={k: v - paths[k] for k, v in mxfp4_paths.items()})  # fmt: skip
        if lookahead is not None:  # counted over the whole run (warm-up, profile included)
            row["lookahead"] = lookahead
        row["direct"] = direct  # decode rows planned on the device, or why not
        row["graphs"] = graphs  # OLLM_MOE_GRAPHS=1: graph replays of decode rows' MoE
        row["peak_reserved_GiB"] = peak  # this run's LLM (the 8 GiB budget is scaled)
        if cpu_trial is not None:
            row["cpu_trial"] = cpu_trial
        if one_batch is not None:  # cpu_ms / copy_ms: the one-batch / two-batch arms here
            row["one_batch_trial"] = one_batch
        row["floor_s_per_token"] = floor_bytes / h2d
    else:
        streamed = sum(llm.store.layer_nbytes(i) for i in plan.streamed_for("decode"))
        row["streamed_layers"] = len(plan.streamed_for("decode"))
        row["floor_s_per_token"] = streamed / h2d
    row["s_per_token"] = step_s
    row["ms_per_layer"] = 1e3 * step_s / layers
    row["profile"] = profiled
    print(json.dumps(row), flush=True)
    return row


def bench(
    tmp: Path, quick: bool, device: str = "cuda", preset: str = "qwen3-30b-a3b", mxfp4: bool = True
) -> dict:
    """``preset``'s shapes with fewer layers, 8 GiB scaled (see the module docstring); for
    gpt-oss-20b only LRU, CPU compute off and the baseline, its experts MXFP4 (``mxfp4``)."""
    from ollm.bench.probes import probe_h2d
    from ollm.storage.experts import StoreExperts
    from ollm.storage.store import LayerStore

    full, layers, few, _ = PRESETS[preset]
    layers = few if quick else layers
    t = time.perf_counter()
    store = _store(tmp, preset, layers, device, mxfp4)
    out: dict = {"preset": preset, "layers": layers, "full_layers": full}
    out["store_s"] = time.perf_counter() - t
    st = LayerStore(store)
    se = StoreExperts(st)
    out |= dict(expert_format="mxfp4" if se.coded else "bf16", bytes_per_expert=se.expert_bytes,
                decoded_bytes_per_expert=se.decoded_bytes)  # fmt: skip
    st.close()
    on_gpu = device != "cpu"
    h2d = probe_h2d(torch.device(device), pinned=True) if on_gpu else 10e9
    out["h2d_pinned_GBps"] = h2d / 1e9
    ctx = 2048 if quick or not on_gpu else 8192
    kw = dict(device=device, progress=False, verify_checksums=False, max_context=ctx + 64)
    kw["cache_dir"] = str(tmp / "c")
    budget = 8 * GIB if on_gpu else 2 * GIB
    slots, frac, e = _scaled_slots(store, {**kw, "offload": "cpu"}, layers, budget, full)
    out |= dict(slot_bytes=e.slot_bytes, coded_slots=e.coded_slots)
    out |= {"cache_slots": slots, "cache_fraction": frac, "budget": "8GiB scaled", "context": ctx}
    new = 16 if quick else 32
    exp = dict(gpu_memory=budget, offload="cpu", moe_offload="expert", expert_slots=slots)
    runs = []
    qwen = preset == "qwen3-30b-a3b"
    lfu = qwen and not os.environ.get("OLLM_MOE_NO_LFU")
    for zipf in (0.0, ZIPF) if qwen else (0.0,):
        for policy in ("lru", "lfu") if lfu else ("lru",):
            runs.append(_run(store, kw, full, ctx, new, h2d, zipf, expert_cache=policy, **exp))
    runs.append(_run(store, kw, full, ctx, new, h2d, 0.0, expert_cpu="off", **exp))
    ahead = qwen and not os.environ.get("OLLM_MOE_NO_LOOKAHEAD")
    for zipf in (0.0, ZIPF) if ahead else ():  # next layer's experts predicted and copied early
        runs.append(_run(store, kw, full, ctx, new, h2d, zipf, expert_lookahead=True, **exp))
    try:  # a failure here must not lose the runs above
        out["repeats"] = _repeats(store, kw, full, ctx, new, h2d, exp)
    except Exception as exc:  # noqa: BLE001
        out["repeats"] = f"failed: {exc!r}"
    # the whole-layer baseline: every layer streamed from pinned RAM through a ring (under 8
    # GiB the full model keeps ~3 of its 48 layers of 1.2 GiB resident; this streams all)
    base = dict(gpu_memory=_stream_all(store, kw), offload="cpu", moe_offload="layer")
    runs.append(_run(store, kw, full, min(ctx, 2048), new, h2d, **base))
    out["runs"] = runs
    peer = on_gpu and not quick and qwen
    out["llamacpp"] = _llamacpp_row(tmp, layers, full, ctx, new) if peer else "not run"
    return out


def _repeats(store, kw, full, ctx, new, h2d, exp) -> dict:
    """``OLLM_MOE_REPEAT`` more runs each of the defaults and of CPU compute off, interleaved
    (single runs spread widely on the device): every projected tok/s and the median; with
    ``OLLM_MOE_REPEAT_ZIPF=1`` also LRU under the Zipf routing (is it slower than uniform?)."""
    n = int(os.environ.get("OLLM_MOE_REPEAT", "0"))
    got: dict[str, list[float]] = {
        "defaults": [], "expert_cpu_off": [], "host_path": [], "no_graphs": []
    }  # fmt: skip
    zipf = bool(os.environ.get("OLLM_MOE_REPEAT_ZIPF"))
    if zipf:
        got["zipf_lru"] = []
    for _ in range(n):
        got["defaults"].append(_run(store, kw, full, ctx, new, h2d, 0.0, **exp))
        if not os.environ.get("OLLM_MOE_REPEAT_NO_CPU_OFF"):  # the same as the defaults
            got["expert_cpu_off"].append(  # when the direct decode is on
                _run(store, kw, full, ctx, new, h2d, 0.0, expert_cpu="off", **exp)
            )
        # the defaults on the host path (one sync a layer), and direct without the CUDA graphs
        for name, var in (("host_path", "OLLM_MOE_DIRECT"), ("no_graphs", "OLLM_MOE_GRAPHS")):
            os.environ[var] = "0"
            try:
                got[name].append(_run(store, kw, full, ctx, new, h2d, 0.0, **exp))
            finally:
                os.environ.pop(var)
        if zipf:
            got["zipf_lru"].append(_run(store, kw, full, ctx, new, h2d, ZIPF, **exp))
    key = "projected_decode_tok_s_full_model"
    return {
        name: {"projected_tok_s": [r[key] for r in rs],
               "median": statistics.median(r[key] for r in rs) if rs else None}
        for name, rs in got.items()
    }  # fmt: skip


def _direct(cache) -> str | None:
    """The direct decode's backend (``runtime/expert_direct.py``), or why decode rows took the
    host path; None without an expert cache."""
    if cache is None:
        return None
    from ollm.runtime.expert_direct import reason

    return cache.direct.mode if cache.direct is not None else f"host path: {reason(cache)}"


def _llamacpp_row(tmp: Path, layers: int, full: int, ctx: int, new: int) -> dict | str:
    """llama.cpp's row of the bench (``moe_llamacpp.bench_row``), imported beside this file."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import moe_llamacpp

    return moe_llamacpp.bench_row(tmp, layers, full, ctx, new)


def _bench_safely(quick: bool, device: str, preset: str, mxfp4: bool = True) -> dict:
    """``bench`` in its own temporary directory; a failure is reported, not raised (the
    correctness rows are still written)."""
    try:
        with tempfile.TemporaryDirectory(dir=os.environ.get("OLLM_BENCH_DIR")) as b:
            return bench(Path(b), quick, device, preset, mxfp4)
    except Exception:  # noqa: BLE001
        import traceback

        return {"preset": preset, "error": traceback.format_exc()[-4000:]}


def run(
    out: Path,
    quick: bool = False,
    device: str = "cuda",
    gpt_oss: bool = False,
    bf16: bool = False,
    gpt_oss_bf16: bool = False,
) -> dict:
    """Correctness rows (``ok`` judged on float32; ``bf16`` adds bfloat16 rows) and the
    Qwen3-30B-A3B-shaped benchmark (with ``gpt_oss`` the gpt-oss-20b one too, MXFP4 experts:
    ~1 min more; ``gpt_oss_bf16``: and with bf16 experts)."""
    rows = []
    dtypes = (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)
    with tempfile.TemporaryDirectory() as d:
        for family in FAMILIES:
            for dtype in dtypes:
                rows += case(Path(d), family, dtype, device)
        report = {"bench": _bench_safely(quick, device, "qwen3-30b-a3b")}
        if gpt_oss:
            report["bench_gpt_oss"] = _bench_safely(quick, device, "gpt-oss-20b")
        if gpt_oss and gpt_oss_bf16:
            report["bench_gpt_oss_bf16"] = _bench_safely(quick, device, "gpt-oss-20b", False)
    dev = torch.cuda.get_device_name() if device != "cpu" else "cpu"
    report |= {"ok": all(r["ok"] for r in rows), "rows": rows, "device": dev}
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe.json").write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--quick", action="store_true", help="4 layers, 2k context, no llama.cpp")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 correctness rows too (~1 min)")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script here")
    ap.add_argument("--gpt-oss", action="store_true", help="also gpt-oss-20b shapes (4 layers)")
    ap.add_argument("--gpt-oss-bf16", action="store_true", help="and with bf16 experts (+1 min)")
    args = ap.parse_args()
    report = run(args.out, args.quick, args.device, args.gpt_oss, args.bf16, args.gpt_oss_bf16)
    print("ok" if report["ok"] else "FAILED")


if __name__ == "__main__":
    main()
