"""GPU (or RAM) memory accounting for the planner: what a forward's activations, the attention
kernels, the KV caches, the prefill scratch and the KV fetch buffers really allocate, by purpose.
Each function mirrors an allocation site named in its docstring; tests/test_budget.py checks them
against the allocations of the real code, scripts/gpu/budget.py against the CUDA allocator's peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ollm.planning.footprint import (
    CODEC_CPU_CHUNK,
    codec_decoded_slots,
    max_live_blocks,
    score_block_bytes,
    temporal_ring_slots,
    window_capacity,
)
from ollm.tiers import KvTier

if TYPE_CHECKING:
    from ollm.planning.placement import Workload

MIB = 1 << 20


def activation_bytes(
    spec, work: Workload, dtype_bytes: int, mlp_chunk: int, chunk: int, on_gpu: bool = True,
    residual_ram: bool = False,
) -> int:  # fmt: skip
    """Peak activation memory of a forward of ``prefill_tokens`` tokens in row chunks of
    ``chunk``: the sum of ``activation_parts``."""
    parts = activation_parts(spec, work, dtype_bytes, mlp_chunk, chunk, on_gpu, residual_ram)
    return sum(parts.values())


def residual_bytes(spec, work: Workload, dtype_bytes: int) -> int:
    """The residual stream of the whole prompt: hidden states [batch, prefill_tokens, hidden]
    kept between layers (prefill runs layer-major)."""
    return work.batch * work.prefill_tokens * spec.hidden_size * dtype_bytes


def activation_parts(
    spec, work: Workload, dtype_bytes: int, mlp_chunk: int, chunk: int, on_gpu: bool = True,
    residual_ram: bool = False,
) -> dict[str, int]:  # fmt: skip
    """Activation memory by purpose: the residual stream and rope tables of the whole prompt,
    one chunk's temporaries (``chunk_temp_bytes``), the MLP's row chunk, the attention kernel's
    own scratch (by the path ``layers.attention.attention_path`` takes), masks and logits.
    ``residual_ram``: the residual stream sits in pinned RAM during prefill (``Runner``'s
    ``_host_residual_block``); the device holds a chunk's input buffer and the chunk's output
    until its copy back (two chunks of rows; on the CPU both are besides the stream itself)."""
    b, e, t = work.batch, dtype_bytes, work.prefill_tokens
    h, d, heads = spec.hidden_size, spec.head_dim, spec.num_heads
    rows = b * min(chunk, t)
    window = max((layer.window or 0) for layer in spec.layers)
    masked = b > 1 or window > 0  # padding (several sequences) or sliding windows
    ropes = len({layer.rope for layer in spec.layers})
    flash = e == 2 and d % 8 == 0 and d <= 256
    if on_gpu and (masked or not flash):
        # blocked_attention: its score blocks, plus one block's folded queries and output.
        attn = score_block_bytes(b, heads, work.context, e) + 2 * rows * heads * d * e
    else:  # flash kernels: their log-sum-exps (chunk_attention: two, merged by a third)
        attn = rows * (heads * d * e + 12 * heads)
    keys = work.context if b > 1 else min(work.context, min(chunk, t) + window)
    # Boolean masks: a few [rows, keys] temporaries; on the GPU the runner builds a dense one
    # only up to 4M cells, the blocked kernel per block (counted in its cells).
    cells = rows * keys if masked else 0
    mask = 5 * (cells if not on_gpu else min(cells, b << 22))
    stream = {"residual stream": b * t * h * e}
    if residual_ram:  # the chunk buffers (the whole prompt when not chunked: never smaller)
        buffers = {"residual chunk buffers": 2 * b * min(chunk or t, t) * h * e}
        stream = buffers if on_gpu else {**stream, **buffers}
    return {
        **stream,
        "rope tables": ropes * 2 * b * t * d * e,
        "chunk temporaries": max(
            rows * chunk_temp_bytes(spec, e), linear_temp_bytes(spec, b, rows // b, e)
        ),
        "mlp": min(rows, mlp_chunk) * spec.intermediate_size * e * 3,
        "attention": attn,
        "masks": mask,
        "logits": b * spec.vocab_size * 4 * 3,
        # cuBLAS workspaces and the allocator's rounding (2 MiB pages per segment). 64 MiB left
        # the reserved peak 5 MiB over a minimum budget at 32k (H200, fp16/bf16: reserved ran
        # 36 MiB above allocated), so 96.
        "slack": 96 * MIB,
    }


def chunk_temp_bytes(spec, dtype_bytes: int) -> int:
    """Bytes per prompt row live at once inside one decoder block, besides the MLP's
    intermediates and attention scratch: the normed input, q/k/v and their rotated copies, the
    attention output and its transposed copy, the block's sums and the float32 norm temporaries
    (checked against the allocations of a real block in tests/test_budget.py)."""
    h, kvd = spec.hidden_size, spec.num_kv_heads * spec.head_dim
    qd = spec.num_heads * spec.head_dim
    return dtype_bytes * (3 * h + 3 * qd + 3 * kvd) + 8 * h


def linear_temp_bytes(spec, batch: int, rows: int, dtype_bytes: int) -> int:
    """Live bytes of a linear-attention (gated DeltaNet) layer over ``rows`` rows per sequence
    (``layers/deltanet.py``, 0 without such layers): the rule works in float32 on rows padded
    to its 64-token chunks, about 20 head-width vectors and 4 chunk-wide rows of pair weights per
    row and value head, plus a few copies of the state; the projections in the activations'
    dtype (tests/test_qwen3_next.py measures a real block against it)."""
    lin = getattr(spec, "linear_attn", None)
    if lin is None:
        return 0
    padded = batch * -(-rows // 64) * 64
    d = max(lin.k_dim, lin.v_dim)
    rule = padded * lin.num_v_heads * 4 * (24 * d + 4 * 64)
    proj = batch * rows * dtype_bytes * (2 * lin.key_dim + 2 * lin.value_dim + 2 * lin.conv_dim)
    return (
        rule
        + proj
        + batch * rows * 3 * spec.hidden_size * dtype_bytes
        + 3 * lin.state_bytes(batch, dtype_bytes)
    )


def kv_layer_bytes(
    spec, work: Workload, dtype_bytes: int, forward: int, fmt: KVFormat | None = None
) -> list[int]:
    """Device KV of each layer as the runner allocates it: the whole context, or for a
    sliding-window layer window + one forward of ``forward`` tokens (``SlidingKVCache``); a
    full-attention layer under a codec that covers the device tier: its stored bytes; a
    linear-attention layer: its fixed-size recurrent state (``kv/recurrent.py``)."""
    per_token = 2 * work.batch * spec.num_kv_heads * spec.head_dim * dtype_bytes
    out = []
    for layer in spec.layers:
        if getattr(layer, "linear", False):
            out.append(spec.linear_attn.state_bytes(work.batch, dtype_bytes))
        elif fmt is not None and fmt.on_device and layer.window is None:
            b, h, d = work.batch, spec.num_kv_heads, spec.head_dim
            out.append(fmt.layer_bytes(b, h, d, dtype_bytes, work.context, forward))
        else:
            cap = window_capacity(layer.window, forward) or work.context
            out.append(per_token * min(work.context, cap))
    return out


def kv_scratch_bytes(spec, work: Workload, dtype_bytes: int) -> int:
    """The prefill scratch (``KVScratch``) and each KV fetch buffer: K and V of one layer at the
    request's full capacity, per KV head (never repeated per query head), window or not."""
    return 2 * work.batch * spec.num_kv_heads * spec.head_dim * dtype_bytes * work.context


