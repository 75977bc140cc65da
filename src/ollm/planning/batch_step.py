"""GPU memory of the batch engine's steps (engine v2, ``engine/batch.py`` over paged pools), for
the plans it runs: a workload of several sequences (``LLM.generate`` of a list, ``bench --batch``,
``LLM.submit``) on a model whose KV pages (no recurrent state, exact KV; ``engine/kvpools``'s
``batch_unsupported`` refuses the others, which keep the padded batch's accounting).

A step packs every sequence's query tokens into one row ``[1, N]``; ``Runner._chunked_block``
cuts it into chunks of ``prefill_chunk_tokens`` rows, so a chunk's temporaries are those of
``chunk`` rows, not ``batch x chunk``; only the residual stream and the rope tables hold all N
rows. The KV lives in paged pools (``kv_pool_blocks`` blocks per group, each layer's in its
tier), with no prefill scratch, fetch buffers or split device blocks (``KVScratch`` and
``PackedLayerKV.fetcher`` exist only on the single-request path). What the step allocates
besides (each function below names its allocation site) is counted by ``engine_parts``; the plan
reserves the larger of that and the single-request ``Runner`` at batch 1, which the same plan
serves for single prompts. Decode steps (one row per sequence) allocate less than the largest
prefill step except for their batched gather (``kv/decode_batch.py``), counted in the chunk's
attention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ollm.planning.accounting import chunk_temp_bytes, kv_group
from ollm.planning.footprint import max_live_blocks, row_cell_bytes, score_block_bytes

if TYPE_CHECKING:
    from ollm.planning.accounting import KVFormat
    from ollm.planning.placement import Workload

MIB = 1 << 20
# kv/decode_batch.py's GATHER_BYTES: most K+V bytes one batched decode call gathers (a batch is
# cut below it; one sequence longer than that is gathered alone). tests check they agree.
GATHER_BYTES = 64 << 20
ROPE_F32_BYTES = 18  # layers/rope.rope_cos_sin: float32 freqs/2, emb, cos, sin, then two tables


def batch_engine_runs(spec, work: Workload, kv_format: KVFormat | None) -> bool:
    """Whether the plan of ``work`` is run by the batch engine and sized for it here: several
    sequences, exact KV (encoded pools keep the padded batch's accounting for now), no
    recurrent state (``batch_unsupported``) and no experts (their rows are ``experts.py``'s)."""
    return (
        work.batch > 1
        and kv_format is None
        and getattr(spec, "linear_attn", None) is None
        and getattr(spec, "moe", None) is None
    )


def step_tokens(spec, work: Workload, chunk: int) -> int:
    """Most query tokens one batch-engine step carries (``BatchEngine.for_plan``): one prefill
    chunk with sliding windows (a paged window group holds a whole step), else every
    sequence's prompt (``batch x prefill_tokens``) in one weight pass; with a ``work.shared``
    prefix, one whole prompt and the others' tails (their prefix is cached)."""
    if chunk and any(layer.window for layer in spec.layers):
        return chunk
    shared = min(work.shared, work.prefill_tokens - 1)  # each prompt computes its own tail
    return work.prefill_tokens + (work.batch - 1) * (work.prefill_tokens - shared)


def pool_layer_bytes(spec, pools: dict[str, int], page: int, dtype_bytes: int) -> list[int]:
    """Each layer's pool: its group's blocks of ``page`` K/V slots (what ``build_pools`` makes)."""
    block = 2 * page * spec.num_kv_heads * spec.head_dim * dtype_bytes
    return [pools[kv_group(layer.window)] * block for layer in spec.layers]


def engine_parts(
    spec, work: Workload, dtype_bytes: int, mlp_chunk: int, chunk: int, *, on_gpu: bool = True,
    residual_ram: bool = False, embed_on_device: bool = False, page: int = 16,
    logit_rows: int | None = None, forward: int | None = None,
) -> dict[str, int]:  # fmt: skip
    """Bytes the batch engine allocates on the device in its largest step besides the pools,
    weights and globals, by allocation site: N = ``step_tokens`` packed rows cut into chunks
    of ``chunk`` rows (0: one), ``logit_rows`` sequences with a logits row (default
    ``work.batch``). The parts sum to at least the step's peak (the float32 rope transient
    happens before any chunk runs, yet is added: the allocator keeps its segments).
    ``forward``: a step of at most that many query rows instead (a decode step, held layers'
    reservation: ``planning/decode_resident.py``), whose scores are bounded by its rows too."""
    e, h, d = dtype_bytes, spec.hidden_size, spec.head_dim
    heads, kvh = spec.num_heads, spec.num_kv_heads
    n = forward or step_tokens(spec, work, chunk)
    rows = min(chunk or n, n)
    r = max(1, logit_rows or work.batch)
    ctx_slots = -(-work.context // page) * page  # a sequence's keys, whole blocks
    ropes = len({layer.rope for layer in spec.layers})
    host = residual_ram and on_gpu and bool(chunk) and n > chunk  # Runner._host_residual_block
    parts = {
        # Runner._embed then h.to(dev); in RAM: a chunk's input buffer and its output
        "residual stream": 2 * rows * h * e if host else n * h * e,
        "rope tables": ropes * 2 * n * d * e,  # cos/sin [1, N, D] per rope kind, whole step
        "step index tensors": _index_bytes(spec, work, n, r, page),
    }
    # One chunk inside decoder_block (chunk_temp_bytes, the MLP's row chunk), PackedLayerKV.attend
    # (the rows' K/V concatenated for the pool write, its output) and one sequence's attention:
    # its K/V gathered from the pool (index_select, then a copy; the previous sequence's are
    # still referenced while the next is gathered) and the kernel's scratch, or a decode batch's
    # gather (at most GATHER_BYTES, or one whole sequence's 2 x seq_kv).
    seq_kv = kvh * ctx_slots * d * e
    gathered = max(5 * seq_kv, GATHER_BYTES)
    windowed = any(layer.window for layer in spec.layers)
    parts["chunk temporaries"] = rows * chunk_temp_bytes(spec, e)
    parts["mlp"] = min(rows, mlp_chunk) * spec.intermediate_size * e * 3
    parts["attention"] = (
        2 * kvh * rows * d * e  # torch.cat([k, v]) for the pool write
        + 2 * rows * heads * d * e  # the step's output and one sequence's (before it is copied)
        + _scores(spec, work.context, e, ctx_slots, forward)  # blocked_attention's (or flash's)
        + rows * heads * (d * e + 12)  # the kernel's output and log-sum-exps
        + gathered
    )
    # blocked masks per score block; the runner's dense [N, N] mask with windows (<= 4M cells)
    parts["masks"] = 5 * min(rows * work.context, 1 << 22)
    parts["masks"] += 5 * min(n * n, 1 << 22) if windowed else 0
    # BatchEngine._forward's head: the rows' hidden states, the norm's float32, bfloat16 logits
    # then float32 ones, and greedy_picks' copy of a subset of them.
    parts["logits"] = r * (spec.vocab_size * (e + 8) + h * (e + 12))
    parts["slack"] = 96 * MIB  # cuBLAS workspaces, allocator pages (accounting.activation_parts)
    # Before any chunk runs: rope_cos_sin's float32 work beyond one table pair, or a scaled
    # embedding's second copy. Freed before the chunks, but counted whole: the H200's B=64 step
    # reserved ~150 MiB more than the parts above (the allocator keeps those segments cached).
    before = ROPE_F32_BYTES * n * d + 12 * n - 2 * n * d * e
    if embed_on_device and spec.embed_scale is not None:
        before = max(before, n * h * e)  # ``e * scale``: a second embedding before the first goes
    parts["pre-layer transient (rope float32)"] = before
    return parts


def _scores(spec, context: int, e: int, ctx_slots: int, forward: int | None) -> int:
    """Scores of one attention call: a block under ``SCORE_BLOCK_BYTES`` (or one row), and in a
    step of ``forward`` rows at most those rows over every key slot (``row_cell_bytes`` per
    row and key, plus a boolean per folded row: `kv/shared_prefix.py` folds each KV head's
    query heads into rows, its mask then has ``heads / kv_heads`` rows per query)."""
    block = score_block_bytes(1, spec.num_heads, context, e)
    if not forward:
        return block
    group = spec.num_heads // spec.num_kv_heads
    return min(block, forward * ctx_slots * (row_cell_bytes(spec.num_heads, e) + 4 * group))


def _index_bytes(spec, work: Workload, n: int, running: int, page: int) -> int:
    """``PackedStep``'s int64 index tensors per KV group and device (``GroupLayout``: rows'
    blocks and offsets, held blocks, decode batches' rows and padded blocks, their masks,
    ``write_slots`` per chunk kept for the step), the step's token ids and positions."""
    kvh = spec.num_kv_heads
    total = 3 * 8 * n  # input ids and positions on the device, positions.float()
    for g in {kv_group(layer.window): layer.window for layer in spec.layers}.items():
        per_seq = max_live_blocks(page, g[1], work.context, n)
        held = work.batch * per_seq
        total += 8 * (2 * n + held + running * (per_seq + 1)) + 8 * 2 * kvh * n
        total += running * per_seq * page  # decode batches' boolean key masks
    return total


def runner_parts(spec, work: Workload, dtype_bytes: int, mlp_chunk: int, chunk: int,
                 on_gpu: bool, residual_ram: bool) -> dict[str, int]:  # fmt: skip
    """The single-request ``Runner``'s activations at batch 1 on the same plan
    (``accounting.activation_parts``), which single prompts take."""
    from ollm.planning.accounting import activation_parts
    from ollm.planning.placement import Workload

    one = Workload(1, work.context, work.prefill_tokens)
    rows = chunk or work.prefill_tokens
    return activation_parts(spec, one, dtype_bytes, mlp_chunk, rows, on_gpu, residual_ram)


def engine_sized(sz, spec, work: Workload, dtype_bytes: int, on_gpu: bool, page: int = 16):
    """``sz`` (``PlanSizes``, counted for the padded batch) as the batch engine allocates: each
    layer's KV its paged pool, the prefill scratch (and any fetch buffer) the single-request
    path's at batch 1, activations the larger of the engine's step and a single request's
    (``engine_parts`` plus the difference, named, when a single request needs more)."""
    from dataclasses import replace

    from ollm.planning.accounting import kv_pool_blocks, kv_scratch_bytes
    from ollm.planning.placement import Workload

    step = step_tokens(spec, work, sz.chunk)
    pools = kv_pool_blocks(spec, work, page, step)
    embed_on_device = not on_gpu or not sz.head  # an untied table stays in RAM on a GPU
    parts = engine_parts(spec, work, dtype_bytes, sz.mlp_chunk, sz.chunk, on_gpu=on_gpu,
                         residual_ram=sz.residual_ram, embed_on_device=embed_on_device,
                         page=page)  # fmt: skip
    single = runner_parts(spec, work, dtype_bytes, sz.mlp_chunk, sz.chunk, on_gpu, sz.residual_ram)
    beyond = sum(single.values()) - sum(parts.values())
    if beyond > 0:
        parts["single request (batch 1) beyond the step"] = beyond
    one = Workload(1, work.context, work.prefill_tokens)
    return replace(
        sz,
        act=sum(parts.values()),
        layer_kv=pool_layer_bytes(spec, pools, page, dtype_bytes),
        scratch=kv_scratch_bytes(spec, one, dtype_bytes),
        engine=True,
        engine_parts=parts,
        kv_pools=pools,
        step_tokens=step,
        logit_rows=work.batch,
    )


def batch_rows(plan) -> list[tuple[str, str]]:
    """``describe`` rows of a plan sized for the batch engine: its step and activations."""
    if not plan.batch_parts:
        return []
    from ollm.sizes import format_size

    parts = ", ".join(f"{k} {format_size(v)}" for k, v in plan.batch_parts.items() if v)
    rows = [
        ("batch engine step", f"<= {plan.step_tokens} query tokens, {plan.logit_rows} logits rows"),
        ("batch engine activations", parts),
    ]
    if plan.shared_prefix:
        rows.append(("shared prefix (KV held once)", f"{plan.shared_prefix} tokens"))
    return rows
