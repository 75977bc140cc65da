"""I/O counters shared by the prefetcher and the runner; plain data, no imports upward."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class IOStats:
    """Bytes moved and seconds spent moving them, accumulated over a request.

    Two different waits for weights are kept apart: ``host_wait_seconds`` is time the compute
    thread blocked on the disk reader; ``gpu_stall_seconds`` (CUDA only) is time the compute
    stream stalled on copy events, measured with CUDA events (the host did not block then).
    """

    bytes_disk: int = 0
    bytes_h2d: int = 0
    read_seconds: float = 0.0
    copy_seconds: float = 0.0
    host_wait_seconds: float = 0.0
    gpu_stall_seconds: float = 0.0
    cpu_seconds: float = 0.0  # time the CPU path computed layers (hybrid decode)
    kv_read_tokens: int = 0  # decode: key slots routed attention read (all KV heads)
    kv_total_tokens: int = 0  # decode: key slots those layers hold (what full attention reads)
    expert_hits: int = 0  # routed experts found on the device (cache hit, resident or in place)
    expert_misses: int = 0  # routed experts fetched (or, with ``expert_cpu``, run on the CPU)
    expert_cpu: int = 0  # misses computed by the CPU where they sit in RAM
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # callables that add counts kept elsewhere (on a device) before a snapshot reads them
    flushers: list = field(default_factory=list, repr=False, compare=False)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for key, value in deltas.items():
                setattr(self, key, getattr(self, key) + value)

    def snapshot(self) -> dict[str, float]:
        for flush in list(self.flushers):
            flush()
        with self._lock:
            return {
                "bytes_disk": self.bytes_disk,
                "bytes_h2d": self.bytes_h2d,
                "read_seconds": self.read_seconds,
                "copy_seconds": self.copy_seconds,
                "host_wait_seconds": self.host_wait_seconds,
                "gpu_stall_seconds": self.gpu_stall_seconds,
                "cpu_seconds": self.cpu_seconds,
                "expert_hits": self.expert_hits,
                "expert_misses": self.expert_misses,
                "expert_cpu": self.expert_cpu,
                "kv_read_tokens": self.kv_read_tokens,
                "kv_total_tokens": self.kv_total_tokens,
            }
