"""The reads of one routed decode step (issue 18): the sinks, chosen pages and window of a group
of KV heads, gathered from one tier of a layer's KV into one buffer [B, R, L, D], so that one
attention call covers every head of the group. For pinned RAM that is one memcpy per page
(one ``index_select`` over the tier viewed as rows of ``page * D`` elements, the sinks, pages and
window of every head at once) into a buffer kept between layers (``PageBuffers``: a fresh tensor per layer would fault its
pages in every time), then attention on the CPU where the pages sit, or, with the pages copied
on (``read="device"``), one asynchronous copy of the gathered bytes and attention on the GPU.

A tier whose slots hold the whole middle (the common case: all of a layer's RAM KV, or all of its
device KV) gives every head the same number of pages: one flash call. A tier boundary inside the
middle (the first offloaded layer's device blocks) gives heads different counts: padded, masked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ollm.layers.attention import _attend_lse as attend_lse
from ollm.layers.attention import _flash_with_lse, merge_lse
from ollm.layers.routing import gathered_attention
from ollm.runtime.pinned import pinned_empty

MIN_PART = 1024  # keys per part at least when a CPU read is split between threads


@dataclass(frozen=True)
class StepSlots:
    """Which slots a routed head reads this step: sinks [0, lo), chosen whole pages of
    [lo, hi) and the window [hi, end); pages of ``page`` slots."""

    lo: int
    hi: int
    end: int
    page: int

    def ragged(self, a: int, e: int) -> bool:
        """Whether a tier holding slots [a, e) holds part of the middle only (heads differ)."""
        return a < self.hi and e > self.lo and not (a <= self.lo and e >= self.hi)


class PageBuffers:
    """Host buffers the routed reads of one request's layers gather into, reused layer after
    layer. Pinned when the gathered bytes are then copied to ``pin_device`` (a CUDA device); two
    sets used in turn, each waited for (its last copy out) before it is written again."""

    def __init__(self, pin_device: torch.device | None = None) -> None:
        self.pin_device = pin_device
        self._sets: list[torch.Tensor | None] = [None, None]
        self._done: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Two uninitialised tensors of ``shape`` (keys, values) and the set's number."""
        i = self._turn
        self._turn ^= 1
        if self._done[i] is not None:
            self._done[i].synchronize()  # its last copy to the GPU has been read out
            self._done[i] = None
        n = 1
        for s in shape:
            n *= s
        nbytes = 2 * n * torch.empty((), dtype=dtype).element_size()
        buf = self._sets[i]
        if buf is None or buf.numel() < nbytes:
            size = nbytes + nbytes // 4  # headroom: the window part varies by up to a page
            if self.pin_device is not None:
                buf = pinned_empty(size, device=self.pin_device)
            else:
                buf = torch.empty(size, dtype=torch.uint8)
            self._sets[i] = buf
        flat = buf[:nbytes].view(dtype)
        return flat[:n].view(shape), flat[n:].view(shape), i

    def copied(self, i: int, stream: torch.cuda.Stream) -> None:
        """Set ``i`` was copied out by work queued on ``stream`` so far."""
        ev = torch.cuda.Event()
        ev.record(stream)
        self._done[i] = ev


