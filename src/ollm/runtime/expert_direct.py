"""Direct expert decode (issue 19): a decode row's experts found, cached and read by the GPU
alone, with no host sync per layer.

The cache's host path (``runtime/experts.py`` ``run``) reads each sparse layer's expert ids to the
host, decides hits and misses there and queues copies: one host sync per layer, and on the H200
a batch-1 decode layer took 1.67 ms of wall for ~0.6 ms of kernels (GPU busy 36%), the host
planning while the GPU waited. Here the cache's state lives on the device as tables:

* ``slot_of`` [layers x experts]: the slot holding each expert, or -1;
* ``key_of`` [slots]: the expert (layer position x experts + id) in each slot, or -1;
* ``stamp`` [slots]: the tick of each slot's last use (-1: never filled, taken first) - LRU;
* ``host_ptr`` [layers x experts]: each expert's home in pinned RAM, a host address a kernel
  reads over the link (unified addressing: no copy engine, so nothing waits behind it).

Per decode row (one token, ``top_k`` experts) two kernels (``expert_direct_triton.py``): ``plan``
marks the hits and gives each miss the least recently used slot that this call does not use;
``gather`` copies every pair's expert into a scratch [k, ...] buffer, a miss also into its slot as
it crosses the link (read once, kept for the next tokens). The batched matmuls then read the
scratch (``layers/moe.py``), the same products as the stacked all-hit batch of the host path.
Hits, misses and each expert's uses are counted on the device and read only when asked
(``flush``, from ``IOStats.snapshot``).

The host path still serves prefill (many rows: experts streamed once per group) and anything
else: ownership of the state moves with a sync at a phase change only (``push`` before a direct
call when the host path ran last, ``pull`` before a host call after direct ones).

``plan_torch`` / ``gather_torch`` do the same with torch ops and a host loop (syncs): the
reference the kernels are tested against, and the backend of the CPU stand-in in tests
(``OLLM_MOE_DIRECT=torch``; ``=triton`` forces the kernels, e.g. under ``TRITON_INTERPRET=1``).
``OLLM_MOE_DIRECT=0`` turns the direct decode off.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

import torch

from ollm.runtime.expert_graphs import LayerGraphs, wanted
from ollm.runtime.expert_stacks import stacked_views

if TYPE_CHECKING:
    from ollm.runtime.experts import ExpertCache

WORD = 8  # the gather moves int64 words: expert ranges and addresses must be multiples of 8


def backend(cache: ExpertCache) -> str | None:
    """``"triton"``, ``"torch"`` (forced, tests) or None: why not is in ``reason``."""
    return None if reason(cache) else _mode(cache)


def _mode(cache: ExpertCache) -> str:
    env = os.environ.get("OLLM_MOE_DIRECT", "auto").lower()
    if env in ("0", "off", "false"):
        return "off"
    if env in ("torch", "triton"):  # forced (tests: the CPU stand-in, Triton's interpreter)
        return env
    if not cache.cuda or importlib.util.find_spec("triton") is None:
        return "off"
    return "triton"


def reason(cache: ExpertCache) -> str | None:
    """None when decode rows can take the direct path, else why not (one line)."""
    p, st = cache.plan, cache.experts
    if _mode(cache) == "off":
        return "off (OLLM_MOE_DIRECT=0, no CUDA or no Triton)"
    checks = (
        (p.resident, "every expert is resident"),
        (cache.in_place, "the CPU is the device"),
        (any(r < p.num_experts for r in p.ram), "some experts live on disk"),
        (p.policy != "lru", f"policy {p.policy} (the device tables keep LRU)"),
        (p.lookahead, "lookahead asked for"),
        (p.cpu_compute == "on", "expert_cpu='on' asked for"),
        (cache.coded, "coded experts decoded in their slots"),
        (len(set(cache._layout.values())) != 1, "more than one expert layout"),
        (len(cache.slot_key) < 2, "fewer than two slots"),
    )
    for bad, why in checks:
        if bad:
            return why
    sizes = {n for i in p.layers for n in st.regions[i].sizes}
    if len(sizes) != 1 or next(iter(sizes)) % WORD:
        return "expert ranges of different sizes or not whole words"
    if any(b.data_ptr() % WORD for b in cache._bytes.values()) or cache.slots.stride(0) % WORD:
        return "expert bytes not aligned to words"
    return None


def attach(cache: ExpertCache) -> DirectExperts | None:
    """The cache's direct decode when it can have one (its decode rows then never go to the
    CPU: no host rows, no CPU trial), its counts flushed with the I/O stats."""
    mode = backend(cache)
    if mode is None:
        return None
    d = DirectExperts(cache, mode)
    cache.host_rows, cache.trial = False, None
    cache.stats.flushers.append(d.flush)
    return d


def detach(cache: ExpertCache) -> None:
    """Flush and drop the cache's direct decode (``ExpertCache.close``)."""
    d = cache.direct
    if d is not None and d.flush in cache.stats.flushers:
        d.flush()
        cache.stats.flushers.remove(d.flush)
    cache.direct = None


