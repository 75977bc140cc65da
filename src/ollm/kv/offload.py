"""KV cache in pinned host RAM for contexts whose KV does not fit the GPU budget.

Prefill attends on the GPU: a layer's keys/values for the whole prompt go to a scratch buffer
shared by all offloaded layers (one layer's KV at a time), and are copied out to RAM when the
layer is done. Decode attends on the CPU, where the cache lives: only the new token's q/k/v and
the attention output cross PCIe (a few KB), instead of the whole cache every step. For the
layers the plan marks ``kv_fetch``, a ``KVFetcher`` instead copies the cache back to the GPU
ahead of use (two buffers, on its own stream, beside the weight copies), so that the copy engine
and the CPU share the KV reads and finish together.

The cache is split between tiers in fixed-size blocks of token slots: the first
``device_tokens`` slots (whole blocks, as many as the budget has room for after the layers that
keep all their KV on the device) stay on the compute device, the rest live in RAM or on disk.
The blocks of one tier are adjacent, so attention over a tier is one kernel call; decode attends
each tier where it sits and merges the parts by their log-sum-exps (``attend_parts``).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Executor, Future
from contextlib import nullcontext
from functools import partial

import torch

from ollm.kv.routed import NewSlots
from ollm.layers.attention import AttentionMask, attend, attend_parts
from ollm.runtime.pinned import pinned_empty, unpin


def _no_storage(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


class KVScratch:
    """A device buffer holding one offloaded layer's KV during prefill."""

    def __init__(
        self, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype, device
    ) -> None:
        shape = (batch, kv_heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.owner: OffloadedKVCache | None = None
        self.valid = 0  # slots [0, valid) of the owner are in the scratch

    def claim(self, cache: OffloadedKVCache, start: int) -> None:
        """Make the scratch hold ``cache``'s slots [0, start)."""
        if self.owner is not cache or self.valid < start:
            if self.owner is not None and self.owner is not cache:
                self.owner.flush()
            cache.copy_tiers(self.k, self.v, 0, start, into_cache=False)
            self.owner, self.valid = cache, start
            cache.dirty_from = start


class OffloadedKVCache:
    """LayerKVCache protocol (``attend``, ``length``, ``trim``, ``nbytes``, ``flush``) with storage
    [B, kv_heads, capacity, head_dim] in pinned RAM, or in a file (the disk tier); slots
    [0, device_tokens) instead sit on the scratch's device (``dk``/``dv``), and ``k``/``v`` hold
    slots [device_tokens, capacity) (host slot ``s`` is cache slot ``device_tokens + s``)."""

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        scratch: KVScratch,
        decode_tokens: int = 8,
        storage=None,
        allocator: Executor | None = None,
        device_tokens: int = 0,
    ) -> None:
        self._shape = (batch, kv_heads, capacity, head_dim)  # logical (fetch buffers hold it)
        self._dtype = dtype
        g = self.device_tokens = max(0, min(device_tokens, capacity))
        self._host_shape = (batch, kv_heads, capacity - g, head_dim)
        n = batch * kv_heads * (capacity - g) * head_dim * torch.finfo(dtype).bits // 8
        dev_shape = (batch, kv_heads, g, head_dim)
        self.dk = torch.empty(dev_shape, dtype=dtype, device=scratch.k.device) if g else None
        self.dv = torch.empty(dev_shape, dtype=dtype, device=scratch.k.device) if g else None
        # ``storage(nbytes) -> uint8 tensor`` places the cache (default: pinned RAM; the disk
        # tier passes file-backed buffers). Page-locking hundreds of MB takes ~60 ms, so with an
        # ``allocator`` (a one-thread executor) it happens in the background, in layer order,
        # while earlier layers compute; the first use waits for it.
        pin = partial(pinned_empty, device=scratch.k.device)  # registered from its context
        make = (storage or pin) if n else _no_storage  # n == 0: all on the device
        # RAM: a block of slots past the last head's (a routed read may run past its end: the
        # window's last page whole, kv/page_read.py; rows not attended)
        self._n, more = n, 256 * head_dim * torch.finfo(dtype).bits // 8 if n and not storage else 0
        self._bufs: tuple[torch.Tensor, torch.Tensor] | None = None  # raw bytes (to unpin)
        self._kv: tuple[torch.Tensor, torch.Tensor] | None = None  # typed [B, H, S, D] views
        self._pending: Future | None = None
        if allocator is not None:
            self._pending = allocator.submit(lambda: (make(n + more), make(n + more)))
        else:
            self._adopt((make(n + more), make(n + more)))
        self.capacity, self.length = capacity, 0
        self.scratch, self.decode_tokens = scratch, decode_tokens
        self.dirty_from = 0
        self._copied: torch.cuda.Event | None = None  # D2H copies the CPU must wait for
        self._written: torch.cuda.Event | None = None  # the last D2H write (a fetch waits on it)
        self.fetcher: KVFetcher | None = None  # set for layers whose decode attends on the GPU
        self.router = None  # attention routing (issue 18): a kv.routed.Router, set by the runner

    def _adopt(self, bufs: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._bufs = bufs
        self._kv = (
            bufs[0][: self._n].view(self._dtype).view(self._host_shape),
            bufs[1][: self._n].view(self._dtype).view(self._host_shape),
        )

    def _views(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._kv is None:  # first use: wait for the background allocation
            assert self._pending is not None
            pending, self._pending = self._pending, None
            self._adopt(pending.result())
        return self._kv  # type: ignore[return-value]

    @property
    def k(self) -> torch.Tensor:
        return self._views()[0]

    @property
    def v(self) -> torch.Tensor:
        return self._views()[1]

    def _sync(self) -> None:
        """Wait for copies into RAM before the CPU reads or writes the cache."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: AttentionMask,
        scale: float,
        dense_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        t = k.shape[2]
        start, end = self.length, self.length + t
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {self.capacity}")
        if self.fetcher is not None and t <= self.decode_tokens and q.device == self.fetcher.device:
            return self._attend_fetched(q, k, v, mask, scale, dense_mask, start, end)
        if t <= self.decode_tokens or q.device != self.scratch.k.device:
            # Decode (or a layer the CPU computes, as in hybrid decode): attend where the KV is.
            self.flush()
            self._sync()
            # routing: the new slots' RAM part read to the host with q and the chosen pages
            new = self._store(k, v, start, end, self.k, self.v, self.router is not None)
            self._advance(start, end)  # RAM is ahead of the scratch now
            return self._attend_tiers(q, mask, scale, dense_mask, self.k, self.v, end, new)
        s = self.scratch
        s.claim(self, start)
        s.k[:, :, start:end] = k
        s.v[:, :, start:end] = v
        s.valid = self.length = end
        # -- attention routing (issue 18): summaries of the prompt's keys; routed prefill
        if self.router is not None:
            self.router.on_append(k, start)
            out = self.router.attend(q, [(s.k[:, :, :end], s.v[:, :, :end], 0)], mask, scale)
            if out is not None:
                return out
        # -- end attention routing
        return attend(q, s.k[:, :, :end], s.v[:, :, :end], mask, scale, dense_mask)

    def _attend_fetched(self, q, k, v, mask, scale, dense_mask, start, end):
        """Decode on the GPU over the copy the fetcher brought in; the new slots are written
        to that copy and, asynchronously, to RAM (which stays the complete cache)."""
        self.flush()
        kb, vb, slot = self.fetcher.take(self)
        g = self.device_tokens
        self._store(k, v, start, end, kb, vb)
        a, b = max(start, g) - g, end - g
        copy_slots(self.k, kb, a, b)
        copy_slots(self.v, vb, a, b)
        if kb.device.type == "cuda":
            self._written = self._copied = torch.cuda.Event()
            self._written.record(torch.cuda.current_stream(kb.device))
        self._advance(start, end)
        out = self._attend_tiers(q, mask, scale, dense_mask, kb, vb, end)
        self.fetcher.release(slot)
        return out

    def _store(self, k, v, start: int, end: int, host_k, host_v, defer: bool = False):
        """Write slots [start, end): device blocks to ``dk``/``dv``, the rest to ``host_k``/
        ``host_v`` (RAM, or the fetcher's copy of it) at host-relative positions; ``defer``:
        the rest returned as ``NewSlots`` (the router reads them to the host with its own)."""
        g = self.device_tokens
        if self.router is not None:  # attention routing (issue 18): keep summaries current
            self.router.on_append(k, start)
        if start < g:
            m = min(end, g)
            self.dk[:, :, start:m] = k[:, :, : m - start]
            self.dv[:, :, start:m] = v[:, :, : m - start]
        if end > g:
            a = max(start, g)
            new = NewSlots(k[:, :, a - start :], v[:, :, a - start :],
                           host_k[:, :, a - g : end - g], host_v[:, :, a - g : end - g])  # fmt: skip
            if defer:
                return new
            new.flush()
        return None

    def _advance(self, start: int, end: int) -> None:
        self.length = self.dirty_from = end
        if self.scratch.owner is self:
            self.scratch.valid = min(self.scratch.valid, start)

    def _attend_tiers(self, q, mask, scale, dense_mask, host_k, host_v, end, new=None):
        """Attention over slots [0, end): the device blocks where they sit, the host part where
        ``host_k``/``host_v`` sit (RAM: on the CPU; a fetched copy: on the GPU)."""
        g = self.device_tokens
        parts = []
        if g:
            m = min(end, g)
            parts.append((self.dk[:, :, :m], self.dv[:, :, :m]))
        if end > g:
            parts.append((host_k[:, :, : end - g], host_v[:, :, : end - g]))
        if self.router is not None:  # attention routing (issue 18): read only the chosen KV
            tiers = [(pk, pv, 0 if i == 0 and g else g) for i, (pk, pv) in enumerate(parts)]
            out = self.router.attend(q, tiers, mask, scale, new)  # ``new`` written
            if out is not None:
                return out
        return attend_parts(q, parts, mask, scale, dense_mask)

    def _keys(self, a: int, b: int) -> torch.Tensor:
        """Keys of slots [a, b) (within one tier's blocks or across both), where they sit."""
        g = self.device_tokens
        parts = [self.dk[:, :, a : min(b, g)]] if a < g else []
        if b > g:
            parts.append(self.k[:, :, max(a, g) - g : b - g].to(self.scratch.k.device))
        return torch.cat([p.to(self.scratch.k.device) for p in parts], 2)

    def copy_tiers(self, full_k, full_v, a: int, b: int, into_cache: bool) -> None:
        """Slots [a, b) between full-capacity buffers (the prefill scratch) and the cache's tiers:
        into the tiers (``into_cache``) or out of them. Empty ranges are skipped by copy_slots."""
        g = self.device_tokens
        for full, dev, host in ((full_k, self.dk, self.k), (full_v, self.dv, self.v)):
            spans = ((full, dev, a, min(b, g)), (full[:, :, g:], host, max(a, g) - g, b - g))
            for outer, tier, lo, hi in spans:
                if into_cache:
                    copy_slots(tier, outer, lo, hi)
                else:
                    copy_slots(outer, tier, lo, hi)

    def flush(self) -> bool:
        """Copy the slots written in the scratch since the last flush out to their tiers; True
        if any. Asynchronous on the current stream (later kernels that overwrite the scratch
        queue behind it); the CPU waits for it (``_sync``) before it touches the cache."""
        s = self.scratch
        if s.owner is self and self.dirty_from < self.length:
            a, b = self.dirty_from, self.length
            self.copy_tiers(s.k, s.v, a, b, into_cache=True)
            self.dirty_from = b
            if s.k.device.type == "cuda":
                self._written = self._copied = torch.cuda.Event()
                self._copied.record(torch.cuda.current_stream(s.k.device))
            return True
        return False

    def trim(self, length: int) -> None:
        if self.router is not None:  # attention routing (issue 18): rebuild a partial page
            self.flush()
            self._sync()
            self.router.on_trim(length, self._keys)
        self.length = min(self.length, max(0, length))
        self.dirty_from = min(self.dirty_from, self.length)
        if self.scratch.owner is self:
            self.scratch.valid = min(self.scratch.valid, self.length)

    @property
    def nbytes(self) -> int:
        b, h, c, d = self._shape
        return 2 * b * h * c * d * torch.finfo(self._dtype).bits // 8

    def __len__(self) -> int:
        return self.length

    def close(self) -> None:
        self.fetcher = None
        self.dk = self.dv = None  # the device blocks go with the request
        if self._pending is not None:
            try:
                self._views()
            except Exception:  # the allocation failed: nothing to release
                return
        if self._bufs is None:
            return
        device = self.scratch.k.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # no copy may still target the pinned pages
        for buf in self._bufs:
            unpin(buf)
        self._bufs = self._kv = None


def copy_slots(dst: torch.Tensor, src: torch.Tensor, a: int, b: int) -> None:
    """dst[:, :, a:b] = src[:, :, a:b] for [B, heads, slots, D] caches on two devices, as one
    copy per (sequence, head): each is contiguous on both sides, so it is a direct DMA between
    device memory and pinned RAM (asynchronous). One strided copy would instead be staged by
    PyTorch through a pageable host buffer, at a few GB/s and blocking the CPU."""
    if b <= a:
        return
    if dst.device == src.device:
        dst[:, :, a:b].copy_(src[:, :, a:b])
        return
    for i in range(dst.shape[0]):
        for h in range(dst.shape[1]):
            dst[i, h, a:b].copy_(src[i, h, a:b], non_blocking=True)


class KVFetcher:
    """Copies the pinned-RAM KV of the ``caches`` (in layer order) back to the GPU for decode,
    ahead of use: at the start of a decode step the first ``buffers`` layers' caches are issued,
    and each layer that finishes attending frees its buffer for the next one. Copies run on
    their own stream, after the cache's last write to RAM and after the buffer's last reader
    has attended over it; the compute stream waits only on the copy it needs. On the CPU device
    (tests) the same bookkeeping runs with plain copies.

    A copy may be asked for before the buffer's last reader has even run: with copies following
    the weights (``attach``) and a ring of three slots, the third consecutive fetched layer is
    issued while the first (same buffer of two) has not attended yet. A stream cannot wait on an
    event recorded later, so such a copy is deferred and issued when that reader releases the
    buffer, behind its release event."""

    def __init__(self, caches: list[OffloadedKVCache], buffers: int = 2, stats=None) -> None:
        self.caches = caches
        self._stats = stats  # an IOStats: fetched bytes count as host->GPU bytes
        first = caches[0]
        device = self.device = first.scratch.k.device
        self.decode_tokens = first.decode_tokens
        self._bufs = [
            (
                torch.empty(first._shape, dtype=first._dtype, device=device),
                torch.empty(first._shape, dtype=first._dtype, device=device),
            )
            for _ in range(buffers)
        ]
        self._cuda = device.type == "cuda"
        self._free: list[torch.cuda.Event | None] = [None] * buffers  # last reader's release
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        # id(cache) -> (buffer, copy-done event, slots copied), for copies already issued
        self._pending: dict[int, tuple[int, torch.cuda.Event | None, int]] = {}
        # per buffer: the cache whose copy it holds until that cache releases it (None: free),
        # and the caches whose copies wait for that release, in order
        self._reader: list[OffloadedKVCache | None] = [None] * buffers
        self._deferred: list[deque[OffloadedKVCache]] = [deque() for _ in range(buffers)]
        self._next = 0  # index into caches of the next copy to issue in this step
        self._by_layer: dict[int, OffloadedKVCache] = {}  # set by attach()
        self.active = False  # in decode: copies follow the weights (cleared by larger forwards)
        self._slot = 0  # buffer the next copy goes to (round robin)
        for c in caches:
            c.fetcher = self

    def attach(self, layers: list[int], stream) -> None:
        """Issue each cache's copy when the weight prefetcher issues its layer's weights, on the
        same ``stream``: the copy engine then serves KV and weights in the order layers need
        them (see ``Prefetcher.on_issue``); ``layers`` are the caches' layer indices."""
        self._by_layer = dict(zip(layers, self.caches, strict=True))
        self._stream = stream

    def issue_layer(self, layer: int) -> None:
        """Called by the prefetcher, inside its copy stream, after layer ``layer``'s weights."""
        cache = self._by_layer.get(layer)
        if cache is not None and self._bufs and self.active:
            self._issue(cache)

    def start_step(self) -> None:
        """A decode step begins: the prefill scratch's last owner writes its KV to RAM, then
        (unless copies follow the weight prefetcher) the first caches' copies are issued."""
        for c in self.caches:
            c.flush()
        self.active = True
        if self._by_layer:
            return
        self._forget()
        self._next = 0
        for _ in self._bufs:
            self._issue_next()

    def _forget(self) -> None:
        """Drop the copies issued or deferred and not taken: nobody will read them (a new copy
        into their buffer is ordered after them on the same stream)."""
        self._pending.clear()
        self._reader = [None] * len(self._bufs)
        for q in self._deferred:
            q.clear()

    def _issue_next(self) -> None:
        if self._next < len(self.caches):
            self._issue(self.caches[self._next])
            self._next += 1

    def _issue(self, cache: OffloadedKVCache) -> None:
        """Copy ``cache`` into a free buffer, else queue it behind the next buffer's reader."""
        self._drop(cache)
        slot = self._free_slot()
        if slot is not None:
            self._copy(cache, slot)
            return
        slot = self._slot
        self._slot = (slot + 1) % len(self._bufs)
        self._deferred[slot].append(cache)  # its reader has not attended yet: wait for release

    def _free_slot(self) -> int | None:
        return next(
            (s for s, r in enumerate(self._reader) if r is None and not self._deferred[s]), None
        )

    def _drop(self, cache: OffloadedKVCache) -> None:
        """Forget ``cache``'s copy issued or deferred and not taken (a newer one replaces it)."""
        for q in self._deferred:
            if cache in q:
                q.remove(cache)
        entry = self._pending.pop(id(cache), None)
        if entry is not None and self._reader[entry[0]] is cache:
            self._vacate(entry[0])

    def _vacate(self, slot: int) -> None:
        """Nobody will read ``slot``'s copy any more: the next copy deferred behind it goes."""
        self._reader[slot] = None
        if self._deferred[slot]:
            self._copy(self._deferred[slot].popleft(), slot)

    def _copy(self, cache: OffloadedKVCache, slot: int) -> None:
        kb, vb = self._bufs[slot]
        n = cache.length
        nh = max(0, n - cache.device_tokens)  # device blocks are attended where they sit
        done = None
        with torch.cuda.stream(self._stream) if self._cuda else nullcontext():
            for ev in (self._free[slot], cache._written):
                if ev is not None:
                    self._stream.wait_event(ev)
            copy_slots(kb, cache.k, 0, nh)
            copy_slots(vb, cache.v, 0, nh)
            if self._cuda:
                if self._stats is not None:
                    self._stats.add(bytes_h2d=2 * kb[:, :, :nh].numel() * kb.element_size())
                done = torch.cuda.Event()
                done.record(self._stream)
        self._reader[slot] = cache
        self._pending[id(cache)] = (slot, done, n)

    def take(self, cache: OffloadedKVCache) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``cache``'s buffer (its host slots up to ``length`` valid once the current stream
        reaches here)."""
        entry = self._pending.pop(id(cache), None)
        if entry is None or entry[2] != cache.length:
            self._copy_now(cache, None if entry is None else entry[0])
            entry = self._pending.pop(id(cache))
        slot, done, _ = entry
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
        return self._bufs[slot][0], self._bufs[slot][1], slot

    def _copy_now(self, cache: OffloadedKVCache, stale: int | None) -> None:
        """Copy ``cache`` for use now (not issued ahead, stale, or still deferred): following the
        weights, into its own buffer if stale, else a free one, else the buffer of the copy
        needed last, leaving the other copies issued ahead alone (the first decode step's
        layers were issued while inactive; dropping the others' copies would make every later
        take miss too). Copies issued by ``start_step`` instead are dropped (a buffer may be
        promised to another cache) and issuing ahead stops for this step."""
        if not self._by_layer:
            self._forget()
            self._next = len(self.caches)
            self._issue(cache)
            return
        if stale is None:
            self._drop(cache)
            stale = self._free_slot()
        self._copy(cache, self._evict() if stale is None else stale)

    def _evict(self) -> int:
        """Every buffer holds a copy issued ahead: take the buffer of the one issued last (needed
        furthest ahead); that cache is copied again, first, when the buffer is next released."""
        rank = {key: i for i, key in enumerate(self._pending)}  # dicts keep the issue order
        slot = max(range(len(self._bufs)), key=lambda s: rank.get(id(self._reader[s]), -1))
        victim = self._reader[slot]
        if self._pending.pop(id(victim), None) is not None:  # else left by a broken pass
            self._deferred[slot].appendleft(victim)
        return slot

    def release(self, slot: int) -> None:
        """The current stream's work queued so far is the buffer's last use: record that, issue
        the copy deferred behind it, then the next cache's."""
        if self._cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._free[slot] = ev
        self._vacate(slot)
        self._issue_next()