def device_kv_bytes(
    layers, layer_kv: list[int], scratch: int, fetch_buffers: int, per_token: int
) -> int:
    """KV bytes a plan's placements allocate on the device: the layers whose KV stays there,
    the first blocks of split layers, the prefill scratch (a codec's staging store) when any
    layer's KV is offloaded and the fetch buffers when any is fetched (``Runner.new_kv``)."""
    on_device = KvTier.DEVICE
    total = sum(kv for p, kv in zip(layers, layer_kv, strict=True) if p.kv_tier == on_device)
    total += sum(per_token * p.kv_device_tokens for p in layers if p.kv_tier != on_device)
    if any(p.kv_tier != on_device for p in layers):
        total += scratch
    if any(p.kv_fetch for p in layers):
        total += scratch * fetch_buffers
    return total


# Token slots per block of the paged KV pools (engine v2). Small, so that prompts share most of a
# common prefix (reuse is per full block) and a sequence wastes under one block per KV group;
# large enough that a gather stays a few index_select rows per sequence. (``kv_block_tokens``,
# 256 by default, is the unit the single-request caches split a layer between tiers in.)
PAGE_TOKENS = 16


def kv_group(window: int | None) -> str:
    """The KV group of a layer: every full-attention layer shares one block table per
    sequence, each sliding window another (a block id names the same slot in each layer)."""
    return "full" if window is None else f"window{window}"


def kv_pool_blocks(spec, work: Workload, page_tokens: int, step_tokens: int) -> dict[str, int]:
    """Blocks per KV group of the paged pools for ``work.batch`` sequences of ``work.context``
    tokens: whole contexts for the full-attention group (rounded up to blocks per sequence; the
    full blocks of a ``work.shared`` prefix once, as prefix sharing holds them), for
    a window group the blocks a window keeps live when a step carries ``step_tokens`` query
    tokens (``BlockManager.max_live_blocks``). Every layer of a group has this many blocks in
    its own KV tier (device, pinned RAM or disk, from its ``LayerPlacement.kv_tier``)."""
    out: dict[str, int] = {}
    for layer in spec.layers:
        g = kv_group(layer.window)
        if g not in out:
            live = max_live_blocks(page_tokens, layer.window, work.context, step_tokens)
            # a shared prefix's full blocks once (a window's live blocks are each sequence's)
            shared = min(work.shared, work.context) // page_tokens if layer.window is None else 0
            out[g] = shared + work.batch * (live - shared)
    return out


