"""The Triton kernel of `kv.codec_paged_attend` (issue 17 part 6): attention of every sequence
of a batched step over its encoded paged blocks, codes dequantized in registers, one launch.

As ``kv/codec_triton.py``'s kernel (whose code loaders and split merge it reuses), one program
per (sequence, KV head, split of the slots), the query heads and rows of a KV head as the rows
of one ``tl.dot``, one codec group (``BLOCK_N`` slots, one row of per-channel key (lo, scale))
per tile, an online softmax; here each tile's block id comes from the sequence's row of the
block table, and each sequence has its own number of encoded slots (splits past its end write
an empty part: output 0, log-sum-exp -inf, which the merge weighs 0). Imported only for CUDA
queries; tests run it on the CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import logging

import torch

from ollm.kv import codec_triton
from ollm.kv.codec_triton import _LOG2E, _merge_splits, _splits, triton

if triton is not None:
    import triton.language as tl

    from ollm.kv.codec_triton import _codes, _lo_scale, _tile

log = logging.getLogger(__name__)


def supported(q: torch.Tensor, store) -> bool:
    """Whether `paged_lse` takes queries q [S, H, T, D] over the codes ``store``."""
    return codec_triton.supported(q, store) and store.slots % store.codec.block == 0


def paged_lse(
    q: torch.Tensor, store, table: torch.Tensor, blocks: list[int], scale: float, splits=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`kv.codec_paged_attend.paged_encoded_lse` in one kernel launch (q, store and table on
    one device): (out [S, H, T, D], lse [S, H, T] float32)."""
    n_seq, h, t, d = q.shape
    kvh = store.kc.shape[1]
    rows = h // kvh * t
    rpad = max(16, 1 << (rows - 1).bit_length())
    qg = q.reshape(n_seq, kvh, rows, d)
    c, bt = store.codec, store.slots
    slots = torch.tensor([n * bt for n in blocks], dtype=torch.int32, device=q.device)
    tiles = max(blocks) * bt // c.block
    if splits is None:
        splits = _splits(q.device, n_seq * kvh, tiles)
    splits = max(1, min(splits, tiles))
    per = -(-tiles // splits) * c.block  # slots per split, whole codec groups
    splits = -(-max(blocks) * bt // per)
    o = torch.empty((n_seq, kvh, splits, rpad, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((n_seq, kvh, splits, rpad), dtype=torch.float32, device=q.device)
    kc, kp, vc, vp = store.tensors()
    tab = table.to(q.device, torch.int64)
    _paged_kernel[(n_seq * kvh, splits)](
        qg, kc, kp, vc, vp, tab, slots, o, lse,
        scale * _LOG2E, per, rows,
        *qg.stride()[:3], *kc.stride()[:3], *kp.stride()[:3], *vc.stride()[:3],
        *vp.stride()[:3], tab.stride(0), *o.stride()[:4], *lse.stride()[:3],
        KVH=kvh, R=rpad, D=d, BT=bt, BLOCK_N=c.block, VGROUP=c.value.token_group(d),
        NG=c.value.channel_groups(d), K_INT4=c.key.kind == "int4",
        V_INT4=c.value.kind == "int4", IEEE=q.dtype == torch.float32,
        K_PACKED=c.key.packed, V_PACKED=c.value.packed,
    )  # fmt: skip
    out, s = _merge_splits(o[:, :, :, :rows], lse[:, :, :, :rows])
    return out.to(q.dtype).reshape(n_seq, h, t, d), s.reshape(n_seq, h, t)


if triton is not None:

    @triton.jit
    def _paged_kernel(
        Q, KC, KP, VC, VP, TAB, SLOTS, OUT, LSE,
        qk_scale, per_split, n_rows,
        sqb, sqh, sqr, skcb, skch, skcs, skpb, skph, skpn, svcb, svch, svcs,
        svpb, svph, svps, stab, sob, soh, sos, sor, slb, slh, sls,
        KVH: tl.constexpr, R: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
        BLOCK_N: tl.constexpr, VGROUP: tl.constexpr, NG: tl.constexpr,
        K_INT4: tl.constexpr, V_INT4: tl.constexpr, IEEE: tl.constexpr,
        K_PACKED: tl.constexpr, V_PACKED: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        b = bh // KVH
        h = bh % KVH
        rows = tl.arange(0, R)
        d = tl.arange(0, D)
        q = tl.load(
            Q + b * sqb + h * sqh + rows[:, None] * sqr + d[None, :],
            mask=rows[:, None] < n_rows,
            other=0.0,
        )
        n_slots = tl.load(SLOTS + b)
        lo_slot = sp * per_split
        hi_slot = tl.minimum(lo_slot + per_split, n_slots)
        m_i = tl.full([R], float("-inf"), tl.float32)
        l_i = tl.zeros([R], tl.float32)
        acc = tl.zeros([R, D], tl.float32)
        for s0 in range(lo_slot, hi_slot, BLOCK_N):  # one codec group per tile, in one block
            blk = tl.load(TAB + b * stab + s0 // BT).to(tl.int64)  # the block's id
            off = s0 % BT
            n = off + tl.arange(0, BLOCK_N)  # slots inside the block
            kc = KC + blk * skcb + h * skch
            kp = KP + blk * skpb + h * skph + (off // BLOCK_N) * skpn
            klo, ksc = _lo_scale(kp + d, D, K_PACKED)  # the group's per-channel (lo, scale)
            k = klo[None, :] + _codes(kc, n * skcs, d, K_INT4) * ksc[None, :]  # [N, D]
            grp = VP + blk * svpb + h * svph + n[:, None] * svps + d[None, :] // VGROUP
            vlo, vsc = _lo_scale(grp, NG, V_PACKED)
            v = vlo + _codes(VC + blk * svcb + h * svch, n * svcs, d, V_INT4) * vsc  # [N, D]
            m_i, l_i, acc = _tile(q, k, v, m_i, l_i, acc, qk_scale, IEEE)
        empty = l_i == 0.0  # a split past this sequence's end
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_i)) / 1.4426950408889634)
        tl.store(OUT + b * sob + h * soh + sp * sos + rows[:, None] * sor + d[None, :], out)
        tl.store(LSE + b * slb + h * slh + sp * sls + rows, lse)


_STATE: dict[tuple, bool] = {}  # (codec, dtype, device, rows) -> checked good; False: off


def fast_paged_lse(q, store, table, blocks, scale, reference):
    """`paged_lse` where `supported`, else None. The first call of each configuration is
    compared with ``reference`` (the torch path, same arguments); a kernel that fails to build
    or disagrees is turned off for the process with a logged warning (as ``fast_lse``)."""
    if not supported(q, store):
        return None
    key = (store.codec, q.dtype, str(q.device), q.shape[1] // store.kc.shape[1] * q.shape[2])
    state = _STATE.get(key)
    if state is False:
        return None
    try:
        got = paged_lse(q, store, table, blocks, scale)
        if state is None:
            _STATE[key] = codec_triton._agree(got, reference(q, store, table, blocks, scale))
            if not _STATE[key]:
                log.warning("Triton paged KV-codec attention disagrees with torch; using torch")
                return None
        return got
    except Exception as exc:  # noqa: BLE001 - an optional kernel: the torch path answers
        _STATE[key] = False
        log.warning("Triton paged KV-codec attention unavailable (%s); using torch", exc)
        return None
