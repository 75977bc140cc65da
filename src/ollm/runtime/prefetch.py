"""The prefetcher: gives the runner each layer's weights on its execution device, loading the next
streamed layers while the current one computes.

Streamed layers rotate through ``ring_slots`` preallocated device buffers. A background thread
walks the streamed layers in order (cyclically, so the next step's first layers load during this
step's tail): for a disk layer it reads the file into a pinned staging buffer, then issues the
host->GPU copy on its own CUDA stream after the slot's previous user has finished (a CUDA event
recorded by the compute stream). The compute stream waits on the copy's event, never the host.
On the CPU device the same thread reads disk layers into reused RAM buffers. Nothing is allocated
or freed per layer. A loader error is re-raised in the caller by ``get``.

Lifetime: the reader thread holds only its ``_ReadPass`` (one per schedule; ``reset`` stops the
old reader, waiting for its read in progress, before a new one may touch the buffers), never the
Prefetcher, so a Prefetcher dropped without ``close`` is collected; a finalizer then stops the
reader and unpins the page-locked buffers, as ``close`` and a failed constructor do.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING

import torch

from ollm.errors import WeightReadError
from ollm.runtime.mlp_split import attention_ranges, copy_ranges, split_views
from ollm.runtime.pinned import pinned_empty, unpin
from ollm.storage.store import GLOBALS, LayerStore, layer_file
from ollm.telemetry.stats import IOStats
from ollm.tiers import Phase, Tier

if TYPE_CHECKING:  # the plan is read by attribute only (runtime sits below planning)
    from ollm.planning.placement import PlacementPlan

__all__ = ["Prefetcher", "pinned_empty", "unpin"]

log = logging.getLogger(__name__)

# A stopped reader finishes the read in progress before it exits; shutdown waits for it without
# a limit (a second reader would fill the same buffers) and logs a warning every this many s.
READER_JOIN_WARN_S = 30.0


class _ReadPass:
    """One generation of the disk reader and the state it shares with the compute thread (under
    ``cond``). Holds no reference to the Prefetcher, so the thread never keeps one alive."""

    def __init__(self, pf: Prefetcher, staging: list[torch.Tensor], slots: list[torch.Tensor]):
        self.store, self.verify, self.stats = pf.store, pf.verify, pf.stats
        self.cuda, self.timeline = pf.cuda, pf.timeline
        self.streamed = list(pf.streamed)
        self.is_disk = [pf.plan.layers[i].tier == Tier.DISK for i in self.streamed]
        self._disk_before = [sum(self.is_disk[:j]) for j in range(len(self.streamed))]
        self._disk_per_pass = sum(self.is_disk)
        self.staging, self.slots = staging, slots
        self.cond = threading.Condition()
        self.stop = False
        self.read_done: set[int] = set()  # sequence numbers whose disk read has landed
        self.error: BaseException | None = None
        self.released = 0  # sequence numbers whose slot the compute side has given back
        self.staging_issued = 0  # disk ordinals whose copy out of staging has been issued
        self.staging_done: list[torch.cuda.Event | None] = [None] * len(staging)
        self.thread: threading.Thread | None = None
        if self._disk_per_pass:
            self.thread = threading.Thread(target=self._read_loop, name="ollm-read", daemon=True)
            self.thread.start()

    def ordinal(self, n: int) -> int:
        """Disk ordinal of stream sequence number ``n`` (which staging buffer it uses)."""
        m = len(self.streamed)
        return (n // m) * self._disk_per_pass + self._disk_before[n % m]

    def _wait_free(self, n: int) -> int | None:
        """Under ``cond``: wait until ``n``'s destination is free; its staging index (GPU), or
        None once stopped."""
        k = 0
        if self.cuda:
            q = self.ordinal(n)
            k = q % len(self.staging)
            # staging k is free once the copy out of it for ordinal q - K was issued
            while not self.stop and self.staging_issued <= q - len(self.staging):
                self.cond.wait()
        else:
            while not self.stop and n - self.released >= len(self.slots):
                self.cond.wait()
        return None if self.stop else k

    def _read_loop(self) -> None:
        """Read disk-tier layers, in stream order, into staging (GPU) or ring slots (CPU)."""
        n, m = 0, len(self.streamed)
        try:
            while True:
                if not self.is_disk[n % m]:
                    n += 1
                    continue
                layer = self.streamed[n % m]
                with self.cond:
                    k = self._wait_free(n)
                    if k is None:
                        return
                    done = self.staging_done[k] if self.cuda else None
                if done is not None:
                    done.synchronize()
                dest = self.staging[k] if self.cuda else self.slots[n % len(self.slots)]
                t0 = time.perf_counter()
                nbytes = self.store.read_into(layer_file(layer), dest, self.verify)
                t1 = time.perf_counter()
                self.stats.add(bytes_disk=nbytes, read_seconds=t1 - t0)
                if self.timeline is not None:
                    self.timeline.host("read", layer, t0, t1)
                with self.cond:
                    if self.stop:  # a stopped pass publishes nothing
                        return
                    self.read_done.add(n)
                    self.cond.notify_all()
                n += 1
        except BaseException as exc:  # surfaced to the caller by get()
            with self.cond:
                self.error = exc
                self.cond.notify_all()

    def wait_read(self, n: int) -> None:
        """Block until sequence number ``n``'s disk read has landed; re-raise a reader error."""
        t0 = time.perf_counter()
        with self.cond:
            while n not in self.read_done and self.error is None:
                if self.thread is None or not self.thread.is_alive():
                    raise WeightReadError("weight reader thread stopped unexpectedly")
                self.cond.wait(timeout=1.0)
            if n not in self.read_done:
                err = self.error
                raise err if isinstance(err, Exception) else WeightReadError(str(err))
            self.read_done.discard(n)
        self.stats.add(host_wait_seconds=time.perf_counter() - t0)

    def shutdown(self) -> None:
        """Stop the reader and wait until it has exited: it finishes at most the read in
        progress, and no later reader may start while it could still write a buffer."""
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        t = self.thread
        if t is None or t is threading.current_thread():  # finalized from the reader itself
            return
        waited = 0.0
        while True:
            t.join(READER_JOIN_WARN_S)
            if not t.is_alive():
                return
            waited += READER_JOIN_WARN_S
            log.warning("the weight reader is still in a read after %.0f s; waiting", waited)


