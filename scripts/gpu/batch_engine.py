"""Device check of the engine v2 batch path (issue 13), run on the device machine:

    PYTHONPATH=src:tests python scripts/gpu/batch_engine.py --out $OUT

1. Equivalence on CUDA: every family's tiny random model, float32 and bfloat16, 8 prompts (three
   sharing a 40-token prefix, two submitted after three steps) through `BatchEngine`: greedy
   tokens vs each prompt alone through ``LLM.generate``, and KV blocks back to zero; the same
   prompts with prompt-lookup drafts (several query rows per sequence and step).
2. Throughput: Llama-3.2-1B shapes (random bf16 weights) under a GPU budget that streams most
   layers from pinned RAM; 16 prompts of 96-352 tokens, 32 new tokens each: one request at a
   time, the padded batch of ``Generator`` (one weight pass per step for all, left padding), and
   `BatchEngine` (continuous batching). Tokens/s of each and the number of forward passes.

3. KV in every tier (issue 13): every family, float32, layer i's KV pool in device / pinned RAM /
   disk (``i % 3``), the 8 prompts vs each alone; and Llama-3.2-1B shapes under a GPU budget
   that puts some layers' KV in pinned RAM (``LLM.generate`` of 16 prompts through the engine).
4. ``ollm bench --batch 1,4,16,64`` (2k-token prompts, 128 new tokens, llama3-1b shapes, 3 GiB
   of GPU memory): aggregate decode tok/s next to the floor, Poisson arrivals, prefix sharing.

5. With ``--profile-steps N`` (or ``OLLM_BATCH_PROFILE=N``): the bench's batch-16 static case
   (``--profile-batch``; plan for ``--profile-plan-batch`` = the largest bench batch, 2k
   prompts) stepped to pure decode, ``N`` steps timed, ``N`` more under torch.profiler: per
   step wall ms, total self CPU / CUDA ms and the top ops by each (`ollm.bench.stepprof`;
   ``step_profile`` in the JSON, a few KB), then 2 steps' timeline (``step_timeline``: every
   weight copy and layer compute span, and how much of the wall the link was busy; ~10 KB).
   The timeline also has the host's phases outside the layers (schedule, moves, layout, start,
   embed, prep, head, writes, sample, update), and 2 more steps with each phase synchronized.
6. With ``--profile-prefix N``: the bench's shared-prefix case (16 requests sharing all but 32
   tokens of ``--profile-prompt``, its ``shared_prefix`` plan) stepped to pure decode: the
   admission steps' walls, ``N`` decode steps' walls, then ``N`` steps' timeline and ``N``
   synchronized (``prefix_profile`` in the JSON).
   ``--device cpu --profile-synthetic tiny`` is a dry
   run of 5 and 6 on the CPU (a 4-layer llama of tiny widths), with ``--skip-*`` for the rest.

Writes ``batch_engine.json`` (and ``bench_batch_<preset>.json``) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def prompts_for(seed: int, n: int, prefix: int, lengths) -> list[list[int]]:
    """``n`` random prompts of ``lengths[i]`` own tokens; every third starts with a shared prefix."""
    g = torch.Generator().manual_seed(seed)
    pre = torch.randint(0, 256, (prefix,), generator=g).tolist()
    out = []
    for i in range(n):
        tail = torch.randint(0, 256, (lengths(i),), generator=g).tolist()
        out.append(pre + tail if i % 3 == 1 else tail)
    return out


def equivalence(tmp: Path) -> list[dict]:
    """Batch vs alone on CUDA for every family and dtype."""
    from conftest import FAMILIES, make_hf_model

    rows = []
    for family in FAMILIES:
        for dtype in ("float32", "bfloat16"):
            try:
                if dtype == "float32":
                    make_hf_model(family, tmp / family)
                rows.append(dict(family=family, dtype=dtype, **_compare(tmp, family, dtype)))
            except Exception as exc:  # a family still being added by someone else: say so
                rows.append(dict(family=family, dtype=dtype, equal=False, error=repr(exc)))
            print(rows[-1], flush=True)
    return rows


def _compare(tmp: Path, family: str, dtype: str) -> dict:
    """8 prompts (3 sharing a prefix, 2 late) through the engine vs each alone."""
    from ollm import LLM, SamplingParams
    from ollm.engine.batch import BatchEngine

    params = SamplingParams(temperature=0, max_new_tokens=16)
    prompts = prompts_for(1, 8, 40, lambda i: 3 + 7 * i)
    llm = LLM(
        tmp / family, device="cuda", dtype=dtype, max_batch=1, max_context=256,
        prefill_chunk=32, cache_dir=tmp / "cache", progress=False,
    )  # fmt: skip
    alone = [llm.generate(p, params).token_ids for p in prompts]
    eng = BatchEngine(
        llm.runner, None, (), block_tokens=8, max_batch=8, max_context=256, max_step_tokens=64
    )
    ids = [eng.add(p, params) for p in prompts[:6]]
    for _ in range(3):
        eng.step()
    ids += [eng.add(p, params) for p in prompts[6:]]
    eng.run()
    got = [eng.finished[r].token_ids for r in ids]
    same = [a == b for a, b in zip(alone, got, strict=True)]
    # First differing token per prompt (bf16: kernels of another row count may flip a near
    # tie; float32 should match exactly).
    first_diff = [
        next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        for a, b in zip(alone, got, strict=True)
    ]
    m = eng.metrics()
    row = dict(
        equal=all(same), equal_prompts=sum(same), first_diff=first_diff,
        prefix_hits=m.prefix_hits, blocks_left=eng.kv_blocks_used(), steps=m.steps,
    )  # fmt: skip
    eng.close()
    # Speculative steps (n-gram drafts, several query rows per sequence) on the same prompts.
    from ollm.engine.drafting import prompt_lookup

    spec = BatchEngine(
        llm.runner, None, (), block_tokens=8, max_batch=8, max_context=256,
        drafter=prompt_lookup(2, 3),
    )  # fmt: skip
    outs, _ = spec.generate(prompts, params)
    sm = spec.metrics()
    row["drafts_equal_prompts"] = sum(o.token_ids == a for o, a in zip(outs, alone, strict=True))
    row["drafted"], row["accepted_drafts"] = sm.drafted, sm.accepted_drafts
    spec.close()
    llm.close()
    return row


def throughput(tmp: Path) -> dict:
    """One at a time vs padded batch vs continuous batching, weights streamed from RAM."""
    from ollm import LLM, SamplingParams
    from ollm.engine.batch import BatchEngine
    from ollm.models.registry import STORE_FAMILIES
    from ollm.storage.synthetic import make_synthetic_store

    store = make_synthetic_store(
        "llama3-1b", tmp / "llama3-1b", progress=False, families=STORE_FAMILIES
    )
    n, new = 16, 32
    prompts = prompts_for(2, n, 64, lambda i: 96 + 16 * i)
    longest = max(len(p) for p in prompts)
    params = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)
    llm = LLM(
        store, device="cuda", gpu_memory="2GiB", max_batch=n, max_context=longest + new,
        hybrid="off", progress=False,
    )  # fmt: skip
    out: dict = {"plan": dict(llm.plan.describe()), "requests": n, "new_tokens": new}
    out["kv"] = sorted({(p.kv_tier, p.kv_device) for p in llm.plan.layers})
    print(out, flush=True)
    calls = {"n": 0}
    fwd = llm.runner.forward

    def counted(*a, **k):
        calls["n"] += 1
        return fwd(*a, **k)

    llm.runner.forward = counted  # count weight passes (each streams every RAM layer once)
    llm.generate(prompts[0], SamplingParams(max_new_tokens=2))  # warm-up

    def timed(name, fn):
        calls["n"] = 0
        torch.cuda.synchronize()
        t = time.perf_counter()
        toks = fn()
        torch.cuda.synchronize()
        s = time.perf_counter() - t
        out[name] = dict(seconds=s, tokens=toks, tok_s=toks / s, forwards=calls["n"])
        print(name, out[name], flush=True)

    timed("one_at_a_time", lambda: sum(len(llm.generate(p, params).token_ids) for p in prompts))
    timed(
        "padded_batch",
        lambda: sum(len(o.token_ids) for o in llm._engine.generate(prompts, params)[0]),
    )
    w = llm.workload

    def continuous():
        eng = BatchEngine(
            llm.runner, None, (), block_tokens=16, max_batch=w.batch, max_context=w.context
        )
        outs, _ = eng.generate(prompts, params)
        out["engine_metrics"] = vars(eng.metrics())
        eng.close()
        return sum(len(o.token_ids) for o in outs)

    timed("batch_engine", continuous)
    llm.close()
    return out


def tiers(tmp: Path) -> dict:
    """The engine with each layer's KV pool in the tier ``TIERS[i % 3]`` on CUDA, every family
    (float32: equal to alone; llama also on ``cuda:1`` with two GPUs), a plan with RAM KV."""
    from dataclasses import replace

    from conftest import FAMILIES, make_hf_model
    from ollm import LLM, SamplingParams
    from ollm.engine.batch import BatchEngine
    from ollm.engine.runner import Runner
    from ollm.models.registry import STORE_FAMILIES
    from ollm.storage.synthetic import make_synthetic_store

    params = SamplingParams(temperature=0, max_new_tokens=16)
    prompts = prompts_for(1, 8, 40, lambda i: 3 + 7 * i)
    second = torch.cuda.device_count() > 1  # else a row saying why cuda:1 did not run
    cases = [(f, "cuda") for f in FAMILIES] + [("llama", "cuda:1")] * second
    rows = [dict(family="llama", device="cuda:1", skipped="one GPU")] * (not second)
    for family, device in cases:
        try:
            if not (tmp / family).exists():
                make_hf_model(family, tmp / family)
            llm = LLM(
                tmp / family, device=device, max_batch=1, max_context=256, prefill_chunk=32,
                cache_dir=tmp / "cache", progress=False,
            )  # fmt: skip
            alone = [llm.generate(p, params).token_ids for p in prompts]
            tiers = ("device", "cpu", "disk")
            layers = tuple(replace(p, kv_tier=tiers[i % 3]) for i, p in enumerate(llm.plan.layers))
            runner = Runner(llm.spec, replace(llm.plan, layers=layers), llm.prefetcher, llm.dtype)
            eng = BatchEngine(
                runner, None, (), block_tokens=8, max_batch=8, max_context=256,
                max_step_tokens=64, kv_dir=str(tmp / "kv"),
            )  # fmt: skip
            outs, _ = eng.generate(prompts, params)
            same = [o.token_ids == a for o, a in zip(outs, alone, strict=True)]
            rows.append(dict(family=family, device=device, equal=all(same),
                             equal_prompts=sum(same), blocks_left=eng.kv_blocks_used()))  # fmt: skip
            eng.close()
            llm.close()
        except Exception as exc:
            rows.append(dict(family=family, device=device, equal=False, error=repr(exc)))
        print(rows[-1], flush=True)
    out: dict = {"families": rows}
    store = make_synthetic_store(
        "llama3-1b", tmp / "llama3-1b", progress=False, families=STORE_FAMILIES
    )
    ps = prompts_for(3, 16, 512, lambda i: 64 + 32 * i)
    p16 = SamplingParams(temperature=0, max_new_tokens=32, ignore_eos=True)
    with LLM(store, device="cuda", gpu_memory="3GiB", max_batch=16, max_context=2048,
             hybrid="off", progress=False) as llm:  # fmt: skip
        out["kv"] = sorted({p.kv_tier for p in llm.plan.layers})
        torch.cuda.synchronize()
        t = time.perf_counter()
        res = llm.generate(ps, p16)
        torch.cuda.synchronize()
        out["ram_kv_16x32_tok_s"] = sum(len(r.token_ids) for r in res) / (time.perf_counter() - t)
    print(out, flush=True)
    return out


def llm_kwargs(budget: str) -> dict:
    """The bench's ``LLM`` settings: CUDA, the budget, and ``OLLM_BENCH_KW`` (JSON, e.g.
    ``{"hybrid": "off"}``) for an A/B of a planner setting."""
    return {
        "device": "cuda",
        "gpu_memory": budget,
        **json.loads(os.environ.get("OLLM_BENCH_KW", "{}")),
    }


def bench_batch(
    out_dir: Path,
    synthetic: str = "llama3-1b",
    budget: str = "3GiB",
    batches: tuple[int, ...] = (1, 4, 16, 64),
    workloads: tuple[str, ...] = ("static", "arrivals", "prefix"),
    split: tuple[int, ...] = (),
    prompt_tokens: int = 2048,
    new_tokens: int = 128,
    stream_all: tuple[int, ...] = (),
    prefix_resident: bool = False,
    prefix_rounds: int = 1,
    prefix_mlp_cpu: bool = False,
) -> dict:
    """``ollm bench --batch`` on ``synthetic`` shapes (2k prompts, 128 new tokens by default);
    ``split``: static batches also run with the host-pool split, in the same process;
    ``prefix_resident`` / ``prefix_mlp_cpu``: the prefix case's shared requests also with
    ``decode_resident`` / ``mlp_cpu``; ``prefix_rounds``: each prefix case that many times."""
    from ollm.bench.batching import run_batch_bench

    report = run_batch_bench(
        model=None, synthetic=synthetic, batches=list(batches), prompt_tokens=prompt_tokens,
        new_tokens=new_tokens, llm_kwargs=llm_kwargs(budget),
        on_case=lambda kind, case: print(kind, case, flush=True), workloads=workloads,
        split_batches=split, stream_all_batches=stream_all, prefix_resident=prefix_resident,
        prefix_rounds=prefix_rounds, prefix_mlp_cpu=prefix_mlp_cpu,
    )  # fmt: skip
    name = f"bench_batch_{synthetic}_{'_'.join(workloads)}.json"
    (out_dir / name).write_text(json.dumps(report, indent=1, default=str))
    keys = ("plan", "static", "static_split", "static_stream_all", "arrivals",
            "arrivals_saturated", "prefix")  # fmt: skip
    return {k: report[k] for k in keys if k in report}


TINY = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=256)  # --profile-synthetic tiny  # fmt: skip


def step_profile(
    tmp: Path,
    synthetic: str = "llama3-1b",
    budget: str = "3GiB",
    batch: int = 16,
    plan_batch: int = 64,
    prompt_tokens: int = 2048,
    steps: int = 4,
    device: str = "cuda",
) -> dict:
    """``batch`` requests of ``prompt_tokens`` through the bench's engine for a plan sized for
    ``plan_batch``: ``steps`` decode steps timed, ``steps`` more profiled (the module docstring)."""
    from ollm import LLM
    from ollm.bench.batching import _engine, _params, prompts
    from ollm.bench.stepprof import decode_ready, profile_steps, step_timeline, time_steps

    store = _store(tmp, synthetic, device)
    new = 2 * steps + 14
    kw = {"gpu_memory": budget} if device.startswith("cuda") else {}
    llm = LLM(store, device=device, max_batch=plan_batch, max_context=prompt_tokens + new,
              progress=False, **kw)  # fmt: skip
    try:
        eng = _engine(llm)
        for p in prompts(batch, prompt_tokens, llm.spec.vocab_size, 0):
            eng.add(p, _params(new))
        prefill_steps = decode_ready(eng)
        time_steps(eng, 2)  # warm-up
        wall = time_steps(eng, steps)
        prof = profile_steps(eng, steps)
        timeline = step_timeline(eng, 2)  # where the link and the compute chain wait
        synced = step_timeline(eng, 2, sync_phases=True)  # each phase's device work in its span
        eng.close()
        out = {
            "model": synthetic, "plan_batch": plan_batch, "prompt_tokens": prompt_tokens,
            "cpu_layers": len(llm.plan.cpu_layers), "prefill_steps": prefill_steps,
            "step_ms": [round(t * 1e3, 2) for t in wall],
        }  # fmt: skip
        return out | prof | {"timeline": timeline, "timeline_synced": synced}
    finally:
        llm.close()


def _store(tmp: Path, synthetic: str, device: str) -> Path:
    """The store of ``synthetic`` shapes ("tiny": `TINY`, float32, for the CPU dry runs)."""
    if synthetic != "tiny":
        from ollm.bench.run import resolve_model

        return resolve_model(None, synthetic, None, False, device)[0]
    from ollm.models.registry import STORE_FAMILIES
    from ollm.storage.convert import convert
    from ollm.storage.synthetic import SyntheticSource

    src = SyntheticSource("llama3-8b", families=STORE_FAMILIES, **TINY)
    return convert(src, tmp / "tiny", dtype=torch.float32, progress=False, families=STORE_FAMILIES)


def prefix_profile(
    tmp: Path,
    synthetic: str = "llama3-1b",
    budget: str = "3GiB",
    prompt_tokens: int = 2048,
    steps: int = 3,
    device: str = "cuda",
) -> dict:
    """The bench's shared-prefix case (`bench.batching.prefix_run`: 16 requests sharing all but
    their last ``TAIL`` tokens, all submitted at once, on the ``shared_prefix`` plan the bench
    makes for it). A warm-up round of 16 with another prefix runs to the end first; then, each
    with a prefix of its own, a warm admission step (the prefix's and every tail's prefill in
    one step) under torch.profiler (``admission_profile``), and one as a timeline
    (``admission_timeline``), whose requests are stepped to pure decode: the admission steps'
    and ``steps`` decode steps' walls, then ``steps`` steps' timeline and ``steps`` more with
    every phase synchronized (``stepprof.step_timeline``)."""
    from ollm import LLM
    from ollm.bench.batching import PREFIX_REQUESTS, TAIL, _engine, _params, prompts
    from ollm.bench.stepprof import profile_steps, step_timeline, time_steps

    store = _store(tmp, synthetic, device)
    head, new = max(0, prompt_tokens - TAIL), 3 * steps + 8
    kw = llm_kwargs(budget) if device.startswith("cuda") else {}  # the bench's, with its budget
    llm = LLM(store, **{**kw, "device": device}, progress=False, max_batch=PREFIX_REQUESTS,
              max_context=prompt_tokens + new, shared_prefix=head)  # fmt: skip
    try:
        eng = _engine(llm)
        vocab = llm.spec.vocab_size

        def submit(seed: int, n_new: int) -> None:  # all at once (the bench's order)
            for p in prompts(PREFIX_REQUESTS, prompt_tokens, vocab, seed, head):
                eng.add(p, _params(n_new))

        submit(1, 2)  # warm-up: kernels, allocator, pinned buffers
        while eng.scheduler.seqs:
            eng.step()
        submit(2, 1)
        prof = profile_steps(eng, 1)
        while eng.scheduler.seqs:
            eng.step()
        hits, inflight = eng.metrics().prefix_hits, eng.scheduler.inflight_hits
        submit(0, new)
        first = step_timeline(eng, 1)
        admission = [first["wall_ms"] / 1e3]
        while any(len(q.tokens) - q.num_computed > 1 for q in eng.scheduler.seqs.values()):
            admission += time_steps(eng, 1)
        wall = time_steps(eng, steps)
        timeline = step_timeline(eng, steps)
        synced = step_timeline(eng, steps, sync_phases=True)
        m = eng.metrics()
        out = {
            "model": synthetic, "prompt_tokens": prompt_tokens, "shared_prefix_tokens": head,
            "batch": len(eng.scheduler.seqs), "prefix_hits": m.prefix_hits - hits,
            "inflight_hits": eng.scheduler.inflight_hits - inflight,
            "plan": dict(llm.plan.describe()),
            "admission_ms": [round(t * 1e3, 2) for t in admission],
            "step_ms": [round(t * 1e3, 2) for t in wall],
        }  # fmt: skip
        eng.close()
        return out | {"admission_profile": prof, "admission_timeline": first,
                      "timeline": timeline, "timeline_synced": synced}  # fmt: skip
    finally:
        llm.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--skip-equiv", action="store_true")
    ap.add_argument("--skip-tiers", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--bench-synthetic", default="llama3-1b", help="preset for the bench sweep")
    ap.add_argument("--bench-budget", default="3GiB")
    ap.add_argument("--bench-batches", default="1,4,16,64")
    ap.add_argument("--bench-workloads", default="static,arrivals,prefix")
    ap.add_argument("--bench-split", default="", help="static batches also run host-split")
    ap.add_argument("--bench-stream-all", default="", help="static batches also run unhybrid")
    ap.add_argument("--bench-prompt", type=int, default=2048)
    ap.add_argument("--bench-new", type=int, default=128)
    ap.add_argument("--bench-prefix-resident", action="store_true",
                    help="prefix case: shared requests also with decode-resident layers")  # fmt: skip
    ap.add_argument("--bench-prefix-rounds", type=int, default=1,
                    help="prefix case: each case this many times, the median reported")  # fmt: skip
    ap.add_argument("--bench-prefix-mlp-cpu", action="store_true",
                    help="prefix case: shared requests also with MLPs on the CPU")  # fmt: skip
    ap.add_argument("--profile-steps", type=int,
                    default=int(os.environ.get("OLLM_BATCH_PROFILE", "0") or 0),
                    help="profile this many decode steps of the batch-16 case (0: off)")  # fmt: skip
    ap.add_argument("--profile-batch", type=int, default=16)
    ap.add_argument("--profile-plan-batch", type=int, default=0, help="0: largest bench batch")
    ap.add_argument("--profile-synthetic", default="", help="default: --bench-synthetic")
    ap.add_argument("--profile-prompt", type=int, default=0, help="0: --bench-prompt")
    ap.add_argument("--profile-prefix", type=int, default=0,
                    help="timeline this many decode steps of the bench's shared-prefix case")  # fmt: skip
    ap.add_argument("--device", default="cuda", help="cpu: dry run of the --profile-* parts")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    report: dict = {"gpu": gpu}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_equiv:
            report["equivalence"] = equivalence(Path(tmp))
        if not args.skip_throughput:
            report["throughput"] = throughput(Path(tmp))
        if not args.skip_tiers:
            report["tiers"] = tiers(Path(tmp))
        if not args.skip_bench:
            sizes = tuple(int(b) for b in args.bench_batches.split(","))
            report["bench_batch"] = bench_batch(
                Path(args.out), args.bench_synthetic, args.bench_budget, sizes,
                tuple(args.bench_workloads.split(",")),
                tuple(int(b) for b in args.bench_split.split(",") if b),
                args.bench_prompt, args.bench_new,
                tuple(int(b) for b in args.bench_stream_all.split(",") if b),
                args.bench_prefix_resident, args.bench_prefix_rounds, args.bench_prefix_mlp_cpu,
            )  # fmt: skip
        if args.profile_steps:
            sizes = [int(b) for b in args.bench_batches.split(",")]
            try:  # the rest of the report is kept whatever happens here (e.g. no CUPTI)
                report["step_profile"] = step_profile(
                    Path(tmp), args.profile_synthetic or args.bench_synthetic, args.bench_budget,
                    args.profile_batch, args.profile_plan_batch or max(sizes),
                    args.profile_prompt or args.bench_prompt, args.profile_steps, args.device,
                )  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - recorded in the report
                report["step_profile"] = {"error": repr(exc)}
            print("step_profile", json.dumps(report["step_profile"]), flush=True)
        if args.profile_prefix:
            try:
                report["prefix_profile"] = prefix_profile(
                    Path(tmp), args.profile_synthetic or args.bench_synthetic, args.bench_budget,
                    args.profile_prompt or args.bench_prompt, args.profile_prefix, args.device,
                )  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - recorded in the report
                report["prefix_profile"] = {"error": repr(exc)}
            print("prefix_profile", json.dumps(report["prefix_profile"]), flush=True)
    (Path(args.out) / "batch_engine.json").write_text(json.dumps(report, indent=1, default=str))
    eq = report.get("equivalence", [])
    return 0 if all(r["equal"] for r in eq if r["dtype"] == "float32") else 1


if __name__ == "__main__":
    raise SystemExit(main())
