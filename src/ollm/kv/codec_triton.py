"""Decode attention straight from encoded KV blocks (issue 17 part 6): a Triton kernel that
dequantizes int8 / int4 codes in registers, so no full-precision copy of the cache is made.

One program per (sequence, KV head, split of the slots): the query heads of the KV head (and
the few rows of a decode step) are the rows of one ``tl.dot``; each key tile is one codec block
(``block`` slots, one row of per-channel key (lo, scale): float16, or int4's 3-byte packing,
``_lo_scale``), loaded as codes, turned into values
(values per token and group of channels) and folded into an online softmax (flash decoding). Each split writes its normalised output and log-sum-exp; a few torch ops
merge the splits (``_merge_splits``). The result (out, lse) merges with the exact window.

``supported(q, store)`` says when it applies (CUDA, Triton importable, int8 / int4 on both
sides, at most ``MAX_ROWS`` rows per KV head); the torch path of ``kv/compressed.py`` does the
rest. Tests run the kernel on the CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
import logging
import math

import torch

try:  # optional: the torch path covers everything without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

log = logging.getLogger(__name__)
KINDS = ("int8", "int4")
MAX_ROWS = 64  # query rows per KV head (query heads x decode rows) one program holds
_LOG2E = 1.4426950408889634


def available() -> bool:
    """Whether Triton is importable."""
    return triton is not None


def supported(q: torch.Tensor, store) -> bool:
    """Whether ``encoded_lse`` takes these queries over ``store`` on q's device."""
    c = store.codec
    rows = q.shape[1] // store.kc.shape[1] * q.shape[2]
    return (
        available()
        and q.device.type == "cuda"
        and store.device == q.device
        and c.key.kind in KINDS
        and c.value.kind in KINDS
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and store.head_dim in (16, 32, 64, 128, 256)
        and c.block in (16, 32, 64, 128)
        and rows <= MAX_ROWS
    )


