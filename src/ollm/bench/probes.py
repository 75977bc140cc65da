"""Bandwidth and compute probes reported with every benchmark (the denominators of the floors).

On a CUDA device: pinned and pageable host->GPU copies, a device-memory copy and the matmul rate
in the model's dtype. On the CPU: a RAM copy, a RAM read and the CPU matmul rate (also at the
model's own projection shape, since a small square matmul under-rates a many-core CPU and a floor
must use the best rate the machine reaches). With a layer store: layer
file reads from the page cache (warm) and, where the OS lets a process drop a file's cached pages
(``posix_fadvise(DONTNEED)``, Linux), from the disk (cold). Every rate is in bytes/s or FLOP/s;
each probe takes well under a second.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["measure_bandwidth", "drop_file_cache", "can_drop_cache", "cpu_matmul_rate"]

MiB = 1 << 20


def _best(fn: Callable[[], None], reps: int, sync: Callable[[], None] = lambda: None) -> float:
    """Seconds of the fastest of ``reps`` runs of ``fn`` after one warm-up run."""
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def can_drop_cache() -> bool:
    """Whether this OS lets a process evict a file's pages from the page cache."""
    return hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED")


def drop_file_cache(paths: list[Path]) -> bool:
    """Evict ``paths`` from the page cache (flushing dirty pages first); False when unsupported."""
    if not can_drop_cache():
        return False
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped; a just-written store has many
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            return False
        finally:
            os.close(fd)
    return True


def _probe_files(store_dir: Path, max_bytes: int) -> list[str]:
    """Layer files of the store (the largest first few) adding up to about ``max_bytes``."""
    from ollm.storage.store import LayerStore, layer_file

    store = LayerStore(store_dir)
    files, total = [], 0
    for i in range(store.num_layers):
        files.append(layer_file(i))
        total += store.layer_nbytes(i)
        if total >= max_bytes:
            break
    store.close()
    return files


def probe_disk(store_dir: str | Path, cold: bool, max_bytes: int = 1 << 30) -> float | None:
    """Bytes/s reading layer files the way the prefetcher does (4 threads, one buffer).

    ``cold`` drops the files from the page cache first; None when the OS cannot do that.
    """
    from ollm.storage.store import LayerStore

    store_dir = Path(store_dir)
    files = _probe_files(store_dir, max_bytes)
    if cold and not drop_file_cache([store_dir / f for f in files]):
        return None
    store = LayerStore(store_dir)
    try:
        buf = torch.empty(max(store.files[f].nbytes for f in files), dtype=torch.uint8)
        if not cold:  # make sure the pages are cached
            for f in files:
                store.read_into(f, buf, verify=False)
        best = 0.0
        for _ in range(1 if cold else 3):  # warm: the best pass, as a floor divides by it
            t, total = time.perf_counter(), 0
            for f in files:
                total += store.read_into(f, buf, verify=False)
            best = max(best, total / (time.perf_counter() - t))
        return best
    finally:
        store.close()


def probe_h2d(device: torch.device, pinned: bool, nbytes: int = 512 * MiB) -> float:
    """Host->GPU copy bytes/s from pinned or pageable memory."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    secs = _best(
        lambda: dst.copy_(src, non_blocking=pinned), 3, lambda: torch.cuda.synchronize(device)
    )
    return nbytes / secs


def probe_memory(device: torch.device, nbytes: int = 256 * MiB) -> float:
    """Memory traffic bytes/s of a large copy on ``device`` (bytes read + bytes written)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return 2 * nbytes / _best(lambda: dst.copy_(src), 3, sync)


def probe_ram_read(nbytes: int = 256 * MiB) -> float:
    """Bytes/s of reading RAM once (a sum over a large buffer): the most a pass over weights
    held in RAM or in the page cache can reach, so the rate a floor divides by."""
    a = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / _best(lambda: a.sum(), 3)


