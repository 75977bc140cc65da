"""Do small host<->GPU transfers on the compute stream wait behind a streamed layer's weight copy?

    PYTHONPATH=src python scripts/gpu/copy_overlap_micro.py [--out FILE]

A hybrid decode step (KV in pinned RAM, attended by the CPU) moves per layer a few hundred KB:
the queries and new K/V GPU->host, the attention output host->GPU, while the copy stream moves
the next streamed layer's 416 MB host->GPU. If the small host->GPU copy queues behind the big one
(one copy engine per direction), every layer's CPU attention adds the big copy's remaining time
to the chain and the step becomes the *sum* of stream and CPU attention instead of their max.

Measured (median ms of ``--reps``), each with nothing else in flight and while a 416 MB copy is
in flight on another stream, whole or as pieces of ``--piece`` MB:
* ``h2d_pinned``: 128 KB pinned -> GPU, non_blocking, then the compute stream synchronized;
* ``h2d_pageable``: the same from pageable memory (what ``tensor.to("cuda")`` of a fresh CPU
  tensor does);
* ``d2h``: 128 KB GPU -> CPU;
* ``cpu_attn``: CPU SDPA of 16 sequences x 2080 keys x 8 KV heads (Llama-3.1-8B decode) alone and
  while copies run back to back (host memory bandwidth shared).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ollm.runtime.uva import device_view

MB = 1 << 20


def _median_ms(fn, reps: int) -> float:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        inner = fn()  # a function timed inside (after its set-up) returns its own seconds
        out.append((inner if inner is not None else time.perf_counter() - t) * 1e3)
    return round(statistics.median(out), 3)


def uva_view(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor over the pinned host tensor ``t`` (``runtime/uva.device_view``: the same
    bytes read by kernels across the link, no copy-engine transfer), with ``t``'s dtype and
    shape."""
    return device_view(t, device).view(t.dtype).view(t.shape)


def kernel_copy_ms(src_pinned: torch.Tensor, dst: torch.Tensor, reps: int = 5) -> float:
    """A host->GPU copy done by a kernel reading pinned memory (no copy engine), in ms."""
    uva = uva_view(src_pinned.view(torch.int32), dst.device)
    d = dst.view(torch.int32)
    torch.add(uva, 0, out=d)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        torch.add(uva, 0, out=d)
    torch.cuda.synchronize()
    ok = torch.equal(d[:1000].cpu(), src_pinned.view(torch.int32)[:1000])
    return round((time.perf_counter() - t) * 1e3 / reps, 3) if ok else -1.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--layer-mb", type=int, default=416)
    ap.add_argument("--piece", default="416,64,16,4")
    args = ap.parse_args()
    dev = torch.device("cuda:0")
    big_host = torch.empty(args.layer_mb * MB, dtype=torch.uint8).pin_memory()
    big_dev = torch.empty_like(big_host, device=dev)
    copy_stream = torch.cuda.Stream(dev)
    small_pinned = torch.randn(64 * 1024, dtype=torch.bfloat16).pin_memory()  # 128 KB
    small_dev = torch.empty_like(small_pinned, device=dev)

    def big(piece_mb: int) -> None:
        n = big_host.numel()
        step = piece_mb * MB
        with torch.cuda.stream(copy_stream):
            for a in range(0, n, step):
                big_dev[a : a + step].copy_(big_host[a : a + step], non_blocking=True)

    def h2d_pinned() -> None:
        small_dev.copy_(small_pinned, non_blocking=True)
        torch.cuda.current_stream(dev).synchronize()

    def h2d_pageable() -> None:
        small_dev.copy_(torch.randn(64 * 1024).to(torch.bfloat16))
        torch.cuda.current_stream(dev).synchronize()

    def d2h() -> None:
        small_dev.to("cpu")

    uva = uva_view(small_pinned, dev)
    report: dict = {"gpu": torch.cuda.get_device_name(), "layer_mb": args.layer_mb}
    report["uva_equal"] = bool(torch.equal(torch.add(uva, 0).cpu(), small_pinned))

    def h2d_uva_kernel() -> None:  # the GPU reads pinned RAM itself: no copy engine
        torch.add(uva, 0, out=small_dev)
        torch.cuda.current_stream(dev).synchronize()

    prio = torch.cuda.Stream(dev, priority=-1)

    def h2d_priority_stream() -> None:
        with torch.cuda.stream(prio):
            small_dev.copy_(small_pinned, non_blocking=True)
        prio.synchronize()

    def with_big(fn, piece: int):
        def run() -> float:
            copy_stream.synchronize()
            big(piece)
            time.sleep(0.001)  # the big copy is under way
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        return run

    big(416)
    torch.cuda.synchronize()
    t = time.perf_counter()
    big(args.layer_mb)
    copy_stream.synchronize()
    report["big_copy_ms"] = round((time.perf_counter() - t) * 1e3, 3)
    report["big_kernel_copy_ms"] = kernel_copy_ms(big_host, big_dev)
    cases = (("h2d_pinned", h2d_pinned), ("h2d_pageable", h2d_pageable), ("d2h", d2h),
             ("h2d_uva_kernel", h2d_uva_kernel), ("h2d_priority_stream", h2d_priority_stream))  # fmt: skip
    for name, fn in cases:
        row = {"alone": _median_ms(fn, args.reps)}
        for p in (int(x) for x in args.piece.split(",")):
            row[f"with_big_{p}MB"] = _median_ms(with_big(fn, p), args.reps)
        report[name] = row
        print(name, row, flush=True)
    copy_stream.synchronize()
    # CPU attention alone and under back-to-back copies
    q = torch.randn(16, 32, 1, 128, dtype=torch.bfloat16)
    k = torch.randn(16, 8, 2080, 128, dtype=torch.bfloat16)
    v = torch.randn_like(k)

    def attn() -> None:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    attn()
    row = {"alone": _median_ms(attn, args.reps)}
    for p in (416, 16):
        for _ in range(8):
            big(p)
        row[f"under_copies_{p}MB"] = _median_ms(attn, args.reps)
        copy_stream.synchronize()
    report["cpu_attn_16x2080"] = row
    print("cpu_attn", row, flush=True)
    print(json.dumps(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