class _Owned:
    """What a Prefetcher gives back on ``close``, on a failed constructor, or (dropped unclosed)
    from its finalizer: the reader thread and the page-locked buffers. Holds no reference to the
    Prefetcher (a finalizer's callback must not)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reader: _ReadPass | None = None
        self.pinned: list[torch.Tensor] = []

    def stop_reader(self) -> None:
        reader, self.reader = self.reader, None
        if reader is not None:
            reader.shutdown()

    def release(self) -> None:
        self.stop_reader()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no copy may still read the pages
        for buf in self.pinned:
            unpin(buf)
        self.pinned.clear()


class Prefetcher:
    """Weights of layer i on its execution device: resident views, or a streamed ring slot."""

    def __init__(
        self, store: LayerStore, plan: PlacementPlan, stats: IOStats, verify: bool = True
    ) -> None:
        self.store, self.plan, self.stats, self.verify = store, plan, stats, verify
        self._timeline = None  # an ollm.telemetry.timeline.Timeline records spans when set
        self.experts = None  # runtime.experts.ExpertCache when experts are cached one by one
        # Called with a layer index inside the copy stream right after that layer's weight copy
        # is issued (the KV fetcher queues the layer's KV behind it).
        self.on_issue = None
        self.device = torch.device(plan.device)
        self.cuda = self.device.type == "cuda"
        self.phase = Phase.PREFILL
        self.streamed = plan.streamed_for(self.phase)
        self._streamed_set = set(self.streamed)
        self._host_views: dict[int, dict[str, torch.Tensor]] = {}  # hybrid decode on the CPU
        self._slot_views: dict[tuple, dict[str, torch.Tensor]] = {}  # (slot, layer, MLP split)
        self._mlp_ranges = {i: attention_ranges(store, layer_file(i))  # their MLP on the CPU
                            for i, p in enumerate(plan.layers) if p.mlp_cpu}  # fmt: skip
        self._resident: dict[int, dict[str, torch.Tensor]] = {}
        self._resident_ready: dict[int, torch.cuda.Event] = {}  # decode-resident copies
        # pinned RAM copies of cpu-tier layers (GPU device)
        self._host: dict[int, torch.Tensor] = {}
        self._own = _Owned(self.device)
        self._pinned = self._own.pinned
        self._finalizer = weakref.finalize(self, self._own.release)
        self._finalizer.atexit = False  # at exit the daemon reader and the pages just go
        self._stall_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._copy_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._ready: dict[int, torch.cuda.Event] = {}  # seq -> copy-done event
        self._consumed = 0  # next sequence number get() will hand out
        self._issued = 0  # next sequence number to copy host->GPU
        try:
            self._allocate()
        except BaseException:
            self._finalizer()  # give back what was pinned so far now, not at collection
            raise

    def _allocate(self) -> None:
        self._load_resident()
        lb = self.plan.layer_bytes
        ring_dev = self.device if self.cuda else torch.device("cpu")
        self._slots = [
            torch.empty(lb, dtype=torch.uint8, device=ring_dev) for _ in range(self.plan.ring_slots)
        ]
        self._staging = [self._pin(lb) for _ in range(self.plan.staging_slots)]
        if self.cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            self._slot_free = [torch.cuda.Event() for _ in self._slots]
        if self.streamed:
            self._start()

    @property
    def copy_stream(self):
        """The CUDA stream that carries host->GPU weight copies (None off CUDA)."""
        return self._copy_stream if self.cuda else None

    @property
    def timeline(self):
        """An ollm.telemetry.timeline.Timeline recording reads and copies, or None."""
        return self._timeline

    @timeline.setter
    def timeline(self, timeline) -> None:
        self._timeline = timeline
        if self._own.reader is not None:
            self._own.reader.timeline = timeline

    # -- set-up ---------------------------------------------------------------------------------
    def _pin(self, nbytes: int) -> torch.Tensor:
        # The host CPU computes from RAM directly; any other device is fed by DMA from it.
        if self.plan.device == "cpu":
            return torch.empty(nbytes, dtype=torch.uint8)
        buf = pinned_empty(nbytes, self.device)
        self._pinned.append(buf)
        return buf

    def _load_resident(self) -> None:
        staging = None
        for i, p in enumerate(self.plan.layers):
            f = layer_file(i)
            if i in self._streamed_set and p.tier != Tier.CPU:
                continue
            if i in self._streamed_set:  # cpu tier streamed to the GPU: keep a pinned RAM copy
                buf = self._pin(self.store.files[f].nbytes)
                self.stats.add(bytes_disk=self.store.read_into(f, buf, self.verify))
                self._host[i] = buf
                if p.decode_device == "cpu" or p.mlp_cpu:
                    self._host_views[i] = self.store.views(f, buf)
                continue
            if p.exec_device == "cpu" or not self.cuda:
                buf = torch.empty(self.store.files[f].nbytes, dtype=torch.uint8)
                self.stats.add(bytes_disk=self.store.read_into(f, buf, self.verify))
            else:
                if staging is None:  # freed (and unregistered) when this function returns
                    staging = pinned_empty(self.plan.layer_bytes, self.device)
                n = self.store.read_into(f, staging, self.verify)
                buf = staging[:n].to(p.exec_device)  # synchronous: staging is reused next
                self.stats.add(bytes_disk=n, bytes_h2d=n)
            self._resident[i] = self.store.views(f, buf)
        self._load_globals()

    def _load_globals(self) -> None:
        g = self.store.files[GLOBALS]
        buf = torch.empty(g.nbytes, dtype=torch.uint8)
        self.stats.add(bytes_disk=self.store.read_into(GLOBALS, buf, self.verify))
        cpu_views = self.store.views(GLOBALS, buf)
        self.globals: dict[str, torch.Tensor] = {}
        for name, t in cpu_views.items():
            dev = self.plan.embed_device if name == "embed_tokens.weight" else self.plan.head_device
            self.globals[name] = t.to(dev) if dev != "cpu" else t
        if "lm_head.weight" not in self.globals:
            emb = cpu_views["embed_tokens.weight"]
            self.globals["lm_head.weight"] = (
                self.globals["embed_tokens.weight"]
                if self.plan.embed_device == self.plan.head_device
                else emb.to(self.plan.head_device)
            )

    # -- disk reader thread ---------------------------------------------------------------------
    def _start(self) -> None:
        """Start a new reader pass from the schedule's first layer; the old one must be gone."""
        assert self._own.reader is None, "a reader pass is still running"
        self._own.reader = _ReadPass(self, self._staging, self._slots)

    # -- host->GPU copies, issued from the compute thread (no thread hand-off per layer) ----------
    def _issue(self, n: int) -> None:
        rp = self._own.reader
        m = len(self.streamed)
        layer = self.streamed[n % m]
        slot = n % len(self._slots)
        disk = rp.is_disk[n % m]
        if disk:
            rp.wait_read(n)
            k = rp.ordinal(n) % len(self._staging)
            src = self._staging[k]
        else:
            src = self._host[layer]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(self._slot_free[slot])
            start.record(self._copy_stream)
            nbytes = copy_ranges(self._slots[slot], src, self._ranges(layer), True)
            end.record(self._copy_stream)
            if self.on_issue is not None:
                self.on_issue(layer)
        self._copy_events.append((start, end))
        if self._timeline is not None:
            self._timeline.cuda("copy", layer, start, end)
        self._ready[n] = end
        self.stats.add(bytes_h2d=nbytes)
        if disk:
            with rp.cond:
                rp.staging_done[k] = end
                rp.staging_issued += 1
                rp.cond.notify_all()
        self._issued = n + 1

    def _pump(self, until: int) -> None:
        """Issue copies while ring slots are free: always up to ``until``, beyond it only for
        sources already in RAM (so the compute thread never blocks on a read it does not need)."""
        rp = self._own.reader
        m = len(self.streamed)
        while self._issued - rp.released < len(self._slots):
            n = self._issued
            if n > until and rp.is_disk[n % m]:
                with rp.cond:
                    if n not in rp.read_done:
                        return
            self._issue(n)

    # -- compute side -------------------------------------------------------------------------------
    def get(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's tensors on its execution device, ready for the current stream to use."""
        if i in self._resident:
            ready = self._resident_ready.pop(i, None)
            if ready is not None:  # a decode-resident layer's copy, issued when decode began
                torch.cuda.current_stream(self.device).wait_event(ready)
            return self._resident[i]
        if i not in self._streamed_set:
            return self._host_views[i]  # computed where it sits (hybrid decode)
        n = self._consumed
        expected = self.streamed[n % len(self.streamed)]
        if expected != i:
            raise RuntimeError(f"prefetcher out of order: asked for layer {i}, next is {expected}")
        self._consumed = n + 1
        slot = n % len(self._slots)
        rp = self._own.reader
        if self.cuda:
            self._pump(n)
            event = self._ready.pop(n)
            stream = torch.cuda.current_stream(self.device)
            before, after = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
            before.record(stream)
            stream.wait_event(event)
            after.record(stream)
            self._stall_events.append((before, after))
        elif rp.is_disk[n % len(self.streamed)]:
            rp.wait_read(n)
        else:  # a RAM layer on a device without a copy engine: the copy is this thread's work
            nbytes = copy_ranges(self._slots[slot], self._host[i], self._ranges(i), False)
            self.stats.add(bytes_h2d=nbytes)
        split = self.phase == Phase.DECODE and i in self._mlp_ranges
        views = self._slot_views.get((slot, i, split))
        if views is None:  # the ring's buffers never move: build each slot's views once
            views = self.store.views(layer_file(i), self._slots[slot])
            views = split_views(views, self._host_views[i]) if split else views
            self._slot_views[(slot, i, split)] = views
        return views

    def _ranges(self, layer: int) -> list[tuple[int, int]]:
        """What a copy of ``layer`` moves: in decode only its attention when the CPU runs its MLP
        (``planning/mlp_cpu.py``), else the whole layer."""
        if self.phase == Phase.DECODE and layer in self._mlp_ranges:
            return self._mlp_ranges[layer]
        return [(0, self.store.layer_nbytes(layer))]

    def release(self, i: int) -> None:
        """The current stream is done with layer i's buffer once the work queued so far finishes."""
        if i in self._resident or i not in self._streamed_set:
            return
        slot = (self._consumed - 1) % len(self._slots)
        if self.cuda:
            self._slot_free[slot].record(torch.cuda.current_stream(self.device))
        rp = self._own.reader
        with rp.cond:
            rp.released += 1
            rp.cond.notify_all()
        if self.cuda:
            self._pump(self._consumed - 1)

    def collect_timings(self) -> None:
        """Fold CUDA event timings (copy time, compute stalls) into the stats; synchronizes."""
        if not self.cuda:
            return
        torch.cuda.synchronize(self.device)  # copies are issued by this thread: all are done
        copies, self._copy_events = self._copy_events, []
        stalls, self._stall_events = self._stall_events, []
        self.stats.add(
            copy_seconds=sum(s.elapsed_time(e) for s, e in copies) / 1e3,
            gpu_stall_seconds=sum(b.elapsed_time(a) for b, a in stalls) / 1e3,
        )

    def set_phase(self, phase: Phase) -> None:
        """Switch the streamed-layer schedule (prefill streams every non-resident layer; hybrid
        decode only those the GPU computes); in-flight loads of the old schedule are dropped."""
        if phase == self.phase:
            return
        self.collect_timings()  # keep the old schedule's event timings
        self.phase = phase
        self.streamed = self.plan.streamed_for(phase)
        self._streamed_set = set(self.streamed)
        self.reset()
        if self.plan.decode_resident:
            self._hold_decode_resident(False)  # a prefill: its activations take their bytes
            if self.cuda:
                # Once per switch, after reset's synchronize (the last forward's tensors are
                # gone): the cached blocks go back, so held layers (or the prefill's activations)
                # get fresh segments instead of splitting the other phase's, which on an H200
                # left the peak reserved above the budget (planning/decode_resident.py).
                torch.cuda.empty_cache()
            self._hold_decode_resident(phase == Phase.DECODE)

    def _hold_decode_resident(self, hold: bool) -> None:
        """Decode-resident layers (``planning/decode_resident.py``): copied from their pinned RAM
        to GPU buffers of their own on the copy stream when decode starts (the compute stream
        waits for each at its ``get``), dropped when a prefill-size forward comes, whose
        activations the planner counted in the same bytes."""
        for i in self.plan.decode_resident:
            if not hold:
                self._resident.pop(i, None)
                self._resident_ready.pop(i, None)
                continue
            host = self._host[i]
            if not self.cuda:  # no copy engine: the pinned RAM copy is the layer's buffer
                self._resident[i] = self.store.views(layer_file(i), host)
                continue
            buf = torch.empty(host.numel(), dtype=torch.uint8, device=self.device)
            ready = torch.cuda.Event()
            with torch.cuda.stream(self._copy_stream):
                buf.copy_(host, non_blocking=True)
                ready.record(self._copy_stream)
            buf.record_stream(self._copy_stream)
            self.stats.add(bytes_h2d=host.numel())
            self._resident[i] = self.store.views(layer_file(i), buf)
            self._resident_ready[i] = ready

    def reset(self) -> None:
        """Drop in-flight loads (after an interrupted pass) and restart from layer order's start.
        The old reader has exited before the new one starts (both would fill the same buffers)."""
        self._own.stop_reader()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._ready.clear()
        self._copy_events.clear()
        self._stall_events.clear()
        self._consumed = self._issued = 0
        if self.streamed:
            self._start()

    def close(self) -> None:
        """Stop the reader, unpin the page-locked buffers and drop the device buffers."""
        self._finalizer()
        self._host.clear()
        self._resident.clear()
        self._resident_ready.clear()
        self._slots.clear()
        self._slot_views.clear()
        self.globals = {}  # the head too: a re-plan loads its own before this object goes
        if self.experts is not None:  # its copies and pinned pages go with the placement
            self.experts.close()
            self.experts = None
        self.store.close()
