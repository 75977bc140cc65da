"""Experts stored in a compact format and computed in another (gpt-oss's MXFP4 experts): the
layout of an expert's tensors as stored (``ExpertTensor``, offsets within its store range) and
as the device holds them for compute (``decoded_layout``: each ``W_blocks`` / ``W_scales`` pair
as one ``W`` in the store's dtype, the other tensors as they are), and the decode between them.

The store, RAM and the link carry the stored bytes (MXFP4: ~4.25 bits per weight); a cache slot
holds the decoded expert, written by ``decode_into`` on the device after the copy lands; the
CPU decodes a RAM expert it computes (``decode_expert``). Experts without pairs are their own
decoded layout (nothing to decode).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from ollm.storage.mxfp4 import BLOCKS, SCALES, dequantize_rows

TENSOR_ALIGN = 256  # decoded tensors' offsets within a decoded range
RANGE_ALIGN = 4096  # a decoded range's size (one slot row)
# Bytes a decode's temporaries take per byte of decoded expert, at most (int32 codes, the
# values before the transposing copy, the gathered codes): the planner reserves this much.
DECODE_TEMP = 3
DECODE_BYTES = 256 << 20  # a decode's temporaries at most (one expert's, if more)


def decode_chunk(decoded_bytes: int, most: int) -> int:
    """Coded experts decoded at once on the device: at most ``most`` (a token's top-k), their
    temporaries (``DECODE_TEMP`` x the decoded bytes each) within ``DECODE_BYTES``; >= 1."""
    return max(1, min(most, DECODE_BYTES // max(1, DECODE_TEMP * decoded_bytes)))


def decode_reserve(decoded_bytes: int, most: int) -> int:
    """Device bytes a decode's temporaries take at most (``decode_chunk`` experts)."""
    return decode_chunk(decoded_bytes, most) * DECODE_TEMP * decoded_bytes


@dataclass(frozen=True)
class ExpertTensor:
    """One tensor of an expert, relative to the start of the expert's range."""

    short: str  # name under ``{prefix}.experts.{e}.``, e.g. ``gate_proj.weight``
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def is_coded(tensors: Sequence[ExpertTensor]) -> bool:
    """Whether the expert holds MXFP4 pairs (``W_blocks`` with its ``W_scales``)."""
    names = {t.short for t in tensors}
    return any(n.endswith(BLOCKS) and n[: -len(BLOCKS)] + SCALES in names for n in names)


def decoded_layout(
    tensors: Sequence[ExpertTensor], dtype: torch.dtype
) -> tuple[list[ExpertTensor], int]:
    """(the decoded tensors, the decoded range's bytes): each pair's ``W`` [G * 32, rows] in
    ``dtype`` (gpt-oss's [in, out] layout, as a bf16 store holds it), the rest unchanged, by
    name, each at a ``TENSOR_ALIGN`` offset."""
    by = {t.short: t for t in tensors}
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for t in tensors:
        if t.short.endswith(SCALES) and t.short[: -len(SCALES)] + BLOCKS in by:
            continue
        if t.short.endswith(BLOCKS) and t.short[: -len(BLOCKS)] + SCALES in by:
            rows, groups, width = t.shape
            shapes[t.short[: -len(BLOCKS)]] = ((groups * width * 2, rows), dtype)
        else:
            shapes[t.short] = (t.shape, t.dtype)
    out, at = [], 0
    for name in sorted(shapes):
        shape, dt = shapes[name]
        nbytes = math.prod(shape) * dt.itemsize
        out.append(ExpertTensor(name, at, nbytes, dt, shape))
        at = _align(at + nbytes, TENSOR_ALIGN)
    return out, _align(max(at, 1), RANGE_ALIGN)


def _rows_view(raw: torch.Tensor, t: ExpertTensor) -> torch.Tensor:
    """Tensor ``t`` of every row of ``raw`` [g, stride] (uint8, row j: an expert's range)."""
    g, el = raw.shape[0], t.dtype.itemsize
    cols = raw[:, t.offset : t.offset + t.nbytes]
    return cols.view(t.dtype).view(g, *t.shape) if el > 1 else cols.view(g, *t.shape)


def decode_rows(
    raw: torch.Tensor, tensors: Sequence[ExpertTensor], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """The decoded tensors (name, [g, *shape]; views where nothing is decoded) of the experts
    whose stored ranges are the rows of ``raw`` [g, stride] (uint8, any device), one at a time
    (each made when asked for: one tensor's temporaries at once)."""
    by = {t.short: t for t in tensors}
    for t in tensors:
        base = t.short[: -len(BLOCKS)]
        if t.short.endswith(SCALES) and t.short[: -len(SCALES)] + BLOCKS in by:
            continue
        if t.short.endswith(BLOCKS) and base + SCALES in by:
            scales = _rows_view(raw, by[base + SCALES])
            yield base, dequantize_rows(_rows_view(raw, t), scales, dtype)
        else:
            yield t.short, _rows_view(raw, t)


def decode_expert(
    raw: torch.Tensor, tensors: Sequence[ExpertTensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """One expert's tensors for compute from its stored range ``raw``: decoded matrices (new,
    as transposed views of contiguous ones, which matmuls take as they are: no transposing
    copy) and the other tensors as views of ``raw``."""
    rows = decode_rows(raw[: max(t.offset + t.nbytes for t in tensors)][None], tensors, dtype)
    return {n: v[0] for n, v in rows}


def decode_into(
    raw: torch.Tensor,
    src_rows: Sequence[int],
    tensors: Sequence[ExpertTensor],
    out: Mapping[str, torch.Tensor],
    dst_rows: Sequence[int],
    dtype: torch.dtype,
    chunk: int,
) -> None:
    """Decode the experts at rows ``src_rows`` of ``raw`` [n, stride] (stored ranges) into rows
    ``dst_rows`` of ``out`` (decoded name -> [m, *shape], stacked views over the slots),
    ``chunk`` experts and one tensor at a time (bounding the temporaries)."""
    dev = raw.device
    for a in range(0, len(src_rows), max(1, chunk)):
        src, dst = list(src_rows[a : a + chunk]), _index(dst_rows[a : a + chunk], dev)
        if _consecutive(src):
            part = raw[src[0] : src[0] + len(src)]
        else:
            part = raw.index_select(0, _index(src, dev))
        for name, v in decode_rows(part, tensors, dtype):
            out[name].index_copy_(0, dst, v)
            del v


def _index(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """``values`` as int64 on ``device``, through pinned memory on CUDA (no host sync)."""
    t = torch.tensor(list(values), dtype=torch.int64)
    return t if device.type != "cuda" else t.pin_memory().to(device, non_blocking=True)


def _consecutive(rows: Sequence[int]) -> bool:
    return all(b == a + 1 for a, b in zip(rows, rows[1:], strict=False))