def probe_linear(
    device: torch.device, dtype: torch.dtype, hidden: int, out: int, tokens: int
) -> float:
    """FLOP/s of the model's largest projection (``tokens`` x ``hidden`` times ``hidden`` x
    ``out``, as ``F.linear`` like the layers): token counts double from 64 until one run takes
    0.2 s or reaches ``tokens``, and the best rate is kept, so a many-core CPU is measured at a
    size where it reaches its peak and a slow one is not kept busy for seconds."""
    w = torch.randn(out, hidden, device=device).to(dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    best, m = 0.0, 64
    while True:
        x = torch.randn(min(m, tokens), hidden, device=device).to(dtype)
        secs = _best(lambda x=x: torch.nn.functional.linear(x, w), 2, sync)
        best = max(best, 2 * x.shape[0] * hidden * out / secs)
        if secs >= 0.2 or m >= tokens:
            return best
        m *= 2


def probe_matmul(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """FLOP/s of an n x n x n matmul in ``dtype`` (8192 on a GPU, 1024 on the CPU)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    reps = 5 if device.type == "cuda" else 2
    return 2 * n**3 / _best(lambda: torch.mm(a, b), reps, sync)


def measure_bandwidth(
    device: str = "cpu",
    store_dir: str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    linear: tuple[int, int, int] | None = None,
) -> dict[str, object]:
    """Measure this machine's rates once: a dict of GB/s and TFLOP/s (GFLOP/s on the CPU).

    Keys: ``disk_cold_GBps`` / ``disk_warm_GBps`` (with ``store_dir``; cold is None where the page
    cache cannot be dropped), ``h2d_pinned_GBps``, ``h2d_pageable_GBps``, ``gpu_mem_GBps`` and
    ``matmul_TFLOPs`` on CUDA, ``ram_GBps`` (host copy traffic) and ``ram_read_GBps`` always,
    ``cpu_matmul_GFLOPs`` on the CPU (the best of a square matmul and, with ``linear`` =
    ``(hidden, out, tokens)``, the model's largest projection: ``probe_linear``), plus
    ``device``, ``device_name``, ``dtype`` and ``seconds`` (the probes' own time).
    """
    t0 = time.perf_counter()
    dev = torch.device(device)
    out: dict[str, object] = {"device": str(dev), "dtype": str(dtype).removeprefix("torch.")}
    if store_dir is not None:
        cold = probe_disk(store_dir, cold=True)
        out["disk_cold_GBps"] = None if cold is None else cold / 1e9
        out["disk_warm_GBps"] = probe_disk(store_dir, cold=False) / 1e9  # type: ignore[operator]
        if cold is None:
            out["disk_cold_note"] = "this OS cannot drop the page cache (no posix_fadvise)"
    out["ram_GBps"] = probe_memory(torch.device("cpu")) / 1e9
    out["ram_read_GBps"] = probe_ram_read() / 1e9
    if dev.type == "cuda":
        torch.cuda.init()
        out["device_name"] = torch.cuda.get_device_name(dev)
        out["h2d_pinned_GBps"] = probe_h2d(dev, pinned=True) / 1e9
        out["h2d_pageable_GBps"] = probe_h2d(dev, pinned=False) / 1e9
        out["gpu_mem_GBps"] = probe_memory(dev, 1 << 30) / 1e9
        out["matmul_TFLOPs"] = probe_matmul(dev, dtype) / 1e12
        torch.cuda.empty_cache()
    else:
        import platform

        out["device_name"] = platform.processor() or platform.machine()
        out["cpu_threads"] = torch.get_num_threads()
        out["cpu_matmul_GFLOPs"] = cpu_matmul_rate(dtype, linear) / 1e9
    out["seconds"] = time.perf_counter() - t0
    return out


def cpu_matmul_rate(dtype: torch.dtype, linear: tuple[int, int, int] | None = None) -> float:
    """The best CPU FLOP/s of a 1024 square matmul and (with ``linear``) the model's shapes."""
    cpu = torch.device("cpu")
    rate = probe_matmul(cpu, dtype)
    if linear is not None:
        rate = max(rate, probe_linear(cpu, dtype, *linear))
    return rate


def matmul_flops(probes: dict[str, object]) -> float | None:
    """The probed matmul rate in FLOP/s, whichever device it was measured on."""
    if probes.get("matmul_TFLOPs"):
        return float(probes["matmul_TFLOPs"]) * 1e12  # type: ignore[arg-type]
    if probes.get("cpu_matmul_GFLOPs"):
        return float(probes["cpu_matmul_GFLOPs"]) * 1e9  # type: ignore[arg-type]
    return None
