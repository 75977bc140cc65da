"""Where a `BatchEngine` decode step spends its time: a compact torch.profiler table.

``decode_ready(engine)`` steps until every running sequence has its whole prompt computed (the
next steps are pure decodes); ``profile_steps(engine, n)`` runs ``n`` steps under
``torch.profiler`` (CPU, and CUDA when the engine runs there) and returns per step: wall ms,
the profiled ops' total self CPU and device ms, and the ``top`` ops by self CPU time and by self
device time (calls, microseconds). A few KB of JSON, for `scripts/gpu/batch_engine.py` and
`scripts/batch_overhead.py`.

``request_calls(llm, prompt, layers)``: CUDA runtime calls, GPU kernel and copy time and host
wall time per decode token (and layer) of a single request (`scripts/gpu/moe.py`).
"""

from __future__ import annotations

import time
from typing import Any

import torch

NAME_CHARS = 60  # op names are cut to this many characters


def decode_ready(engine: Any, max_steps: int = 1000) -> int:
    """Step ``engine`` until no running sequence has prompt tokens left to compute; returns the
    steps taken. Raises if that takes more than ``max_steps``."""
    for n in range(max_steps):
        seqs = engine.scheduler.seqs.values()
        if n and all(len(s.tokens) - s.num_computed <= 1 for s in seqs):
            return n
        engine.step()
    raise RuntimeError(f"prompts not computed after {max_steps} steps")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _row(e: Any, steps: int, device: bool) -> dict:
    self_dev = getattr(e, "self_device_time_total", None)
    if self_dev is None:  # older torch
        self_dev = getattr(e, "self_cuda_time_total", 0)
    row = {
        "op": e.key[:NAME_CHARS],
        "calls": round(e.count / steps, 2),
        "self_cpu_us": round(e.self_cpu_time_total / steps, 1),
    }
    if device:
        row["self_dev_us"] = round(self_dev / steps, 1)
    return row


def profile_steps(engine: Any, steps: int, top: int = 12) -> dict:
    """``steps`` engine steps under torch.profiler: per-step wall ms and the top ops (see the
    module docstring). The engine must have that many steps of work left."""
    from torch.profiler import ProfilerActivity, profile

    device = getattr(engine, "device", torch.device("cpu"))
    on_dev = device.type == "cuda" and torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_dev else [])
    _sync(device)
    batch = len(engine.scheduler.seqs)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        _sync(device)
        wall = time.perf_counter() - t0
    ev = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    rows = [_row(e, steps, on_dev) for e in ev]
    out: dict[str, Any] = {
        "steps": steps,
        "batch": batch,
        "wall_ms_per_step": round(wall / steps * 1e3, 2),  # profiled: above an unprofiled step
        "ops_per_step": round(sum(e.count for e in ev) / steps, 1),
        "self_cpu_ms_per_step": round(sum(r["self_cpu_us"] for r in rows) / 1e3, 2),
        "top_cpu": sorted(rows, key=lambda r: -r["self_cpu_us"])[:top],
    }
    if on_dev:
        out["self_dev_ms_per_step"] = round(sum(r["self_dev_us"] for r in rows) / 1e3, 2)
        out["top_dev"] = sorted(rows, key=lambda r: -r["self_dev_us"])[:top]
    return out


def time_steps(engine: Any, steps: int) -> list[float]:
    """Wall seconds of each of ``steps`` engine steps (synchronised on a GPU)."""
    device = getattr(engine, "device", torch.device("cpu"))
    out = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        engine.step()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


CUDA_CALLS = {  # runtime calls counted per decode token (names as the profiler reports them)
    "launches": ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"),
    "memcpy": ("cudaMemcpyAsync",),
    "syncs": ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize"),
    "event_records": ("cudaEventRecord", "cudaEventRecordWithFlags"),
    "stream_waits": ("cudaStreamWaitEvent",),
}


