"""Per-layer KV cache: one object per layer, passed explicitly to attention.

Protocol: ``append(k, v) -> (keys, values)`` (everything cached so far), ``length``, ``trim(n)``,
``nbytes``. Storage is preallocated for the whole request (prompt + max new tokens), per KV head
(grouped-query heads are never repeated), so decoding allocates nothing.
"""

from __future__ import annotations

import torch

from ollm.planning.footprint import window_capacity  # noqa: F401 (re-exported)


class LayerKVCache:
    """Contiguous KV storage [B, kv_heads, capacity, head_dim] on one device."""

    def __init__(
        self,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch, num_kv_heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0
        self.router = None  # a kv.routed.Router: decode reads only the KV its routing picks

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values [B, kv_heads, T, D]; return views over all cached slots."""
        t = k.shape[2]
        start, end = self.length, self.length + t
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {self.capacity}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        if k.device != self.k.device:
            # Computed elsewhere (a hybrid layer's prefill on the GPU): attend where it runs.
            if start == 0:
                return k, v
            return self.k[:, :, :end].to(k.device), self.v[:, :, :end].to(k.device)
        return self.k[:, :, :end], self.v[:, :, :end]

    def attend(self, q, k, v, mask, scale, dense_mask):
        """Append this step's keys/values, then attend ``q`` over everything cached."""
        from ollm.layers.attention import attend

        k_all, v_all = self.append(k, v)
        if self.router is not None:
            self.router.on_append(k, self.length - k.shape[2])
            out = self.router.attend(q, [(k_all, v_all, 0)], mask, scale)
            if out is not None:
                return out
        return attend(q, k_all, v_all, mask, scale, dense_mask)

    def flush(self) -> bool:
        """Nothing is buffered elsewhere (see OffloadedKVCache)."""
        return False

    def close(self) -> None:
        """Device memory is freed with the tensors."""

    def trim(self, length: int) -> None:
        """Forget slots from ``length`` on (e.g. rejected draft tokens)."""
        if self.router is not None:
            self.router.on_trim(length, lambda a, b: self.k[:, :, a:b])
        self.length = min(self.length, max(0, length))

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def __len__(self) -> int:
        return self.length


class SlidingKVCache(LayerKVCache):
    """KV of a sliding-window layer: keeps only the slots future queries can still see.

    ``length`` stays the logical token count (slot positions are shared with the other layers);
    storage holds slots [offset, length), at most ``window - 1`` old ones plus the current forward,
    so memory is bounded by window + chunk instead of the context.
    """

    def __init__(self, batch, num_kv_heads, head_dim, capacity, dtype, device, window: int) -> None:
        super().__init__(batch, num_kv_heads, head_dim, capacity, dtype, device)
        self.window = window
        self.offset = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        stored = self.length - self.offset
        if stored + t > self.capacity:
            keep_from = max(self.offset, self.length - (self.window - 1))
            drop = keep_from - self.offset
            kept = stored - drop
            if kept + t > self.capacity:
                raise RuntimeError(
                    f"sliding KV cache too small: {kept} + {t} slots > capacity {self.capacity}"
                )
            if kept:
                self.k[:, :, :kept] = self.k[:, :, drop:stored].clone()
                self.v[:, :, :kept] = self.v[:, :, drop:stored].clone()
            self.offset, stored = keep_from, kept
        end = stored + t
        self.k[:, :, stored:end] = k
        self.v[:, :, stored:end] = v
        self.length += t
        if k.device != self.k.device:
            return self.k[:, :, :end].to(k.device), self.v[:, :, :end].to(k.device)
        return self.k[:, :, :end], self.v[:, :, :end]

    def attend(self, q, k, v, mask, scale, dense_mask):
        from ollm.layers.attention import AttentionMask, attend

        k_all, v_all = self.append(k, v)
        if self.offset:
            keep = None if mask.key_keep is None else mask.key_keep[:, self.offset :]
            mask = AttentionMask(
                mask.q_start - self.offset,
                mask.q_len,
                mask.kv_len - self.offset,
                keep,
                mask.window,
                mask.sinks,
            )
            dense_mask = None
        return attend(q, k_all, v_all, mask, scale, dense_mask)

    def trim(self, length: int) -> None:
        if length < self.offset:
            raise RuntimeError(
                f"cannot trim a sliding KV cache below its first kept slot {self.offset}"
            )
        self.length = min(self.length, length)
