"""CPU decode attention over a paged KV pool on the device's host: gather + attention vs
attention over a strided view of a head-major pool (the batch engine's two paths, kv/packed.py).

    PYTHONPATH=src python scripts/gpu/cpu_attn_micro.py [--out DIR]

Random bf16 K/V, 8 KV heads x 128, 4 query heads per KV head, 16-token blocks, all host threads.
Each row: GB/s of K+V read per call (best of 5) for batch x tokens of 64 x 2080, 16 x 2080 and
1 x 100000, and whether the view's output equals the contiguous one (bit for bit).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BT, KVH, G, D = 16, 8, 4, 128
CASES = ((64, 2080), (16, 2080), (1, 100000))


def best(fn, n: int = 5) -> float:
    """Best wall seconds of ``n`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def case(batch: int, tokens: int) -> dict:
    """One row: the gather, attention over the gathered buffer, over the strided view."""
    nb = tokens // BT
    blocks = batch * nb + 64
    pool = torch.randn(2, blocks, KVH, BT, D, dtype=torch.bfloat16)  # block-major: gathered
    ids = torch.randperm(blocks)[: batch * nb].view(batch, nb)
    rows = (ids.view(batch, 1, nb) * KVH + torch.arange(KVH).view(1, KVH, 1)).reshape(-1)
    bufs = [torch.empty(batch * KVH * nb, BT * D, dtype=torch.bfloat16) for _ in range(2)]
    q = torch.randn(batch, KVH, G, D, dtype=torch.bfloat16)

    def gather():
        for i in (0, 1):
            torch.index_select(pool[i].view(blocks * KVH, BT * D), 0, rows, out=bufs[i])
        return [b.view(batch, KVH, tokens, D) for b in bufs]

    k, v = gather()
    slab = tokens + 64  # head-major, one slab per sequence: the batch is one strided view
    hm = torch.randn(2, KVH, batch * slab, D, dtype=torch.bfloat16)
    shape, stride = (batch, KVH, tokens, D), (slab * D, batch * slab * D, D, 1)
    kv = [hm[i].as_strided(shape, stride) for i in (0, 1)]
    kc, vc = kv[0].contiguous(), kv[1].contiguous()
    mask = torch.zeros(batch, 1, G, tokens, dtype=torch.bfloat16)
    gb = 2 * batch * tokens * KVH * D * 2 / 1e9

    def sdpa(k_, v_, m=None):
        return lambda: F.scaled_dot_product_attention(q, k_, v_, attn_mask=m, scale=0.088)

    eq = torch.equal(sdpa(kv[0], kv[1])(), sdpa(kc, vc)())
    return {
        "batch": batch,
        "tokens": tokens,
        "GB": gb,
        "gather_GBps": gb / best(gather),
        "attend_gathered_GBps": gb / best(sdpa(k, v)),
        "attend_view_GBps": gb / best(sdpa(kv[0], kv[1])),
        "attend_view_masked_GBps": gb / best(sdpa(kv[0], kv[1], mask)),
        "attend_contiguous_GBps": gb / best(sdpa(kc, vc)),
        "view_equals_contiguous": eq,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    rows = []
    for b, t in CASES:
        rows.append(case(b, t))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"threads": torch.get_num_threads(), "rows": rows}
    (out / "cpu_attn_micro.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
