"""GPU checks and benchmarks in one call (run on the device machine):

    PYTHONPATH=src:tests python scripts/gpu_check.py [--out DIR] [--quick] [--skip-bench]

1. Probes: pinned and pageable host->GPU copy, disk read, bf16 matmul rate.
2. Equivalence on CUDA: every family's tiny random model, greedy tokens vs transformers, with
   layers streamed from pinned RAM and from disk under a budget below the model size.
3. Benchmark: random weights with Llama-3.1-8B shapes (bf16), 8 GiB budget, 8k prompt: weights
   in pinned RAM, streamed from disk with a warm page cache, and with a cold one; each next to
   its physical floor (streamed bytes / measured bandwidth). Cases (``--cases``): cpu, hybrid,
   disk, disk-cold, all-disk, kv-disk (KV in files under $OLLM_KV_DIR or the temp dir), kv-cpu
   (no KV fetched to the GPU), kv-fetch-all (all RAM KV fetched), kv-nosplit (no KV blocks of an offloaded layer on the GPU).
   ``--prompt 100000`` etc. for long context; ``OLLM_PROFILE=1`` prints profiler tables of the
   measured request's prefill (``=decode``: also a Chrome trace with 3 decode steps);
   ``OLLM_TIMELINE=1`` saves its per-layer spans (JSON and a plot).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from ollm.bench.probes import drop_file_cache, probe_disk, probe_h2d, probe_matmul

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
GiB = 1 << 30
CUDA = torch.device("cuda")


def plan_layers(plan) -> int:
    return len(plan.layers)


def kv_tiers(plan) -> dict[str, int]:
    tiers = [p.kv_tier for p in plan.layers]
    return {
        "kv_ram_layers": tiers.count("cpu"),
        "kv_disk_layers": tiers.count("disk"),
        "kv_fetch_layers": sum(p.kv_fetch for p in plan.layers),
        "kv_split_layers": sum(p.kv_device_tokens > 0 for p in plan.layers),
        "kv_device_slots_of_split": sum(p.kv_device_tokens for p in plan.layers),
    }


def set_kv_fetch(llm, fetch) -> None:
    """Re-mark which layers' pinned-RAM KV decode fetches to the GPU: ``fetch(i, placement)``."""
    layers = tuple(replace(p, kv_fetch=fetch(i, p)) for i, p in enumerate(llm.plan.layers))
    llm.plan = llm.runner.plan = replace(llm.plan, layers=layers)


