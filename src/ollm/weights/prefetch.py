"""The prefetcher: gives the runner each layer's weights on its execution device, loading the next
streamed layers while the current one computes.

Streamed layers rotate through ``ring_slots`` preallocated device buffers. A background thread
walks the streamed layers in order (cyclically, so the next step's first layers load during this
step's tail): for a disk layer it reads the file into a pinned staging buffer, then issues the
host->GPU copy on its own CUDA stream after the slot's previous user has finished (a CUDA event
recorded by the compute stream). The compute stream waits on the copy's event, never the host.
On the CPU device the same thread reads disk layers into reused RAM buffers. Nothing is allocated
or freed per layer. A loader error is re-raised in the caller by ``get``.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from ollm.errors import WeightReadError
from ollm.telemetry.stats import IOStats
from ollm.weights.placement import PlacementPlan
from ollm.weights.store import GLOBALS, LayerStore, layer_file

log = logging.getLogger(__name__)


def pinned_empty(nbytes: int) -> torch.Tensor:
    """A page-locked uint8 host buffer of exactly ``nbytes`` (cudaHostRegister: no power-of-two
    rounding as with the caching host allocator); plain memory when no GPU is present."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if not torch.cuda.is_available() or nbytes == 0:
        return buf
    err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)
    if int(err) != 0:
        log.warning(
            "cudaHostRegister failed (%s); falling back to the caching pinned allocator", err
        )
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    _REGISTERED[buf.data_ptr()] = buf
    return buf


_REGISTERED: dict[int, torch.Tensor] = {}


def unpin(buf: torch.Tensor) -> None:
    if _REGISTERED.pop(buf.data_ptr(), None) is not None:
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())