def encoded_lse(
    q: torch.Tensor, store, upto: int, scale: float, splits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, H, T, D] over the encoded slots [0, upto) of ``store`` (a CodeStore
    on q's device), unmasked, with its log-sum-exp: (out [B, H, T, D], lse [B, H, T] float32)."""
    b, h, t, d = q.shape
    kvh = store.kc.shape[1]
    rows = h // kvh * t
    rpad = max(16, 1 << (rows - 1).bit_length())
    qg = q.reshape(b, kvh, rows, d)  # query heads of a KV head folded into rows
    c = store.codec
    assert upto % c.block == 0, "encoded slots come in whole codec blocks"
    tiles = upto // c.block
    if splits is None:
        splits = _splits(q.device, b * kvh, tiles)
    splits = max(1, min(splits, tiles))
    per = -(-tiles // splits) * c.block  # slots per split, whole codec blocks
    splits = -(-upto // per)  # none empty
    o = torch.empty((b, kvh, splits, rpad, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((b, kvh, splits, rpad), dtype=torch.float32, device=q.device)
    kc, kp, vc, vp = store.tensors()
    _kernel[(b * kvh, splits)](
        qg, kc, kp, vc, vp, o, lse,
        scale * _LOG2E, upto, per, rows,
        *qg.stride()[:3], *kc.stride()[:3], *kp.stride()[:3], *vc.stride()[:3],
        *vp.stride()[:3], *o.stride()[:4], *lse.stride()[:3],
        KVH=kvh, R=rpad, D=d, BLOCK_N=c.block, VGROUP=c.value.token_group(d),
        NG=c.value.channel_groups(d), K_INT4=c.key.kind == "int4",
        V_INT4=c.value.kind == "int4", IEEE=q.dtype == torch.float32,
        K_PACKED=c.key.packed, V_PACKED=c.value.packed,
    )  # fmt: skip
    out, s = _merge_splits(o[:, :, :, :rows], lse[:, :, :, :rows])
    return out.to(q.dtype).reshape(b, h, t, d), s.reshape(b, h, t)


def _merge_splits(o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over every split from each one's output [.., S, R, D] and lse [.., S, R]."""
    total = torch.logsumexp(lse, 2)
    w = torch.exp(lse - total.unsqueeze(2)).nan_to_num_(0.0)
    return (o * w.unsqueeze(-1)).sum(2), total


@functools.lru_cache(maxsize=8)
def _sm_count(device: str) -> int:
    if torch.device(device).type != "cuda":
        return 8
    return torch.cuda.get_device_properties(torch.device(device)).multi_processor_count


def _splits(device: torch.device, programs: int, tiles: int) -> int:
    """Splits of the slots so that about four programs per multiprocessor run."""
    return max(1, min(tiles, math.ceil(4 * _sm_count(str(device)) / max(1, programs))))


if triton is not None:

    @triton.jit
    def _codes(ptr, rows, d, INT4: tl.constexpr):
        """[N, D] integer codes of ``rows`` (pointers of each row's first byte)."""
        if INT4:  # two codes per byte, even channel in the low nibble
            byte = tl.load(ptr + rows[:, None] + (d[None, :] // 2))
            return ((byte >> ((d[None, :] % 2) * 4).to(tl.uint8)) & 15).to(tl.float32)
        return tl.load(ptr + rows[:, None] + d[None, :]).to(tl.float32)

    @triton.jit
    def _lo_scale(ptr, row, PACKED: tl.constexpr):
        """(lo, scale) float32 of the parameters at pointers ``ptr`` (a group's first row;
        ``row``: elements between rows). ``PACKED``: int4's three uint8 rows (a 12-bit scale
        code, the top bits of a float16, and a 12-bit signed offset ``z`` in quarter steps:
        ``lo = -z * scale / 4``; ``kv/codec_params.py``), else float16 rows (lo, scale)."""
        if PACKED:
            b0 = tl.load(ptr).to(tl.int32)
            b1 = tl.load(ptr + row).to(tl.int32)
            b2 = tl.load(ptr + 2 * row).to(tl.int32)
            code = b0 | ((b2 & 15) << 8)
            sc = ((code << 3).to(tl.int16)).to(tl.float16, bitcast=True).to(tl.float32)
            z = b1 | ((b2 >> 4) << 8)
            z = tl.where(z >= 2048, z - 4096, z)
            lo = z.to(tl.float32) * sc * -0.25
        else:
            lo = tl.load(ptr).to(tl.float32)
            sc = tl.load(ptr + row).to(tl.float32)
        return lo, sc

    @triton.jit
    def _tile(q, k, v, m_i, l_i, acc, qk_scale, IEEE: tl.constexpr):
        """One tile of the online softmax: q [R, D] against decoded keys and values [N, D]
        (every slot valid) folded into the running max, sum and output -> (m, l, acc)."""
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype)))
        s = s * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(q.dtype), v.to(q.dtype))
        return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + pv

    @triton.jit
    def _kernel(
        Q, KC, KP, VC, VP, OUT, LSE,
        qk_scale, n_slots, per_split, n_rows,
        sqb, sqh, sqr, skcb, skch, skcs, skpb, skph, skpn, svcb, svch, svcs,
        svpb, svph, svps, sob, soh, sos, sor, slb, slh, sls,
        KVH: tl.constexpr, R: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        VGROUP: tl.constexpr, NG: tl.constexpr, K_INT4: tl.constexpr, V_INT4: tl.constexpr,
        IEEE: tl.constexpr, K_PACKED: tl.constexpr, V_PACKED: tl.constexpr,
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
        lo_slot = sp * per_split
        hi_slot = tl.minimum(lo_slot + per_split, n_slots)
        m_i = tl.full([R], float("-inf"), tl.float32)
        l_i = tl.zeros([R], tl.float32)
        acc = tl.zeros([R, D], tl.float32)
        kc = KC + b * skcb + h * skch
        kp = KP + b * skpb + h * skph
        vc = VC + b * svcb + h * svch
        vp = VP + b * svpb + h * svph
        for s0 in range(lo_slot, hi_slot, BLOCK_N):  # one codec block per tile, all slots valid
            n = s0 + tl.arange(0, BLOCK_N)
            blk = kp + (s0 // BLOCK_N) * skpn
            klo, ksc = _lo_scale(blk + d, D, K_PACKED)  # the block's per-channel (lo, scale)
            k = klo[None, :] + _codes(kc, n * skcs, d, K_INT4) * ksc[None, :]  # [N, D]
            grp = n[:, None] * svps + d[None, :] // VGROUP
            vlo, vsc = _lo_scale(vp + grp, NG, V_PACKED)
            v = vlo + _codes(vc, n * svcs, d, V_INT4) * vsc  # [N, D]
            m_i, l_i, acc = _tile(q, k, v, m_i, l_i, acc, qk_scale, IEEE)
        out = acc / l_i[:, None]
        lse = (m_i + tl.log2(l_i)) / 1.4426950408889634
        tl.store(OUT + b * sob + h * soh + sp * sos + rows[:, None] * sor + d[None, :], out)
        tl.store(LSE + b * slb + h * slh + sp * sls + rows, lse)


CHECK_SLOTS = 4096  # slots of the one-time comparison with the torch path
_STATE: dict[tuple, bool] = {}  # (codec, dtype, device, rows) -> checked good; False: off


def fast_lse(q: torch.Tensor, store, upto: int, scale: float, reference):
    """``encoded_lse`` where ``supported``, else None. The first call of each configuration is
    compared with ``reference(q, store, upto, scale)`` (the torch path) on its first
    ``CHECK_SLOTS`` slots; a kernel that fails to build or disagrees is turned off for the
    process with a logged warning, and the torch path answers."""
    if upto == 0 or not supported(q, store):
        return None
    key = (store.codec, q.dtype, str(q.device), q.shape[1] // store.kc.shape[1] * q.shape[2])
    state = _STATE.get(key)
    if state is False:
        return None
    try:
        if state is None:
            n = min(upto, CHECK_SLOTS)
            got, want = encoded_lse(q, store, n, scale), reference(q, store, n, scale)
            _STATE[key] = _agree(got, want)
            if not _STATE[key]:
                log.warning("Triton KV-codec attention disagrees with torch; using torch")
                return None
        return encoded_lse(q, store, upto, scale)
    except Exception as exc:  # noqa: BLE001 - an optional kernel: the torch path answers
        _STATE[key] = False
        log.warning("Triton KV-codec attention unavailable (%s); using torch", exc)
        return None


def _agree(got, want) -> bool:
    """Outputs within a few rounding steps of the cache dtype, lse within 1e-2."""
    (o, s), (ro, rs) = got, want
    tol = 4 * torch.finfo(o.dtype).eps * float(ro.float().abs().max()) + 1e-5
    return bool((o.float() - ro.float()).abs().max() <= tol) and bool((s - rs).abs().max() <= 1e-2)
