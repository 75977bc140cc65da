"""Attention of a multi-row forward (a prefill chunk, draft tokens) over a compressed cache's
keys that are encoded for some of its rows only, with a constant number of large kernels.

A query at slot q sees the keys before ``B(q) = codec.boundary(q + 1)`` encoded and the rest
(up to q) exact (decode-faithful, see ``kv/compressed.py``). With ``lag = recent + block - 1``,
``B(q) > q - lag``, so the keys a row sees split into three parts, merged by log-sum-exps:

1. encoded keys [0, a) every row sees, ``a = B(start)`` (``CompressedKVCache._attend_encoded``);
2. encoded keys [a, q - lag]: a plain causal attention of the rows [a + lag, end) over the keys
   [a, end - lag) shifted by ``lag`` (one flash call, square, so causal alignment is moot);
3. the band (q - lag, q]: keys in [a, B(q)) encoded, keys in [B(q), q] exact. Rows are cut into
   tiles of ``m`` rows (a multiple of the block, so the boundary pattern repeats); tile i sees
   the ``m + lag`` slots before its end. Both versions of the band keys sit in two buffers that
   share slot numbering, viewed per tile with ``unfold`` (no copy), scored by batched matmuls and
   normalised by one softmax over both: O(rows * (m + lag)) work, never O(rows^2) masks.
"""

from __future__ import annotations

import torch

from ollm.layers.attention import AttentionMask, blocked_attention_lse, merge_lse
from ollm.layers.attention import _flash_ok as flash_ok
from ollm.layers.attention import _flash_with_lse as flash_with_lse
from ollm.planning.footprint import CODEC_BAND_ROWS, SCORE_BLOCK_BYTES

# rows per band tile (rounded up to whole codec blocks): band work ~ rows + lag; the band's
# buffers are what planning.footprint.codec_decoded_slots counts
BAND_ROWS = CODEC_BAND_ROWS