def kv_pool_bytes(spec, layers, pools: dict[str, int], page_tokens: int, dtype_bytes: int):
    """Bytes of the paged pools per KV tier (device, pinned RAM (CPU), disk):
    each layer's group's blocks in its tier (swap tiers excluded)."""
    block = 2 * page_tokens * spec.num_kv_heads * spec.head_dim * dtype_bytes
    out = dict.fromkeys(KvTier, 0)
    for layer, p in zip(spec.layers, layers, strict=True):
        out[p.kv_tier] += pools[kv_group(layer.window)] * block
    return out


@dataclass(frozen=True)
class KVFormat:
    """Stored size of a full-attention layer's KV under a codec (``kv.codecs.KVCodec.format``):
    ``bytes_per_token`` per KV head (codes and parameters of K and V), ``tail_tokens`` kept
    exact (recent window + one block being filled), whether device-tier KV is compressed
    too (``auto`` keeps it exact unless it pays), and a CPU decode step's attention time over it
    relative to exact KV (``kv.codecs.CPU_ATTN_COST``: decoding costs more than reading bf16)."""

    bytes_per_token: float
    tail_tokens: int
    block: int
    on_device: bool = True
    cpu_attn_cost: float = 1.0
    mid_span: int = 0  # a temporal schedule (kv/temporal.py): tokens its middle tier spans
    mid_bytes_per_token: float = 0.0  # and their stored bytes per token and KV head
    ram: bool = True  # pinned-RAM KV stored so too (``auto`` may encode only the disk tier's)
    sink_tokens: int = 0  # first tokens kept exact beside their codes (``KVCodec.sink_slots``)

    def layer_bytes(
        self, batch: int, kv_heads: int, head_dim: int, dtype_bytes: int, context: int,
        forward: int | None = None,
    ) -> int:  # fmt: skip
        """Bytes of one layer's ``CompressedKVCache`` for ``batch`` x ``context`` tokens (a
        temporal schedule's middle-tier ring sized for forwards of ``forward`` rows)."""
        slots = -(-context // self.block) * self.block
        tail = 2 * head_dim * dtype_bytes * min(context, self.tail_tokens + self.sink_tokens)
        ring = 0.0
        if self.mid_span:  # the deep store holds what gets older than the middle tier
            fwd = context if forward is None else forward
            ring = temporal_ring_slots(self.mid_span, fwd, self.block, context)
            ring *= self.mid_bytes_per_token
            slots = self._deep_slots(context)
        return int(batch * kv_heads * (slots * self.bytes_per_token + ring + tail))

    def _deep_slots(self, context: int) -> int:
        """A temporal schedule's deep store: slots older than the exact and middle tiers."""
        deep = max(self.block, context - self.recent - self.mid_span)
        return -(-deep // self.block) * self.block

    @property
    def recent(self) -> int:
        """Newest tokens kept exact (the tail less the block being filled)."""
        return self.tail_tokens - self.block

    def workspace_bytes(
        self, batch: int, kv_heads: int, head_dim: int, dtype_bytes: int, context: int,
        forward: int, on_gpu: bool = True,
    ) -> int:  # fmt: skip
        """The codec workspace's decoded buffers (``CodecWorkspace.decoded``): two of
        ``codec_decoded_slots`` slots, used by every compressed layer's prefill; on the CPU also
        the decode step's float32 keys (``CodecWorkspace.scores``)."""
        slots = codec_decoded_slots(forward, context, self.block, self.recent, on_gpu)
        per_slot = batch * kv_heads * head_dim
        scores = 0 if on_gpu else 4 * per_slot * CODEC_CPU_CHUNK
        return 2 * per_slot * dtype_bytes * slots + scores

    def staging_bytes(
        self, batch: int, kv_heads: int, context: int, forward: int | None = None
    ) -> int:
        """The workspace's staging store (``CodecWorkspace.staging``): one layer's encoded KV,
        copied in for a RAM-homed layer attended on the device (plus its four tensors' 16-byte
        alignment)."""
        slots = -(-context // self.block) * self.block
        ring = 0
        if self.mid_span:  # and a staging copy of the middle tier's ring (its whole size)
            fwd = context if forward is None else forward
            ring = temporal_ring_slots(self.mid_span, fwd, self.block, context)
            ring = math.ceil(batch * kv_heads * ring * self.mid_bytes_per_token) + 4 * 16
            slots = self._deep_slots(context)
        return math.ceil(batch * kv_heads * slots * self.bytes_per_token) + 4 * 16 + ring
