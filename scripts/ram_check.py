"""Does the RAM side of the plan hold on a CPU machine? Peak RSS against the planned RAM.

First a process converts the model if needed (conversion is not measured) and measures what the
model's tokenizer adds to RSS once imports are done. Then, for each context length, a fresh
process imports Python + torch + transformers + ollm and reads the model's config (the imports
that pulls in), measures that baseline, builds ``LLM(max_context=n + new)`` (the default model
unless ``--model``), runs a random-token prompt of n tokens with ``new`` greedy tokens, and
reports the peak RSS (sampled every 2 ms from /proc/self/status, plus getrusage's ru_maxrss)
next to the plan's reserved total. The check: peak RSS - (baseline + tokenizer) <= planned total.
Anonymous RSS (RssAnon) is reported separately: the store is read with preadv, not mmapped, so
file-backed RSS is shared libraries only, already in the baseline.

    nice .venv/bin/python scripts/ram_check.py 2048 8192 32768 --out docs/runs/x/ram_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

MIB = 1 << 20


def proc_status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM of this process in bytes (Linux /proc/self/status)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


class PeakSampler:
    """A thread that samples /proc/self/status every ``interval`` seconds and keeps the peaks of
    RSS and anonymous RSS, per labelled phase (``phase`` is set by the caller)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.phase = "start"
        self.peaks: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def sample(self) -> None:
        s = proc_status()
        peak = self.peaks.setdefault(self.phase, {"VmRSS": 0, "RssAnon": 0})
        for key in peak:
            peak[key] = max(peak[key], s[key])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def peak(self, key: str) -> int:
        return max(p[key] for p in self.peaks.values())


