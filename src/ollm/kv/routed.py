"""The routing part of a layer's KV object: a ``Router`` rides on a ``LayerKVCache`` or an
``OffloadedKVCache`` (``cache.router``), keeps the key summaries current as KV is appended or
trimmed, and attends decode queries over only the KV its ``LayerRouting`` chooses, reading
those slots where they sit (device, pinned RAM, memory-mapped file): the routing decision is
what is read. The cache hands it its tiers as (keys, values, first slot) parts."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ollm.layers.attention import AttentionMask, blocked_attention_lse, merge_lse, with_sinks
from ollm.layers.attention import _attend_lse as attend_lse
from ollm.layers.routing import (
    FULL,
    TOPK,
    WINDOW,
    KeySummaries,
    LayerRouting,
    gathered_attention,
    page_slots,
    routed_dense,
    select_pages,
)

Tier = tuple[torch.Tensor, torch.Tensor, int]  # keys, values [B, KVH, n, D], first cache slot


class Router:
    """Decode attention of one layer under its ``LayerRouting``; None from ``attend`` means
    "take the exact path" (prefill, or nothing to skip yet)."""

    def __init__(
        self,
        routing: LayerRouting,
        batch: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
        stats=None,
        decode_tokens: int = 8,
    ) -> None:
        self.routing, self.stats, self.decode_tokens = routing, stats, decode_tokens
        kvh = len(routing.heads)
        self.summaries = None
        if TOPK in routing.heads:
            self.summaries = KeySummaries(
                batch, kvh, head_dim, capacity, routing.page_tokens, dtype, device
            )
        self._groups = {
            m: torch.tensor([h for h, x in enumerate(routing.heads) if x == m])
            for m in (FULL, WINDOW, TOPK)
            if m in routing.heads
        }

    @property
    def partial(self) -> bool:
        """No head reads every key (see ``LayerRouting.partial``)."""
        return self.routing.partial

    def on_append(self, k: torch.Tensor, start: int) -> None:
        """Keys of slots [start, start + T) were stored."""
        if self.summaries is not None:
            self.summaries.update(k, start)

    def on_trim(self, length: int, keys: Callable[[int, int], torch.Tensor]) -> None:
        """The cache forgot slots from ``length`` on (``keys(a, b)`` reads kept slots)."""
        if self.summaries is not None:
            self.summaries.trim(length, keys)

    def attend(
        self, q: torch.Tensor, tiers: list[Tier], mask: AttentionMask, scale: float
    ) -> torch.Tensor | None:
        """Routed attention of ``q`` [B, H, T, D] over the cache's ``tiers``, or None."""
        r, t, start, end = self.routing, mask.q_len, mask.q_start, mask.kv_len
        decode = t <= self.decode_tokens
        if decode and self.stats is not None:
            read = r.read_tokens(start, end) if r.routed else end * len(r.heads)
            self.stats.add(kv_read_tokens=read, kv_total_tokens=end * len(r.heads))
        lo, hi = r.middle(start if decode else end - 1)  # prefill: the last row skips most
        if not r.routed or hi <= lo or mask.window is not None or not (decode or r.prefill):
            return None
        if set(r.heads) == {TOPK} and r.pages >= (hi - lo) // r.page_tokens:
            return None  # every page chosen: the key set is all keys (full attention, exactly)
        if not decode:
            out, lse = self._prefill(q, tiers, mask, scale)
        else:
            out, lse = self._decode(q, tiers, mask, scale, lo, hi)
        return out if mask.sinks is None else with_sinks(out, lse, mask.sinks)

    def _prefill(self, q, tiers, mask, scale):
        """Every prefill row routed as if decoded; the prefill path holds all keys in one part."""
        (k, v, off), *rest = tiers
        if off or rest or k.shape[2] < mask.kv_len:
            raise RuntimeError("routed prefill needs the layer's keys in one part")
        n = mask.kv_len
        qd = q.to(k.device)
        out, lse = routed_dense(
            qd, k[:, :, :n], v[:, :, :n], self.routing, self.summaries, mask.q_start, scale,
            mask.key_keep,
        )  # fmt: skip
        return out.to(q.device), lse.to(q.device)

    def _decode(self, q, tiers, mask, scale, lo, hi):
        """Each mechanism's heads over their slots, tier by tier, merged by log-sum-exp."""
        b, h, t, d = q.shape
        kvh = len(self.routing.heads)
        g = h // kvh
        out = torch.empty_like(q)
        lse = torch.empty(b, h, t, device=q.device)
        for mech, heads in self._groups.items():
            qh = q.view(b, kvh, g, t, d)[:, heads.to(q.device)].reshape(b, -1, t, d)
            if mech == FULL:
                o, s = self._full(qh, heads, tiers, mask, scale)
            elif t == 1 and mask.key_keep is None and self._aligned(tiers):
                o, s = self._paged(q, qh, heads, tiers, mask, scale, lo, hi, mech)
            else:
                slots, valid = self._slots(q, heads, mask, lo, hi, mech)
                o, s = self._gathered(qh, heads, tiers, slots, valid, mask, scale)
            out.view(b, kvh, g, t, d)[:, heads.to(q.device)] = o.view(b, -1, g, t, d)
            lse.view(b, kvh, g, t)[:, heads.to(q.device)] = s.view(b, -1, g, t)
        return out, lse

    def _slots(self, q, heads, mask, lo, hi, mech):
        """Key slots [B, R, L] of ``heads`` (sinks, chosen pages, window) and which count."""
        r, end = self.routing, mask.kv_len
        dev = q.device if self.summaries is None else self.summaries.kmin.device
        b, n_h = q.shape[0], heads.shape[0]
        plain = torch.cat([torch.arange(0, lo, device=dev), torch.arange(hi, end, device=dev)])
        slots = plain.expand(b, n_h, -1)
        valid = torch.ones_like(slots, dtype=torch.bool)
        if mech == TOPK:
            pages = select_pages(q, self.summaries, lo, hi, r.pages, heads.to(dev))
            ps, pv = page_slots(pages, r.page_tokens, lo, hi)
            slots, valid = torch.cat([slots, ps], -1), torch.cat([valid, pv], -1)
        if mask.key_keep is not None:
            keep = mask.key_keep.to(dev)
            valid = valid & keep.gather(1, slots.clamp(max=keep.shape[1] - 1).flatten(1)).view(
                slots.shape
            )
        return slots, valid

    def _aligned(self, tiers: list[Tier]) -> bool:
        return all(off % self.routing.page_tokens == 0 for _, _, off in tiers)

    def _paged(self, q, qh, heads, tiers, mask, scale, lo, hi, mech):
        """One decode query, no padding: per tier, per (sequence, KV head), its sinks and window
        slices and its chosen pages copied whole (``index_select`` of page rows: a memcpy per
        page) into one buffer and one flash call where the tier sits (q moves there once, the
        outputs back once); the tiers merged by log-sum-exp."""
        r, end = self.routing, mask.kv_len
        b, g = q.shape[0], qh.shape[1] // heads.shape[0]
        pages = None
        if mech == TOPK:
            dev = self.summaries.kmin.device
            pages = select_pages(q, self.summaries, lo, hi, r.pages, heads.to(dev))
        out = lse = None
        for k, v, off in tiers:
            dev = k.device
            qd = qh.to(dev)
            ids = None if pages is None else pages.to(dev)
            o_t = torch.zeros_like(qd)
            s_t = torch.full(qd.shape[:3], -torch.inf, device=dev)
            for bi in range(b):
                for i, hd in enumerate(heads.tolist()):
                    kv = _page_parts(
                        k[bi, hd], v[bi, hd], off, lo, hi, end, r.page_tokens,
                        None if ids is None else ids[bi, i],
                    )  # fmt: skip
                    if kv is None:  # this tier holds none of the head's slots
                        continue
                    rows = slice(i * g, (i + 1) * g)
                    o1, s1 = attend_lse(
                        qd[bi : bi + 1, rows], kv[0][None, None], kv[1][None, None], scale
                    )
                    o_t[bi, rows], s_t[bi, rows] = o1[0], s1[0]
            o_t, s_t = o_t.to(qh.device), s_t.to(qh.device)
            out, lse = (o_t, s_t) if out is None else merge_lse(out, lse, o_t, s_t)
        return out, lse

    @staticmethod
    def _gathered(qh, heads, tiers, slots, valid, mask, scale):
        out = lse = None
        for k, v, off in tiers:
            n = k.shape[2]
            dev = k.device
            sl, va = slots.to(dev), valid.to(dev)
            here = va & (sl >= off) & (sl < off + n)
            o, s = gathered_attention(
                qh, k, v, heads, (sl - off).clamp(0, max(0, n - 1)), here, mask.q_start - off,
                scale,
            )  # fmt: skip
            o, s = o.to(qh.device), s.to(qh.device)
            out, lse = (o, s) if out is None else merge_lse(out, lse, o, s)
        return out, lse

    @staticmethod
    def _full(qh, heads, tiers, mask, scale):
        """Every key for these heads: each head's slice of each tier (views, no gather)."""
        m = AttentionMask(mask.q_start, mask.q_len, mask.kv_len, mask.key_keep)
        g = qh.shape[1] // heads.shape[0]
        outs, lses = [], []
        for i, hd in enumerate(heads.tolist()):
            q1 = qh[:, i * g : (i + 1) * g]
            out = lse = None
            for k, v, off in tiers:
                o, s = blocked_attention_lse(
                    q1.to(k.device), k[:, hd : hd + 1], v[:, hd : hd + 1], m, scale, None, off
                )
                o, s = o.to(qh.device), s.to(qh.device)
                out, lse = (o, s) if out is None else merge_lse(out, lse, o, s)
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs, 1), torch.cat(lses, 1)


