"""Attention over encoded paged KV blocks without a full-precision copy of the cache (issue 17
part 6), for every sequence of a batched step at once.

`paged_encoded_lse` takes the queries of S sequences ``[S, H, T, D]``, their block tables
``[S, >= blocks]`` (block ids of the `CodecPagedStore` codes, whose batch axis is the block id)
and how many leading blocks each one sees encoded, and returns the attention over those blocks
with its log-sum-exp (merged by the caller with the exact window). On CUDA a Triton kernel
walks the block tables and dequantizes the codes in registers, one launch for all sequences
(``kv/codec_paged_triton.py``, imported only there); anywhere else, and as its fallback, a
torch path that decodes ``chunk`` slots of all sequences at a time (sequences sorted by length,
so a column of blocks is read only for the sequences that have it): keys decoded into a float32
buffer of that chunk, values weighted without being dequantized (``kv/codec_cpu._values``),
chunks merged by an online softmax. No temporary is larger than the chunk (or one block per
sequence of the call).
"""

from __future__ import annotations

import torch

from ollm.kv.codec_cpu import _values
from ollm.kv.codecs import CodeStore, decode
from ollm.planning.footprint import CODEC_CPU_CHUNK, CODEC_GPU_CHUNK


def block_table(ids: list[torch.Tensor], blocks: list[int], device) -> torch.Tensor:
    """[S, max(blocks)] long table of the first ``blocks[i]`` ids of ``ids[i]``, padded with
    the sequence's own first block (a real block: padding is never read as garbage codes)."""
    width = max(blocks)
    table = torch.empty(len(ids), width, dtype=torch.long, device=device)
    for i, (t, n) in enumerate(zip(ids, blocks, strict=True)):
        row = t[:n].to(device, torch.long)
        table[i, :n] = row
        table[i, n:] = row[0]
    return table


def paged_encoded_lse(
    q: torch.Tensor,
    store: CodeStore,
    table: torch.Tensor,
    blocks: list[int],
    scale: float,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [S, H, T, D] (sequence i's rows) over the encoded slots of blocks
    ``table[i, :blocks[i]]`` (each >= 1) of ``store``, unmasked: (out [S, H, T, D] in q's
    dtype, lse [S, H, T] float32). The Triton kernel on CUDA where it applies, else torch."""
    if min(blocks) < 1:
        raise ValueError("every sequence of a paged encoded call sees at least one block")
    if q.device.type == "cuda":
        from ollm.kv import codec_paged_triton

        fast = codec_paged_triton.fast_paged_lse(q, store, table, blocks, scale, paged_lse_torch)
        if fast is not None:
            return fast
    return paged_lse_torch(q, store, table, blocks, scale, chunk)


def _gather(t: torch.Tensor, ids: torch.Tensor, s: int, c: int, device) -> torch.Tensor:
    """Rows of blocks ``ids`` (s sequences x c blocks) of a code tensor [NB, H, r, ...] as
    [s, H, c * r, ...] on ``device`` (a chunk's codes only)."""
    x = t.index_select(0, ids.to(t.device)).to(device)
    x = x.view(s, c, *x.shape[1:]).transpose(1, 2)
    return x.reshape(s, x.shape[1], c * x.shape[3], *x.shape[4:])


def paged_lse_torch(
    q: torch.Tensor,
    store: CodeStore,
    table: torch.Tensor,
    blocks: list[int],
    scale: float,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`paged_encoded_lse` in torch: ``chunk`` slots (all sequences together) decoded at a
    time, longest sequences first."""
    n_seq, h, t, d = q.shape
    kvh, bt = store.kc.shape[1], store.slots
    if chunk is None:
        chunk = CODEC_CPU_CHUNK if q.device.type == "cpu" else CODEC_GPU_CHUNK
    rows = h // kvh * t
    order = sorted(range(n_seq), key=lambda i: -blocks[i])
    nb = [blocks[i] for i in order]
    perm = torch.tensor(order, device=q.device)
    qg = q.index_select(0, perm).float().reshape(n_seq, kvh, rows, d) * scale
    tab = table.index_select(0, perm.to(table.device))
    acc = torch.zeros(n_seq, kvh, rows, d, dtype=torch.float32, device=q.device)
    den = torch.zeros(n_seq, kvh, rows, 1, dtype=torch.float32, device=q.device)
    top = torch.full_like(den, float("-inf"))
    per_group = max(1, chunk // bt)  # sequences of a group: at least one block column each
    for g0 in range(0, n_seq, per_group):
        g1 = min(n_seq, g0 + per_group)
        cols = max(1, chunk // ((g1 - g0) * bt))
        for j0 in range(0, nb[g0], cols):
            k = sum(1 for n in nb[g0:g1] if n > j0)  # sequences that have column j0 (sorted)
            j1 = min(nb[g0], j0 + cols)
            _chunk(qg, store, tab, nb, (g0, g0 + k, j0, j1), acc, den, top)
    out = torch.empty_like(acc)
    out[perm] = acc / den
    lse = torch.empty_like(top)
    lse[perm] = top + den.log()
    return out.reshape(n_seq, h, t, d).to(q.dtype), lse.reshape(n_seq, h, t)


def _chunk(qg, store: CodeStore, tab, nb, span, acc, den, top) -> None:
    """Fold block columns [j0, j1) of sequences [s0, s1) (each has column j0) into the running
    ``acc`` / ``den`` / ``top`` (online softmax)."""
    s0, s1, j0, j1 = span
    n, c, bt, d = s1 - s0, j1 - j0, store.slots, qg.shape[-1]
    dev = qg.device
    ids = tab[s0:s1, j0:j1].reshape(-1)
    kc, kp, vc, vp = (_gather(x, ids, n, c, dev) for x in store.tensors())
    kb = torch.empty(n, kc.shape[1], c * bt, d, dtype=torch.float32, device=dev)
    decode(kc, kp, store.codec.key, kb)
    s = torch.matmul(qg[s0:s1], kb.transpose(-1, -2))  # [n, KVH, rows, c * bt]
    have = torch.tensor(nb[s0:s1], device=dev)[:, None] > torch.arange(j0, j1, device=dev)
    if not all(x >= j1 for x in nb[s0:s1]):  # a shorter sequence's padding columns
        s.masked_fill_(~have.repeat_interleave(bt, 1)[:, None, None], float("-inf"))
    m = torch.maximum(s.amax(-1, keepdim=True), top[s0:s1])  # finite: column j0 is real
    p = s.sub_(m).exp_()
    o = _values(p, vc, vp, store.codec.value, d)
    w = torch.exp(top[s0:s1] - m)
    acc[s0:s1] = acc[s0:s1] * w + o
    den[s0:s1] = den[s0:s1] * w + p.sum(-1, keepdim=True)
    top[s0:s1] = m
