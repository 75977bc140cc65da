"""Triton kernels of MXFP4 experts computed from their codes (issue 19, gpt-oss decode): a grouped
GEMV over a few rows, one program per (block of output columns, expert), the expert's cache slot
read from a device index tensor, so one launch serves every expert of a layer's batch. The
4-bit codes and the e8m0 block scales are turned into values in registers (no decoded copy of
the expert exists anywhere); ``tl.dot`` over rows padded to 16 accumulates in float32.

``gate_up``: ``x @ W_gate_up + b`` and gpt-oss's clamped SwiGLU fused (gate = even columns,
up = odd ones), writing h [g, m, I]; ``down``: ``h @ W_down + b`` -> [g, m, H]. Imported only
when a CUDA batch runs them (``layers/moe_mxfp4.py``); the interpreter (``TRITON_INTERPRET=1``)
runs them on the CPU in tests, in float32 dots (it has no bfloat16 dot).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 16  # rows per program (tl.dot's least M): decode batches of up to this many rows
BLOCK_O = 32  # output columns per program (gpt-oss-20b: 90 x experts programs)
BLOCK_J = 64  # code bytes per step along a row (128 input values)


@triton.jit
def _fp4(c):
    """E2M1 codes (int32, 0..15) -> float32, built from bits (exact): sign, 2-bit exponent e,
    1-bit mantissa m; e == 0: 0 or 0.5, else (1 + m / 2) * 2^(e - 1)."""
    e = (c >> 1) & 3
    m = c & 1
    bits = tl.where(e == 0, m * (126 << 23), ((e + 126) << 23) | (m << 22))
    return (bits | ((c & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _accumulate(acc, xe, xo, bp, sp, orow, omask, jj, jm, kb, F32: tl.constexpr):
    """acc [R, O] += x [R, 2 J] @ W[:, orow] for one step of ``jj`` code bytes: the codes of
    output rows ``orow`` (``kb`` bytes per row, groups of 16 bytes sharing one scale) decoded in
    registers; ``xe`` / ``xo``: the inputs at the low / high nibbles' positions."""
    m2 = omask[:, None] & jm[None, :]
    byte = tl.load(bp + orow[:, None] * kb + jj[None, :], mask=m2, other=0).to(tl.int32)
    sc = tl.load(sp + orow[:, None] * (kb // 16) + jj[None, :] // 16, mask=m2, other=127)
    # 2^(scale - 127) from its float32 bits (exact; scale 0, 2^-127, reads as 0)
    f = (sc.to(tl.int32) << 23).to(tl.float32, bitcast=True)
    lo = _fp4(byte & 15) * f
    hi = _fp4(byte >> 4) * f
    if F32:
        acc += tl.dot(xe, tl.trans(lo), input_precision="ieee")
        acc += tl.dot(xo, tl.trans(hi), input_precision="ieee")
    else:  # values exact in bf16 (a 2-bit mantissa times a power of two)
        acc += tl.dot(xe, tl.trans(lo.to(xe.dtype)))
        acc += tl.dot(xo, tl.trans(hi.to(xo.dtype)))
    return acc


@triton.jit
def _rows_step(X, xg, r, rmask, jj, jm, sxm, F32: tl.constexpr):
    """The inputs at a step's even and odd positions: [R, J] each (float32 when ``F32``)."""
    m = rmask[:, None] & jm[None, :]
    p = X + xg + r[:, None] * sxm + 2 * jj[None, :]
    xe = tl.load(p, mask=m, other=0.0)
    xo = tl.load(p + 1, mask=m, other=0.0)
    if F32:
        xe, xo = xe.to(tl.float32), xo.to(tl.float32)
    return xe, xo


@triton.jit
def _gate_up_kernel(
    X, IDX, B, S, BIAS, HOUT,
    n_rows, inter, kb, sxg, sxm, sbn, ssn, sbin, shg, shm, alpha, limit,
    R: tl.constexpr, BO: tl.constexpr, BJ: tl.constexpr, F32: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    g = tl.program_id(1)
    slot = tl.load(IDX + g).to(tl.int64)
    i = pid * BO + tl.arange(0, BO)
    imask = i < inter
    r = tl.arange(0, R)
    rmask = r < n_rows
    j = tl.arange(0, BJ)
    bp = B + slot * sbn
    sp = S + slot * ssn
    xg = g.to(tl.int64) * sxg
    acc_g = tl.zeros([R, BO], tl.float32)
    acc_u = tl.zeros([R, BO], tl.float32)
    for j0 in range(0, kb, BJ):
        jj = j0 + j
        jm = jj < kb
        xe, xo = _rows_step(X, xg, r, rmask, jj, jm, sxm, F32)
        acc_g = _accumulate(acc_g, xe, xo, bp, sp, 2 * i, imask, jj, jm, kb, F32)
        acc_u = _accumulate(acc_u, xe, xo, bp, sp, 2 * i + 1, imask, jj, jm, kb, F32)
    bias = BIAS + slot * sbin
    gate = acc_g + tl.load(bias + 2 * i, mask=imask, other=0.0).to(tl.float32)[None, :]
    up = acc_u + tl.load(bias + 2 * i + 1, mask=imask, other=0.0).to(tl.float32)[None, :]
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    # log2(e) as a literal: a kernel may read module globals only as tl.constexpr
    glu = gate / (1.0 + tl.exp2(-alpha * 1.4426950408889634 * gate))
    h = (up + 1.0) * glu
    out = HOUT + g.to(tl.int64) * shg + r[:, None] * shm + i[None, :]
    tl.store(out, h.to(HOUT.dtype.element_ty), mask=rmask[:, None] & imask[None, :])


@triton.jit
def _down_kernel(
    X, IDX, B, S, BIAS, Y,
    n_rows, width, kb, sxg, sxm, sbn, ssn, sbin, syg, sym,
    R: tl.constexpr, BO: tl.constexpr, BJ: tl.constexpr, F32: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    g = tl.program_id(1)
    slot = tl.load(IDX + g).to(tl.int64)
    o = pid * BO + tl.arange(0, BO)
    omask = o < width
    r = tl.arange(0, R)
    rmask = r < n_rows
    j = tl.arange(0, BJ)
    bp = B + slot * sbn
    sp = S + slot * ssn
    xg = g.to(tl.int64) * sxg
    acc = tl.zeros([R, BO], tl.float32)
    for j0 in range(0, kb, BJ):
        jj = j0 + j
        jm = jj < kb
        xe, xo = _rows_step(X, xg, r, rmask, jj, jm, sxm, F32)
        acc = _accumulate(acc, xe, xo, bp, sp, o, omask, jj, jm, kb, F32)
    y = acc + tl.load(BIAS + slot * sbin + o, mask=omask, other=0.0).to(tl.float32)[None, :]
    out = Y + g.to(tl.int64) * syg + r[:, None] * sym + o[None, :]
    tl.store(out, y.to(Y.dtype.element_ty), mask=rmask[:, None] & omask[None, :])


def _pair(stacks, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [N, rows, G * 16], scales [N, rows, G], bias [N, rows]) of matrix ``name``."""
    blocks = stacks[f"{name}_blocks"]
    n, rows, groups, _ = blocks.shape
    return (blocks.view(n, rows, groups * 16), stacks[f"{name}_scales"],
            stacks[f"{name}_bias"])  # fmt: skip


def gpt_oss_experts(
    x: torch.Tensor, stacks, idx: torch.Tensor, alpha: float, limit: float
) -> torch.Tensor:
    """gpt-oss's experts over ``x`` [g, m, H] (m <= ``ROWS``; expert j's rows in ``x[j]``, any
    stride but the last), expert j the slot ``idx[j]`` of ``stacks`` (stored tensors over the
    slots: ``{gate_up_proj,down_proj}_{blocks,scales,bias}``, [N, ...]): two launches ->
    [g, m, H] in x's dtype."""
    g, m, hidden = x.shape
    b1, s1, bias1 = _pair(stacks, "gate_up_proj")
    b2, s2, bias2 = _pair(stacks, "down_proj")
    inter = b1.shape[1] // 2
    f32 = x.dtype == torch.float32 or x.device.type == "cpu"  # the interpreter: no bf16 dot
    h = torch.empty(g, m, inter, dtype=x.dtype, device=x.device)
    y = torch.empty(g, m, hidden, dtype=x.dtype, device=x.device)
    for t in (b1, s1, b2, s2):  # each slot's rows back to back
        assert t.stride(2) == 1 and t.stride(1) == t.shape[2], "MXFP4 stacks: rows not packed"
    assert bias1.stride(1) == 1 and bias2.stride(1) == 1 and idx.dtype == torch.int64
    assert x.stride(-1) == 1 and b1.shape[-1] * 2 == hidden and b2.shape[-1] * 2 == inter
    if idx.data_ptr() % 16:  # Triton specializes pointers on 16-byte alignment: one variant
        idx = idx.clone()  # (a slice of the step's index tensor alternates; each compiles)
    _gate_up_kernel[(triton.cdiv(inter, BLOCK_O), g)](
        x, idx, b1, s1, bias1, h,
        m, inter, b1.shape[-1], x.stride(0), x.stride(1), b1.stride(0), s1.stride(0),
        bias1.stride(0), h.stride(0), h.stride(1), alpha, limit,
        R=ROWS, BO=BLOCK_O, BJ=BLOCK_J, F32=f32,
    )  # fmt: skip
    _down_kernel[(triton.cdiv(hidden, BLOCK_O), g)](
        h, idx, b2, s2, bias2, y,
        m, hidden, b2.shape[-1], h.stride(0), h.stride(1), b2.stride(0), s2.stride(0),
        bias2.stride(0), y.stride(0), y.stride(1),
        R=ROWS, BO=BLOCK_O, BJ=BLOCK_J, F32=f32,
    )  # fmt: skip
    return y