def equivalence(tmp: Path) -> list[dict]:
    from conftest import FAMILIES, make_hf_model
    from ollm import LLM, SamplingParams
    from ollm.planning.placement import plan_placement

    rows = []
    prompt = [5, 17, 99, 3, 42, 7, 250, 11] * 24  # 192 tokens: prefill on the GPU, decode hybrid
    for fam in FAMILIES:
        model = make_hf_model(fam, tmp / f"hf-{fam}").cuda()
        ref = model.generate(
            torch.tensor([prompt], device="cuda"),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        for offload in ("cpu", "disk", "hybrid", "kv-ram", "kv-fetch", "kv-split"):
            probe = LLM(tmp / f"hf-{fam}", device="cpu", cache_dir=tmp / "c", progress=False)
            plan = plan_placement(
                probe.spec, probe.store, "cuda:0", None, None, "auto", probe.workload, 4
            )
            probe.close()
            fixed = sum(
                v
                for k, v in plan.reserved.items()
                if k not in ("resident layers", "stream buffers")
            )
            budget = fixed + int(3.5 * plan.layer_bytes)  # one resident layer, the rest streamed
            kv_modes = ("kv-ram", "kv-fetch", "kv-split")
            if offload in kv_modes:  # KV of all but one layer in pinned RAM
                kv_layer = plan.reserved["kv cache"] // plan_layers(plan)
                budget = (
                    fixed - plan.reserved["kv cache"] + 2 * kv_layer + int(2.5 * plan.layer_bytes)
                )
            hybrid = offload == "hybrid"
            llm = LLM(
                tmp / f"hf-{fam}",
                device="cuda:0",
                gpu_memory=budget,
                offload="cpu" if offload in ("hybrid", *kv_modes) else offload,
                hybrid="auto" if hybrid else "off",
                cpu_layers=2 if hybrid else None,
                dtype="float32",  # exact against the float32 reference (the GPU default is bf16)
                cache_dir=tmp / "c",
                progress=False,
            )
            if hybrid:
                assert len(llm.plan.cpu_layers) == 2, llm.plan.describe()
            if offload in ("kv-fetch", "kv-split"):  # every other RAM-KV layer: GPU decode
                set_kv_fetch(llm, lambda i, p: p.kv_tier == "cpu" and i % 2 == 0)
            if offload == "kv-split":  # and the first 64 slots of each RAM-KV layer on the GPU
                layers = tuple(
                    replace(p, kv_device_tokens=64) if p.kv_tier == "cpu" else p
                    for p in llm.plan.layers
                )
                llm.plan = llm.runner.plan = replace(llm.plan, layers=layers)
            res = llm.generate(prompt, SamplingParams(max_new_tokens=32, temperature=0))
            rows.append(
                {
                    "family": fam,
                    "offload": offload,
                    "match": res.token_ids == ref,
                    "streamed_layers": len(llm.plan.streamed_for("decode")),
                    "cpu_layers": len(llm.plan.cpu_layers),
                    "cpu_path_s": res.metrics.cpu_path_seconds,
                    "cpu_max_tokens": llm.plan.cpu_max_tokens,
                    **kv_tiers(llm.plan),
                    "layers": llm.spec.num_layers,
                    "bytes_h2d": res.metrics.bytes_copied_h2d,
                }
            )
            llm.close()
        del model
    return rows


def attention_check() -> dict:
    """Chunked-prefill attention on CUDA (bf16, Llama-3.1-8B heads): the flash + log-sum-exp merge
    against a float32 reference, and its time next to the bottom-right-causal kernel it replaced
    (memory-efficient, K/V repeated per head) for a 16k chunk after 48k earlier tokens."""
    from torch.nn.attention.bias import causal_lower_right

    from ollm.layers.attention import AttentionMask, chunk_attention

    out: dict = {}
    scale = 128**-0.5
    torch.manual_seed(0)
    for t, s in ((64, 200), (1000, 3000)):
        q = torch.randn(1, 32, t, 128, device=CUDA, dtype=torch.bfloat16)
        k = torch.randn(1, 8, s, 128, device=CUDA, dtype=torch.bfloat16)
        v = torch.randn(1, 8, s, 128, device=CUDA, dtype=torch.bfloat16)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float(),
            k.float().repeat_interleave(4, 1),
            v.float().repeat_interleave(4, 1),
            attn_mask=AttentionMask(s - t, t, s).dense(CUDA),
            scale=scale,
        )
        err = (chunk_attention(q, k, v, scale).float() - ref).abs().max().item()
        out[f"max_err_{t}x{s}"] = err
    t, s = 16384, 65536
    q = torch.randn(1, 32, t, 128, device=CUDA, dtype=torch.bfloat16)
    k = torch.randn(1, 8, s, 128, device=CUDA, dtype=torch.bfloat16)
    v = torch.randn(1, 8, s, 128, device=CUDA, dtype=torch.bfloat16)

    def old():
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_lower_right(t, s), scale=scale, enable_gqa=True
        )

    for name, fn in (("old_s", old), ("flash_merge_s", lambda: chunk_attention(q, k, v, scale))):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        out[name] = (time.perf_counter() - t0) / 3
    flops = 4 * 32 * 128 * t * (s - t / 2)
    out["flash_merge_TFLOPs"] = flops / out["flash_merge_s"] / 1e12
    out.update(decode_attention_check(scale))
    return out


