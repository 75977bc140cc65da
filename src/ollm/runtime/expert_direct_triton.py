"""The two kernels of the direct expert decode (``runtime/expert_direct.py``), imported only on
CUDA with Triton present (or under ``TRITON_INTERPRET=1`` in tests).

``plan``: one program reads the row's k expert ids and the cache's device tables, marks the hits
used at this call's tick, and gives every miss the least recently used slot not used by this
call (evicting its expert): the same choice, in the same order, as ``expert_direct.plan_torch``.
Per pair it writes where the expert's bytes are read from (its slot, or its home in pinned RAM:
a host address the GPU reads over the link) and where a miss is kept (its new slot; 0 for a hit).

``gather``: k x chunks programs copy each pair's expert into row j of a scratch buffer (the
batched matmuls read it as [k, ...] stacks), a miss also into its slot in the same pass: the link
is crossed once per miss, with no host sync and no copy engine.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BIG = tl.constexpr(1 << 62)  # no stamp reaches it: a slot used by this call is never a victim


@triton.jit
def _plan(
    ids_ptr, slot_of, key_of, stamp, tick_ptr, uses, counters, host_ptr, src_out, dst_out,
    pos_e, slot_base, row_bytes, S,
    K: tl.constexpr, KP: tl.constexpr, SP: tl.constexpr,
):  # fmt: skip
    ks = tl.arange(0, KP)
    km = ks < K
    g = pos_e + tl.load(ids_ptr + ks, mask=km, other=0)
    s = tl.load(slot_of + g, mask=km, other=-1)
    hit = (s >= 0) & km
    miss = (s < 0) & km
    t = tl.load(tick_ptr) + 1
    tl.store(tick_ptr, t)
    ss = tl.arange(0, SP)
    sm = ss < S
    st = tl.load(stamp + ss, mask=sm, other=0)
    keys = tl.load(key_of + ss, mask=sm, other=-1)
    used = tl.sum(((s[:, None] == ss[None, :]) & hit[:, None]).to(tl.int32), axis=0) > 0
    st = tl.where(used, t, st)
    src = tl.where(hit, slot_base + s * row_bytes, 0)
    dst = tl.zeros([KP], dtype=tl.int64)
    for j in tl.static_range(K):
        at = ks == j
        mj = tl.sum(tl.where(at & miss, 1, 0)) > 0
        gj = tl.sum(tl.where(at, g, 0))
        v = tl.argmin(tl.where(sm & (st != t), st, BIG), axis=0)
        here = (ss == v) & mj
        old = tl.sum(tl.where(ss == v, keys, 0))
        tl.store(slot_of + old, -1, mask=mj & (old >= 0))
        tl.store(slot_of + gj, v, mask=mj)
        keys = tl.where(here, gj, keys)
        st = tl.where(here, t, st)
        hp = tl.load(host_ptr + gj, mask=mj, other=0)
        src = tl.where(at & mj, hp, src)
        dst = tl.where(at & mj, slot_base + v * row_bytes, dst)
    tl.store(stamp + ss, st, mask=sm)
    tl.store(key_of + ss, keys, mask=sm)
    tl.store(src_out + ks, src, mask=km)
    tl.store(dst_out + ks, dst, mask=km)
    tl.store(counters, tl.load(counters) + tl.sum(hit.to(tl.int64)))
    tl.store(counters + 1, tl.load(counters + 1) + tl.sum(miss.to(tl.int64)))
    tl.store(uses + g, tl.load(uses + g, mask=km, other=0) + 1, mask=km)


@triton.jit
def _gather(src_out, dst_out, scratch, n_words, BLOCK: tl.constexpr):
    j = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_words
    src = tl.load(src_out + j).to(tl.pointer_type(tl.int64))
    d = tl.load(dst_out + j)
    v = tl.load(src + offs, mask=m)
    tl.store(scratch + j.to(tl.int64) * n_words + offs, v, mask=m)
    keep = (tl.zeros([BLOCK], dtype=tl.int64) + d) != 0  # a miss: kept in its slot too
    tl.store(d.to(tl.pointer_type(tl.int64)) + offs, v, mask=m & keep)


GATHER_BLOCK = 2048  # int64 words per program: 16 KB


def plan(d, ids, pos_e: int) -> None:
    """``_plan`` over ``d`` (an ``expert_direct.DirectExperts``) for the ids [k] of one row."""
    k = ids.shape[0]
    _plan[(1,)](
        ids, d.slot_of, d.key_of, d.stamp, d.tick, d.uses, d.counters, d.host_ptr, d.src, d.dst,
        pos_e, d.slot_base, d.row_bytes, d.S,
        K=k, KP=triton.next_power_of_2(k), SP=triton.next_power_of_2(d.S),
    )  # fmt: skip


def gather(d, k: int, scratch) -> None:
    """``_gather`` of the k pairs ``plan`` wrote into ``scratch`` [k, nbytes] (uint8)."""
    n_words = d.nbytes // 8
    grid = (k, triton.cdiv(n_words, GATHER_BLOCK))
    _gather[grid](d.src, d.dst, scratch.view(-1).view(torch.int64), n_words, BLOCK=GATHER_BLOCK)