def causal_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of q [B, H, n, D] over k/v [B, KVH, n, D] (square) with its
    log-sum-exp [B, H, n]: flash where it takes these tensors, else blocked attention."""
    n = q.shape[2]
    if q.device.type == "cpu" or flash_ok(q):
        return flash_with_lse(q, k, v, True, scale)
    return blocked_attention_lse(q, k, v, AttentionMask(0, n, n), scale)


def recent_lse(q, ek, ev, src, span, a: int, codec, scale: float, workspace=None):
    """(out, lse) of the rows of one forward over parts 2 and 3 above. ``ek``/``ev`` hold the
    exact slots [e0, end); ``src`` (a CodeStore on q's device) the encoded slots [a, e1),
    decoded here once into a buffer shared by both parts; ``span`` is (e0, e1, start, end)."""
    e0, e1, start, end = span
    b, _, t, d = q.shape
    kvh = ek.shape[1]
    lag = codec.recent + codec.block - 1
    m = codec.block * -(-BAND_ROWS // codec.block)  # rows per tile: whole codec blocks
    tiles = -(-t // m)
    o = start - lag  # the slot of band row 0
    length = tiles * m + lag
    if workspace is not None:
        yk, yv = workspace.decoded((b, kvh, length, d), ek.dtype, q.device)
    else:
        yk, yv = (torch.empty((b, kvh, length, d), dtype=ek.dtype, device=q.device) for _ in "kv")
    for buf in (yk, yv):  # outside [a, e1) only masked scores: finite values, zero weights
        buf[:, :, : a - o].zero_()
        buf[:, :, e1 - o :].zero_()
    if e1 > a:
        src.read(a, e1, yk[:, :, a - o : e1 - o], yv[:, :, a - o : e1 - o])
    pad = (ek.new_zeros(b, kvh, e0 - o, d), ek.new_zeros(b, kvh, o + length - end, d))
    xk = torch.cat([pad[0], ek, pad[1]], 2)  # exact slots, numbered like the decoded ones
    xv = torch.cat([pad[0], ev, pad[1]], 2)
    out, lse = band_lse(q, (xk, xv, yk, yv), start, a, codec, scale, m)
    n2 = end - lag - a  # rows [a + lag, end) see the keys [a, end - lag) encoded
    if n2 > 0:
        r0 = t - n2
        kb, vb = yk[:, :, a - o : a - o + n2], yv[:, :, a - o : a - o + n2]
        o2, s2 = causal_lse(q[:, :, r0:], kb, vb, scale)
        o2, s2 = merge_lse(out[:, :, r0:], lse[:, :, r0:], o2, s2)
        out[:, :, r0:] = o2
        lse[:, :, r0:] = s2
    return out, lse


def band_masks(start: int, a: int, codec, m: int, tiles: int, device) -> torch.Tensor:
    """[tiles, 1, m, 2 * (m + lag)] booleans: row j of tile i (slot start + i*m + j) over the
    band slots start + i*m - lag + w, first as encoded keys then as exact keys."""
    g, r = codec.block, codec.recent
    lag = r + g - 1
    base = start + torch.arange(tiles, device=device)[:, None, None] * m
    qpos = base + torch.arange(m, device=device)[None, :, None]
    kpos = base - lag + torch.arange(m + lag, device=device)[None, None, :]
    bq = torch.div((qpos + 1 - r).clamp_min(0), g, rounding_mode="floor") * g
    enc = (kpos > qpos - lag) & (kpos < bq) & (kpos >= a)
    exact = (kpos <= qpos) & (kpos >= bq)
    return torch.cat([enc, exact], -1)[:, None]


def band_lse(q, bufs, start: int, a: int, codec, scale: float, m: int):
    """(out, lse) of every row over its band (part 3). ``bufs``: exact K, V and decoded K, V
    [B, KVH, tiles * m + lag, D], row j holding slot start - lag + j."""
    b, h, t, d = q.shape
    xk, xv, yk, yv = bufs
    kvh = xk.shape[1]
    grp = h // kvh
    lag = codec.recent + codec.block - 1
    tiles = -(-t // m)
    width = m + lag
    qp = q if tiles * m == t else torch.nn.functional.pad(q, (0, 0, 0, tiles * m - t))
    masks = band_masks(start, a, codec, m, tiles, q.device)
    out = torch.empty(b, h, tiles * m, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, tiles * m, dtype=torch.float32, device=q.device)
    cell = b * kvh * grp * m * 2 * width * 4  # float32 scores of one tile
    per = max(1, SCORE_BLOCK_BYTES // cell)
    for i0 in range(0, tiles, per):
        i1 = min(tiles, i0 + per)
        win = slice(i0 * m, i1 * m + lag)
        n = i1 - i0  # tiles of this group; a KV head's query heads folded into their rows
        qs = qp[:, :, i0 * m : i1 * m].reshape(b, kvh, grp, n, m, d).transpose(2, 3)
        qs = qs.reshape(b, kvh, n, grp * m, d)
        s = torch.empty(b, kvh, n, grp * m, 2 * width, device=q.device)  # float32
        s[..., :width] = torch.matmul(qs, yk[:, :, win].unfold(2, width, m))
        s[..., width:] = torch.matmul(qs, xk[:, :, win].unfold(2, width, m))
        s = s.view(b, kvh, n, grp, m, 2 * width)
        s.mul_(scale).masked_fill_(~masks[i0:i1], -torch.inf)
        top = s.amax(-1, keepdim=True)  # every row sees its own slot: finite
        s.sub_(top).exp_()
        den = s.sum(-1, keepdim=True)
        p = s.div_(den).view(b, kvh, n, grp * m, 2 * width).to(xv.dtype)
        ov = torch.matmul(p[..., :width], yv[:, :, win].unfold(2, width, m).transpose(-1, -2))
        ov += torch.matmul(p[..., width:], xv[:, :, win].unfold(2, width, m).transpose(-1, -2))
        rows = slice(i0 * m, i1 * m)
        ov = ov.view(b, kvh, n, grp, m, d).transpose(2, 3)
        out[:, :, rows] = ov.reshape(b, h, n * m, d).to(q.dtype)
        ls = (den.log_() + top).view(b, kvh, n, grp, m).transpose(2, 3)
        lse[:, :, rows] = ls.reshape(b, h, n * m)
        del s, p, ov, qs  # freed before the next group's scores: one score block at a time
    return out[:, :, :t], lse[:, :, :t]
