"""What a plan holds besides resident weights, for one workload: the sizes ``plan_placement``
reserves (globals, KV, activations, the prefill chunk and MLP row chunk, the prefill scratch),
counted by ``accounting``, and the refusal of a budget below their minimum."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ollm.errors import BudgetError
from ollm.planning.accounting import (
    KVFormat,
    activation_bytes,
    activation_parts,
    kv_layer_bytes,
    kv_scratch_bytes,
    linear_temp_bytes,
    residual_bytes,
)
from ollm.planning.footprint import codec_attention_bytes
from ollm.sizes import format_size

if TYPE_CHECKING:
    from ollm.planning.placement import Workload

MIB = 1 << 20
MIN_CHUNK = 256  # fewest rows per prefill chunk the planner chooses


def prefill_chunk(spec, work: Workload, dtype_bytes: int, budget: int | None) -> int:
    """Rows per prefill chunk: the whole prompt when its temporaries take at most 1/8 of the
    budget, else the largest power of two that does (at least 256)."""
    h, kvd = spec.hidden_size, spec.num_kv_heads * spec.head_dim
    qd = spec.num_heads * spec.head_dim
    per_row = work.batch * dtype_bytes * (3 * h + 2 * qd + 2 * kvd)
    # Linear-attention layers (Qwen3-Next) hold more per row: the delta rule's float32 work.
    per_row = max(per_row, linear_temp_bytes(spec, work.batch, MIN_CHUNK, dtype_bytes) // MIN_CHUNK)
    share = (budget or 1 << 40) // 8
    if per_row * work.prefill_tokens <= share:
        return 0
    rows = max(MIN_CHUNK, share // per_row)
    return 1 << (rows.bit_length() - 1)


# A batch-engine prefill chunk's fixed cost per layer (host work and kernel launches, whatever
# its rows) and the most of the chunk's compute it may add: chunks are made at least that large.
# The H200 ran B=64 x 2k in 256-row chunks at ~1.5 ms per chunk and layer, ~0.2 ms of it
# compute, with a host sync per chunk (the pool write) since removed; on the CPU VM a chunk's
# host work is ~0.26 ms per layer (scripts/batch_prefill_overhead.py, tiny widths: 64- vs
# 512-row chunks), ~50 kernel launches more on a GPU. A device measurement should set it.
CHUNK_OVERHEAD_S = 0.5e-3
CHUNK_OVERHEAD_SHARE = 0.5


def engine_chunk(spec, work: Workload, dtype_bytes: int, budget: int | None, padded: int,
                 layer_bytes: int, rates=None) -> int:  # fmt: skip
    """Rows per prefill chunk of the batch engine's packed row (``batch x prefill_tokens``
    rows; no sliding windows): ``padded`` (the padded batch's rule, whose chunk holds ``batch``
    rows per chunk row, so the engine's chunk temporaries are 1/batch of what that rule
    allowed) raised, with ``rates``, to the smallest power of two whose fixed cost
    (``CHUNK_OVERHEAD_S``) is at most ``CHUNK_OVERHEAD_SHARE`` of its compute (a layer's
    ``2 x params`` FLOPs per row at ``gpu_flops``), within the budget rule of one packed row
    (temporaries under 1/8 of the budget); 0 is the whole step."""
    from dataclasses import replace

    n = work.batch * work.prefill_tokens
    if rates is None or not getattr(rates, "gpu_flops", 0):
        return padded
    row_s = 2 * (layer_bytes / dtype_bytes) / rates.gpu_flops
    want = CHUNK_OVERHEAD_S / (CHUNK_OVERHEAD_SHARE * row_s)
    rows = max(padded or n, MIN_CHUNK, 1 << max(0, math.ceil(want) - 1).bit_length())
    cap = prefill_chunk(spec, replace(work, batch=1, prefill_tokens=n), dtype_bytes, budget)
    rows = min(rows, cap or rows)
    return 0 if rows >= n else rows


@dataclass(frozen=True)
class PlanSizes:
    """Bytes the plan counts besides resident weights, for one workload (see ``accounting``)."""

    layer: int  # the largest layer file (a ring slot)
    embed: int
    head: int  # 0 when the head is tied to the embedding
    norm: int
    mlp_chunk: int  # MLP rows at once
    chunk: int  # prefill rows per chunk (0: the whole prompt)
    act: int  # activations of the largest forward
    per_token: int  # KV bytes per token position of one layer (whole batch)
    layer_kv: list[int]  # each layer's KV at full context
    scratch: int  # the prefill scratch (and each KV fetch buffer); compressed: codec staging
    compressed: bool = False  # every layer's KV compressed (offloaded ones keep no device blocks)
    workspace: int = 0  # a codec's decoded buffers and its attention's transients beyond an
    # exact layer's (any compressed layer prefills through them)
    # Compressed KV in RAM: per layer, the encoded bytes a GPU decode step copies in (0: exact
    # or no codec), and CPU decode attention's cost over it relative to exact KV.
    kv_copy: tuple[int, ...] = ()
    cpu_kv_cost: float = 1.0
    # The prompt's residual stream in pinned RAM during prefill, chunks moved to the device per
    # layer (``act`` counts the chunk buffers instead); ``residual`` its bytes.
    residual_ram: bool = False
    residual: int = 0
    # Sized for the batch engine (``planning/batch_step.py``): ``layer_kv`` are the paged pools
    # (``kv_pools`` blocks per group), ``scratch`` the single-request path's at batch 1, ``act``
    # the larger of the engine's step (``engine_parts``, by name) and a single request's.
    engine: bool = False
    engine_parts: dict[str, int] = field(default_factory=dict)
    kv_pools: dict[str, int] = field(default_factory=dict)
    step_tokens: int = 0  # most query tokens of one batch-engine step
    logit_rows: int = 0  # sequences of one step with a float32 logits row

    @classmethod
    def of(cls, spec, store, work, dtype_bytes, device, gpu_memory, cpu_memory, chunk_tokens,
           kv_format: KVFormat | None = None, residual_ram: bool = False,
           engine: bool = False, rates=None):  # fmt: skip
        gfile = store.files["globals.bin"].tensors
        t = work.batch * work.prefill_tokens
        # MLP row chunks: keep its three intermediates under ~256 MiB or 1/16 of the budget.
        mlp_cap = max(32 * MIB, min(256 * MIB, (gpu_memory or cpu_memory or 1 << 40) // 16))
        mlp_chunk = max(16, min(t, mlp_cap // (spec.intermediate_size * dtype_bytes * 3)))
        on_gpu = device.startswith("cuda")
        if on_gpu:
            chunk = chunk_tokens or prefill_chunk(spec, work, dtype_bytes, gpu_memory)
            if engine and not chunk_tokens and not any(layer.window for layer in spec.layers):
                chunk = engine_chunk(spec, work, dtype_bytes, gpu_memory, chunk,
                                     store.max_layer_nbytes, rates)  # fmt: skip
        else:  # activations share RAM with the weights: chunked even without a budget
            from ollm.planning.host_memory import cpu_prefill_chunk

            chunk = chunk_tokens or cpu_prefill_chunk(
                spec, work, dtype_bytes, mlp_chunk, cpu_memory, MIN_CHUNK
            )
        rows = chunk or work.prefill_tokens
        scratch = kv_scratch_bytes(spec, work, dtype_bytes)
        workspace, kv_copy = 0, ()
        compressed = kv_format is not None and kv_format.ram
        compressed = compressed and not any(layer.window for layer in spec.layers)
        if kv_format is not None:  # the codec workspace (kv/compressed.py CodecWorkspace)
            b, h, ctx = work.batch, spec.num_kv_heads, work.context
            # the runner's largest forward (Runner.new_kv's ``forward``; a segment's rows)
            fwd = chunk or min(ctx, work.prefill_tokens)
            workspace = kv_format.workspace_bytes(
                b, h, spec.head_dim, dtype_bytes, ctx, fwd, on_gpu
            )
            # a compressed layer's attention transients, in place of an exact layer's
            exact_attn = activation_parts(spec, work, dtype_bytes, mlp_chunk, rows, on_gpu)
            codec_attn = codec_attention_bytes(
                b, spec.num_heads, h, spec.head_dim, dtype_bytes, min(rows, ctx),
                kv_format.recent, kv_format.block,
            )  # fmt: skip
            workspace += max(0, codec_attn - exact_attn["attention"])
            staging = kv_format.staging_bytes(b, h, ctx, fwd)
            scratch = staging if compressed else scratch + staging
            encoded = int(b * h * ctx * kv_format.bytes_per_token)
            kv_copy = (
                tuple(  # RAM KV left exact (``auto``, disk encoded only): fetched as is
                    0 if layer.window or getattr(layer, "linear", False) else encoded
                    for layer in spec.layers
                )
                if kv_format.ram
                else ()
            )
        sz = cls(
            layer=store.max_layer_nbytes,
            embed=gfile["embed_tokens.weight"].nbytes,
            head=gfile["lm_head.weight"].nbytes if "lm_head.weight" in gfile else 0,
            norm=gfile["norm.weight"].nbytes,
            mlp_chunk=mlp_chunk,
            chunk=chunk,
            act=activation_bytes(spec, work, dtype_bytes, mlp_chunk, rows, on_gpu, residual_ram),
            per_token=2 * work.batch * spec.num_kv_heads * spec.head_dim * dtype_bytes,
            layer_kv=kv_layer_bytes(spec, work, dtype_bytes, chunk or work.context, kv_format),
            scratch=scratch,
            compressed=compressed,
            workspace=workspace,
            kv_copy=kv_copy,
            cpu_kv_cost=kv_format.cpu_attn_cost if kv_format is not None and kv_format.ram else 1.0,
            residual_ram=residual_ram,
            residual=residual_bytes(spec, work, dtype_bytes),
        )
        if not engine:
            return sz
        from ollm.planning.batch_step import engine_sized

        return engine_sized(sz, spec, work, dtype_bytes, on_gpu)

    def cpu_kv_extra_s(self, rates, context: int) -> float:
        """Seconds a CPU-computed decode layer spends beyond the measured rates on its
        compressed KV: the CPU rate was measured over exact KV (``cpu_attn``, else a real layer
        at ``cpu_mem``), decoding codes costs ``cpu_kv_cost`` times that."""
        if self.cpu_kv_cost <= 1.0:
            return 0.0
        exact = self.per_token * context
        rate = rates.cpu_attn * rates.cpu_mem_busy / rates.cpu_mem if rates.cpu_attn else 0.0
        return exact / (rate or rates.cpu_mem_busy) * (self.cpu_kv_cost - 1.0)

    @property
    def head_resident(self) -> int:
        """The head (or the tied embedding) stays on the execution device."""
        return self.head if self.head else self.embed

    def fixed(self, on_gpu: bool, summary_bytes: int = 0) -> dict[str, int]:
        """Reservations besides weights: globals, all KV on the device, activations, and
        ``summary_bytes`` of attention routing's key summaries (held on the compute device). On
        a GPU an untied embedding table is only gathered from, so it stays in RAM."""
        globals_ = self.head_resident + self.norm if on_gpu else self.embed + self.head + self.norm
        out = {"globals": globals_, "kv cache": sum(self.layer_kv), "activations": self.act}
        if self.workspace:  # a codec's decoded buffers, whatever tier its layers' KV is in
            out["codec workspace"] = self.workspace
        if summary_bytes:
            out["routing summaries"] = summary_bytes
        return out

    def offload_kv(self, fixed: dict[str, int], budget: int, slots: int, extra: int) -> int:
        """KV that cannot sit beside the minimum weights goes to RAM (or disk) layer by layer,
        the last ones first; the prefill scratch (and ``extra`` fetch buffers, all at full
        capacity, even for a sliding-window layer) hold one layer's KV on the device. Updates
        ``fixed["kv cache"]``; returns how many layers' KV left the device."""
        n = len(self.layer_kv)
        kv_off = 0
        while kv_off < n and sum(fixed.values()) + slots * self.layer > budget:
            kv_off += 1
            fixed["kv cache"] = sum(self.layer_kv[: n - kv_off]) + self.scratch * (1 + extra)
        return kv_off