class DirectExperts:
    """The device tables of one ``ExpertCache`` and its direct decode calls."""

    def __init__(self, cache: ExpertCache, mode: str) -> None:
        self.cache, self.mode = cache, mode
        p = cache.plan
        dev = cache.slots.device
        self.E, self.S = p.num_experts, len(cache.slot_key)
        self.row_bytes = cache.slots.stride(0)
        self.slot_base = cache.slots.data_ptr()
        i0 = p.layers[0]
        self.nbytes = cache.experts.regions[i0].sizes[0]
        self.tensors = cache.slot_tensors(i0, 0)  # the layout the slots hold
        self.kern = (
            importlib.import_module(f"{__package__}.expert_direct_triton")
            if mode == "triton"
            else None
        )
        keys = [(i, e) for i in p.layers for e in range(self.E)]
        host = [cache._bytes[k].data_ptr() for k in keys]
        i64 = dict(dtype=torch.int64, device=dev)
        self.host_ptr = torch.tensor(host, **i64)
        self.slot_of = torch.full((len(keys),), -1, **i64)
        self.key_of = torch.full((self.S,), -1, **i64)
        self.stamp = torch.full((self.S,), -1, **i64)
        self.tick = torch.zeros(1, **i64)
        self.uses = torch.zeros(len(keys), **i64)
        self.counters = torch.zeros(2, **i64)  # hits, misses
        self.src = torch.zeros(p.num_experts, **i64)  # per pair: read from (an address)
        self.dst = torch.zeros(p.num_experts, **i64)  # per pair: kept in (0: a hit)
        self.owner = "host"  # who holds the cache's state now
        # CUDA graphs of a decode row's sparse block (``runtime/expert_graphs.py``)
        self.graphs = (
            LayerGraphs(self.on_device, len(p.layers))
            if mode == "triton" and cache.cuda and wanted()
            else None
        )

    # -- one decode row ---------------------------------------------------------------------------
    def experts(self, i: int, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Layer i's experts ``ids`` [k] (a device tensor, one row's top-k, distinct) as
        [k, ...] stacks in ``ids``' order, misses cached on the way."""
        self.on_device()
        k = ids.shape[0]
        pos_e = self.cache._index[i] * self.E
        scratch = torch.empty(k, self.nbytes, dtype=torch.uint8, device=self.cache.slots.device)
        if self.kern is not None:
            self.kern.plan(self, ids, pos_e)
            self.kern.gather(self, k, scratch)
        else:
            plan_torch(self, ids, pos_e)
            gather_torch(self, k, scratch)
        return stacked_views(scratch, self.tensors)

    # -- state moves between the host path and the device tables ----------------------------------
    def on_device(self) -> None:
        """The state in the device tables (pushed if the host path ran last)."""
        if self.owner != "device":
            self.push()

    def push(self) -> None:
        """The host path's state into the device tables (its copies in flight ordered first)."""
        c = self.cache
        if c.cuda:
            torch.cuda.current_stream(c.device).wait_stream(c.copy_stream)
        slot_of = torch.full((self.slot_of.numel(),), -1, dtype=torch.int64)
        key_of = torch.full((self.S,), -1, dtype=torch.int64)
        stamp = torch.full((self.S,), -1, dtype=torch.int64)
        order = list(c.policy.order)  # LRU (the only policy with a direct decode)
        rank = {key: n for n, key in enumerate(order)}
        for s, key in enumerate(c.slot_key):
            if key is not None:
                g = c._index[key[0]] * self.E + key[1]
                slot_of[g], key_of[s], stamp[s] = s, g, rank.get(key, 0)
        for t, src in ((self.slot_of, slot_of), (self.key_of, key_of), (self.stamp, stamp)):
            t.copy_(src)
        self.tick.fill_(len(order))
        self.owner = "device"

    def pull(self) -> None:
        """The device tables back into the host path's state (one sync): slots, LRU order."""
        c = self.cache
        self.flush()
        key_of, stamp = self.key_of.tolist(), self.stamp.tolist()
        for s in range(self.S):
            if c.slot_key[s] is not None:
                c._unmap(s)
        c._empty.clear()
        filled = sorted((st, s) for s, st in enumerate(stamp) if key_of[s] >= 0)
        c._empty.extend(s for s in range(self.S - 1, -1, -1) if key_of[s] < 0)
        layers = c.plan.layers
        for _, s in filled:
            key = (layers[key_of[s] // self.E], key_of[s] % self.E)
            c.where[key], c.slot_key[s] = s, key
            c.policy.add(key)
            c._set_views(*key, s)
        if c.cuda:  # a host copy into a slot waits for the direct calls' last reads of it
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(c.device))
            c._seq += 1
            for s in range(self.S):
                c.free[s], c.free_seq[s], c.ready[s] = ev, c._seq, None
        self.owner = "host"

    def flush(self) -> None:
        """Counts of the direct calls so far into the cache's counts and I/O stats (a sync)."""
        hits, misses = self.counters.tolist()
        if hits or misses:
            self.counters.zero_()
            c = self.cache
            c.counts["hits"] += hits
            c.counts["misses"] += misses
            c.stats.add(expert_hits=hits, expert_misses=misses, bytes_h2d=misses * self.nbytes)
            new = self.uses.tolist()
            self.uses.zero_()
            layers = c.plan.layers
            for g, n in enumerate(new):
                if n:
                    key = (layers[g // self.E], g % self.E)
                    c.routed[key] = c.routed.get(key, 0) + n


def plan_torch(d: DirectExperts, ids: torch.Tensor, pos_e: int) -> None:
    """``expert_direct_triton._plan`` in torch ops and a host loop (reads the tables: syncs)."""
    g = (ids + pos_e).tolist()
    s = d.slot_of[g].tolist()
    t = int(d.tick.item()) + 1
    d.tick.fill_(t)
    stamp = d.stamp.tolist()
    for sj in s:
        if sj >= 0:
            stamp[sj] = t
    for j, (gj, sj) in enumerate(zip(g, s, strict=True)):
        if sj >= 0:
            d.src[j], d.dst[j] = d.slot_base + sj * d.row_bytes, 0
            continue
        cand = [st if st != t else 1 << 62 for st in stamp]
        v = min(range(d.S), key=lambda n: (cand[n], n))
        old = int(d.key_of[v])
        if old >= 0:
            d.slot_of[old] = -1
        d.slot_of[gj], d.key_of[v], stamp[v] = v, gj, t
        d.src[j], d.dst[j] = int(d.host_ptr[gj]), d.slot_base + v * d.row_bytes
    d.stamp.copy_(torch.tensor(stamp, dtype=torch.int64))
    d.counters += torch.tensor(
        [sum(x >= 0 for x in s), sum(x < 0 for x in s)], device=d.counters.device
    )
    d.uses[g] += 1


def gather_torch(d: DirectExperts, k: int, scratch: torch.Tensor) -> None:
    """``expert_direct_triton._gather`` with torch copies: each pair's bytes from its slot or its
    RAM home into ``scratch``, a miss's also into its slot."""
    c = d.cache
    homes = {b.data_ptr(): b for b in c._bytes.values()}
    for j, (src, dst) in enumerate(zip(d.src[:k].tolist(), d.dst[:k].tolist(), strict=True)):
        if src in homes:
            data = homes[src][: d.nbytes].to(scratch.device)
        else:
            data = c.slots[(src - d.slot_base) // d.row_bytes, : d.nbytes]
        scratch[j].copy_(data)
        if dst:
            c.slots[(dst - d.slot_base) // d.row_bytes, : d.nbytes].copy_(data)
