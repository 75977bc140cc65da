"""Decode-resident layers: the prefill's activations, given to weights while decode runs.

A long prompt's prefill holds the residual stream of the whole prompt, one chunk's temporaries
and the MLP's row chunk (2.6 GiB of an 8 GiB budget at 100k on Llama-3.1-8B shapes); a decode
step of a few tokens needs almost none of it. Placement sizes the resident layers for the
prefill, so the decode reservation is the same plan with the activations of a forward of at
most ``DECODE_ROWS`` tokens in their place (``decode_reserved``), and the difference holds
streamed layers that the prefetcher copies to the GPU once when decode starts and gives back
when a larger forward comes (``Prefetcher.set_phase``): each saves one layer copy per decode
step for one extra copy per request (the first decode step copied it anyway). Which layers and
how many: the count and arrangement (first streamed ones or spread between them) whose decode
step, simulated layer by layer (``costmodel.pipeline_step``, with the fetch and routed-read
choices made again), is shortest. Held layers fill the decode reservation only up to
``fragmentation_allowance`` below the budget. Opt-in (``EngineConfig.decode_resident``) until a
device budget check (``scripts/gpu/budget.py --kinds resident``) passes.

A plan for the batch engine (``sz.engine``) reserves its largest step (a shared prefix's
admission: 6912 packed rows for 16 x 6192 tokens sharing 6144); its decode step is one row per
sequence, so its decode reservation is ``batch_step.engine_parts`` of that many rows (the
same sites: the 64 MiB decode gather stays, the scores are those rows' over every key slot
instead of a 64 MiB block), or a single request's forward of as many tokens if larger."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ollm.planning.accounting import activation_parts
from ollm.tiers import KvTier, Tier

if TYPE_CHECKING:
    from ollm.planning.placement import PlacementPlan, Workload
    from ollm.planning.sizing import PlanSizes

DECODE_ROWS = 64  # largest forward (tokens) that runs with the decode-resident layers held
# Larger forwards kept in the decode phase when the budget left over holds their activations
# (speculative verify passes of up to 256 query tokens; a larger one drops and reloads them).
DECODE_ROWS_UP_TO = (256, 128)
STEP_KEY = "decode s (KV split)"
# Held layers are allocated while the allocator still holds the prefill's blocks, which need
# not be split to fit them: on an H200 (Llama-3.1-8B shapes, 8 GiB, 100k; 2026-12-02) the
# process's peak reserved memory was up to 0.112 GiB above the planned decode reservation
# (8.018 GiB against 7.906 planned, over the 8 GiB budget). So decode plans below the budget by
# max(256 MiB, 3% of it), besides the prefetcher emptying the allocator's cache at the switch.
FRAGMENTATION_MIN = 256 << 20
FRAGMENTATION_SHARE = 0.03


def fragmentation_allowance(budget: int) -> int:
    """Bytes the decode reservation with held layers keeps below ``budget``."""
    return max(FRAGMENTATION_MIN, int(budget * FRAGMENTATION_SHARE))


def decode_activations(spec, work: Workload, dtype_bytes: int, mlp_chunk: int,
                       rows: int = DECODE_ROWS) -> int:  # fmt: skip
    """Device activations of a forward of ``rows`` tokens at ``work.context`` (the same
    ``activation_parts`` as a prefill, with float32 logits of every row: a verify pass)."""
    small = type(work)(work.batch, work.context, rows)  # a Workload of decode's forward
    parts = activation_parts(spec, small, dtype_bytes, mlp_chunk, rows, True)
    parts["logits"] = work.batch * rows * spec.vocab_size * 4 * 3
    return sum(parts.values())


def _candidates(plan: PlacementPlan) -> list[int]:
    """Streamed layers whose weights sit in pinned RAM (a host copy the prefetcher holds)."""
    return [
        i
        for i, p in enumerate(plan.layers)
        if p.tier == Tier.CPU and p.decode_device != "cpu" and p.exec_device != "cpu"
    ]


def _simulate(plan, store, sz: PlanSizes, rates, work, layers, kv_read, fetch: bool):
    """(layers with the fetch choice made again, the decode step) of ``layers``, decode-resident
    ones counted as resident. Compressed KV in RAM: its encoded bytes queue behind the layer's
    weights (``kv/compressed.py`` fetches them), no CPU read."""
    from ollm.planning.costmodel import decode_chain, pipeline_step
    from ollm.planning.decode_split import choose_kv_fetch

    view = [replace(p, tier=Tier.GPU) if p.decode_resident else p for p in layers]
    if sz.kv_copy:
        copy = [0.0 if p.tier == Tier.GPU else store.layer_nbytes(i) / rates.pcie
                for i, p in enumerate(view)]  # fmt: skip
        kv = [sz.kv_copy[i] / rates.pcie if p.kv_tier != KvTier.DEVICE else 0.0
              for i, p in enumerate(view)]  # fmt: skip
        layer_s, start = decode_chain(bool(sz.engine))
        chain = [layer_s] * len(view)
        return layers, pipeline_step(chain, copy, max(1, plan.ring_slots), kv, start_s=start)
    base = [replace(p, kv_fetch=False) for p in view]
    chosen, _, step = choose_kv_fetch(
        store, base, rates, work, sz.per_token, dict(plan.predicted), plan.ring_slots,
        kv_read, fetch, bool(sz.engine),
    )  # fmt: skip
    out = [replace(p, kv_fetch=c.kv_fetch) for p, c in zip(layers, chosen, strict=True)]
    return out, step


def plan_decode_resident(plan: PlacementPlan, spec, store, sz: PlanSizes, rates, work,
                         offload: str, kv_read=None, hold: bool = True) -> PlacementPlan:  # fmt: skip
    """``plan`` with ``decode_reserved`` (its reservations with decode's activations) and the
    streamed layers made decode-resident in what that frees, when the cost model says they
    shorten the step. Single-sequence or batch-engine GPU plans with measured rates, without
    CPU-computed layers or experts, only; others are returned as they are. ``hold`` False: none held, the
    plan gets only its decode reservations and (compressed KV) its simulated step."""
    from ollm.planning.costmodel import interleave

    if (plan.budget is None or not plan.device.startswith("cuda") or rates is None
            or (work.batch != 1 and not sz.engine) or plan.cpu_layers or spec.moe is not None
            or offload == "disk"):  # fmt: skip
        return plan
    decode = dict(plan.reserved)
    base_rows, more_rows = _rows(sz, work)
    decode["activations"] = min(plan.reserved["activations"], _act(spec, sz, work, base_rows))
    cands = _candidates(plan)
    cap = plan.budget - fragmentation_allowance(plan.budget)  # what held layers may fill
    spare = cap - sum(decode.values())
    kmax = min(len(cands), max(0, spare) // sz.layer) if hold else 0
    fetch = any(p.kv_fetch for p in plan.layers)
    now = plan.predicted.get(STEP_KEY)
    base = [replace(p, decode_resident=False) for p in plan.layers]
    if now is None and sz.kv_copy:
        now = _simulate(plan, store, sz, rates, work, base, kv_read, fetch)[1]
    best = (round(now, 6) if now is not None else float("inf"), 0, False, base)
    for k in range(1, kmax + 1):
        for spread in (False, True):
            pick = interleave(cands, k) if spread else set(cands[:k])
            layers = [replace(p, decode_resident=i in pick) for i, p in enumerate(base)]
            layers, step = _simulate(plan, store, sz, rates, work, layers, kv_read, fetch)
            best = min(best, (round(step, 6), k, spread, layers), key=lambda b: b[:3])
    step, k, _, layers = best
    decode["decode-resident layers"] = sum(
        store.layer_nbytes(i) for i, p in enumerate(layers) if p.decode_resident
    )
    rows = base_rows
    for more in more_rows:  # the largest verify pass whose activations still fit
        act = min(plan.reserved["activations"], _act(spec, sz, work, more))
        if sum({**decode, "activations": act}.values()) <= cap:
            rows, decode["activations"] = more, act
            break
    predicted = dict(plan.predicted)
    if k:
        predicted[STEP_KEY] = step
    elif now is not None:
        predicted[STEP_KEY] = now
    return replace(plan, layers=tuple(layers), decode_reserved=decode, predicted=predicted,
                   decode_rows=rows if k else 0)  # fmt: skip


def _elem(sz: PlanSizes, spec, batch: int) -> int:
    """Bytes per activation element: KV bytes per token (of the whole batch) over batch x 2 x
    KV heads x head size."""
    return sz.per_token // (2 * spec.num_kv_heads * spec.head_dim * batch)


def _rows(sz: PlanSizes, work: Workload) -> tuple[int, tuple[int, ...]]:
    """(rows of the forward decode runs with held layers, larger ones kept when they fit):
    ``DECODE_ROWS`` and ``DECODE_ROWS_UP_TO`` for one sequence; for the batch engine its
    decode step, one row per sequence (``logit_rows``: as many as the plan's step runs), then
    2 and 4 rows each (drafts; at most 256). A larger forward (a prompt admitted, longer
    drafts) runs in the prefill phase: the held layers are given back first."""
    if not sz.engine:
        return DECODE_ROWS, DECODE_ROWS_UP_TO
    b = max(1, sz.logit_rows or work.batch)
    return b, tuple(r for r in (min(256, 4 * b), min(256, 2 * b)) if r > b)


def _act(spec, sz: PlanSizes, work: Workload, rows: int) -> int:
    """Device activations of a decode-phase forward of ``rows`` query rows: ``decode_activations``
    for one sequence; for the batch engine the larger of its step of ``rows`` packed rows
    (``batch_step.engine_parts`` with ``forward``, a logits row each) and a single request's
    forward of ``rows`` tokens at batch 1 (the same plan serves single prompts)."""
    elem = _elem(sz, spec, work.batch)
    if not sz.engine:
        return decode_activations(spec, work, elem, sz.mlp_chunk, rows)
    from ollm.planning.batch_step import engine_parts

    parts = engine_parts(spec, work, elem, sz.mlp_chunk, sz.chunk, on_gpu=True,
                         residual_ram=sz.residual_ram, embed_on_device=not sz.head,
                         logit_rows=rows, forward=rows)  # fmt: skip
    one = type(work)(1, work.context, rows)
    return max(sum(parts.values()), decode_activations(spec, one, elem, sz.mlp_chunk, rows))
