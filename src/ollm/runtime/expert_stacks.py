"""Stacked views of experts (issue 19): one buffer holding N experts of one tensor layout, every
expert's range at a fixed stride (the cache's slots; a layer's resident experts), seen as one
[N, ...] tensor per expert tensor. A decode batch gathers its experts' weights for the batched
matmuls with one ``index_select`` per tensor (``layers/moe.py``) instead of stacking the
experts' views one by one, and no view is built per call."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ollm.storage.experts import ExpertTensor


class StackedBatch(list):
    """A device batch ``[(expert, weights), ...]`` whose experts are also rows of stacked views
    (``stacks``: tensor name -> [N, ...] view over one buffer of N experts; ``"a+b"``: tensors
    a and b adjacent, as one [N, 2 * rows, ...] view), expert j at row ``rows[j]``."""

    stacks: Mapping[str, torch.Tensor]
    rows: list[int]


def stacked_batch(items: list, stacks: Mapping[str, torch.Tensor], rows: list[int]) -> list:
    """``items`` as a ``StackedBatch`` over ``stacks`` at ``rows`` (``items`` when no stacks)."""
    if not stacks:
        return items
    b = StackedBatch(items)
    b.stacks, b.rows = stacks, rows
    return b


def stacked_views(buf: torch.Tensor, tensors: Sequence[ExpertTensor]) -> dict[str, torch.Tensor]:
    """The tensors of one expert layout (``tensors``, offsets within an expert's range) over
    every row of ``buf`` [N, stride] (uint8, row j: an expert's range): name -> [N, *shape];
    two tensors of one shape and dtype lying back to back also as ``"a+b"`` [N, 2 * shape[0],
    ...] (per-expert gate then up: the fused layout's gate_up). Empty when a tensor's offset or
    the stride is not a whole number of its elements, or ``buf`` has no rows."""
    n, stride = buf.shape
    if n == 0 or not buf.is_contiguous():
        return {}
    out: dict[str, torch.Tensor] = {}
    order = sorted(tensors, key=lambda t: t.offset)
    for t in order:
        el = t.dtype.itemsize
        if stride % el or t.offset % el:
            return {}
        a, numel = t.offset // el, math.prod(t.shape)
        out[t.short] = buf.view(t.dtype)[:, a : a + numel].unflatten(1, tuple(t.shape))
    for a, b in zip(order, order[1:], strict=False):
        if a.shape and b.offset == a.offset + a.nbytes and (a.shape, a.dtype) == (b.shape, b.dtype):
            el = a.dtype.itemsize
            lo, numel = a.offset // el, math.prod(a.shape)
            shape = (2 * a.shape[0], *a.shape[1:])
            out[f"{a.short}+{b.short}"] = buf.view(a.dtype)[:, lo : lo + 2 * numel].unflatten(
                1, shape
            )
    return out


def uniform_rows(buf: torch.Tensor, offsets: Sequence[int], sizes: Sequence[int]):
    """``buf`` (a layer's experts read back to back, byte 0 = expert 0) as [N, stride] when
    every expert's range has one size and they follow each other at that stride; else None."""
    stride = sizes[0] if sizes else 0
    base = offsets[0] if offsets else 0
    if not stride or any(s != stride for s in sizes):
        return None
    if any(o - base != e * stride for e, o in enumerate(offsets)):
        return None
    return buf[: len(offsets) * stride].view(len(offsets), stride)
