"""Small host->GPU transfers that do not wait behind the weight stream.

The GPU's copy engine serves host->GPU copies in the order they were queued, whatever their
stream: a 128 KB attention output copied to the GPU while a streamed layer's 416 MB is in flight
waits for the rest of that copy (H200, `scripts/gpu/copy_overlap_micro.py`: 0.02 ms alone, 6.8 ms
behind the copy, also from a high-priority stream or with the big copy in 4 MB pieces). A hybrid
decode step (KV or layers computed on the CPU) hands such a result back at every layer, so the
step took the *sum* of the weight stream and the CPU's work instead of their max.

A kernel can read pinned host memory itself (unified addressing: the host pointer is the device
pointer), without the copy engine: 0.09 ms for the same transfer behind the same copy.
``to_device(t, device)`` copies a small CPU tensor into one of a ring of pinned buffers (a host
memcpy) and has the GPU read it from there on the current stream; larger tensors, tensors already
on a device and non-CUDA targets take ``Tensor.to``. ``OLLM_UVA=0`` turns it off.
"""

from __future__ import annotations

import os
import threading

import torch

MAX_BYTES = 8 << 20  # larger transfers are bandwidth, not latency: the copy engine's job
RING = 16  # buffers per device; one is reused only once the GPU has read it (its event)
_LOCK = threading.Lock()
_RINGS: dict[torch.device, _Ring] = {}


def enabled() -> bool:
    """Whether small host->GPU transfers go through kernel reads (``OLLM_UVA``, default on)."""
    return os.environ.get("OLLM_UVA", "1") not in ("0", "off", "false")


def device_view(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA uint8 tensor over the pinned host buffer ``host`` (same bytes, no copy)."""

    class _Iface:
        __cuda_array_interface__ = {
            "shape": (host.numel() * host.element_size(),),
            "typestr": "|u1",
            "data": (host.data_ptr(), False),
            "version": 3,
            "strides": None,
        }

    return torch.as_tensor(_Iface(), device=device)


class _Ring:
    """Pinned buffers with a device view each and the event after the GPU's last read."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.slots: list[list] = [[None, None, None] for _ in range(RING)]  # host, view, event
        self.next = 0

    def put(self, t: torch.Tensor) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        slot = self.slots[self.next]
        self.next = (self.next + 1) % RING
        host, view, event = slot
        # the GPU's read of this buffer, RING transfers ago, is usually long done: a query
        # (no host sync) says so, and only an unfinished read is waited for
        if event is not None and not event.query():
            event.synchronize()
        if host is None or host.numel() < nbytes:
            size = max(nbytes, 1 << 16)
            with torch.cuda.device(self.device):  # pinned from the reading device's context
                host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            view = device_view(host, self.device)
            slot[0], slot[1] = host, view
        host[:nbytes].view(t.dtype).view(t.shape).copy_(t)
        out = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        word = 4 if nbytes % 4 == 0 else 1
        kind = torch.int32 if word == 4 else torch.uint8
        torch.add(view[:nbytes].view(kind), 0, out=out.view(kind))  # a kernel, bit-exact
        if event is None:
            event = slot[2] = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return out.view(t.dtype).view(t.shape)


def to_device(
    t: torch.Tensor, device: torch.device | str, non_blocking: bool = False
) -> torch.Tensor:
    """``t`` on ``device``: a small CPU tensor for a CUDA device read by a kernel from pinned
    memory (queued on the current stream, never behind the copy engine; ``t`` may change or go
    at once), else ``t.to(device, non_blocking=non_blocking)``; with ``OLLM_UVA=0`` a small
    tensor asked not to block goes through a pinned copy (from pageable memory the copy would
    wait for the GPU)."""
    device = torch.device(device)
    small = t.numel() * t.element_size() <= MAX_BYTES and t.numel() > 0
    if device.type != "cuda" or t.device.type != "cpu" or not small:
        return t.to(device, non_blocking=non_blocking)
    if not enabled():
        src = t.pin_memory() if non_blocking and not t.is_pinned() else t
        return src.to(device, non_blocking=non_blocking)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _LOCK:
        ring = _RINGS.get(device)
        if ring is None:
            ring = _RINGS[device] = _Ring(device)
        return ring.put(t)
