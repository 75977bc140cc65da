"""The routing part of a layer's KV object: a ``Router`` rides on a ``LayerKVCache`` or an
``OffloadedKVCache`` (``cache.router``), keeps the key summaries current as KV is appended or
trimmed, and attends decode queries over only the KV its ``LayerRouting`` chooses, reading
those slots where they sit (device, pinned RAM, memory-mapped file): the routing decision is
what is read. The cache hands it its tiers as (keys, values, first slot) parts."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence

import torch

from ollm.kv.page_read import PageBuffers, StepSlots, attend_read, gather_tier, padded
from ollm.layers.attention import AttentionMask, blocked_attention_lse, merge_lse, with_sinks
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
from ollm.layers.segments import span_pages
from ollm.runtime.uva import to_device

Tier = tuple[torch.Tensor, torch.Tensor, int]  # keys, values [B, KVH, n, D], first cache slot
# Where a routed decode step attends the pages it reads from pinned RAM: "sit" (on the CPU, where
# they are: only q and the output cross PCIe) or "device" (gathered into pinned buffers, copied
# to the GPU, attended there). scripts/gpu/routing_micro.py times both.
READS = ("sit", "device")
READ = "sit"


class NewSlots:
    """A decode step's new keys and values ``k``/``v`` (on the compute device) bound for host
    slots ``dst_k``/``dst_v`` (RAM): ``Router._paged`` reads them to the host in the one wait
    for q and the chosen page ids and writes them before it gathers; ``flush`` writes them on
    their own (a blocking copy: a wait of its own on a GPU) when nothing did."""

    def __init__(self, k, v, dst_k: torch.Tensor, dst_v: torch.Tensor) -> None:
        self.k, self.v, self.dst, self.done = k, v, (dst_k, dst_v), False

    def write(self, hk: torch.Tensor, hv: torch.Tensor) -> None:
        """Store the host copies ``hk``/``hv`` of ``k``/``v``."""
        self.dst[0].copy_(hk)
        self.dst[1].copy_(hv)
        self.done = True

    def flush(self) -> None:
        if not self.done:
            self.write(self.k.to(self.dst[0].device), self.v.to(self.dst[1].device))


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
        buffers: PageBuffers | None = None,
        read: str = "sit",
    ) -> None:
        if read not in READS:
            raise ValueError(f"read must be one of {READS}, not {read!r}")
        self.routing, self.stats, self.decode_tokens = routing, stats, decode_tokens
        self.read = read  # where RAM pages are attended: "sit" (the CPU) or "device" (copied)
        self.buffers = buffers or PageBuffers()
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
        self._tuples = {m: tuple(x.tolist()) for m, x in self._groups.items()}
        self._indices: dict[tuple[str, str], torch.Tensor] = {}
        self.batch, self.capacity = batch, capacity
        # Routing by segment: per sequence, the sorted pages spans mark full (None: none).
        self.forced: list[list[int]] | None = None
        self._forced_cache: dict = {}

    def force(self, spans: Sequence[Sequence[tuple[int, int]]] | None) -> None:
        """Per sequence, the slot spans [a, b) the request marks full: every page they touch is
        read by every routed head at every decode step (like the sinks), outside the top-k
        budget. None (or no spans at all) clears: routing as without spans, exactly."""
        self._forced_cache = {}
        if spans is None or not any(spans):
            self.forced = None
            return
        if len(spans) != self.batch:
            raise ValueError(f"{len(spans)} sequences of spans for a batch of {self.batch}")
        for a, e in (x for row in spans for x in row):
            if not 0 <= a < e <= self.capacity:
                raise ValueError(f"span [{a}, {e}) outside the cache's {self.capacity} slots")
        self.forced = [span_pages(row, self.routing.page_tokens) for row in spans]

    def _forced_in(self, lo: int, hi: int) -> list[list[int]] | None:
        """Per sequence, the forced pages inside the middle [lo, hi) (None: none there)."""
        if self.forced is None:
            return None
        p0, p1 = lo // self.routing.page_tokens, hi // self.routing.page_tokens
        out = [row[bisect_left(row, p0) : bisect_left(row, p1)] for row in self.forced]
        return out if any(out) else None  # spans only over sinks and window: as without

    def _forced_mask(self, device) -> torch.Tensor:
        """Bool [B, pages of the capacity] on ``device``: the pages spans mark full."""
        key = ("mask", str(device))
        if key not in self._forced_cache:
            m = torch.zeros(self.batch, -(-self.capacity // self.routing.page_tokens), dtype=bool)
            for b, row in enumerate(self.forced or ()):
                m[b, row] = True
            self._forced_cache[key] = m.to(device)
        return self._forced_cache[key]

    def _forced_ids(self, forced: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """``forced`` as ids [B, F] (rows padded with their first id, or 0) and which are real."""
        key = ("ids", tuple(map(tuple, forced)), str(device))
        if key not in self._forced_cache:
            f = max(map(len, forced))
            pad = [row + [row[0] if row else 0] * (f - len(row)) for row in forced]
            ids = torch.tensor(pad, dtype=torch.long)
            ok = torch.tensor([[i < len(row) for i in range(f)] for row in forced], dtype=bool)
            self._forced_cache[key] = (ids.to(device), ok.to(device))
        return self._forced_cache[key]

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
        self,
        q: torch.Tensor,
        tiers: list[Tier],
        mask: AttentionMask,
        scale: float,
        new: NewSlots | None = None,
    ) -> torch.Tensor | None:
        """Routed attention of ``q`` [B, H, T, D] over the cache's ``tiers``, or None; ``new``
        (slots the tiers show but the host does not hold yet) is written either way."""
        out = self._attend(q, tiers, mask, scale, new)
        if new is not None:
            new.flush()
        return out

    def _attend(self, q, tiers, mask, scale, new):
        r, t, start, end = self.routing, mask.q_len, mask.q_start, mask.kv_len
        decode = t <= self.decode_tokens
        lo, hi = r.middle(start if decode else end - 1)  # prefill: the last row skips most
        forced = self._forced_in(lo, hi)  # per sequence: pages of the middle marked full
        fmin = 0 if forced is None else min(map(len, forced))
        if decode and self.stats is not None:
            f = 0 if forced is None else round(sum(map(len, forced)) / len(forced))
            read = r.read_tokens(start, end, f) if r.routed else end * len(r.heads)
            self.stats.add(kv_read_tokens=read, kv_total_tokens=end * len(r.heads))
        if not r.routed or hi <= lo or mask.window is not None or not (decode or r.prefill):
            return None
        mid = (hi - lo) // r.page_tokens
        if fmin >= mid or (set(r.heads) == {TOPK} and r.pages + fmin >= mid):
            return None  # every page read: the key set is all keys (full attention, exactly)
        if not decode:
            out, lse = self._prefill(q, tiers, mask, scale)
        else:
            out, lse = self._decode(q, tiers, mask, scale, lo, hi, forced, new)
        return out if mask.sinks is None else with_sinks(out, lse.to(out.device), mask.sinks)

    def _prefill(self, q, tiers, mask, scale):
        """Every prefill row routed as if decoded; the prefill path holds all keys in one part."""
        (k, v, off), *rest = tiers
        if off or rest or k.shape[2] < mask.kv_len:
            raise RuntimeError("routed prefill needs the layer's keys in one part")
        n = mask.kv_len
        qd = q.to(k.device)
        forced = None if self.forced is None else self._forced_mask(k.device)
        out, lse = routed_dense(
            qd, k[:, :, :n], v[:, :, :n], self.routing, self.summaries, mask.q_start, scale,
            mask.key_keep, forced,
        )  # fmt: skip
        return to_device(out, q.device), to_device(lse, q.device)

    def _decode(self, q, tiers, mask, scale, lo, hi, forced=None, new=None):
        """Each mechanism's heads over their slots, tier by tier, merged by log-sum-exp
        (``forced``: per sequence, the pages of the middle spans mark full; ``new``: written
        by the first paged read, or first of all when some group reads otherwise)."""
        b, h, t, d = q.shape
        kvh = len(self.routing.heads)
        g = h // kvh
        whole = len(self._groups) == 1  # one mechanism: no split of the heads, no scatter
        even = forced is None or len(set(map(len, forced))) == 1  # the paged read: no padding
        paged = t == 1 and mask.key_keep is None and even and self._aligned(tiers)
        if new is not None and (FULL in self._groups or not paged):
            new.flush()
        out = None if whole else torch.empty_like(q)
        lse = None if whole else torch.empty(b, h, t, device=q.device)
        for mech, heads in self._groups.items():
            idx = None if whole else self._index(mech, q.device)
            qh = q if whole else q.view(b, kvh, g, t, d)[:, idx].reshape(b, -1, t, d)
            if mech == FULL:
                o, s = self._full(qh, heads, tiers, mask, scale)
            elif paged:
                o, s = self._paged(q, qh, mech, tiers, mask, scale, lo, hi, forced, new)
            else:
                slots, valid = self._slots(q, heads, mask, lo, hi, mech, forced)
                o, s = self._gathered(qh, heads, tiers, slots, valid, mask, scale)
            if whole:
                return o, s
            out.view(b, kvh, g, t, d)[:, idx] = o.view(b, -1, g, t, d)
            lse.view(b, kvh, g, t)[:, idx] = to_device(s.view(b, -1, g, t), q.device)
        return out, lse

    def _index(self, mech: str, device: torch.device) -> torch.Tensor:
        """The KV heads of ``mech`` as an index on ``device``, kept (a CPU index of a CUDA tensor
        would be copied, and the host wait for the GPU, at every use)."""
        key = (mech, str(device))
        if key not in self._indices:
            self._indices[key] = self._groups[mech].to(device)
        return self._indices[key]

    def _pages(self, q, mech, lo, hi, forced, idx):
        """Pages [B, R, K] of the middle ``mech``'s heads read (top-k choices, then pages marked
        full) and which count (None: all), or (None, None): none. Top-k is chosen among the
        pages not marked full; a row with more of them may get fewer (-inf picks: not counted)."""
        r = self.routing
        if forced is None:
            if mech != TOPK:
                return None, None
            return select_pages(q, self.summaries, lo, hi, r.pages, idx), None
        dev = q.device if self.summaries is None else self.summaries.kmin.device
        fids, fok = self._forced_ids(forced, dev)
        n_h = len(self._tuples[mech])
        fids, fok = (x[:, None].expand(-1, n_h, -1) for x in (fids, fok))
        if mech != TOPK:
            return fids, fok
        k = min(r.pages, (hi - lo) // r.page_tokens - min(map(len, forced)))
        excl = self._forced_mask(dev)
        top = select_pages(q, self.summaries, lo, hi, k, idx, excl)
        tok = ~excl.gather(1, top.flatten(1)).view(top.shape)  # a -inf pick is a forced page
        return torch.cat([top, fids], -1), torch.cat([tok, fok], -1)

    def _slots(self, q, heads, mask, lo, hi, mech, forced=None):
        """Key slots [B, R, L] of ``heads`` (sinks, chosen pages, window) and which count."""
        r, end = self.routing, mask.kv_len
        dev = q.device if self.summaries is None else self.summaries.kmin.device
        b, n_h = q.shape[0], heads.shape[0]
        plain = torch.cat([torch.arange(0, lo, device=dev), torch.arange(hi, end, device=dev)])
        slots = plain.expand(b, n_h, -1)
        valid = torch.ones_like(slots, dtype=torch.bool)
        pages, ok = self._pages(q, mech, lo, hi, forced, self._index(mech, dev))
        if pages is not None:
            ps, pv = page_slots(pages, r.page_tokens, lo, hi)
            if ok is not None:
                pv = pv & ok.repeat_interleave(r.page_tokens, -1)
            slots, valid = torch.cat([slots, ps], -1), torch.cat([valid, pv], -1)
        if mask.key_keep is not None:
            keep = mask.key_keep.to(dev)
            valid = valid & keep.gather(1, slots.clamp(max=keep.shape[1] - 1).flatten(1)).view(
                slots.shape
            )
        return slots, valid

    def _aligned(self, tiers: list[Tier]) -> bool:
        return all(off % self.routing.page_tokens == 0 for _, _, off in tiers)

    def _paged(self, q, qh, mech, tiers, mask, scale, lo, hi, forced=None, new=None):
        """One decode query, no padding: per tier, the group's sinks, chosen pages and window
        gathered into one buffer (``page_read.gather_tier``: a memcpy per page) and one
        attention call where the tier sits (RAM: on the CPU, or with ``read="device"`` copied
        to the GPU first); the tiers merged by log-sum-exp. The host waits for the GPU once:
        q, the chosen page ids and ``new`` (the step's keys and values for RAM, written before
        the gather) come back in one go. Pages marked full (``forced``, as many
        per sequence) are read with the chosen ones (every top-k pick then counts)."""
        r = self.routing
        step = StepSlots(lo, hi, mask.kv_len, r.page_tokens)
        idx = None
        if mech == TOPK and len(self._tuples[mech]) != len(r.heads):  # not all heads in order
            idx = self._index(mech, self.summaries.kmin.device)
        pages, _ = self._pages(q, mech, lo, hi, forced, idx)
        on_cpu = [k.device.type == "cpu" for k, _, _ in tiers]
        ragged = [step.ragged(off, off + k.shape[2]) for k, _, off in tiers]
        sit = self.read == "sit" or qh.device.type == "cpu"
        pending = [] if new is None or new.done else [new.k, new.v]
        q_host, ids_host, *kv_host = _to_host(
            qh if sit and any(on_cpu) else None,
            pages if pages is not None and (any(on_cpu) or any(ragged)) else None,
            *pending,
        )
        if pending:
            new.write(*kv_host)
        heads = self._tuples[mech]
        out = lse = None
        for (k, v, off), cpu, rag in zip(tiers, on_cpu, ragged, strict=True):
            ids = pages if pages is None or (pages.device == k.device and not rag) else ids_host
            got = gather_tier(k, v, off, step, heads, ids, self.buffers)
            if got is None:  # this tier holds none of the group's slots
                continue
            kb, vb, valid, which = got
            qd = qh
            if cpu and not sit:  # the chosen pages go to the GPU, attended there
                n = kb.shape[2]  # the whole buffer (contiguous, pinned), then the read's rows
                kb, vb = (padded(x).to(qh.device, non_blocking=True)[:, :, :n] for x in (kb, vb))
                valid = None if valid is None else valid.to(qh.device)
                if which is not None:
                    self.buffers.copied(which, torch.cuda.current_stream(qh.device))
            elif cpu:
                qd = q_host
            o, s = attend_read(qd, kb, vb, valid, scale)
            o = to_device(o, qh.device)  # lse stays where it is unless needed (a merge, sinks)
            if out is None:
                out, lse = o, s
            else:
                out, lse = merge_lse(out, to_device(lse, qh.device), o, to_device(s, qh.device))
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
            o, s = to_device(o, qh.device), to_device(s, qh.device)
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
                o, s = to_device(o, qh.device), to_device(s, qh.device)
                out, lse = (o, s) if out is None else merge_lse(out, lse, o, s)
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs, 1), torch.cat(lses, 1)


def _to_host(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    """CPU copies of the CUDA tensors among ``ts`` after one wait for the GPU (None and CPU
    tensors as they are)."""
    out = [t if t is None or t.device.type == "cpu" else t.to("cpu", non_blocking=True) for t in ts]
    dev = next((t.device for t in ts if t is not None and t.device.type == "cuda"), None)
    if dev is not None:
        torch.cuda.current_stream(dev).synchronize()
    return out


def force_spans(caches: list, spans: Sequence[Sequence[tuple[int, int]]] | None) -> None:
    """Routing by segment: every routed cache of a request reads the pages of ``spans`` (per
    sequence, slot spans [a, b)) at every step (``Router.force``); None clears."""
    for cache in caches:
        router = getattr(cache, "router", None)
        if router is not None:
            router.force(spans)


def attach_routers(
    caches: list,
    routing: list[LayerRouting | None],
    batch: int,
    capacity: int,
    stats=None,
    read: str = READ,
) -> None:
    """Give each cache whose layer has a routing its ``Router`` (summaries on the device the
    layer computes on: the prefill scratch's for offloaded KV, else the cache's own); the
    routers share one set of gather buffers (a layer at a time uses them)."""
    buffers = None
    for cache, r in zip(caches, routing, strict=True):
        if r is None or not hasattr(cache, "router"):
            continue
        scratch = getattr(cache, "scratch", None)
        device = scratch.k.device if scratch is not None else cache.k.device
        dtype = scratch.k.dtype if scratch is not None else cache.k.dtype
        head_dim = (scratch or cache).k.shape[-1]
        if buffers is None:
            buffers = PageBuffers(device if read == "device" and device.type == "cuda" else None)
        cache.router = Router(
            r, batch, head_dim, capacity, dtype, device, stats,
            getattr(cache, "decode_tokens", 8), buffers, read,
        )  # fmt: skip
