"""An engine's placement: planned (with the cost model's rates where layers or KV sit in RAM),
loaded, and replaced atomically when a request needs more than was planned. The `Engine`
(``engine/core.py``) holds the result: ``workload``, ``plan``, ``rates``, ``prefetcher``,
``runner``; these functions take it as ``engine``."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from ollm.errors import BudgetError
from ollm.tiers import KvTier, Tier


def routing_summary_bytes(spec, cfg, workload, elem: int) -> int:
    """Device bytes of attention routing's key summaries (``layers.routing.KeySummaries``: a
    min and a max key per page, per KV head) for every full-attention layer when routing is on
    (``auto`` may leave some layers full: counted anyway, the conservative side)."""
    if cfg.attention == "full":
        return 0
    from ollm.layers.routing import KeySummaries

    shape = KeySummaries.shape(
        workload.batch, spec.num_kv_heads, spec.head_dim, workload.context,
        cfg.attention_page_tokens,
    )  # fmt: skip
    per_layer = 2 * math.prod(shape) * elem  # kmin and kmax
    return per_layer * sum(1 for layer in spec.layers if not layer.window)


def routing_kv_read(engine, workload) -> tuple[float, ...] | None:
    """Per layer the share of its KV a routed decode step reads at ``workload.context`` (sinks,
    window and the top-k pages; 1.0 for a layer with a full head or none routed), which the
    planner weighs against resident weights; None when no layer reads less, with compressed or
    evicted KV (not routed) and for batches (the paged batch engine does not route)."""
    routing, cfg = getattr(engine, "routing", None), engine.config
    if routing is None or workload.batch > 1 or cfg.kv_codec != "none" or cfg.kv_evict != "none":
        return None
    c = workload.context
    out = tuple(
        min(1.0, r.read_tokens(c - 1, c) / (len(r.heads) * c)) if r and r.partial else 1.0
        for r in routing
    )
    return out if any(x < 1.0 for x in out) else None


def plan_for(engine, workload):
    """(plan, measured rates or None) for ``workload``; loads nothing, changes nothing."""
    from ollm.engine.kv_auto import choose_for, settle
    from ollm.engine.moe_offload import plan_with_experts
    from ollm.kv.codecs import kv_format
    from ollm.planning.placement import plan_placement

    cfg = engine.config
    elem = torch.finfo(engine.dtype).bits // 8
    choice = choose_for(engine, workload)  # kv_codec auto: default rates, no plan yet
    args = (
        engine.spec,
        engine.store,
        engine.device,
        engine.gpu_memory,
        cfg.cpu_memory,
        cfg.offload,
    )
    chunk = {
        "chunk_tokens": cfg.prefill_chunk,
        "kv_cache": cfg.kv_cache,
        "kv_block_tokens": cfg.kv_block_tokens,
        "kv_format": kv_format(choice or cfg.kv_codec, cfg.kv_recent, engine.spec.head_dim, elem),
        "summary_bytes": routing_summary_bytes(engine.spec, cfg, workload, elem),
        "kv_read": routing_kv_read(engine, workload),
        "decode_resident": cfg.decode_resident,
        "mlp_cpu": cfg.mlp_cpu,
        "prefill_residual": cfg.prefill_residual,
    }
    whole = lambda: plan_placement(*args, workload, elem, **chunk)  # noqa: E731
    experts = plan_with_experts(engine, whole, workload, elem, chunk)  # MoE: experts one by one
    if experts is not None:  # auto: the choice of the default rates
        return (replace(experts[0], kv_codecs=choice) if choice else experts[0]), experts[1]

    def at(w):  # prefill in segments when prefill_segment says so (planning/segments.py)
        return segmented(engine, w, elem, chunk["kv_format"],
                         lambda x: plan_placement(*args, x, elem, **chunk))  # fmt: skip

    try:
        plan = at(workload)
        asked, workload = workload, prefill_workload(workload, plan)  # a segment's rows now
    except BudgetError as exc:
        fit = largest_context(
            lambda c: at(replace(workload, context=c, prefill_tokens=c)), workload.context
        )
        if not fit:
            raise
        raise BudgetError(
            f"{exc}; this budget fits at most {fit} tokens of context "
            f"(max_context={fit}, --max-context {fit})"
        ) from None
    rates, seg = None, plan.prefill_segment
    hybrid = "off" if engine.hybrid_demoted else cfg.hybrid
    kv_in_ram = any(p.kv_tier == KvTier.CPU for p in plan.layers)
    routed = chunk["kv_read"] is not None and bool(plan.streamed)
    if plan.device != "cpu" and (hybrid != "off" and plan.count(Tier.CPU) or kv_in_ram or routed):
        # Layers or KV sit in RAM: measure (once per machine) whether the CPU should compute
        # some layers, and which RAM KV decode attends on the CPU or fetches to the GPU; with
        # routing, how much KV leaves the device for resident weights.
        from ollm.engine.calibrate import cached_rates
        from ollm.storage.convert import default_cache_dir

        cache = Path(cfg.cache_dir or default_cache_dir())
        rates = cached_rates(engine.device, cache, engine.dtype, engine.spec, workload.context)
        plan = plan_placement(*args, workload, elem, rates, hybrid, cfg.cpu_layers, **chunk)
    # auto: chosen again with the plan's weight time and the measured rates (re-planned if a
    # tier's codec changed)
    extra = () if rates is None else (rates, hybrid, cfg.cpu_layers)

    def plan_with(fmt):
        return plan_placement(*args, workload, elem, *extra, **{**chunk, "kv_format": fmt})

    plan = settle(engine, workload, rates, plan, choice, plan_with)
    return with_segment(engine, plan, seg, asked, rates, chunk["kv_format"], elem), rates


def segmented(engine, workload, elem: int, fmt, plan_at):
    """``plan_at(workload)`` with prefill segments as ``prefill_segment`` says
    (``planning/segments.py``; auto also segments a plan pinning more RAM than ``cpu_memory``)."""
    from ollm.planning.segments import pinned_host_bytes, plan_segmented

    def pinned(p) -> int:
        return pinned_host_bytes(
            engine.spec, engine.store, p, fmt, workload.context, workload.batch, elem
        )

    cfg = engine.config
    seg = getattr(cfg, "prefill_segment", "auto")
    return plan_segmented(plan_at, workload, seg, cfg.cpu_memory, pinned)


def prefill_workload(workload, plan):
    """``workload`` with the rows of one forward the plan prefills in (its segment)."""
    if not plan.prefill_segment:
        return workload
    rows = min(workload.prefill_tokens, plan.prefill_segment)
    return replace(workload, prefill_tokens=rows)


def with_segment(engine, plan, seg: int, work, rates, fmt, elem: int):
    """``plan`` (re-planned for a segment's rows) marked with that segment, and with measured
    rates the prefill time its extra copies take (``segments.segment_copy_bytes``)."""
    if not seg:
        return plan
    from ollm.planning.segments import COST_KEY, mark, segment_copy_bytes

    plan = mark(plan, seg)
    if rates is not None and getattr(rates, "pcie", 0):
        extra = segment_copy_bytes(engine.spec, engine.store, plan, fmt, work, elem)
        plan = replace(plan, predicted={**plan.predicted, COST_KEY: extra / rates.pcie})
    return plan


def load(engine, workload, planned=None) -> None:
    """Load the resident weights of ``planned`` (plan, rates; planned now when None) and make
    it the engine's placement: the prefetcher and runner are built completely first, and the
    engine's attributes change together only once both exist."""
    from ollm.engine.kv_auto import runner_codec
    from ollm.engine.moe_offload import make_prefetcher
    from ollm.engine.runner import Runner

    plan, rates = planned or plan_for(engine, workload)
    cfg = engine.config
    prefetcher = make_prefetcher(engine.store, plan, engine.stats, cfg.verify_checksums, rates)
    if plan.cpu_layers and rates is not None:
        torch.set_num_threads(rates.cpu_threads)
    try:
        runner = Runner(engine.spec, plan, prefetcher, engine.dtype)
    except BaseException:
        prefetcher.close()
        raise
    runner.routing = engine.routing
    runner.kv_codec, runner.kv_recent = runner_codec(plan, cfg.kv_codec), cfg.kv_recent
    runner.kv_evict, runner.kv_keep = cfg.kv_evict, cfg.kv_keep
    engine.workload, engine.plan, engine.rates = workload, plan, rates
    engine.prefetcher, engine.runner = prefetcher, runner
    if getattr(engine, "generator", None) is not None:  # None while the engine is built
        engine.generator.runner = runner


def replan(engine, workload) -> None:
    """Switch to a placement for ``workload``. Planning comes first and changes nothing (a
    BudgetError leaves the current placement in use). The old buffers are released before
    the new ones load, since both may not fit the GPU budget; if loading fails, the old
    plan is loaded again and the error re-raised."""
    planned = plan_for(engine, workload)
    old = engine.workload, (engine.plan, engine.rates)
    engine.prefetcher.close()
    try:
        load(engine, workload, planned)
    except BaseException:
        load(engine, *old)
        raise


def largest_context(try_plan, upper: int) -> int:
    """Largest context in [1, upper) for which ``try_plan(context)`` succeeds (0 if none)."""
    lo, hi = 0, upper
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            try_plan(mid)
            lo = mid
        except BudgetError:
            hi = mid
    return lo