def request_calls(llm: Any, prompt: list[int], layers: int, steps: int = 6) -> dict:
    """Per decode token (and per layer): CUDA runtime calls (kernel launches, copies, host syncs,
    event records and waits), the GPU's kernel and copy time, and the host's wall time, from
    torch.profiler over a short request with and without ``steps`` more decode tokens. The
    GPU's busy share of the wall time says whether a step is bound by the host (launches,
    Python, syncs) or by the device."""
    from torch.profiler import ProfilerActivity, profile

    from ollm import SamplingParams

    cuda = torch.cuda.is_available()  # off CUDA (the dry run): the host's side only
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    totals = []
    for n in (2, 2, 2 + steps):  # the first: the profiler's own start-up, dropped
        sync()
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            llm.generate(prompt[:16], SamplingParams(max_new_tokens=n, temperature=0))
            sync()
            wall = time.perf_counter() - t0
        row = {k: 0 for k in CUDA_CALLS} | {"kernel_s": 0.0, "copy_s": 0.0, "wall_s": wall}
        for ev in prof.key_averages():
            for k, names in CUDA_CALLS.items():
                if ev.key in names:
                    row[k] += ev.count
            dev_s = getattr(ev, "self_device_time_total", 0) / 1e6
            if ev.key.startswith("Memcpy") or ev.key.startswith("Memset"):
                row["copy_s"] += dev_s
            elif dev_s and not ev.key.startswith("cuda"):
                row["kernel_s"] += dev_s
        totals.append(row)
    per_token = {k: (totals[2][k] - totals[1][k]) / steps for k in totals[0]}
    out = {"per_token": per_token, "per_layer": {k: v / layers for k, v in per_token.items()}}
    out["gpu_busy_fraction"] = per_token["kernel_s"] / max(per_token["wall_s"], 1e-9)
    return out


def _busy_ms(spans: list, lo: float, hi: float) -> float:
    """Milliseconds of [lo, hi) covered by the union of ``spans`` (start, end) in seconds."""
    total, end = 0.0, lo
    for s, e in sorted(spans):
        s, e = max(s, end), min(e, hi)
        if e > s:
            total += e - s
            end = e
    return round(total * 1e3, 2)


PHASES = (
    "schedule", "moves", "layout", "start", "embed", "prep", "head", "writes", "sample", "update"
)  # fmt: skip


def step_timeline(engine: Any, steps: int = 2, sync_phases: bool = False) -> dict:
    """``steps`` engine steps with an ``ollm.telemetry.timeline.Timeline`` on the runner and the
    prefetcher: every weight copy (CUDA events on the copy stream), every layer's compute on the
    device (events around it: a CPU attention inside a GPU layer stretches its span), the host's
    own time on each GPU layer (kind "host": its syncs, CPU attention and launches), every
    CPU-computed layer (host clock), and the host's phases of a step outside the layers
    (``PHASES``: layer -1 but "prep", each layer's rope tables, masks and hidden-state move).
    Returns the spans as ``[kind, layer, start_ms, end_ms]`` from the first step's start, per
    kind the milliseconds its spans cover (union) within the steps' wall time (``copy`` busy
    below the wall is time the link sat idle), ``phase_ms``: each phase's summed ms per step,
    ``unspanned_ms``: ms per step of the wall no host-clock span of the main thread covers,
    and ``synced``: the phases whose spans end on a device sync (every `phase` span with
    ``sync_phases``, which synchronizes after each: its span then holds its device work;
    "prep" and "host" spans never add one)."""
    from ollm.telemetry.timeline import Timeline

    device = getattr(engine, "device", torch.device("cpu"))
    runner = engine.runner
    _sync(device)
    tl = Timeline(device, sync_phases=sync_phases)
    runner.timeline = runner.prefetcher.timeline = tl
    try:
        t0 = time.perf_counter() - tl.t0
        for _ in range(steps):
            engine.step()
        _sync(device)
        t1 = time.perf_counter() - tl.t0
    finally:
        runner.timeline = runner.prefetcher.timeline = None
    spans = [sp for sp in tl.spans() if sp.end > t0]
    kinds = sorted({sp.kind for sp in spans})
    on_host = set(PHASES) | {"host", "cpu"} | ({"compute"} if device.type != "cuda" else set())
    lit = [(sp.start, sp.end) for sp in spans if sp.kind in on_host]  # the main thread's spans
    phase_ms = {
        k: round(sum(sp.end - sp.start for sp in spans if sp.kind == k) * 1e3 / steps, 3)
        for k in PHASES if k in kinds
    }  # fmt: skip
    return {
        "steps": steps,
        "sync_phases": tl.sync_phases,
        "wall_ms": round((t1 - t0) * 1e3, 2),
        "busy_ms": {
            k: _busy_ms([(sp.start, sp.end) for sp in spans if sp.kind == k], t0, t1) for k in kinds
        },  # fmt: skip
        "phase_ms": phase_ms,
        "unspanned_ms": round(((t1 - t0) * 1e3 - _busy_ms(lit, t0, t1)) / steps, 3),
        "synced": sorted(tl.synced),
        "spans": [
            [sp.kind, sp.layer, round((sp.start - t0) * 1e3, 3), round((sp.end - t0) * 1e3, 3)]
            for sp in spans
        ],  # fmt: skip
    }