def smaller_chunks(again, rows: int, fetch_buffers: int):
    """The chunk was sized from the budget; smaller chunks need fewer activations, so try them
    (halving, down to MIN_CHUNK rows) before refusing: the minimum named is then the smallest
    any chunk allows. ``again(rows, fetch_buffers)`` plans with ``rows`` per chunk."""
    while True:
        rows = max(MIN_CHUNK, rows // 2)
        try:
            return again(rows, fetch_buffers)
        except BudgetError:
            if rows == MIN_CHUNK:
                raise


def too_small(budget, minimum, on_gpu, sz: PlanSizes, fixed, slots) -> BudgetError:
    """The refusal of a budget under ``minimum``, naming what the minimum is made of."""
    what = "gpu_memory" if on_gpu else "cpu_memory"
    return BudgetError(
        f"{what} {format_size(budget)} is too small for this model and request: at least "
        f"{format_size(minimum)} is needed ({format_size(sz.layer)} per layer x {slots} "
        f"stream buffers, {format_size(fixed['kv cache'])} KV cache on the device (of "
        f"{format_size(sum(sz.layer_kv))}), {format_size(sz.act)} activations, "
        f"{format_size(fixed['globals'])} embeddings/head"
        + (
            f", {format_size(fixed['routing summaries'])} attention-routing key summaries)"
            if fixed.get("routing summaries")
            else ")"
        )
    )