class Prefetcher:
    """Weights of layer i on its execution device: resident views, or a streamed ring slot."""

    def __init__(
        self, store: LayerStore, plan: PlacementPlan, stats: IOStats, verify: bool = True
    ) -> None:
        self.store, self.plan, self.stats, self.verify = store, plan, stats, verify
        self.timeline = None  # an ollm.telemetry.timeline.Timeline records spans when set
        # Called with a layer index inside the copy stream right after that layer's weight copy
        # is issued (the KV fetcher queues the layer's KV behind it).
        self.on_issue = None
        self.device = torch.device(plan.device)
        self.cuda = self.device.type == "cuda"
        self.phase = "prefill"
        self.streamed = plan.streamed_for(self.phase)
        self._streamed_set = set(self.streamed)
        self._host_views: dict[int, dict[str, torch.Tensor]] = {}  # hybrid decode on the CPU
        self._slot_views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (slot, layer)
        self._pinned: list[torch.Tensor] = []
        self._resident: dict[int, dict[str, torch.Tensor]] = {}
        self._host: dict[
            int, torch.Tensor
        ] = {}  # pinned RAM copies of cpu-tier layers (GPU device)
        self._load_resident()
        lb = plan.layer_bytes
        ring_dev = self.device if self.cuda else torch.device("cpu")
        self._slots = [
            torch.empty(lb, dtype=torch.uint8, device=ring_dev) for _ in range(plan.ring_slots)
        ]
        self._staging = [self._pin(lb) for _ in range(plan.staging_slots)]
        if self.cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            self._slot_free = [torch.cuda.Event() for _ in self._slots]
            self._staging_done: list[torch.cuda.Event | None] = [None] * len(self._staging)
        self._stall_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._copy_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._cond = threading.Condition()
        self._ready: dict[int, torch.cuda.Event] = {}  # seq -> copy-done event
        self._read_done: set[int] = set()  # seqs whose disk read has landed
        self._error: BaseException | None = None
        self._consumed = 0  # next sequence number get() will hand out
        self._released = 0  # sequence numbers whose slot the compute side has given back
        self._issued = 0  # next sequence number to copy host->GPU
        self._staging_issued = 0  # disk ordinals whose copy out of staging has been issued
        self._stop = False
        self._thread: threading.Thread | None = None
        if self.streamed:
            self._start()

    @property
    def copy_stream(self):
        """The CUDA stream that carries host->GPU weight copies (None off CUDA)."""
        return self._copy_stream if self.cuda else None

    # -- set-up ---------------------------------------------------------------------------------
    def _pin(self, nbytes: int) -> torch.Tensor:
        if not self.cuda:
            return torch.empty(nbytes, dtype=torch.uint8)
        buf = pinned_empty(nbytes)
        self._pinned.append(buf)
        return buf

    def _load_resident(self) -> None:
        staging = None
        for i, p in enumerate(self.plan.layers):
            f = layer_file(i)
            if i in self._streamed_set and p.tier != "cpu":
                continue
            if i in self._streamed_set:  # cpu tier streamed to the GPU: keep a pinned RAM copy
                buf = self._pin(self.store.files[f].nbytes)
                self.stats.add(bytes_disk=self.store.read_into(f, buf, self.verify))
                self._host[i] = buf
                if p.decode_device == "cpu":
                    self._host_views[i] = self.store.views(f, buf)
                continue
            if p.exec_device == "cpu" or not self.cuda:
                buf = torch.empty(self.store.files[f].nbytes, dtype=torch.uint8)
                self.stats.add(bytes_disk=self.store.read_into(f, buf, self.verify))
            else:
                if staging is None:
                    staging = torch.empty(self.plan.layer_bytes, dtype=torch.uint8, pin_memory=True)
                n = self.store.read_into(f, staging, self.verify)
                buf = staging[:n].to(p.exec_device)
                self.stats.add(bytes_disk=n, bytes_h2d=n)
            self._resident[i] = self.store.views(f, buf)
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
        self._stop = False
        m = len(self.streamed)
        self._is_disk = [self.plan.layers[i].tier == "disk" for i in self.streamed]
        self._disk_before = [sum(self._is_disk[:j]) for j in range(m)]
        self._disk_per_pass = sum(self._is_disk)
        self._thread = None
        if self._disk_per_pass:
            self._thread = threading.Thread(target=self._read_loop, name="ollm-read", daemon=True)
            self._thread.start()

    def _disk_ordinal(self, n: int) -> int:
        m = len(self.streamed)
        return (n // m) * self._disk_per_pass + self._disk_before[n % m]

    def _read_loop(self) -> None:
        """Read disk-tier layers, in stream order, into staging (GPU) or ring slots (CPU)."""
        n = self._consumed
        m = len(self.streamed)
        try:
            while True:
                if not self._is_disk[n % m]:
                    n += 1
                    continue
                layer = self.streamed[n % m]
                with self._cond:
                    if self.cuda:
                        q = self._disk_ordinal(n)
                        k = q % len(self._staging)
                        # staging k is free once the copy out of it for ordinal q - K was issued
                        while not self._stop and self._staging_issued <= q - len(self._staging):
                            self._cond.wait()
                    else:
                        while not self._stop and n - self._released >= len(self._slots):
                            self._cond.wait()
                    if self._stop:
                        return
                    done = self._staging_done[k] if self.cuda else None
                if done is not None:
                    done.synchronize()
                dest = self._staging[k] if self.cuda else self._slots[n % len(self._slots)]
                f = layer_file(layer)
                t0 = time.perf_counter()
                nbytes = self.store.read_into(f, dest, self.verify)
                t1 = time.perf_counter()
                self.stats.add(bytes_disk=nbytes, read_seconds=t1 - t0)
                if self.timeline is not None:
                    self.timeline.host("read", layer, t0, t1)
                with self._cond:
                    self._read_done.add(n)
                    self._cond.notify_all()
                n += 1
        except BaseException as exc:  # surfaced to the caller by get()
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _wait_read(self, n: int) -> None:
        t0 = time.perf_counter()
        with self._cond:
            while n not in self._read_done and self._error is None:
                if self._thread is None or not self._thread.is_alive():
                    raise WeightReadError("weight reader thread stopped unexpectedly")
                self._cond.wait(timeout=1.0)
            if n not in self._read_done:
                err = self._error
                raise err if isinstance(err, Exception) else WeightReadError(str(err))
            self._read_done.discard(n)
        self.stats.add(host_wait_seconds=time.perf_counter() - t0)

    # -- host->GPU copies, issued from the compute thread (no thread hand-off per layer) ----------
    def _issue(self, n: int) -> None:
        m = len(self.streamed)
        layer = self.streamed[n % m]
        slot = n % len(self._slots)
        nbytes = self.store.layer_nbytes(layer)
        disk = self._is_disk[n % m]
        if disk:
            self._wait_read(n)
            k = self._disk_ordinal(n) % len(self._staging)
            src = self._staging[k]
        else:
            src = self._host[layer]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(self._slot_free[slot])
            start.record(self._copy_stream)
            self._slots[slot][:nbytes].copy_(src[:nbytes], non_blocking=True)
            end.record(self._copy_stream)
            if self.on_issue is not None:
                self.on_issue(layer)
        self._copy_events.append((start, end))
        if self.timeline is not None:
            self.timeline.cuda("copy", layer, start, end)
        self._ready[n] = end
        self.stats.add(bytes_h2d=nbytes)
        if disk:
            with self._cond:
                self._staging_done[k] = end
                self._staging_issued += 1
                self._cond.notify_all()
        self._issued = n + 1

    def _pump(self, until: int) -> None:
        """Issue copies while ring slots are free: always up to ``until``, beyond it only for
        sources already in RAM (so the compute thread never blocks on a read it does not need)."""
        m = len(self.streamed)
        while self._issued - self._released < len(self._slots):
            n = self._issued
            if n > until and self._is_disk[n % m]:
                with self._cond:
                    if n not in self._read_done:
                        return
            self._issue(n)

    # -- compute side -------------------------------------------------------------------------------
    def get(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's tensors on its execution device, ready for the current stream to use."""
        if i in self._resident:
            return self._resident[i]
        if i not in self._streamed_set:
            return self._host_views[i]  # computed where it sits (hybrid decode)
        n = self._consumed
        expected = self.streamed[n % len(self.streamed)]
        if expected != i:
            raise RuntimeError(f"prefetcher out of order: asked for layer {i}, next is {expected}")
        self._consumed = n + 1
        slot = n % len(self._slots)
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
        elif self._is_disk[n % len(self.streamed)]:
            self._wait_read(n)
        else:  # a RAM layer on a device without a copy engine: the copy is this thread's work
            nbytes = self.store.layer_nbytes(i)
            self._slots[slot][:nbytes].copy_(self._host[i][:nbytes])
            self.stats.add(bytes_h2d=nbytes)
        views = self._slot_views.get((slot, i))
        if views is None:  # the ring's buffers never move: build each slot's views once
            views = self._slot_views[(slot, i)] = self.store.views(layer_file(i), self._slots[slot])
        return views

    def release(self, i: int) -> None:
        """The current stream is done with layer i's buffer once the work queued so far finishes."""
        if i in self._resident or i not in self._streamed_set:
            return
        slot = (self._consumed - 1) % len(self._slots)
        if self.cuda:
            self._slot_free[slot].record(torch.cuda.current_stream(self.device))
        with self._cond:
            self._released += 1
            self._cond.notify_all()
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

    def set_phase(self, phase: str) -> None:
        """Switch the streamed-layer schedule (prefill streams every non-resident layer; hybrid
        decode only those the GPU computes); in-flight loads of the old schedule are dropped."""
        if phase == self.phase:
            return
        self.collect_timings()  # keep the old schedule's event timings
        self.phase = phase
        self.streamed = self.plan.streamed_for(phase)
        self._streamed_set = set(self.streamed)
        self.reset()

    def reset(self) -> None:
        """Drop in-flight loads (after an interrupted pass) and restart from layer order's start."""
        self._shutdown_thread()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._ready.clear()
        self._read_done.clear()
        self._copy_events.clear()
        self._stall_events.clear()
        self._error = None
        self._consumed = self._released = self._issued = self._staging_issued = 0
        if self.cuda:
            self._staging_done = [None] * len(self._staging)
        if self.streamed:
            self._start()

    def _shutdown_thread(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def close(self) -> None:
        self._shutdown_thread()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for buf in self._pinned:
            unpin(buf)
        self._pinned.clear()
        self._host.clear()
        self._resident.clear()
        self._slots.clear()
        self._slot_views.clear()
        self.store.close()
