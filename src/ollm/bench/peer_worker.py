"""One peer engine on one workload, in its own process (started by ``scripts/peers.py``).

Standalone on purpose: it imports nothing from ``ollm``, because upstream oLLM's package has the
same name and comes first on this process's path. Run it with ``python -P`` (no script directory
on ``sys.path``). Progress goes to stdout as JSON lines prefixed ``@@ `` and flushed at once, so a
run killed at its time limit still leaves its prefill and decode steps so far:

    {"event": "loaded", ...}  {"event": "warmup", "context": N, "warmup_s": ...}
    {"event": "token", "context": N, "i": k, "t": seconds since start}
    {"event": "case", ...}    {"event": "error", "stage": ..., "message": ...}

Peers: ``accelerate-cpu`` / ``accelerate-disk`` (transformers ``device_map="auto"`` with
``max_memory``: CPU offload, or disk offload through ``offload_folder``), ``ollm-upstream``
(oLLM from PyPI: every layer read from the checkpoint on each pass), ``airllm``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import traceback

T0 = time.perf_counter()


def emit(**fields: object) -> None:
    print("@@ " + json.dumps(fields), flush=True)


class Rss:
    """Peak RSS of this process, sampled on a thread."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def io(self) -> dict[str, int]:
        try:
            c = self.proc.io_counters()
            return {"read_chars": c.read_chars, "read_bytes": c.read_bytes}
        except (AttributeError, OSError):
            return {}


def _versions(peer: str) -> dict[str, str]:
    from importlib import metadata

    names = ["torch", "transformers", "accelerate", "huggingface_hub"]
    names += {"ollm-upstream": ["ollm"], "airllm": ["airllm"]}.get(peer, [])
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                total += os.stat(p).st_blocks * 512
    return total


def load_accelerate(args: argparse.Namespace, disk: bool) -> tuple[object, dict]:
    import torch
    from transformers import AutoModelForCausalLM

    gpu = 0 if args.device == "cpu" else int(args.device.split(":")[1] if ":" in args.device else 0)
    max_memory: dict[object, object] = {"cpu": args.cpu_memory}
    if args.device != "cpu":
        max_memory[gpu] = args.gpu_memory
    kwargs: dict[str, object] = {"dtype": torch.bfloat16, "device_map": "auto"}
    if disk:
        max_memory["cpu"] = args.disk_cpu_memory
        kwargs["offload_folder"] = os.path.join(args.workdir, "offload")
    model = AutoModelForCausalLM.from_pretrained(args.model, max_memory=max_memory, **kwargs)
    dm = getattr(model, "hf_device_map", {}) or {}
    tiers: dict[str, int] = {}
    for name, where in dm.items():
        if ".layers." in f".{name}." or name.endswith(".layers"):
            tiers[str(where)] = tiers.get(str(where), 0) + 1
    return model, {
        "max_memory": {str(k): v for k, v in max_memory.items()},
        "layers_by_device": tiers,
    }


def load_ollm_upstream(args: argparse.Namespace) -> tuple[object, dict]:
    import json as _json

    with open(os.path.join(args.model, "config.json")) as f:
        model_type = _json.load(f).get("model_type")
    ids = {"llama": "llama3-8B-chat", "gemma3_text": "gemma3-12B", "gemma3": "gemma3-12B"}
    if model_type not in ids:
        raise RuntimeError(f"upstream oLLM has no loader for model_type {model_type!r}")
    model_id = ids[model_type]
    models_dir = os.path.join(args.workdir, "ollm-models")
    os.makedirs(models_dir, exist_ok=True)
    link = os.path.join(models_dir, model_id)  # oLLM loads models_dir/<model id>/
    if os.path.islink(link):
        os.unlink(link)
    os.symlink(os.path.abspath(args.model), link)
    from ollm import Inference  # upstream oLLM (first on PYTHONPATH)

    o = Inference(model_id, device=args.device, logging=False)
    o.ini_model(models_dir=models_dir, force_download=False)
    if args.ollm_cpu_layers:
        o.offload_layers_to_cpu(layers_num=args.ollm_cpu_layers)
    info = {"model_id": model_id, "cpu_layers": args.ollm_cpu_layers, "kv": args.ollm_kv}
    if args.ollm_kv == "disk":
        info["_cache"] = lambda: o.DiskCache(cache_dir=os.path.join(args.workdir, "ollm-kv"))
    return o.model, info


def load_airllm(args: argparse.Namespace, max_len: int) -> tuple[object, dict]:
    from airllm import AutoModel

    model = AutoModel.from_pretrained(args.model, device=args.device, max_seq_len=max_len)
    return model, {"prefetching": getattr(model, "prefetching", None)}


# The same warm-up as ``ollm bench`` (``ollm.bench.run.WARMUP_NEW_TOKENS``; this file imports
# nothing from ollm): one untimed generate at the full prompt length, so kernel selection, first
# reads and allocator growth are not timed for any engine.
WARMUP_NEW_TOKENS = 2
HARD_DEADLINE = [float("inf")]  # --deadline (epoch s), set in main()


