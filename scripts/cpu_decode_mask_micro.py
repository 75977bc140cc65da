"""Batched CPU decode attention (16 sequences x 2080 keys, Llama-3.1-8B heads, bf16): the key
mask as before (boolean, expanded per head), boolean broadcast, and additive (0 / -inf, made
once per step) broadcast; medians of interleaved runs:
``PYTHONPATH=src python scripts/cpu_decode_mask_micro.py``."""

import statistics
import time

import torch
import torch.nn.functional as F

from ollm.kv.decode_batch import additive_mask
from ollm.layers.attention import AttentionMask, attend

torch.manual_seed(0)
B, KVH, G, S, D = 16, 8, 4, 2080, 128
dt = torch.bfloat16
k = torch.randn(B, KVH, S, D, dtype=dt)
v = torch.randn(B, KVH, S, D, dtype=dt)
q = torch.randn(B, KVH * G, 1, D, dtype=dt)
keep = (torch.arange(S)[None] < (S - 16 + torch.arange(B))[:, None])[:, None, None]
m = AttentionMask(S - 1, 1, S, keep[:, 0, 0], None, None)
add = additive_mask({}, keep, dt)


def old(q, k, v, keep):  # the expand/reshape of the boolean mask, as before
    b, h, t, d = q.shape
    g = h // KVH
    qg = q.reshape(b, KVH, g * t, d)
    mk = keep.unsqueeze(2).expand(b, 1, g, t, S).reshape(-1, 1, g * t, S)
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=mk, scale=0.1)


fs = {
    "before (bool, expanded)": lambda: old(q, k, v, keep),
    "bool broadcast": lambda: attend(q, k, v, m, 0.1, keep),
    "additive broadcast": lambda: attend(q, k, v, m, 0.1, add),
}
res = {n: [] for n in fs}
for f in fs.values():
    f()
for _ in range(40):
    for n, f in fs.items():
        t0 = time.perf_counter()
        f()
        res[n].append((time.perf_counter() - t0) * 1e3)
print("threads", torch.get_num_threads())
for n, v in res.items():
    print(n, round(statistics.median(v), 1), "ms")
