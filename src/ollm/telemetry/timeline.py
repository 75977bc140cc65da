"""Per-layer timeline of disk reads, host->GPU copies and compute, for ``ollm bench --plot``.

Host spans use ``time.perf_counter``; CUDA spans are event pairs placed on the host clock through
an anchor event recorded at start. Recording is off unless a Timeline is attached.

``phase(timeline, kind)``: a host span around a phase of a step outside the layers (the batch
engine's "schedule", "moves", "layout", "writes", "sample", "update"; the runner's "start",
"embed", "prep" per layer and "head"); layer -1 for a step-wide phase. Nothing is timed when the timeline is None.
A phase marked ``sync`` ends on a device sync in the code (e.g. the sampled tokens read to the
host); with ``Timeline(sync_phases=True)`` every phase ends on one, so its span also holds the
device work it queued (and whatever was queued before it). ``Timeline.synced`` names the kinds
whose spans ended on a sync.
"""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Span:
    """One activity: ``kind`` is "read", "copy", "compute" or "cpu"; seconds from the start."""

    kind: str
    layer: int
    start: float
    end: float


class Timeline:
    """Collects spans from the loader thread, the copy stream and the compute stream."""

    def __init__(self, device: str | torch.device = "cpu", sync_phases: bool = False) -> None:
        self.device = torch.device(device)
        self.sync_phases = sync_phases and self.device.type == "cuda"
        self.synced: set[str] = set()  # phase kinds whose spans ended on a device sync
        self._lock = threading.Lock()
        self._host: list[Span] = []
        self._cuda: list[tuple[str, int, object, object]] = []
        self.t0 = time.perf_counter()
        self._anchor = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._anchor = torch.cuda.Event(enable_timing=True)
            self._anchor.record(torch.cuda.current_stream(self.device))
            self.t0 = time.perf_counter()

    def host(self, kind: str, layer: int, t_start: float, t_end: float) -> None:
        with self._lock:
            self._host.append(Span(kind, layer, t_start - self.t0, t_end - self.t0))

    def cuda(self, kind: str, layer: int, start: object, end: object) -> None:
        with self._lock:
            self._cuda.append((kind, layer, start, end))

    def spans(self) -> list[Span]:
        """All spans on one clock (synchronizes the device to resolve CUDA events)."""
        out = list(self._host)
        if self._cuda:
            torch.cuda.synchronize(self.device)
            for kind, layer, s, e in self._cuda:
                a = self._anchor.elapsed_time(s) / 1e3  # type: ignore[union-attr]
                b = self._anchor.elapsed_time(e) / 1e3  # type: ignore[union-attr]
                out.append(Span(kind, layer, a, b))
        return sorted(out, key=lambda sp: sp.start)


class _Phase:
    """The context of `phase` while a timeline records."""

    __slots__ = ("tl", "kind", "layer", "sync", "t0")

    def __init__(self, tl: Timeline, kind: str, layer: int, sync: bool) -> None:
        self.tl, self.kind, self.layer, self.sync = tl, kind, layer, sync

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        tl = self.tl
        if tl.sync_phases:
            torch.cuda.synchronize(tl.device)
        if self.sync or tl.sync_phases:
            tl.synced.add(self.kind)
        tl.host(self.kind, self.layer, self.t0, time.perf_counter())


_OFF = nullcontext()  # reusable: entering and leaving it does nothing


def phase(
    timeline: Timeline | None, kind: str, layer: int = -1, sync: bool = False
) -> AbstractContextManager[None]:
    """A context that records a host span of ``kind`` on ``timeline`` (the module docstring);
    with no timeline (the default everywhere) a shared no-op context."""
    return _OFF if timeline is None else _Phase(timeline, kind, layer, sync)
