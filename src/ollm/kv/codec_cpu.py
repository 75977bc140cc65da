"""Decode attention over encoded KV blocks on the CPU (issue 17 part 6, the CPU's path): a few
query rows per KV head against ``CPU_CHUNK`` slots at a time, values never dequantized.

Keys are decoded into a float32 buffer (one ``addcmul`` per chunk: per-channel parameters
broadcast over the block's tokens) and scored with one matmul. Values are quantized per token
and group of channels, ``v[t, d] = lo[t, j] + code[t, d] * scale[t, j]`` with ``j`` the group of
``d``, so with the softmax weights ``p``::

    out[r, d] = sum_t (p[r, t] * scale[t, j]) * code[t, d] + sum_t p[r, t] * lo[t, j]

one matmul per channel group over the codes (as float32, the only full-size pass) plus a
small one for the offsets: the per-token parameters scale the [rows, slots] weights, not the
[slots, channels] values. Chunks merge by their log-sum-exps.
"""

from __future__ import annotations

import torch

from ollm.kv.codecs import CodeStore, decode, unpack_int4


def encoded_lse(
    q: torch.Tensor, store: CodeStore, upto: int, scale: float, chunk: int, buffer
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, H, T, D] over the encoded slots [0, upto) of ``store`` (on the
    CPU), unmasked: (out [B, H, T, D] in q's dtype, lse [B, H, T] float32). ``buffer(n)``
    gives a float32 [B, KVH, n, D] scratch for the decoded keys."""
    b, h, t, d = q.shape
    kvh = store.kc.shape[1]
    rows = h // kvh * t
    qg = q.float().reshape(b, kvh, rows, d) * scale  # a KV head's query heads folded into rows
    kc, kp, vc, vp = store.tensors()
    g = store.codec.block
    acc = top = den = None
    for c0 in range(0, upto, chunk):
        c1 = min(upto, c0 + chunk)
        kb = buffer(c1 - c0)
        decode(kc[:, :, c0:c1], kp[:, :, c0 // g : -(-c1 // g)], store.codec.key, kb)
        s = torch.matmul(qg, kb.transpose(-1, -2))  # [B, KVH, rows, n]
        m = s.amax(-1, keepdim=True)
        if top is not None:
            m = torch.maximum(m, top)
        p = s.sub_(m).exp_()
        o = _values(p, vc[:, :, c0:c1], vp[:, :, c0:c1], store.codec.value, d)
        if acc is None:
            acc, den = o, p.sum(-1, keepdim=True)
        else:  # rescale the running sums to the new maximum
            w = torch.exp(top - m)
            acc = acc.mul_(w).add_(o)
            den = den.mul_(w).add_(p.sum(-1, keepdim=True))
        top = m
    out = (acc / den).reshape(b, h, t, d).to(q.dtype)
    return out, (top + den.log()).reshape(b, h, t)


def _values(p: torch.Tensor, codes: torch.Tensor, params, side, d: int) -> torch.Tensor:
    """sum_t p[.., r, t] * v[t] for encoded values ``codes`` [B, KVH, n, code bytes] with their
    per-token ``params`` [B, KVH, n, P, G]: [B, KVH, rows, D] float32."""
    b, kvh, n, _ = codes.shape
    if side.kind == "none":
        return torch.matmul(p, codes.float())
    if side.kind == "int4":
        c = unpack_int4(codes).reshape(b, kvh, n, d).float()
    elif side.kind == "fp8":
        c = codes.view(torch.float8_e4m3fn).float()
    else:
        c = codes.float()
    lo, sc = side.lo_scale(params)  # [B, KVH, n, G] each
    g = side.token_group(d)
    ps = p.unsqueeze(-1) * sc[:, :, None]  # [B, KVH, rows, n, G]
    out = torch.empty(*p.shape[:3], d, dtype=torch.float32, device=p.device)
    for j in range(d // g):
        out[..., j * g : (j + 1) * g] = torch.matmul(ps[..., j], c[..., j * g : (j + 1) * g])
    if side.kind != "fp8":  # the offsets: sum_t p[r, t] * lo[t, j], widened to channels
        out += torch.matmul(p, lo).repeat_interleave(g, -1)
    return out
