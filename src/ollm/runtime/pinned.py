"""Page-locked host buffers whose registration lives exactly as long as their memory.

``pinned_empty`` allocates with numpy and registers the pages with ``cudaHostRegister`` (exact
sizes, unlike the caching pinned allocator's power-of-two blocks). The registration is owned by
the numpy array under the returned tensor: when the last tensor or view of it is gone the array is
freed, and a ``weakref.finalize`` on the array unregisters the pages first. A buffer dropped
without ``unpin`` (an ``LLM`` never closed, a constructor that failed halfway) is therefore given
back like any other memory; ``unpin`` only gives the pages back earlier.
"""

from __future__ import annotations

import logging
import weakref
from contextlib import nullcontext

import numpy as np
import torch

log = logging.getLogger(__name__)

# cudaHostRegisterPortable: the pages count as pinned for every device's context, not only for
# the context current at registration (with device="cuda:1" that would be cuda:0's).
_HOST_REGISTER_PORTABLE = 1

# data_ptr -> the finalizer that unregisters it; holds no reference to the buffer itself.
_LIVE: dict[int, weakref.finalize] = {}


def _cudart():
    """The CUDA runtime bindings, or None without a GPU (tests substitute a fake)."""
    return torch.cuda.cudart() if torch.cuda.is_available() else None


def on_device(device: torch.device | str | None):
    """A context making ``device`` current when it is a CUDA device (else a no-op): CUDA calls
    that act on "the current device" (host registration, pinned allocation) then use it."""
    dev = None if device is None else torch.device(device)
    if dev is not None and dev.type == "cuda":
        return torch.cuda.device(dev)
    return nullcontext()


def _unregister(rt, ptr: int) -> None:
    _LIVE.pop(ptr, None)
    rt.cudaHostUnregister(ptr)


def pinned_empty(nbytes: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A page-locked uint8 host buffer of exactly ``nbytes``, registered from ``device``'s context
    (plain memory when no GPU is present). Unregistered when its memory is freed."""
    rt = _cudart()
    if rt is None or nbytes == 0:
        return torch.empty(nbytes, dtype=torch.uint8)
    arr = np.empty(nbytes, dtype=np.uint8)
    ptr = arr.ctypes.data
    with on_device(device):
        err = rt.cudaHostRegister(ptr, nbytes, _HOST_REGISTER_PORTABLE)
    if int(err) != 0:
        log.warning(
            "cudaHostRegister failed (%s); falling back to the caching pinned allocator", err
        )
        with on_device(device):
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    fin = weakref.finalize(arr, _unregister, rt, ptr)
    fin.atexit = False  # the process is ending: its pages go with it
    _LIVE[ptr] = fin
    return torch.from_numpy(arr)  # the tensor's storage keeps ``arr`` (and so the pages) alive


def unpin(buf: torch.Tensor) -> None:
    """Unregister ``buf``'s pages now (no-op if not registered by ``pinned_empty``); no copy may
    still be reading or writing them. The memory itself goes with the last reference."""
    fin = _LIVE.get(buf.data_ptr())
    if fin is not None:
        fin()


def live_registrations() -> int:
    """How many ``pinned_empty`` registrations are still in place (for tests and leak checks)."""
    return len(_LIVE)
