"""Stored parameters of the integer KV codecs (``kv/codecs.py``): how a group's (lo, scale) is
kept.

int8 groups keep ``lo`` and ``scale`` as float16 (4 B a group, ``[.., 2, W]`` float16 rows).
int4 groups pack them in 3 B (``[.., 3, W]`` uint8 rows; docs/benchmarks.md, "int4 KV: 3-byte
group parameters"): the scale as the top 12 bits of its float16 (5 exponent, 7 mantissa bits;
rounded up, so at most 2^-7 wider than the group needs) and ``lo`` as a 12-bit signed count of
quarter steps, ``lo = -z * scale / 4`` (a zero-point with two fractional bits; GPTQ / AWQ keep
an integer one). Rows: the scale code's low byte, z's low byte, then the two high nibbles
(scale's in the low one). ``z = round(-4 * min / scale)`` puts ``lo`` within an eighth of a
step of the group's minimum and ``scale >= range / 15`` covers its maximum, so every element's
error is at most ``scale / 2``, as with float16 parameters. Where ``|z|`` would pass 2047 (a
group far from zero next to its range: ``|min| > 511 * scale``) the scale is widened to
``|min| / 511.75`` instead, which keeps the bound with the wider stored scale. Decoders read
both formats through ``lo_scale`` (float32, exact: z has 12 and the scale 8 significant bits).

Also the codes' helpers the codecs share: ``unpack_int4``, ``copy_rows``.
"""

from __future__ import annotations

import sys

import torch

_F16_MAX = 65504.0
Z_MAX = 2047  # |z| of the 12-bit quarter-step offset
_S_MAX = 0xF7F  # the largest 12-bit scale code of a finite float16 (65280)


def f16_round(t: torch.Tensor, down: bool) -> torch.Tensor:
    """float16 of ``t`` rounded towards -inf (``down``) or +inf: stored parameters that still
    bound the group, so the quantization error bound holds with the stored values."""
    h = t.clamp(-_F16_MAX, _F16_MAX).to(torch.float16)
    wrong = h.float() > t if down else h.float() < t
    toward = torch.full_like(h, float("-inf") if down else float("inf"))
    return torch.where(wrong, torch.nextafter(h, toward), h)  # no .any(): no device sync


def pack_int4_params(
    mn: torch.Tensor, mx: torch.Tensor, qmax: int
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(lo, scale) float32 of groups ranging [mn, mx] as stored, and their three uint8 rows
    (each of ``mn``'s shape)."""
    need = torch.maximum((mx - mn) / qmax, mn.abs() / (Z_MAX / 4))
    bits = f16_round(need, down=False).view(torch.int16).to(torch.int32)
    code = ((bits + 7) >> 3).clamp_(1, _S_MAX)  # rounded up to 7 mantissa bits
    scale = (code << 3).to(torch.int16).view(torch.float16).float()
    z = (mn * -4 / scale).round_().clamp_(-Z_MAX, Z_MAX).to(torch.int32)
    zb = z & 0xFFF  # two's complement, 12 bits
    rows = [code & 0xFF, zb & 0xFF, (code >> 8) | ((zb >> 8) << 4)]
    return z.float().mul_(scale).mul_(-0.25), scale, [r.to(torch.uint8) for r in rows]


def lo_scale(p: torch.Tensor, packed: bool, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, scale) float32 [..., W] of stored parameters ``p`` [..., P, W] (P at dim -2).
    ``packed``: the int4 rows of ``pack_int4_params``; else float16 rows (lo at 0, scale at
    ``last``: 1 for integers, 0 for fp8, whose ``lo`` is not used)."""
    if not packed:
        f = p.float()
        return f[..., 0, :], f[..., last, :]
    b0, b1, b2 = (p[..., i, :].to(torch.int32) for i in range(3))
    code = b0 | ((b2 & 15) << 8)
    scale = (code << 3).to(torch.int16).view(torch.float16).float()
    z = b1 | ((b2 >> 4) << 8)
    z = torch.where(z >= 2048, z - 4096, z)
    return z.float().mul_(scale).mul_(-0.25), scale


def unpack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., n] of two int4 each -> [..., 2n] (even channel from the low nibble).
    As int16 ``w + (w >> 4) * 240 = (w & 15) | (w >> 4) << 8`` whose bytes (little-endian)
    are the two codes in order: three contiguous passes instead of a strided stack."""
    if sys.byteorder != "little":  # pragma: no cover - every supported device is little-endian
        return torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)
    w = codes.to(torch.int16)
    return torch.add(w, w >> 4, alpha=240).view(torch.uint8)


def copy_rows(
    dst: torch.Tensor, src: torch.Tensor, lo: int, hi: int, src_offset: bool = False
) -> None:
    """dst[:, :, lo:hi] = src; across devices one copy per (sequence, head), each contiguous
    on both sides (a direct, asynchronous DMA from pinned memory; see ``offload.copy_slots``)."""
    if hi <= lo:
        return
    if dst.device == src.device:
        dst[:, :, lo:hi].copy_(src)
        return
    for i in range(dst.shape[0]):
        for h in range(dst.shape[1]):
            dst[i, h, lo:hi].copy_(src[i, h], non_blocking=True)