def _page_parts(k, v, off, lo, hi, end, page, ids):
    """Keys and values [L, D] of one head that one tier (slots [off, off + n)) holds: its
    share of the sinks [0, lo), of the chosen pages ``ids`` (whole pages of [lo, hi)) and of
    the window [hi, end), in slot order; None when it holds none."""
    n = k.shape[0]
    a, e = off, off + n
    spans = [(max(a, 0), min(e, lo)), (max(a, hi), min(e, end))]
    spans = [(x - off, y - off) for x, y in spans if y > x]
    if ids is not None:
        if a > lo or e < hi:  # the tier holds part of the middle: its pages (a sync on a GPU)
            ids = ids[(ids * page >= a) & ((ids + 1) * page <= e)]
        ids = ids - off // page if off else ids
    count = sum(y - x for x, y in spans) + (0 if ids is None else ids.numel() * page)
    if not count:
        return None
    kb = torch.empty(count, k.shape[1], dtype=k.dtype, device=k.device)
    vb = torch.empty_like(kb)
    pos = 0
    for x, y in spans[:1]:  # sinks first (slot order does not change a softmax, kept for reading)
        kb[pos : pos + y - x], vb[pos : pos + y - x] = k[x:y], v[x:y]
        pos += y - x
    if ids is not None and ids.numel():
        full = (n // page) * page
        m = ids.numel() * page
        rows_k, rows_v = k[:full].view(-1, page * k.shape[1]), v[:full].view(-1, page * k.shape[1])
        torch.index_select(rows_k, 0, ids, out=kb[pos : pos + m].view(-1, page * k.shape[1]))
        torch.index_select(rows_v, 0, ids, out=vb[pos : pos + m].view(-1, page * k.shape[1]))
        pos += m
    for x, y in spans[1:]:
        kb[pos : pos + y - x], vb[pos : pos + y - x] = k[x:y], v[x:y]
        pos += y - x
    return kb, vb


def attach_routers(
    caches: list, routing: list[LayerRouting | None], batch: int, capacity: int, stats=None
) -> None:
    """Give each cache whose layer has a routing its ``Router`` (summaries on the device the
    layer computes on: the prefill scratch's for offloaded KV, else the cache's own)."""
    for cache, r in zip(caches, routing, strict=True):
        if r is None or not hasattr(cache, "router"):
            continue
        scratch = getattr(cache, "scratch", None)
        device = scratch.k.device if scratch is not None else cache.k.device
        dtype = scratch.k.dtype if scratch is not None else cache.k.dtype
        head_dim = (scratch or cache).k.shape[-1]
        cache.router = Router(
            r, batch, head_dim, capacity, dtype, device, stats, getattr(cache, "decode_tokens", 8)
        )