def _pages(t: torch.Tensor, page: int) -> torch.Tensor:
    """A tier [B, KVH, n, D] (slots contiguous per head) as whole pages [B, KVH, n // page,
    page * D]: a view, no copy."""
    b, h, n, d = t.shape
    if t.stride(3) != 1 or t.stride(2) != d:
        raise RuntimeError("a routed tier needs its slots contiguous per head")
    return t.as_strided((b, h, n // page, page * d), (t.stride(0), t.stride(1), page * d, 1))


def _head_range(heads: tuple[int, ...]) -> slice | None:
    """``heads`` as a slice when they are consecutive (then one copy covers all of them)."""
    if heads == tuple(range(heads[0], heads[0] + len(heads))):
        return slice(heads[0], heads[0] + len(heads))
    return None


def _copy_span(dst: torch.Tensor, src: torch.Tensor, heads: tuple[int, ...], x: int, y: int):
    """dst[:, :, :y - x] = src[:, heads, x:y] (one copy when the heads are consecutive)."""
    hs = _head_range(heads)
    if hs is not None:
        dst.copy_(src[:, hs, x:y])
        return
    for i, h in enumerate(heads):
        dst[:, i].copy_(src[:, h, x:y])


def gather_tier(
    k: torch.Tensor,
    v: torch.Tensor,
    off: int,
    step: StepSlots,
    heads: tuple[int, ...],
    ids: torch.Tensor | None,
    bufs: PageBuffers | None,
):
    """What one tier (k/v [B, KVH, n, D] holding slots [off, off + n), ``off`` page-aligned) holds
    of the read of KV heads ``heads``: (keys, values [B, R, L, D], valid [B, R, L] or None when
    every row counts, buffer set or None), sinks then pages then window; None when it holds
    nothing. ``ids`` [B, R, K] are the chosen global pages, on ``k``'s device (or on the CPU when
    the tier is ragged); ``bufs`` gives the buffers of a host tier (else fresh ones)."""
    p, (b, _, n, d), r = step.page, k.shape, len(heads)
    a, e = off, off + n
    sinks = (max(a, 0) - off, min(e, step.lo) - off)
    window = (max(a, step.hi) - off, min(e, step.end) - off)
    ns, nw = max(0, sinks[1] - sinks[0]), max(0, window[1] - window[0])
    local, counts = None, None
    if ids is not None and ids.shape[-1] and a < step.hi and e > step.lo:
        if not step.ragged(a, e):  # the whole middle: one op per K/V if the pages allow
            got = _gather_paged(k, v, off, step, heads, ids, bufs)
            if got is not None:
                return got
        local = ids - off // p
        if step.ragged(a, e):  # this tier holds some of each head's pages: per head, padded
            inside = (ids * p >= a) & ((ids + 1) * p <= e)
            counts = inside.sum(-1).tolist()
            local = [
                [local[bi, i][inside[bi, i]].to(k.device) for i in range(r)] for bi in range(b)
            ]
    npg = 0 if local is None else local.shape[-1] if counts is None else max(map(max, counts))
    length = ns + npg * p + nw
    if not length:
        return None
    shape = (b, r, length, d)
    if bufs is not None and k.device.type == "cpu":
        kb, vb, which = bufs.take(shape, k.dtype)
    else:
        kb, vb = (torch.empty(shape, dtype=k.dtype, device=k.device) for _ in range(2))
        which = None
    for src, dst in ((k, kb), (v, vb)):
        if ns:
            _copy_span(dst[:, :, :ns], src, heads, *sinks)
        if nw:
            _copy_span(dst[:, :, length - nw :], src, heads, *window)
        if npg:
            _copy_pages(dst[:, :, ns : ns + npg * p], _pages(src, p), heads, local, npg, p)
    valid = None
    if counts is not None:
        valid = torch.ones(b, r, length, dtype=torch.bool)
        for bi in range(b):
            for i in range(r):
                valid[bi, i, ns + counts[bi][i] * p : ns + npg * p] = False
        valid = valid.to(k.device)
    return kb, vb, valid, which


def _page_view(t: torch.Tensor, p: int) -> tuple[torch.Tensor, int]:
    """``t`` [B, KVH, n, D] (slots contiguous per head) as rows of ``p * D`` elements, one starting
    every ``u`` elements of its storage (u divides every page's start: rows overlap, read only),
    and ``u``. A page of any head is then one row: one ``index`` op reads every head's pages."""
    d = t.shape[-1]
    if t.stride(3) != 1 or t.stride(2) != d:
        raise RuntimeError("a routed tier needs its slots contiguous per head")
    w = p * d
    u = math.gcd(t.stride(0), t.stride(1), w)
    avail = t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
    return t.as_strided(((avail - w) // u + 1, w), (u, 1)), u


@lru_cache(maxsize=256)
def _bases(b: int, s0: int, s1: int, u: int, heads: tuple[int, ...], shift: int, device: str):
    """[B, R, 1]: the row of ``_page_view`` where page ``shift`` of each (sequence, head) would
    start, less ``shift`` (page ``i``'s row is base + i * rows per page). Kept: on a GPU a
    fresh one would be a host-to-device copy per layer."""
    base = [[[(bi * s0 + h * s1) // u - shift] for h in heads] for bi in range(b)]
    return torch.tensor(base, dtype=torch.long, device=device)


@lru_cache(maxsize=256)
def _fixed_pages(s0: int, s1: int, w0: int, w1: int, device: str):
    """The page ids of the sinks [s0, s1) and of the window [w0, w1) (its last page partly
    past the step's keys), kept as ``_bases``."""
    return (torch.arange(s0, s1, device=device), torch.arange(w0, w1, device=device))


def _gather_paged(k, v, off: int, step: StepSlots, heads, ids, bufs):
    """``gather_tier`` for a tier holding the whole middle (slots [off, off + n), off <= lo):
    the sinks, the chosen pages ``ids`` and the window read as whole pages, every head's in one
    ``index_select`` per K/V (a memcpy per page) into one contiguous buffer [B, R, pages * p,
    D], of which the read is the first ``length`` rows per head (the window's last page may run
    past the step's keys: those rows are not attended); the keys in the order of
    ``gather_tier``'s. None when that last page would run past the tier's storage."""
    p, (b, _, n, d), r = step.page, k.shape, len(heads)
    if k.stride() != v.stride():
        return None
    (view, u), (vview, _) = _page_view(k, p), _page_view(v, p)
    per, first = p * d // u, off // p
    w_end = min(off + n, step.end)
    w0, w1 = step.hi // p, -(-w_end // p)
    top = ((b - 1) * k.stride(0) + max(heads) * k.stride(1)) // u + (w1 - 1 - first) * per
    if top >= min(view.shape[0], vview.shape[0]):
        return None
    dev = str(ids.device)
    sinks, window = _fixed_pages(first, step.lo // p, w0, w1, dev)
    pages = torch.cat([sinks.expand(b, r, -1), ids, window.expand(b, r, -1)], -1)
    base = _bases(b, k.stride(0), k.stride(1), u, heads, first * per, dev)
    rows = torch.add(base, pages, alpha=per).view(-1)
    shape = (b, r, pages.shape[-1] * p, d)
    if bufs is not None and k.device.type == "cpu":
        kb, vb, which = bufs.take(shape, k.dtype)
    else:
        kb, vb = (torch.empty(shape, dtype=k.dtype, device=k.device) for _ in range(2))
        which = None
    torch.index_select(view, 0, rows, out=kb.view(-1, p * d))
    torch.index_select(vview, 0, rows, out=vb.view(-1, p * d))
    length = (step.lo - off) + ids.shape[-1] * p + (w_end - step.hi)
    return kb[:, :, :length], vb[:, :, :length], None, which


def padded(x: torch.Tensor) -> torch.Tensor:
    """The contiguous buffer behind a read of ``gather_tier`` (a read of ``_gather_paged`` is
    its first rows per head): what a copy to the GPU takes whole."""
    b, r, _, d = x.shape
    return x.as_strided((b, r, x.stride(1) // d, d), x.stride())


def _copy_pages(dst, pages, heads, local, npg, p) -> None:
    """dst [B, R, npg * p, D] = the pages ``local`` (per (sequence, head): a LongTensor [K], or
    lists of them when ragged; padding rows left as they are) of ``pages`` [B, KVH, P, p * D]:
    one ``index_select`` (a memcpy per page, parallel over pages) per sequence and head."""
    b, r = dst.shape[:2]
    rows = dst.view(b, r, npg, pages.shape[-1])  # dst is a slice of whole rows
    for bi in range(b):
        for i, h in enumerate(heads):
            sel = local[bi][i]
            m = sel.numel()
            if m:
                torch.index_select(pages[bi, h], 0, sel, out=rows[bi, i, :m])
            if m < npg:  # padding (masked out): zeros, since 0 * NaN would leak into the output
                rows[bi, i, m:].zero_()


def attend_read(
    q: torch.Tensor,
    kb: torch.Tensor,
    vb: torch.Tensor,
    valid: torch.Tensor | None,
    scale: float,
    parts: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, R*G, 1, D] over a gathered read [B, R, L, D] (every row a key of its
    head, or those ``valid`` marks) -> (out, lse float32 [B, R*G, 1]). On the CPU the keys are
    cut into ``parts`` (default: enough for every thread) attended as one batch."""
    if valid is None:
        if kb.device.type == "cpu" and kb.shape[0] == 1:
            if parts is None:
                parts = min(8, torch.get_num_threads() // kb.shape[1], kb.shape[2] // MIN_PART)
            if parts > 1:
                return _split_lse(q, kb, vb, scale, parts)
        out, lse = attend_lse(q, kb, vb, scale)
        return out, lse.float()
    b, r, n = valid.shape
    slots = torch.arange(n, device=kb.device).expand(b, r, n)
    heads = torch.arange(r, device=kb.device)
    return gathered_attention(q, kb, vb, heads, slots, valid, n, scale)


def _split_lse(q, kb, vb, scale: float, parts: int):
    """One sequence's read [1, R, L, D] as ``parts`` consecutive key ranges attended in one
    flash call (a batch of ``parts``: the CPU kernel runs batch x heads tasks, so R heads alone
    would leave threads idle), merged by log-sum-exp; a remainder of L attended apart."""
    _, r, n, d = kb.shape
    c = n // parts
    g = q.shape[1] // r
    qq = q.reshape(1, r, g, d).expand(parts, r, g, d).contiguous()  # small
    kk = kb[0, :, : parts * c].view(r, parts, c, d).transpose(0, 1)  # views, no copy
    vv = vb[0, :, : parts * c].view(r, parts, c, d).transpose(0, 1)
    o, lse = _flash_with_lse(qq, kk, vv, False, scale)  # [parts, R, G, D], [parts, R, G]
    ct = torch.promote_types(q.dtype, torch.float32)
    lse = lse.to(ct)
    total = torch.logsumexp(lse, 0)
    out = (o.to(ct) * torch.exp(lse - total)[..., None]).sum(0).to(q.dtype)
    out, total = out.reshape(1, r * g, 1, d), total.reshape(1, r * g, 1)
    if parts * c < n:
        o2, s2 = attend_lse(q, kb[:, :, parts * c :], vb[:, :, parts * c :], scale)
        out, total = merge_lse(out, total, o2, s2.to(ct))
    return out, total.float()
