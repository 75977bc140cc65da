"""One layer of routed decode attention over KV in pinned RAM (issue 18), run on the device:

    PYTHONPATH=src python scripts/gpu/routing_micro.py --out $OUT [--context 100000]

Llama-3.1-8B attention shapes (32 query heads, 8 KV heads of 128, bf16), one sequence, the whole
layer's KV (``context`` slots, 410 MB at 100k) in pinned RAM as an ``OffloadedKVCache`` with no
device blocks, key summaries on the GPU. Times one decode step's attention through the cache
(the new token's K/V stored, pages chosen, read, attended), CUDA events around it plus the host
clock with a synchronize, median of ``--iters``:

* ``full_cpu``: every key, attended on the CPU where it sits (a RAM layer of ``--attention full``
  that is not fetched);
* ``full_fetch``: the whole KV copied to the GPU, then attended there (a ``kv_fetch`` layer);
* ``topk_sit``: top-k pages reading 1/8 of the KV (sinks 64, window 256, pages of 64), the
  chosen pages gathered and attended on the CPU (``Router.read="sit"``, the default);
* ``topk_device``: the same pages gathered into pinned buffers, copied, attended on the GPU;
* ``topk_sit_parts``: the CPU gather and the CPU attention of ``topk_sit`` timed alone (and the
  attention in one part: ``attend`` cuts the keys so that every thread has a share).

and, for scale, the time one streamed layer's weights (436 MB) take host->GPU (``weights_h2d``):
in a decode step the routed reads of a RAM layer are hidden behind the weight stream when they
take less; ``beside_weights_ms`` is each step timed while such a copy runs on another stream. Target: topk <= ~1/8 of full_cpu + 1 ms, and below weights_h2d. < 60 s on an H200.
``bench(context, device)`` runs on the CPU too (tests, tiny context). Writes routing_micro.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

H, KVH, D = 32, 8, 128
PAGE, SINKS, WINDOW, SHARE = 64, 64, 256, 1 / 8
LAYER_BYTES = 436_207_616  # one Llama-3.1-8B decoder layer's weights in bf16


def _clock(fn, device: torch.device, iters: int) -> dict:
    """Median wall (host clock after a synchronize) and CUDA-event milliseconds of ``fn()``."""
    cuda = device.type == "cuda"
    walls, events = [], []
    fn()  # warm-up: buffers allocated, kernels loaded
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize(device)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        t = time.perf_counter()
        fn()
        if cuda:
            b.record()
            torch.cuda.synchronize(device)
            events.append(a.elapsed_time(b))
        walls.append((time.perf_counter() - t) * 1e3)
    row = {"wall_ms": round(statistics.median(walls), 3), "best_ms": round(min(walls), 3)}
    if events:
        row["event_ms"] = round(statistics.median(events), 3)
    return row


def _cache(context: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """An OffloadedKVCache holding ``context`` random slots in (pinned) RAM, summaries unset."""
    from ollm.kv.offload import KVScratch, OffloadedKVCache

    cap = context + 64
    scratch = KVScratch(1, KVH, D, 1, dtype, device)  # decode never uses it
    cache = OffloadedKVCache(1, KVH, D, cap, dtype, scratch)
    g = torch.Generator().manual_seed(seed)
    for a in range(0, context, 8192):
        e = min(context, a + 8192)
        cache.k[:, :, a:e] = torch.randn(1, KVH, e - a, D, generator=g).to(dtype)
        cache.v[:, :, a:e] = torch.randn(1, KVH, e - a, D, generator=g).to(dtype)
    cache.length = cache.dirty_from = context
    return cache


def _route(cache, context: int, pages: int, read: str, device, dtype) -> None:
    from ollm.kv.page_read import PageBuffers
    from ollm.kv.routed import Router
    from ollm.layers.routing import TOPK, LayerRouting

    r = LayerRouting((TOPK,) * KVH, WINDOW, SINKS, pages, PAGE)
    pin = device if read == "device" and device.type == "cuda" else None
    cache.router = Router(r, 1, D, cache.capacity, dtype, device, None, 8, PageBuffers(pin), read)
    for a in range(0, context, 8192):  # the summaries a prefill would have built
        e = min(context, a + 8192)
        cache.router.summaries.update(cache.k[:, :, a:e].to(device), a)


def _beside(fn, w_src: torch.Tensor, w_dst: torch.Tensor, side) -> None:
    """``fn()`` while one layer's weights copy host->GPU on another stream (as in a decode
    step, where a RAM layer's reads should hide behind the weight stream)."""
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        w_dst.copy_(w_src, non_blocking=True)
    fn()
    torch.cuda.current_stream().wait_stream(side)


