"""Paged KV tensors: per-tier block pools that `kv/blocks.py` tables index into.

Each tier holds one tensor ``[num_layers, 2 (K, V), kv_heads, num_blocks, block_tokens,
head_dim]``; ``k(tier, layer)`` is the per-layer pool ``[kv_heads, num_blocks, block_tokens,
head_dim]``. A block id therefore names the same slot in every layer, so one `BlockMove` copies a
block of every layer at once. Head-major: one head's blocks are consecutive in memory, so the
K of a sequence whose blocks are consecutive ids (`kv.slabs.SlabPool` places them so) is the
strided view ``[kv_heads, tokens, head_dim]`` attention reads directly, without a gather.

A ``"disk"`` tier (any tier given a file path) is a memory-mapped
file (``torch.from_file``), so the OS pages it in and out; a tier given a ``storage`` allocator
(bytes -> uint8 tensor: pinned RAM, a preallocated file of a `KVDirectory`) lives in what it
returns.

This is the minimal real tensor side for the engine v2 runner: ``write`` stores one sequence's new
K/V through its table, ``gather`` returns its K/V contiguous for attention, ``copy_blocks`` runs the
copy-on-write and swap moves the manager returns.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from ollm.kv.blocks import BlockMove, BlockTable


class PagedKVStore:
    """K/V block pools of ``num_layers`` layers in several tiers (devices or files)."""

    HEAD_MAJOR = True  # pools [.., kv_heads, blocks, ..]; a subclass may keep blocks first

    def __init__(
        self,
        num_layers: int,
        num_blocks: Mapping[str, int],
        kv_heads: int,
        block_tokens: int,
        head_dim: int,
        dtype: torch.dtype,
        devices: Mapping[str, torch.device | str],
        files: Mapping[str, Path] | None = None,
        storage: Mapping[str, Callable[[int], torch.Tensor]] | None = None,
    ) -> None:
        """``devices[tier]`` places a tier's pool; ``files[tier]`` backs it by a file instead
        (created or grown to size; it lives on the CPU); ``storage[tier](nbytes)`` allocates
        it (a zeroed uint8 host tensor of ``nbytes``, viewed as the pool: padding slots are
        read and masked, and 0 x NaN would not be 0)."""
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.block_tokens = block_tokens
        self.head_dim = head_dim
        self.dtype = dtype
        self.pools: dict[str, torch.Tensor] = {}
        self._scratch = threading.local()  # host_scratch buffers, one set per thread
        # Batched decode over a host pool split between the CPU and the GPU (kv/hostsplit.py's
        # HostSplit; the engine sets it when the plan leaves GPU memory for it).
        self.split = None
        files, storage = files or {}, storage or {}
        for tier, n in num_blocks.items():
            shape = (num_layers, 2, *((kv_heads, n) if self.HEAD_MAJOR else (n, kv_heads)))
            shape = (*shape, block_tokens, head_dim)
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if tier in storage and nbytes:
                raw = storage[tier](nbytes)  # zeroed: unwritten slots are read under a mask
                self.pools[tier] = raw[:nbytes].view(dtype).view(shape)
            elif tier in files:
                self.pools[tier] = _file_tensor(Path(files[tier]), shape, dtype)
            else:
                self.pools[tier] = torch.zeros(shape, dtype=dtype, device=devices.get(tier, "cpu"))

    def layer_pool(self, tier: str, layer: int) -> torch.Tensor:
        """Layer ``layer``'s pool in ``tier``, ``[2, kv_heads, num_blocks, block_tokens,
        head_dim]``: one view per layer, kept (indexing the tier tensor is a dispatch each)."""
        views = self.__dict__.setdefault("_layer_views", {})
        key = (tier, layer)
        view = views.get(key)
        if view is None:
            view = views[key] = self.pools[tier][layer]
        return view

    def k(self, tier: str, layer: int) -> torch.Tensor:
        """Layer ``layer``'s key pool in ``tier``: [kv_heads, num_blocks, block_tokens, head_dim]."""
        return self.pools[tier][layer, 0]

    def v(self, tier: str, layer: int) -> torch.Tensor:
        """Layer ``layer``'s value pool in ``tier``."""
        return self.pools[tier][layer, 1]

    def host_scratch(self, slot: int, shape: tuple[int, ...]) -> torch.Tensor:
        """A reusable host buffer of ``shape`` (the pool dtype) for gathers the CPU attends over,
        one set per thread. Grown, never shrunk: a fresh tensor per layer and step is a fresh
        mmap above glibc's 32 MiB threshold, and first-touch page faults cost more than the copy
        (a 71 MB gather: 170 ms fresh, 45 ms into a kept buffer on the 2-core CI VM)."""
        if not hasattr(self._scratch, "bufs"):  # first call on this thread
            self._scratch.bufs = {}
        cache = self._scratch.bufs
        n = math.prod(shape)
        buf = cache.get(slot)
        if buf is None or buf.numel() < n:
            buf = cache[slot] = torch.empty(n, dtype=self.dtype)
        return buf[:n].view(shape)

    @property
    def nbytes(self) -> int:
        """Bytes of every tier's pool."""
        return sum(p.numel() * p.element_size() for p in self.pools.values())

    def _spans(self, table: BlockTable, start: int, end: int) -> Iterable[tuple[int, int, int]]:
        """(block index, first offset, last offset + 1) of the blocks covering [start, end)."""
        b = self.block_tokens
        for i in range(start // b, -(-end // b)):
            yield i, max(start - i * b, 0), min(end - i * b, b)

    def write(
        self, layer: int, table: BlockTable, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store one sequence's K/V ``[kv_heads, n, head_dim]`` at positions ``[start, start+n)``
        (space already appended to ``table``)."""
        end = start + k.shape[1]
        if start < table.start_token or end > table.length:
            raise IndexError(
                f"write [{start}, {end}) outside held [{table.start_token}, {table.length})"
            )
        for i, lo, hi in self._spans(table, start, end):
            ref = table.blocks[i]
            assert ref is not None
            src = slice(i * self.block_tokens + lo - start, i * self.block_tokens + hi - start)
            pool = self.pools[ref.tier][layer]
            pool[0, :, ref.block, lo:hi] = k[:, src]
            pool[1, :, ref.block, lo:hi] = v[:, src]

    def gather(
        self, layer: int, table: BlockTable, upto: int | None = None, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of positions ``[table.start_token, upto)`` as contiguous ``[kv_heads, n,
        head_dim]`` tensors on ``device`` (default: the first block's tier device)."""
        upto = table.length if upto is None else upto
        start = table.start_token
        if not start <= upto <= table.length:
            raise IndexError(f"gather up to {upto} outside held [{start}, {table.length}]")
        parts_k, parts_v = [], []
        for i, lo, hi in self._spans(table, start, upto):
            ref = table.blocks[i]
            assert ref is not None
            pool = self.pools[ref.tier][layer]
            parts_k.append(pool[0, :, ref.block, lo:hi])
            parts_v.append(pool[1, :, ref.block, lo:hi])
        if device is None:
            device = parts_k[0].device if parts_k else next(iter(self.pools.values())).device
        if not parts_k:
            empty = torch.empty(self.kv_heads, 0, self.head_dim, dtype=self.dtype, device=device)
            return empty, empty.clone()
        k = torch.cat([p.to(device) for p in parts_k], dim=1)
        v = torch.cat([p.to(device) for p in parts_v], dim=1)
        return k, v

    def copy_blocks(self, moves: Iterable[BlockMove]) -> None:
        """Run the manager's moves as if one by one, in order (a later move may read what an
        earlier one wrote), batching consecutive independent moves between the same two tiers
        into one indexed copy."""
        batch: list[BlockMove] = []
        for m in moves:
            if batch and not _joins(batch, m):
                self._copy(batch)
                batch = []
            batch.append(m)
        if batch:
            self._copy(batch)

    def _copy(self, batch: list[BlockMove]) -> None:
        src_pool = self.pools[batch[0].src_tier]
        dst_pool = self.pools[batch[0].dst_tier]
        src = torch.tensor([m.src_block for m in batch], device=src_pool.device)
        dst = torch.tensor([m.dst_block for m in batch], device=dst_pool.device)
        dim = 3 if self.HEAD_MAJOR else 2  # the blocks axis of [layers, 2, .., .., bt, D]
        dst_pool.index_copy_(dim, dst, src_pool.index_select(dim, src).to(dst_pool.device))


def _joins(batch: list[BlockMove], m: BlockMove) -> bool:
    """Whether ``m`` can run in one indexed copy with ``batch``: same tiers, and no block of
    ``m`` written by the batch or written by ``m`` and used by the batch (order-free)."""
    first = batch[0]
    if (m.src_tier, m.dst_tier) != (first.src_tier, first.dst_tier):
        return False
    srcs = {b.src_block for b in batch}
    dsts = {b.dst_block for b in batch}
    same_tier = m.src_tier == m.dst_tier
    if m.dst_block in dsts or (same_tier and (m.dst_block in srcs or m.src_block in dsts)):
        return False
    return True


def _file_tensor(path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor over a memory-mapped file of exactly the pool's size."""
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        if f.tell() < nbytes:
            f.truncate(nbytes)
    return torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)
