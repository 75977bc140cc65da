"""Host syncs of decode steps counted on the CPU stand-in accelerator ("cpu:1", as in
tests/test_moe_experts.py), for tests/test_moe_syncs.py and scripts/moe_syncs.py.

The GPU is modelled as finishing queued work only when the host waits for it (the worst case
for syncs): a CUDA event is done once a host sync follows its record. Counted as host syncs,
as torch.profiler's ``cudaStreamSynchronize`` / ``cudaEventSynchronize`` /
``cudaDeviceSynchronize`` calls (``bench.stepprof.request_calls``) are:

* ``layers.moe._to_host``: one stream synchronize on CUDA (the expert ids, with lookahead's
  prediction and the rows when the CPU may compute, read back together);
* every ``synchronize`` of an event or stream in ``runtime/uva.py``: ``to_device`` and its
  pinned ring run for real, CUDA's events, streams, device and pinned allocations played by
  the fakes below (host memory), and ``layers.moe._index`` (a batch's index) and
  ``_hand_back`` (a CPU batch's outputs) take their CUDA branch into it (the stand-in's own
  branch keeps host tensors);
* a host read of any other tensor (``tolist``, ``cpu``, ``numpy``, ``to("cpu")``; ``item``,
  ``bool``, ``int``, ``float`` as aten's ``_local_scalar_dense``) and an aten op whose output
  shape depends on the data (``nonzero``, ``masked_select``, ``unique``, ``bincount``, ...).
  Tensors ``_to_host`` or a counted read returned are on the host: reading them is free.

What only runs on CUDA elsewhere (the expert cache's copy and free events: recorded and waited
on by streams, never by the host in decode) is not modelled; ``torch.profiler`` on the device
(``scripts/gpu/moe.py``'s ``profile``) is the check there.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ollm.layers.moe as moe_mod
from ollm.runtime import uva

READS = ("tolist", "cpu", "numpy")
CUDA = torch.device("cuda", 0)  # where the MoE layer's transfers are sent (played by the host)
DATA_DEPENDENT = {
    "_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "_unique", "_unique2",
    "unique_dim", "unique_consecutive", "bincount", "equal", "repeat_interleave",
}  # fmt: skip


class Gpu:
    """The modelled GPU: ``epoch`` counts host syncs; ``syncs`` by what made them."""

    def __init__(self) -> None:
        self.epoch = 0
        self.syncs: collections.Counter = collections.Counter()
        self.puts = 0  # small transfers through uva's ring

    def sync(self, why: str) -> None:
        self.syncs[why] += 1
        self.epoch += 1


class _Event:
    def __init__(self, gpu: Gpu) -> None:
        self.gpu, self.at = gpu, None

    def record(self, stream=None) -> None:
        self.at = self.gpu.epoch

    def query(self) -> bool:
        return self.at is None or self.at < self.gpu.epoch

    def synchronize(self) -> None:
        self.gpu.sync("event.synchronize")


class _Stream:
    def __init__(self, gpu: Gpu) -> None:
        self.gpu = gpu

    def synchronize(self) -> None:
        self.gpu.sync("stream.synchronize")

    def wait_event(self, event) -> None:
        pass


class _Torch:
    """``torch`` as ``runtime/uva.py`` sees it: CUDA's events, streams and pinned memory
    played by fakes of ``gpu``."""

    def __init__(self, gpu: Gpu) -> None:
        self._gpu = gpu
        self.cuda = type("cuda", (), {})()
        self.cuda.Event = lambda *a, **k: _Event(gpu)
        self.cuda.current_stream = lambda *a, **k: _Stream(gpu)
        self.cuda.current_device = lambda: 0
        self.cuda.device = lambda d: contextlib.nullcontext()

    def empty(self, *a, pin_memory: bool = False, device=None, **k) -> torch.Tensor:
        return torch.empty(*a, **k)  # host memory for pinned and device buffers alike

    def __getattr__(self, name: str):
        return getattr(torch, name)


class _Reads(TorchDispatchMode):
    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.c = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in DATA_DEPENDENT and not (args and self.c.is_host(args[0])):
            self.c.read(name)
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """Host syncs while ``counting`` (main thread only: disk reads run in their own)."""

    def __init__(self) -> None:
        self.gpu = Gpu()
        self.host: set[int] = set()  # ids of tensors on the host (``_to_host``'s, read back)
        self._keep: list[torch.Tensor] = []  # keeps those ids unique while counting
        self.main = threading.get_ident()

    def is_host(self, t) -> bool:
        return isinstance(t, torch.Tensor) and id(t) in self.host

    def mark_host(self, t) -> None:
        if isinstance(t, torch.Tensor):
            self.host.add(id(t))
            self._keep.append(t)

    def read(self, why: str) -> None:
        if threading.get_ident() == self.main:
            self.gpu.sync(f"read: {why}")

    @property
    def total(self) -> int:
        return sum(self.gpu.syncs.values())


@contextlib.contextmanager
def counting(monkeypatch) -> Iterator[SyncCounter]:
    """Count host syncs (see the module docstring) under ``monkeypatch`` (a pytest
    ``MonkeyPatch``, undone by its caller)."""
    c = SyncCounter()
    monkeypatch.setattr(uva, "torch", _Torch(c.gpu))
    monkeypatch.setattr(uva, "device_view", lambda host, device: host)
    monkeypatch.setattr(uva, "_RINGS", {})
    real_put = uva._Ring.put

    def put(self, t):
        c.gpu.puts += 1
        return real_put(self, t)

    monkeypatch.setattr(uva._Ring, "put", put)
    real_index, real_to_host = moe_mod._index, moe_mod._to_host
    real_hand_back = getattr(moe_mod, "_hand_back", None)  # (older trees: two transfers)

    def index(values, device):  # the CUDA branch: through uva.to_device
        return real_index(values, CUDA)

    def hand_back(ys, dst, device):
        return real_hand_back(ys, dst, CUDA)

    def to_host(ts):
        c.gpu.sync("_to_host")
        out = real_to_host(ts)
        for t in out:
            c.mark_host(t)
        return out

    monkeypatch.setattr(moe_mod, "_index", index)
    if real_hand_back is not None:
        monkeypatch.setattr(moe_mod, "_hand_back", hand_back)
    monkeypatch.setattr(moe_mod, "_to_host", to_host)
    for name in READS:
        real = getattr(torch.Tensor, name)

        def wrap(self, *a, _real=real, _name=name, **k):
            host = c.is_host(self)
            out = _real(self, *a, **k)
            if not host:
                c.read(_name)
                c.mark_host(out)
            return out

        monkeypatch.setattr(torch.Tensor, name, wrap)
    real_to = torch.Tensor.to

    def to(self, *a, **k):
        dev = a[0] if a else k.get("device")
        out = real_to(self, *a, **k)
        if isinstance(dev, (str, torch.device)) and torch.device(dev) == torch.device("cpu"):
            if not c.is_host(self):
                c.read("to(cpu)")
                c.mark_host(out)
        return out

    monkeypatch.setattr(torch.Tensor, "to", to)
    with _Reads(c):
        yield c
