"""A layer whose MLP the CPU computes in decode (``planning/mlp_cpu.py``): the byte ranges of its
other tensors, which a decode step copies into the layer's ring slot, and the views the layer is
computed from (those tensors in the slot, the MLP's in its pinned RAM copy)."""

from __future__ import annotations

import torch

MLP_PREFIX = "mlp."  # the tensors of a layer the CPU computes from RAM (the gated MLP's three)


def attention_ranges(store, file: str) -> list[tuple[int, int]]:
    """(offset, bytes) of ``file``'s tensors other than the MLP's, adjacent ones merged, in
    file order: what a decode step copies of the layer."""
    spans = sorted((e.offset, e.offset + e.nbytes) for name, e in store.files[file].tensors.items()
                   if not name.startswith(MLP_PREFIX))  # fmt: skip
    out: list[list[int]] = []
    for a, b in spans:
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b - a) for a, b in out]


def copy_ranges(dst: torch.Tensor, src: torch.Tensor, ranges, non_blocking: bool) -> int:
    """Copy ``ranges`` of ``src`` into the same offsets of ``dst``; returns the bytes copied."""
    for off, n in ranges:
        dst[off : off + n].copy_(src[off : off + n], non_blocking=non_blocking)
    return sum(n for _, n in ranges)


def split_views(slot: dict[str, torch.Tensor], host: dict[str, torch.Tensor]) -> dict:
    """The layer's tensors: the MLP's from its RAM copy (``host``), the rest from the slot."""
    return {k: host[k] if k.startswith(MLP_PREFIX) else v for k, v in slot.items()}
