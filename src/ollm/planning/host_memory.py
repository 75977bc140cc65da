"""RAM-side planning for plans that compute on the host CPU: how large a prefill chunk may be.

On the CPU a forward's activations live in the same RAM as the weights, and attention over a
sliding window (or with padding) builds masks of [rows, keys] cells: for a whole 38k prompt that
was 5-9 GB of boolean and float masks beside a 1 GB model. So a CPU prefill always runs in row
chunks whose activations (``accounting.activation_parts``, quadratic masks included) stay under
``CPU_CHUNK_BYTES``, or 1/8 of ``cpu_memory`` when that is smaller.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ollm.planning.accounting import activation_parts

if TYPE_CHECKING:
    from ollm.models.spec import ModelSpec
    from ollm.planning.placement import Workload

MIB = 1 << 20
# At most this much RAM for one chunk's activations without a budget: 4096 rows of Gemma 3 270M
# in float32 (~350 MiB), about 1000 rows of an 8B model. CPU matmuls of that many rows already
# run at full speed, and smaller chunks make windowed attention cheaper (rows x (rows + window)).
CPU_CHUNK_BYTES = 512 * MIB


def chunk_activation_bytes(
    spec: ModelSpec, work: Workload, dtype_bytes: int, mlp_chunk: int, rows: int
) -> int:
    """RAM one prefill chunk of ``rows`` rows needs on the CPU beyond what is fixed per request
    (the allocator slack and the logits): its slice of the residual stream and rope tables,
    the block's temporaries, the MLP's intermediates, attention scratch and masks."""
    parts = activation_parts(
        spec, replace(work, prefill_tokens=rows), dtype_bytes, mlp_chunk, rows, False
    )
    return sum(parts.values()) - parts["slack"] - parts["logits"]


def cpu_prefill_chunk(
    spec: ModelSpec,
    work: Workload,
    dtype_bytes: int,
    mlp_chunk: int,
    budget: int | None,
    min_rows: int = 256,
) -> int:
    """Rows per prefill chunk on the host CPU (0 = the whole prompt at once): the whole prompt
    when its activations fit the share (``CPU_CHUNK_BYTES``, or ``budget // 8`` if smaller), else
    the largest power of two of at least ``min_rows`` rows that does."""
    share = CPU_CHUNK_BYTES if budget is None else min(CPU_CHUNK_BYTES, budget // 8)

    def cost(rows: int) -> int:
        return chunk_activation_bytes(spec, work, dtype_bytes, mlp_chunk, rows)

    if cost(work.prefill_tokens) <= share:
        return 0
    rows = min_rows
    while rows * 2 < work.prefill_tokens and cost(rows * 2) <= share:
        rows *= 2
    return rows