def _imports(model: str | None) -> Path:
    """Import what a request imports and read the model's config (transformers imports its
    config and rope modules then: ~100 MB of code, not model memory); the store's path."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import ollm.api  # noqa: F401
    import ollm.engine.runner  # noqa: F401
    from ollm.models.registry import STORE_FAMILIES, build_spec
    from ollm.storage.convert import resolve_store
    from ollm.storage.store import LayerStore

    path = resolve_store(model, None, None, False, families=STORE_FAMILIES)
    build_spec(LayerStore(path).hf_config())
    return path


def tokenizer_cost(model: str | None) -> dict:
    """In a fresh process (after converting the model if needed): RSS the tokenizer adds once
    loaded, and at its peak while loading."""
    import gc

    from transformers import AutoTokenizer

    path = _imports(model)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        return {"tokenizer_rss": 0, "tokenizer_peak": 0}  # token ids only (LLM loads none)
    gc.collect()
    with PeakSampler() as sampler:
        before = proc_status()["VmRSS"]
        tok = AutoTokenizer.from_pretrained(str(path))
        after = proc_status()["VmRSS"]
    del tok
    return {"tokenizer_rss": after - before, "tokenizer_peak": sampler.peak("VmRSS") - before}


def measure_one(n: int, new: int, model: str | None, seed: int, opts: dict) -> dict:
    """In this (fresh) process: baseline, load, one request of ``n`` prompt tokens; sizes in bytes."""
    import gc

    import torch

    _imports(model)
    gc.collect()
    base = proc_status()
    with PeakSampler() as sampler:
        from ollm import LLM, SamplingParams

        sampler.phase = "load"
        llm = LLM(model, max_context=n + new, progress=False, **opts)
        loaded = proc_status()
        g = torch.Generator().manual_seed(seed)
        vocab = llm.spec.vocab_size
        low = min(1000, vocab // 4)  # past the special tokens of real vocabularies
        prompt = torch.randint(low, min(vocab, 200_000), (n,), generator=g).tolist()
        params = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)
        sampler.phase = "request"
        t0 = time.perf_counter()
        res = llm.generate(prompt, params)
        wall = time.perf_counter() - t0
    plan = llm.plan
    return {
        "prompt_tokens": n,
        "new_tokens": len(res.token_ids),
        "device": plan.device,
        "threads": torch.get_num_threads(),
        "prefill_chunk_tokens": plan.prefill_chunk_tokens,
        "baseline_rss": base["VmRSS"],
        "baseline_anon": base["RssAnon"],
        "after_load_rss": loaded["VmRSS"],
        "peak_rss": sampler.peak("VmRSS"),
        "peak_anon": sampler.peak("RssAnon"),
        "peak_rss_by_phase": {k: v["VmRSS"] for k, v in sampler.peaks.items()},
        "vm_hwm": proc_status()["VmHWM"],
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "planned": plan.peak_device_bytes,
        "planned_items": dict(plan.reserved),
        "request_seconds": round(wall, 2),
        "prefill_seconds": round(res.metrics.prefill_seconds, 2),
    }


def judge(r: dict, tok: dict) -> dict:
    """Add the check to a run: the peak over baseline + tokenizer (its steady RSS, and its
    loading peak for the load phase, when both are live) against the planned total."""
    base = r["baseline_rss"] + tok["tokenizer_rss"]
    load_base = r["baseline_rss"] + tok["tokenizer_peak"]
    phases = r["peak_rss_by_phase"]
    over = max(phases.get("request", 0) - base, phases.get("load", 0) - load_base) - r["planned"]
    r.update(tok)
    r["over_plan"] = over
    r["over_plan_anon"] = r["peak_anon"] - r["baseline_anon"] - tok["tokenizer_peak"] - r["planned"]
    r["within_plan"] = over <= 0
    return r


def _child(args: argparse.Namespace, *extra: str) -> dict:
    """Run this script's ``extra`` mode in a new interpreter; its last stdout line is JSON."""
    cmd = [sys.executable, __file__, *extra, "--new", str(args.new), "--seed", str(args.seed)]
    if args.model:
        cmd += ["--model", args.model]
    if args.cpu_memory:
        cmd += ["--cpu-memory", args.cpu_memory]
    if args.prefill_chunk:
        cmd += ["--prefill-chunk", str(args.prefill_chunk)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _row(r: dict) -> str:
    mib = lambda x: f"{x / MIB:9.0f}"  # noqa: E731
    base = r["baseline_rss"] + r["tokenizer_rss"]
    return (
        f"{r['prompt_tokens']:>7} {r['prefill_chunk_tokens']:>6} {mib(base)} {mib(r['peak_rss'])} "
        f"{mib(r['peak_rss'] - base)} {mib(r['planned'])} {mib(r['over_plan'])} "
        f"{str(r['within_plan']):>6} {r['prefill_seconds']:9.1f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("contexts", nargs="*", type=int, default=[2048, 8192, 32768])
    ap.add_argument("--new", type=int, default=4, help="new tokens per request")
    ap.add_argument("--model", default=None, help="model path (default: the default model)")
    ap.add_argument("--cpu-memory", default=None, help="cpu_memory budget, e.g. 4GiB")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="force rows per chunk")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        opts = {"device": "cpu"}
        if args.cpu_memory:
            opts["cpu_memory"] = args.cpu_memory
        if args.prefill_chunk:  # rows per chunk; more than the prompt runs it whole
            opts["prefill_chunk"] = args.prefill_chunk
        print(json.dumps(measure_one(args.one, args.new, args.model, args.seed, opts)))
        return
    if args.tokenizer:
        print(json.dumps(tokenizer_cost(args.model)))
        return
    tok = _child(args, "--tokenizer")
    print(
        f"tokenizer: {tok['tokenizer_rss'] / MIB:.0f} MiB ({tok['tokenizer_peak'] / MIB:.0f} at peak)"
    )
    print(" tokens  chunk  base MiB  peak MiB peak-base   planned over plan within prefill s")
    rows = []
    for n in args.contexts:
        rows.append(judge(_child(args, "--one", str(n)), tok))
        print(_row(rows[-1]), flush=True)
    if args.out:
        import platform

        import torch

        meta = {
            "machine": platform.node(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "command": " ".join(sys.argv),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