def decode_attention_check(scale: float) -> dict:
    """``attend`` (flash) against SDPA's default choice (cuDNN on Hopper) for decode, where the
    key length is new at every step, and for a whole-prompt causal prefill: error against a float
    reference, and seconds per call."""
    from ollm.layers.attention import AttentionMask, attend

    out: dict = {}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for name, t, s in (("decode", 1, 8192), ("prefill", 8192, 8192)):
        q = torch.randn(1, 32, 1 if t == 1 else s + 16, 128, device=CUDA, dtype=torch.bfloat16)
        k = torch.randn(1, 8, s + 16, 128, device=CUDA, dtype=torch.bfloat16)
        v = torch.randn(1, 8, s + 16, 128, device=CUDA, dtype=torch.bfloat16)
        causal = t > 1
        m = AttentionMask(s - t, t, s)
        ref = sdpa(
            q[:, :, :512].float(),
            k[:, :, :s].float().repeat_interleave(4, 1),
            v[:, :, :s].float().repeat_interleave(4, 1),
            attn_mask=None if not causal else m.dense(CUDA)[..., :512, :],
            scale=scale,
        )
        got = attend(q[:, :, :t], k[:, :, :s], v[:, :, :s], m, scale)[:, :, :512]
        out[f"{name}_max_err"] = (got.float() - ref).abs().max().item()
        for kind in ("flash", "sdpa_default"):
            times = []
            for step in range(8):  # a new key length per call, as in decode
                n = s + step * (1 if t == 1 else 2)
                q_ = q if t == 1 else q[:, :, :n]
                kk, vv = k[:, :, :n], v[:, :, :n]
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                if kind == "flash":
                    attend(q_, kk, vv, AttentionMask(n - q_.shape[2], q_.shape[2], n), scale)
                else:
                    sdpa(q_, kk, vv, is_causal=causal, scale=scale, enable_gqa=True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            out[f"{name}_{kind}_s"] = sum(times[1:]) / len(times[1:])
    return out


CASES = {  # name -> (offload, cpu_memory, cold page cache, hybrid)
    "cpu": ("cpu", None, False, "off"),  # non-resident layers in pinned RAM, all streamed
    "hybrid": ("cpu", None, False, "auto"),  # the same, the CPU computes some RAM layers in decode
    "disk": ("auto", "1MiB", False, "off"),  # same GPU-resident layers, the rest from the store
    "disk-cold": ("auto", "1MiB", True, "off"),
    "all-disk": ("disk", None, False, "off"),  # every layer from the store each pass (oLLM)
    "kv-disk": ("cpu", None, False, "off"),  # as "cpu", with the KV cache in files (disk tier)
    "kv-cpu": ("cpu", None, False, "off"),  # as "cpu", all RAM KV attended on the CPU (no fetch)
    "kv-nosplit": ("cpu", None, False, "off"),  # as "cpu", no KV blocks of an offloaded layer
    "kv-fetch-all": ("cpu", None, False, "off"),  # as "cpu", every RAM KV layer fetched
    "kv-fetch-n": ("cpu", None, False, "off"),  # as "cpu", $OLLM_FETCH_N layers fetched (spread)
}
KV_CACHE = {"kv-disk": "disk"}  # case -> kv_cache setting (default "auto")
RAM_CASES = (
    "cpu",
    "hybrid",
    "kv-disk",
    "kv-cpu",
    "kv-nosplit",
    "kv-fetch-all",
    "kv-fetch-n",
)  # weights stream from pinned RAM


def save_timeline(timeline, out: Path, name: str) -> None:
    """Spans as JSON (for offline analysis of the decode steps) and a plot of the first steps."""
    from dataclasses import asdict

    from ollm.bench.plot import plot_timeline

    out.mkdir(parents=True, exist_ok=True)
    spans = timeline.spans()
    (out / f"timeline-{name}.json").write_text(json.dumps([asdict(s) for s in spans]))
    plot_timeline(spans, out / f"timeline-{name}.png", steps=3, title=name)


def bench_case(
    store: Path, case: str, budget: str, prompt_len: int, new: int, out_dir: Path
) -> dict:
    from ollm import LLM, SamplingParams

    offload, cpu_memory, cold, hybrid = CASES[case]
    llm = LLM(
        store,
        device="cuda:0",
        gpu_memory=budget,
        offload=offload,
        cpu_memory=cpu_memory,
        hybrid=hybrid,
        kv_cache=KV_CACHE.get(case, "auto"),
        kv_dir=os.environ.get("OLLM_KV_DIR"),
        verify_checksums=False,
        max_context=prompt_len + new + 8,
        progress=False,
    )
    if case == "kv-cpu":  # the same placement, without fetching any KV to the GPU in decode
        set_kv_fetch(llm, lambda i, p: False)
    if case == "kv-fetch-all":
        set_kv_fetch(llm, lambda i, p: p.kv_tier == "cpu" and p.decode_device != "cpu")
    if case == "kv-fetch-n":
        from ollm.planning.costmodel import interleave

        ram = [i for i, p in enumerate(llm.plan.layers) if p.kv_tier == "cpu"]
        chosen = interleave(ram, int(os.environ.get("OLLM_FETCH_N", "8")))
        set_kv_fetch(llm, lambda i, p: i in chosen)
    if case == "kv-nosplit":  # the same placement, the boundary layer's KV all in RAM
        layers = tuple(replace(p, kv_device_tokens=0) for p in llm.plan.layers)
        llm.plan = llm.runner.plan = replace(llm.plan, layers=layers)
    files = [store / f"layers/layer_{i:04d}.bin" for i in llm.plan.streamed_for("decode")]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, llm.spec.vocab_size, (prompt_len,), generator=g).tolist()
    # Warm-up at full length (up to 8k), so kernel selection for the long prefill is not timed.
    llm.generate(prompt[:8192], SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True))
    if cold:
        drop_file_cache(files)

    params = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    if cold:
        # Drop the page cache of streamed layers before every step, so each pass reads from disk.
        runner = llm.runner
        orig = runner.forward

        def forward(*a, **k):
            drop_file_cache(files)
            return orig(*a, **k)

        runner.forward = forward
    if os.environ.get("OLLM_PROFILE"):  # where the prefill's (or decode's) time goes, op by op
        from torch.profiler import ProfilerActivity, profile

        steps = 4 if os.environ["OLLM_PROFILE"] == "decode" else 1
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            llm.generate(
                prompt, SamplingParams(max_new_tokens=steps, temperature=0, ignore_eos=True)
            )
        if steps > 1:  # a Chrome trace of the prefill and 3 decode steps, for offline reading
            out_dir.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(out_dir / f"trace-{case}-{prompt_len}.json"))
        ka = prof.key_averages()
        print(ka.table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))
        print(ka.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    timeline = None
    if os.environ.get("OLLM_TIMELINE"):  # per-layer copy/compute/CPU spans of the measured request
        from ollm.telemetry.timeline import Timeline

        timeline = Timeline(llm.device)
        llm.runner.timeline = llm.prefetcher.timeline = timeline
    res = llm.generate(prompt, params)
    if timeline is not None:
        llm.runner.timeline = llm.prefetcher.timeline = None
        save_timeline(timeline, out_dir, f"{case}-{prompt_len}")
    m = res.metrics
    streamed = sum(llm.store.layer_nbytes(i) for i in llm.plan.streamed_for("decode"))
    out = {
        "case": case,
        "cpu_layers": len(llm.plan.cpu_layers),
        "predicted": dict(llm.plan.predicted),
        "rates": None if llm.rates is None else llm.rates.__dict__,
        "cpu_path_s": m.cpu_path_seconds,
        "budget": budget,
        "resident": llm.plan.count("gpu"),
        "streamed": len(llm.plan.streamed_for("decode")),
        "streamed_GB_per_pass": streamed / 1e9,
        "prompt": prompt_len,
        "new": new,
        "prefill_s": m.prefill_seconds,
        "decode_tok_s": m.decode_tokens_per_second,
        "decode_s_per_tok": 1 / m.decode_tokens_per_second if m.decode_tokens_per_second else None,
        "peak_gpu_GiB": m.peak_gpu_memory / GiB,
        **kv_tiers(llm.plan),
        "prefill_chunk": llm.plan.prefill_chunk_tokens,
        "rss_GiB": __import__("psutil").Process().memory_info().rss / GiB,
        "io_wait_s": m.io_wait_seconds,
        "prefill_io_s": m.prefill_io_seconds,
        "prefill_io_wait_s": m.prefill_io_wait_seconds,
        "copy_s": m.copy_seconds,
        "read_s": m.read_seconds,
        "bytes_disk_GB": m.bytes_read_disk / 1e9,
        "bytes_h2d_GB": m.bytes_copied_h2d / 1e9,
        "reserved_plan_GiB": llm.plan.peak_device_bytes / GiB,
    }
    llm.close()
    torch.cuda.empty_cache()
    return out


def run_check(name: str, out: Path, quick: bool) -> dict:
    """Run ``scripts/gpu/<name>.py``'s ``run(out, quick=...)``; a failure is reported, not raised,
    so one broken check does not hide the others."""
    import importlib.util
    import inspect
    import traceback

    path = Path(__file__).parent / "gpu" / f"{name}.py"
    try:
        spec = importlib.util.spec_from_file_location(f"gpu_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        kwargs = {"quick": quick} if "quick" in inspect.signature(mod.run).parameters else {}
        result = mod.run(out, **kwargs)
    except Exception:  # noqa: BLE001 - reported in the JSON and the exit code
        result = {"ok": False, "error": traceback.format_exc()}
    print(f"== {name} ==", json.dumps(result, indent=1, default=str), flush=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--workdir", default="/tmp/ollm-gpu")
    ap.add_argument("--skip-equiv", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--prompt", type=int, default=8192)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--cases", default="cpu,hybrid,disk,disk-cold,all-disk")
    ap.add_argument(
        "--checks",
        default="runtime,budget",
        help="modules of scripts/gpu/ to run (each has run(out) -> dict); empty for none",
    )
    ap.add_argument("--quick", action="store_true", help="smaller matrices in the --checks")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    report["h2d_pinned_GBps"] = probe_h2d(CUDA, pinned=True) / 1e9
    report["h2d_pageable_GBps"] = probe_h2d(CUDA, pinned=False) / 1e9
    report["matmul_bf16_TFLOPs"] = probe_matmul(CUDA, torch.bfloat16) / 1e12
    print(json.dumps(report, indent=1), flush=True)
    if not args.skip_equiv:
        report["attention"] = attention_check()
        print(report["attention"], flush=True)
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            report["equivalence"] = equivalence(Path(tmp))
        for r in report["equivalence"]:
            print(r, flush=True)
    for name in filter(None, args.checks.split(",")):
        report[name] = run_check(name, Path(args.out), args.quick)
    if not args.skip_bench:
        from ollm.models.registry import STORE_FAMILIES
        from ollm.storage.synthetic import make_synthetic_store

        t = time.perf_counter()
        store = make_synthetic_store(
            "llama3-8b", work / "llama3-8b", progress=False, families=STORE_FAMILIES
        )
        report["store_build_s"] = time.perf_counter() - t
        report["disk_cold_GBps"] = (probe_disk(store, cold=True) or 0.0) / 1e9
        report["disk_warm_GBps"] = (probe_disk(store, cold=False) or 0.0) / 1e9
        print(
            {k: report[k] for k in ("store_build_s", "disk_cold_GBps", "disk_warm_GBps")},
            flush=True,
        )
        report["bench"] = []
        for case in args.cases.split(","):
            cold = case.endswith("cold")
            new = args.new if case in RAM_CASES else max(4, args.new // (8 if cold else 4))
            r = bench_case(store, case, "8GiB", args.prompt, new, Path(args.out))
            bw = (
                report["h2d_pinned_GBps"]
                if case in RAM_CASES
                else min(
                    report["h2d_pinned_GBps"],
                    report["disk_cold_GBps" if cold else "disk_warm_GBps"],
                )
            )
            r["floor_s_per_tok"] = r["streamed_GB_per_pass"] / bw  # weights only (KV not counted)
            report["bench"].append(r)
            print(json.dumps(r), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print("\n== summary ==")
    for r in report.get("equivalence", []):
        print(
            f"equiv {r['family']:12s} {r['offload']:6s} match={r['match']} streamed={r['streamed_layers']}/{r['layers']} cpu={r['cpu_layers']} kv_ram={r['kv_ram_layers']}"
        )
    for r in report.get("bench", []):
        print(
            f"bench {r['case']:10s} prefill {r['prefill_s']:.2f}s decode {r['decode_tok_s']:.2f} tok/s "
            f"({r['decode_s_per_tok'] or 0:.3f} s/tok, floor {r['floor_s_per_tok']:.3f}) peak {r['peak_gpu_GiB']:.2f} GiB "
            f"cpu layers {r['cpu_layers']} (cpu path {r['cpu_path_s']:.2f}s, predicted {r['predicted'].get('hybrid tok/s', r['predicted'].get('stream-only tok/s', 0)):.2f} tok/s) "
            f"kv ram/fetch/disk {r['kv_ram_layers']}/{r['kv_fetch_layers']}/{r['kv_disk_layers']} "
            f"prefill io/wait {r['prefill_io_s']:.2f}/{r['prefill_io_wait_s']:.2f}s wait {r['io_wait_s']:.2f}s copy {r['copy_s']:.2f}s read {r['read_s']:.2f}s res/stream {r['resident']}/{r['streamed']}"
        )
    print("attention", report.get("attention"))
    ok = all(r["match"] for r in report.get("equivalence", []))
    ok = ok and all(report[n].get("ok", True) for n in filter(None, args.checks.split(",")))
    ok = ok and all(v < 2e-2 for k, v in report.get("attention", {}).items() if "err" in k)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
