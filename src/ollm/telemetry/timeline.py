"""Per-layer timeline of disk reads, host->GPU copies and compute, for ``ollm bench --plot``.

Host spans use ``time.perf_counter``; CUDA spans are event pairs placed on the host clock through
an anchor event recorded at start. Recording is off unless a Timeline is attached.
"""

from __future__ import annotations

import threading
import time
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

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
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
