"""The expert cache (issue 19): a sparse layer's experts given one by one where they are computed.

An ``ExpertPlan`` (``planning/experts.py``) says where each expert lives: all on the device
(``resident``), or at home in RAM (pinned on a GPU machine) or in the layer store, with
``cache_slots`` device buffers of one expert each. When a layer's router has run, ``run`` gets
the experts its rows need: hits first (computing while the copies run), then RAM experts the
cost model sends to the CPU (the host computes while the GPU works and the copy engine copies),
then the misses as their copies land. Every miss is issued as soon as a slot is free, on the
copy stream, behind the slot's last use (an event the compute stream records); the compute
stream waits on the copy's event before it reads the slot. A slot holding an expert of the
current call is pinned until that expert's compute is queued, so eviction under pressure (fewer
slots than experts) proceeds in waves and never hands out a slot whose bytes are in flight.

On a device without a copy engine (the CPU playing an accelerator in tests) copies are this
thread's work; on the CPU device itself RAM experts are computed in place and only disk experts
go through the slots.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

import torch

from ollm.runtime.expert_decode import (
    READ_THREADS,
    cuda_state,
    decode_slots,
    load_decoded,
    read_miss,
    warm_cache,
)
from ollm.runtime.expert_direct import DirectExperts, attach, detach
from ollm.runtime.expert_lookahead import LayerExperts, Lookahead
from ollm.runtime.expert_stacks import stacked_batch, stacked_views, uniform_rows
from ollm.runtime.expert_trial import CpuTrial, begin_call, end_call, measured_cpu, split_misses
from ollm.runtime.experts_policy import Lfu, Lru
from ollm.runtime.pinned import pinned_empty, unpin

if TYPE_CHECKING:
    from ollm.layers.moe import ExpertBatch
    from ollm.planning.experts import ExpertPlan
    from ollm.storage.experts import StoreExperts
    from ollm.telemetry.stats import IOStats

# (RAM misses the CPU may compute, misses in all, rows per expert, expert bytes, its weights,
# measured seconds per CPU expert or None) -> the misses the CPU computes; handed in from above
# (planning.experts.cpu_share, rates bound)
ChooseCpu = Callable[[list[int], int, list[int], int, int, "float | None"], list[int]]
# (dense weights, the layer's expert source, rows per group) -> the weights the block gets
Wrap = Callable[[Mapping, object, int], Mapping]

Key = tuple[int, int]  # (layer, expert)
DECODE_ROWS = 8  # CPU experts timed for the cost model only at up to this many rows each
# Calls routing more (row, expert) pairs than this (prefill) get their copied misses one at a
# time, each computed as soon as its copy lands; fewer (decode): each wave as one batch.
STREAM_PAIRS = 256


class ExpertCache:
    """Experts of the sparse layers under an ``ExpertPlan`` on ``device``; ``bind`` attaches
    layer i's experts to its dense weights for ``moe_mlp``."""

    def __init__(
        self,
        experts: StoreExperts,
        plan: ExpertPlan,
        device: str,
        stats: IOStats,
        wrap: Wrap,
        choose_cpu: ChooseCpu | None = None,
    ) -> None:
        self.experts, self.plan, self.stats = experts, plan, stats
        self.wrap, self.choose_cpu = wrap, choose_cpu
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.in_place = device == "cpu"  # RAM is the device: RAM experts computed where they are
        self.cpu = torch.device("cpu")
        self._pinned: list[torch.Tensor] = []
        self._index = {i: j for j, i in enumerate(plan.layers)}
        self._views: dict[Key, dict[str, torch.Tensor]] = {}  # resident or RAM experts
        self._bytes: dict[Key, torch.Tensor] = {}  # RAM experts' bytes (copy sources)
        self._bound: dict[int, tuple[object, Mapping]] = {}
        n = 0 if plan.resident else plan.cache_slots
        slot_dev = self.device if self.cuda else self.cpu
        # coded (MXFP4) experts: a copy lands in its slot's row of ``raw`` (stored bytes) and is
        # decoded into the slot (``undecoded`` until its first use, on the compute stream);
        # with ``plan.coded_slots`` the slot holds the stored bytes, computed from their codes
        self.coded = experts.coded and not plan.coded_slots  # decoded in the slot
        row = experts.decoded_bytes if self.coded else plan.expert_bytes
        self.slots = torch.empty(n, row, dtype=torch.uint8, device=slot_dev)
        self.raw = torch.empty(n if self.coded else 0, plan.expert_bytes, dtype=torch.uint8,
                               device=slot_dev)  # fmt: skip
        self.undecoded: set[int] = set()
        self.slot_key: list[Key | None] = [None] * n
        self._empty = list(range(n - 1, -1, -1))  # slots never filled, popped from the end
        self.slot_views: list[dict[str, torch.Tensor] | None] = [None] * n
        self.where: dict[Key, int] = {}
        self.pinned: set[Key] = set()
        self.policy = Lfu() if plan.policy == "lfu" else Lru()
        self._pool: ThreadPoolExecutor | None = None  # disk reads of misses
        canon: dict[tuple, int] = {}  # tensor layouts of the experts (one per model, usually)
        self._layout = {
            (i, e): canon.setdefault(tuple(ts), len(canon))
            for i in plan.layers
            for e, ts in enumerate(experts.tensors[i])
        }
        self._slot_views_memo: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        # per layout: its tensors over all slots at once ([slots, ...] views, made once)
        self._rep = {lay: key for key, lay in reversed(self._layout.items())}
        self._slot_stacks: dict[int, dict[str, torch.Tensor]] = {}
        self.slot_layout: list[int | None] = [None] * n
        self._layer_stacks: dict[int, dict[str, torch.Tensor]] = {}  # resident experts'
        self.counts = {"hits": 0, "misses": 0, "cpu": 0}
        self.cpu_expert_s: float | None = None  # measured seconds per expert the CPU computed
        self._cpu_batches = 0
        self.batched = not self.in_place  # device batches as batched matmuls (layers.moe)
        # CPU batches may come: the layer reads its rows to the host with the expert ids
        self.host_rows = (
            self.cuda and not plan.resident and plan.cpu_compute != "off" and any(plan.ram)
        )
        self.routed: dict[Key, int] = {}  # calls that used each expert (a calibration's output)
        # "auto": the CPU computes RAM misses only while it measures faster (decode steps)
        auto = plan.cpu_compute == "auto" and not self.in_place and not plan.resident
        self.trial = CpuTrial(plan.layers) if auto and any(plan.ram) else None
        one = "hits and copied misses as one batch"  # then: is waiting for the copies faster?
        self.merge = CpuTrial(plan.layers, what=one, first=False) if self.batched and n else None
        self.ahead = Lookahead(self) if plan.lookahead and not plan.resident else None
        if self.cuda:
            cuda_state(self, n)
        self.direct: DirectExperts | None = None  # decode rows planned on the device
        try:
            self._load()
            self.direct = attach(self)
        except BaseException:
            self.close()
            raise

    # -- set-up -----------------------------------------------------------------------------------
    def _pin(self, nbytes: int) -> torch.Tensor:
        if not self.cuda:
            return torch.empty(nbytes, dtype=torch.uint8)
        buf = pinned_empty(nbytes, self.device)
        self._pinned.append(buf)
        return buf

    def _load(self) -> None:
        """Read the resident experts (to the device) or each layer's RAM experts (to RAM)."""
        p, st = self.plan, self.experts
        for j, i in enumerate(p.layers):
            m = p.num_experts if p.resident else p.ram[j]
            if m == 0:
                continue
            nbytes = st.range_bytes(i, 0, m)
            host = self._pin(nbytes)
            self.stats.add(bytes_disk=st.read_range(i, 0, m, host))
            buf = host
            if (p.resident or self.in_place) and i in st.decoded:  # coded: decoded once
                load_decoded(self, i, host, m)
                continue
            if p.resident and self.device.type != "cpu":
                buf = host.to(self.device)
                self.stats.add(bytes_h2d=nbytes)
                if self.cuda:
                    unpin(host)
                    self._pinned.remove(host)
            base = st.regions[i].offsets[0]
            if p.resident and len({self._layout[(i, e)] for e in range(m)}) == 1:
                rows = uniform_rows(buf, st.regions[i].offsets, st.regions[i].sizes)
                if rows is not None:  # the layer's experts at one stride: [E, ...] views
                    self._layer_stacks[i] = stacked_views(rows, st.tensors[i][0])
            for e in range(m):
                a = st.regions[i].offsets[e] - base
                raw = buf[a : a + st.regions[i].sizes[e]]
                if i not in st.decoded:  # coded: MXFP4 in pinned RAM, decoded where used
                    self._views[(i, e)] = st.views(i, e, raw)
                if not p.resident:
                    self._bytes[(i, e)] = raw

    def _host(self, i: int, e: int) -> Mapping:
        """Expert e of layer i where it sits (RAM, or resident): its views, or (coded) its
        tensors decoded on the CPU from its RAM bytes."""
        views = self._views.get((i, e))
        return views if views is not None else self.experts.decode(i, e, self._bytes[(i, e)])

    def bind(self, i: int, w: Mapping) -> Mapping:
        """Layer i's weights with its experts attached (``wrap``: ``layers.moe.sparse_weights``);
        other layers' as they are."""
        if i not in self._index:
            return w
        bound = self._bound.get(i)
        if bound is not None and bound[0] is w:
            return bound[1]
        sw = self.wrap(w, LayerExperts(self, i), self.plan.group_rows)
        self._bound[i] = (w, sw)
        return sw

    # -- one layer's experts ------------------------------------------------------------------------
    def run(self, i: int, used: list[int], counts: list[int]) -> Iterator[ExpertBatch]:
        """Experts ``used`` of layer i (``counts``: rows per expert), as ``ExpertSource.run``:
        the hits (and experts computed in place) as one batch, then the RAM misses the CPU
        computes, then the copied misses in waves (one wave when the slots allow; one by one
        in prefill)."""
        if self.plan.resident:
            batch = [(e, self._views[(i, e)]) for e in used]
            yield None, stacked_batch(batch, self._layer_stacks.get(i, {}), used)
            return
        self.host_state()
        ram = self.plan.ram[self._index[i]]
        if self.ahead is not None:
            self.ahead.check(i, used)
        hits, local, misses = [], [], []
        for e in used:
            key = (i, e)
            self.routed[key] = self.routed.get(key, 0) + 1
            s = self.where.get(key)
            self.policy.touch(key, s is not None)
            if s is not None:
                hits.append((e, s))
                self.pinned.add(key)
            elif e < ram and self.in_place:
                local.append(e)
            else:
                misses.append(e)
        merge = begin_call(self, i, used, counts)  # the trials (runtime/expert_trial.py)
        on_cpu, fetch = self._split(i, misses, counts, ram)
        if self.trial is not None:
            self.trial.ran(len(on_cpu))
        self.counts["hits"] += len(hits) + len(local)
        self.counts["misses"] += len(misses)
        self.counts["cpu"] += len(on_cpu)
        self.stats.add(
            expert_hits=len(hits) + len(local), expert_misses=len(misses), expert_cpu=len(on_cpu)
        )
        pending, inflight = deque(fetch), deque()
        try:
            self._issue(i, pending, inflight)  # the copies start before any compute is queued
            if merge and hits and inflight and not (pending or on_cpu or local):
                hits += inflight  # one batch, computed once every copy has landed
                inflight.clear()
                self.merge.ran(1)
            ready = [(e, self._host(i, e)) for e in local]
            if hits:
                batch = self._use(hits)  # a stacked batch unless experts in place join
                yield None, batch + ready if ready else batch
                self._done(hits)
            elif ready:
                yield None, ready
            self._issue(i, pending, inflight)
            if on_cpu:
                t0 = time.perf_counter()
                yield self.cpu, [(e, self._host(i, e)) for e in on_cpu]
                if max(counts[e] for e in on_cpu) <= DECODE_ROWS:  # prefill's: compute-bound
                    self._measured_cpu(len(on_cpu), time.perf_counter() - t0)
            one_by_one = sum(counts) > STREAM_PAIRS  # prefill: compute each as it lands
            while inflight:
                wave = [inflight.popleft()] if one_by_one else list(inflight)
                if not one_by_one:
                    inflight.clear()
                yield None, self._use(wave)
                self._done(wave)
                self._issue(i, pending, inflight)
            if pending:  # never silently: an expert left out would change the output
                raise RuntimeError(f"expert cache of {len(self.slot_key)} slots cannot take "
                                   f"experts {list(pending)} of layer {i}")  # fmt: skip
        finally:  # one call runs at a time: an interrupted one leaves no slot pinned
            self.pinned.clear()
            end_call(self, i)

    def _measured_cpu(self, n: int, seconds: float) -> None:
        measured_cpu(self, n, seconds)

    def _split(self, i: int, misses: list[int], counts: list[int], ram: int):
        return split_misses(self, i, misses, counts, ram)

    # -- slots ------------------------------------------------------------------------------------
    def _issue(self, i: int, pending: deque, inflight: deque) -> None:
        """Start the copies of pending misses while a slot can be taken, ``READ_THREADS`` at a
        time: the disk misses of a batch are read in parallel before their copies are issued.
        A batch that fails (a read error) unmaps its slots, so no slot is left mapped to an
        expert whose bytes never arrived."""
        while pending:
            batch: list[tuple[int, int]] = []
            while pending and len(batch) < READ_THREADS:
                s = self._take()
                if s is None:
                    break
                e = pending.popleft()
                key = (i, e)
                self.where[key] = s
                self.slot_key[s] = key
                self.policy.add(key)
                self.pinned.add(key)
                batch.append((e, s))
            if not batch:
                return
            done, reads = 0, {}
            try:
                for e, s in batch:
                    if (i, e) not in self._bytes:
                        reads[e] = self._read(i, e, s)
                ev = self._copy_start(batch)
                try:
                    for e, s in batch:
                        self._fill(i, e, s, reads.get(e), ev)
                        inflight.append((e, s))
                        done += 1
                finally:  # recorded even after a failed read: the slots filled wait on it
                    self._copy_end(ev)
            except BaseException:
                wait(list(reads.values()))  # no read may still write a slot given back
                for _, s in batch[done:]:
                    self._unmap(s)
                raise

    def _take(self) -> int | None:
        """A free slot, else the policy's victim among unpinned ones (evicted), else None."""
        if self._empty:
            return self._empty.pop()
        victim = self.policy.victim(self.pinned)
        if victim is None:
            return None
        s = self.where[victim]
        self._unmap(s)
        return self._empty.pop()

    def _unmap(self, s: int) -> None:
        """Slot s holds nothing (evicted, or its fill failed)."""
        key = self.slot_key[s]
        if key is not None:
            self.where.pop(key, None)
            self.policy.remove(key)
            self.pinned.discard(key)
        self.slot_key[s] = None
        self.undecoded.discard(s)
        self.slot_views[s] = None
        self.slot_layout[s] = None
        self._empty.append(s)

    def _read(self, i: int, e: int, s: int) -> Future:
        return read_miss(self, i, e, s)

    def _copy_start(self, batch: list[tuple[int, int]]) -> torch.cuda.Event | None:
        """A batch of copies into ``batch``'s slots waits (on the copy stream) for the newest
        last use among those slots (uses are ordered on the compute stream, so it implies the
        others); returns the event the batch's copies will record."""
        if not self.cuda:
            return None
        s = max((s for _, s in batch), key=lambda s: self.free_seq[s])
        if self.free[s] is not None:
            self.copy_stream.wait_event(self.free[s])
        self._seq += 1
        return torch.cuda.Event()

    def _copy_end(self, ev: torch.cuda.Event | None) -> None:
        if ev is not None:
            ev.record(self.copy_stream)

    def _fill(self, i: int, e: int, s: int, read: Future | None, ev=None) -> None:
        """Copy expert e of layer i into slot s, from RAM or from the staging buffer ``read``
        fills (read straight into the slot off CUDA); ``ev``: the event its batch records."""
        st = self.experts
        nbytes = st.regions[i].sizes[e]
        k = None if read is None else read.result()  # re-raises a read error
        dst = self.raw if self.coded else self.slots
        if self.coded:
            self.undecoded.add(s)
        if not self.cuda:
            if read is None:
                dst[s, :nbytes].copy_(self._bytes[(i, e)])
                self.stats.add(bytes_h2d=nbytes)
        else:
            src = self._bytes[(i, e)] if k is None else self._staging[k]
            with torch.cuda.stream(self.copy_stream):
                dst[s, :nbytes].copy_(src[:nbytes], non_blocking=True)
            self.ready[s], self.ready_seq[s] = ev, self._seq
            if k is not None:
                self._staging_done[k] = ev
            self.stats.add(bytes_h2d=nbytes)
        self._set_views(i, e, s)

    def _set_views(self, i: int, e: int, s: int) -> None:
        """Slot s now holds expert e of layer i: its views (every expert of a model has the
        same tensor layout: a slot's views are made once)."""
        sig = (s, self._layout[(i, e)])
        views = self._slot_views_memo.get(sig)
        if views is None:
            views = self.experts.views(i, e, self.slots[s], decoded=not self.plan.coded_slots)
            self._slot_views_memo[sig] = views
        self.slot_views[s] = views
        self.slot_layout[s] = sig[1]

    def host_state(self) -> None:
        """The state back from the direct decode's device tables when they hold it (a sync,
        at a phase change only: the host path runs next)."""
        if self.direct is not None and self.direct.owner == "device":
            self.direct.pull()

    def _use(self, batch: list[tuple[int, int]]) -> list[tuple[int, Mapping]]:
        """(expert, slot) pairs as (expert, its views), once their copies have landed: the
        compute stream waits for the newest copy among them (not the host)."""
        if self.cuda:
            s = max((s for _, s in batch), key=lambda s: self.ready_seq[s])
            if self.ready[s] is not None:
                torch.cuda.current_stream(self.device).wait_event(self.ready[s])
        if self.undecoded:
            self._decode(batch)
        out = []
        for e, s in batch:
            views = self.slot_views[s]
            assert views is not None
            out.append((e, views))
        lay = self.slot_layout[batch[0][1]]
        if lay is None or any(self.slot_layout[s] != lay for _, s in batch[1:]):
            return out
        return stacked_batch(out, self._stacks(lay), [s for _, s in batch])

    def _stacks(self, lay: int) -> dict[str, torch.Tensor]:
        """Layout ``lay``'s (decoded) tensors over all slots: [slots, ...] views, made once."""
        stacks = self._slot_stacks.get(lay)
        if stacks is None:
            tensors = self.slot_tensors(*self._rep[lay])
            stacks = self._slot_stacks[lay] = stacked_views(self.slots, tensors)
        return stacks

    def slot_tensors(self, i: int, e: int):
        """The tensors of expert e of layer i as a slot holds them (stored bytes with
        ``coded_slots``, else decoded)."""
        st = self.experts
        return st.tensors[i][e] if self.plan.coded_slots else st.device_tensors(i, e)

    def _decode(self, batch: list[tuple[int, int]]) -> None:
        decode_slots(self, batch)

    def _done(self, batch: list[tuple[int, int]]) -> None:
        """The compute queued so far is the last use of ``batch``'s slots by this call: one event
        marks them free, and they are unpinned."""
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._seq += 1
        for _, s in batch:
            if self.cuda:
                self.free[s], self.free_seq[s] = ev, self._seq
            key = self.slot_key[s]
            if key is not None:
                self.pinned.discard(key)

    # -- reporting and lifetime -------------------------------------------------------------------
    @property
    def hit_rate(self) -> float:
        if self.direct is not None:
            self.direct.flush()
        n = self.counts["hits"] + self.counts["misses"]
        return self.counts["hits"] / n if n else 0.0

    def cached(self) -> dict[Key, int]:
        """(layer, expert) -> slot for every cached expert (for tests and reports)."""
        self.host_state()
        return dict(self.where)

    def warm(self, freq: Mapping[Key, int]) -> int:
        """Start from a calibration run's routing counts (``routed`` of an earlier run): LFU
        counts seeded with them, and the empty slots filled with the most used experts that are
        neither cached nor computed in place. Returns how many were loaded."""
        self.host_state()
        return warm_cache(self, freq)

    def close(self) -> None:
        """Wait for reads and copies in flight, unpin the host buffers, drop the device ones."""
        detach(self)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for buf in self._pinned:
            unpin(buf)
        self._pinned.clear()
        self._views.clear()
        self._bytes.clear()
        self._bound.clear()
        self.slots = self.raw = torch.empty(0, dtype=torch.uint8)
        self.undecoded.clear()
        self.slot_views = []
        self.slot_key = []
        self._empty = []
        self._slot_views_memo.clear()
        self._slot_stacks.clear()
        self._layer_stacks.clear()
        self.where.clear()