def _generate(model, ids, new_tokens: int, info: dict, streamer, stop_at: float) -> None:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens unless ``stop_at`` (epoch s) passes
    with at least 3 tokens out (2 decode steps) or the worker's hard deadline passes."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    count = [0]

    class Deadline(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            count[0] += 1
            now = time.time()
            stop = (now > stop_at and count[0] >= 3) or now > HARD_DEADLINE[0]
            return torch.full(
                (input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device
            )

    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([Deadline()]),
        pad_token_id=0,
    )
    if "_cache" in info:
        kwargs["past_key_values"] = info["_cache"]()
    with torch.no_grad():
        model.generate(**kwargs)


def run_context(model, args, ctx: int, info: dict, rss: Rss, deadline: float) -> None:
    """Warm up, then generate on a random prompt of ``ctx`` tokens, stopping at ``deadline``."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    stamps: list[float] = []

    class Stamps(BaseStreamer):
        def __init__(self, timed: bool) -> None:
            self.first = True
            self.timed = timed

        def put(self, value) -> None:
            if self.first:  # generate() puts the prompt first
                self.first = False
                return
            now = time.perf_counter()
            stamps.append(now)
            if self.timed:
                emit(event="token", context=ctx, i=len(stamps), t=now - T0)

        def end(self) -> None:
            pass

    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, int(args.vocab), (1, ctx), generator=g)
    dev = torch.device(args.device)
    ids = ids.to(dev)
    cuda = dev.type == "cuda"
    t0 = time.perf_counter()
    _generate(model, ids, WARMUP_NEW_TOKENS, info, Stamps(timed=False), deadline)
    warm = {"warmup_s": time.perf_counter() - t0}
    if stamps:  # the cold figures, for a peer whose timed run the time limit cuts short
        warm["warmup_prefill_s"] = stamps[0] - t0
    if len(stamps) > 1:
        warm["warmup_step_s"] = stamps[1] - stamps[0]
    emit(event="warmup", context=ctx, **warm)
    stamps.clear()
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    io0 = rss.io()
    emit(event="start", context=ctx, t=time.perf_counter() - T0)
    t0 = time.perf_counter()
    _generate(model, ids, args.new_tokens, info, Stamps(timed=True), deadline)
    t_end = time.perf_counter()
    io1 = rss.io()
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    case = {
        "context": ctx,
        **warm,
        "prefill_s": stamps[0] - t0 if stamps else None,
        "generated_tokens": len(stamps),
        "decode_step_median_s": statistics.median(steps) if steps else None,
        "decode_tok_s": len(steps) / (stamps[-1] - stamps[0]) if steps else None,
        "decode_steps_s": steps,
        "total_s": t_end - t0,
        "stopped_at_deadline": len(stamps) < args.new_tokens,
        "peak_gpu_bytes": torch.cuda.max_memory_reserved(dev) if cuda else 0,
        "ram_peak_bytes": rss.peak,
    }
    for k in io1:
        case[f"{k}_delta"] = io1[k] - io0.get(k, 0)
    case["scratch_bytes"] = _du(args.workdir)  # offload folder, KV files
    emit(event="case", **case)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--peer", required=True)
    ap.add_argument("--model", required=True, help="HF checkpoint directory")
    ap.add_argument("--contexts", required=True, help="comma-separated token counts")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--gpu-memory", type=int, required=True, help="bytes")
    ap.add_argument("--cpu-memory", type=int, default=200 << 30)
    ap.add_argument("--disk-cpu-memory", type=int, default=1 << 30)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--deadline", type=float, required=True, help="epoch seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ollm-cpu-layers", type=int, default=0)
    ap.add_argument("--ollm-kv", choices=("gpu", "disk"), default="gpu")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    HARD_DEADLINE[0] = args.deadline
    os.makedirs(args.workdir, exist_ok=True)
    rss = Rss()
    stage = "import"
    try:
        import torch

        t = time.perf_counter()
        stage = "load"
        if args.peer in ("accelerate-cpu", "accelerate-disk"):
            model, info = load_accelerate(args, disk=args.peer == "accelerate-disk")
        elif args.peer == "ollm-upstream":
            model, info = load_ollm_upstream(args)
        elif args.peer == "airllm":
            model, info = load_airllm(args, max(contexts) + args.new_tokens + 8)
        else:
            raise RuntimeError(f"unknown peer {args.peer!r}")
        load_peak = 0
        if torch.device(args.device).type == "cuda":
            load_peak = torch.cuda.max_memory_reserved(torch.device(args.device))
        public = {k: v for k, v in info.items() if not k.startswith("_")}
        emit(
            event="loaded",
            load_s=time.perf_counter() - t,
            load_peak_gpu_bytes=load_peak,
            info=public,
            versions=_versions(args.peer),
        )
    except Exception as exc:  # report why the peer cannot run, then stop
        emit(event="error", stage=stage, message=f"{type(exc).__name__}: {exc}".strip())
        traceback.print_exc()
        return 1
    failed = 0
    for k, ctx in enumerate(contexts):
        now = time.time()
        if now > args.deadline:
            emit(event="error", stage=f"context {ctx}", message="time limit reached before start")
            continue
        share = now + (args.deadline - now) / (len(contexts) - k)  # each context its share
        try:
            run_context(model, args, ctx, info, rss, share)
        except Exception as exc:
            failed += 1
            emit(event="error", stage=f"context {ctx}", message=f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
            import gc

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