def _fetch(cache, q, context: int, scale: float):
    """The ``kv_fetch`` path: the whole RAM KV copied to the GPU, attended there."""
    from ollm.kv.offload import copy_slots
    from ollm.layers.attention import AttentionMask, attend

    gk = torch.empty(1, KVH, context, D, dtype=q.dtype, device=q.device)
    gv = torch.empty_like(gk)

    def fetch():  # as KVFetcher: one contiguous DMA per (sequence, head)
        copy_slots(gk, cache.k, 0, context)
        copy_slots(gv, cache.v, 0, context)
        return attend(q, gk, gv, AttentionMask(context - 1, 1, context), scale)

    return fetch


def _parts(cache, q, context: int, pages: int, scale: float, iters: int) -> dict:
    """The CPU read of ``topk_sit`` in parts, each alone: the gather, the attention."""
    from ollm.kv.page_read import StepSlots, attend_read, gather_tier
    from ollm.layers.routing import select_pages

    lo, hi = cache.router.routing.middle(context)
    st = StepSlots(lo, hi, context, PAGE)
    heads = tuple(range(KVH))
    ids = select_pages(q, cache.router.summaries, lo, hi, pages, None).cpu()
    bufs = cache.router.buffers
    got = gather_tier(cache.k, cache.v, 0, st, heads, ids, bufs)
    qc, cpu = q.cpu(), torch.device("cpu")
    return {
        "gather": _clock(
            lambda: gather_tier(cache.k, cache.v, 0, st, heads, ids, bufs), cpu, iters
        ),
        "attend": _clock(lambda: attend_read(qc, got[0], got[1], None, scale), cpu, iters),
        "attend_unsplit": _clock(
            lambda: attend_read(qc, got[0], got[1], None, scale, parts=1), cpu, iters
        ),
        "read_bytes": 2 * got[0].numel() * got[0].element_size(),
        "read_fraction": got[0].shape[2] / (context + 1),
    }


def bench(context: int = 100000, device="cuda:0", iters: int = 7, dtype=torch.bfloat16) -> dict:
    """The rows above at ``context`` on ``device`` (CUDA rows skipped on the CPU)."""
    from ollm.layers.attention import AttentionMask

    device = torch.device(device)
    cuda = device.type == "cuda"
    torch.manual_seed(1)
    cache = _cache(context, device, dtype)
    q = torch.randn(1, H, 1, D, device=device, dtype=dtype)
    kn, vn = (torch.randn(1, KVH, 1, D, device=device, dtype=dtype) for _ in range(2))
    scale, mask = D**-0.5, AttentionMask(context, 1, context + 1)
    pages = max(1, (int(context * SHARE) - (SINKS + WINDOW + PAGE - 1)) // PAGE)

    def step():
        out = cache.attend(q, kn, vn, mask, scale, None)
        cache.trim(context)
        return out

    report: dict = {"device": str(device), "context": context, "pages": pages}
    report["kv_bytes_layer"] = 2 * KVH * D * context * cache.k.element_size()
    if cuda:
        w_src = torch.empty(LAYER_BYTES, dtype=torch.uint8).pin_memory()
        w_dst = torch.empty(LAYER_BYTES, dtype=torch.uint8, device=device)
        side = torch.cuda.Stream(device)
        report["weights_h2d"] = _clock(lambda: w_dst.copy_(w_src, non_blocking=True), device, iters)
        report["full_fetch"] = _clock(_fetch(cache, q, context, scale), device, iters)
    modes = [("full_cpu", None), ("topk_sit", "sit")] + (
        [("topk_device", "device")] if cuda else []
    )
    outs = {}
    for name, read in modes:
        if read is None:
            cache.router = None
        else:
            _route(cache, context, pages, read, device, dtype)
        report[name] = _clock(step, device, iters)
        if cuda:  # the same step while a layer's weights stream in: hidden when ~ weights_h2d
            beside = _clock(lambda: _beside(step, w_src, w_dst, side), device, iters)
            report[name]["beside_weights_ms"] = beside["wall_ms"]
        outs[name] = step()
    report["topk_sit_parts"] = _parts(cache, q, context, pages, scale, iters)
    report["kv_read_fraction"] = report["topk_sit_parts"]["read_fraction"]
    if "topk_device" in outs:
        diff = (outs["topk_sit"].float() - outs["topk_device"].float()).abs().max().item()
        report["sit_vs_device_max_abs"] = diff
    full_ms = report["full_cpu"]["wall_ms"]
    report["topk_sit_over_full_cpu"] = round(report["topk_sit"]["wall_ms"] / full_ms, 4)
    cache.close()
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--context", type=int, default=100000)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    report = bench(args.context, args.device, args.iters)
    report["torch"] = torch.__version__
    report["threads"] = torch.get_num_threads()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routing_micro.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
