"""Where a `BatchEngine` decode step spends its time: a compact torch.profiler table.

``decode_ready(engine)`` steps until every running sequence has its whole prompt computed (the
next steps are pure decodes); ``profile_steps(engine, n)`` runs ``n`` steps under
``torch.profiler`` (CPU, and CUDA when the engine runs there) and returns per step: wall ms,
the profiled ops' total self CPU and device ms, and the ``top`` ops by self CPU time and by self
device time (calls, microseconds). A few KB of JSON, for `scripts/gpu/batch_engine.py` and
`scripts/batch_overhead.py`.
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
