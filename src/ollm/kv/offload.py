"""KV cache in pinned host RAM for contexts whose KV does not fit the GPU budget.

Prefill attends on the GPU: a layer's keys/values for the whole prompt go to a scratch buffer
shared by all offloaded layers (one layer's KV at a time), and are copied out to RAM when the
layer is done. Decode attends on the CPU, where the cache lives: only the new token's q/k/v and
the attention output cross PCIe (a few KB), instead of the whole cache every step.
"""

from __future__ import annotations

import torch

from ollm.layers.attention import AttentionMask, attend
from ollm.weights.prefetch import pinned_empty, unpin


class KVScratch:
    """A device buffer holding one offloaded layer's KV during prefill."""

    def __init__(
        self, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype, device
    ) -> None:
        shape = (batch, kv_heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.owner: OffloadedKVCache | None = None
        self.valid = 0  # slots [0, valid) of the owner are in the scratch

    def claim(self, cache: OffloadedKVCache, start: int) -> None:
        """Make the scratch hold ``cache``'s slots [0, start)."""
        if self.owner is not cache or self.valid < start:
            if self.owner is not None and self.owner is not cache:
                self.owner.flush()
            if start:  # strided slices: blocking copies (non_blocking is unsafe for them)
                self.k[:, :, :start].copy_(cache.k[:, :, :start])
                self.v[:, :, :start].copy_(cache.v[:, :, :start])
            self.owner, self.valid = cache, start
            cache.dirty_from = start


class OffloadedKVCache:
    """LayerKVCache protocol (``attend``, ``length``, ``trim``, ``nbytes``, ``flush``) with storage
    [B, kv_heads, capacity, head_dim] in pinned RAM, or in a file (the disk tier)."""

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        scratch: KVScratch,
        decode_tokens: int = 8,
        storage=None,
    ) -> None:
        shape = (batch, kv_heads, capacity, head_dim)
        n = batch * kv_heads * capacity * head_dim * torch.finfo(dtype).bits // 8
        # ``storage(nbytes) -> uint8 tensor`` places the cache (default: pinned RAM; the disk
        # tier passes file-backed buffers).
        self._kbuf, self._vbuf = (storage or pinned_empty)(n), (storage or pinned_empty)(n)
        self.k = self._kbuf.view(dtype).view(shape)
        self.v = self._vbuf.view(dtype).view(shape)
        self.capacity, self.length = capacity, 0
        self.scratch, self.decode_tokens = scratch, decode_tokens
        self.dirty_from = 0

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: AttentionMask,
        scale: float,
        dense_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        t = k.shape[2]
        start, end = self.length, self.length + t
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {self.capacity}")
        if t <= self.decode_tokens:
            self.flush()
            self.k[:, :, start:end] = k.to("cpu")
            self.v[:, :, start:end] = v.to("cpu")
            self.length = self.dirty_from = end  # RAM is ahead of the scratch now
            if self.scratch.owner is self:
                self.scratch.valid = min(self.scratch.valid, start)
            dense = None if dense_mask is None else dense_mask.to("cpu")
            out = attend(q.to("cpu"), self.k[:, :, :end], self.v[:, :, :end], mask, scale, dense)
            return out.to(q.device)
        s = self.scratch
        s.claim(self, start)
        s.k[:, :, start:end] = k
        s.v[:, :, start:end] = v
        s.valid = self.length = end
        return attend(q, s.k[:, :, :end], s.v[:, :, :end], mask, scale, dense_mask)

    def flush(self) -> bool:
        """Copy the slots written in the scratch since the last flush out to RAM; True if any.
        Blocking: the slices are strided ([B, heads] outer), and an asynchronous copy into a
        strided host tensor would be finished by the CPU before the device has written it."""
        s = self.scratch
        if s.owner is self and self.dirty_from < self.length:
            a, b = self.dirty_from, self.length
            self.k[:, :, a:b].copy_(s.k[:, :, a:b])
            self.v[:, :, a:b].copy_(s.v[:, :, a:b])
            self.dirty_from = b
            return True
        return False

    def trim(self, length: int) -> None:
        self.length = min(self.length, max(0, length))
        self.dirty_from = min(self.dirty_from, self.length)
        if self.scratch.owner is self:
            self.scratch.valid = min(self.scratch.valid, self.length)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def __len__(self) -> int:
        return self.length

    def close(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # no copy may still target the pinned pages
        unpin(self._kbuf)
        unpin(self._vbuf)
