"""Expert-granular offload wired into an ``Engine`` (issue 19): when to plan experts one by one,
and the prefetcher that streams the dense parts with an expert cache beside it.

``moe_offload="auto"`` places experts one by one when the model is a mixture of experts, its
store holds per-expert ranges, and whole layers would not all stay resident (something would
stream), unless ``offload="disk"`` asks for whole layers read from the store on every pass;
``"expert"`` always does (with ``offload="disk"``: every expert on disk, read on a miss),
``"layer"`` never (whole layers stream, the baseline).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ollm.errors import BudgetError
from ollm.tiers import Tier

log = logging.getLogger(__name__)


def plan_with_experts(engine, whole, workload, elem: int, chunk: dict):
    """(plan with ``experts``, rates or None) for ``engine``'s model, or None to plan whole layers.
    ``whole()`` plans whole layers (raising ``BudgetError`` when they do not fit); ``chunk``:
    the keyword arguments ``plan_placement`` gets."""
    from ollm.planning.experts import plan_experts
    from ollm.planning.placement import plan_placement
    from ollm.storage.experts import StoreExperts

    cfg, spec = engine.config, engine.spec
    if spec.moe is None or cfg.moe_offload == "layer":
        return None
    experts = StoreExperts(engine.store)
    if not experts.available:
        if cfg.moe_offload == "expert":
            log.warning("this store has no per-expert ranges (converted before them); whole "
                        "layers stream")  # fmt: skip
        return None
    if cfg.moe_offload == "auto" and cfg.offload == "disk":
        return None  # offload="disk" asks for upstream oLLM's way: whole layers from the store
    if cfg.moe_offload == "auto" and cfg.expert_slots is None:
        try:
            plan = whole()
        except BudgetError:
            plan = None  # whole layers do not fit: experts one by one may
        if plan is not None and not plan.streamed and all(p.tier != Tier.DISK for p in plan.layers):
            return None  # every layer resident: nothing to cache

    def plan_dense(store, gpu, cpu):
        return plan_placement(spec, store, engine.device, gpu, cpu, cfg.offload, workload, elem,
                              hybrid="off", **chunk)  # fmt: skip

    try:
        eplan = plan_experts(
            spec, engine.store, experts, engine.device, engine.gpu_memory, cfg.cpu_memory, cfg.offload,
            workload, elem, cfg.expert_cache, cfg.expert_slots, cfg.expert_cpu, plan_dense,
            lookahead=cfg.expert_lookahead,
        )  # fmt: skip
    except BudgetError as exc:  # a warning only when asked for: "auto" just picks layers
        level = logging.WARNING if cfg.moe_offload == "expert" else logging.INFO
        log.log(level, "experts cannot be placed one by one (%s); whole layers stream", exc)
        return None
    rates = None
    e = eplan.experts
    if eplan.device != "cpu" and not e.resident and sum(e.ram) and e.cpu_compute == "auto":
        # RAM experts missing from the cache may run on the CPU: the measured rates decide.
        from ollm.engine.calibrate import cached_rates
        from ollm.storage.convert import default_cache_dir

        cache = Path(cfg.cache_dir or default_cache_dir())
        rates = cached_rates(engine.device, cache, engine.dtype, spec, workload.context)
    return eplan, rates


def make_prefetcher(store, plan, stats, verify: bool, rates=None):
    """The plan's ``Prefetcher``; with ``plan.experts`` it streams the dense view of the store
    and carries the ``ExpertCache`` (``prefetcher.experts``) the runner binds to sparse layers."""
    from ollm.runtime.prefetch import Prefetcher

    if plan.experts is None:
        return Prefetcher(store, plan, stats, verify)
    from ollm.runtime.experts import ExpertCache
    from ollm.storage.experts import StoreExperts, dense_store

    experts = StoreExperts(store)
    experts.verify = verify
    prefetcher = Prefetcher(dense_store(store, experts), plan, stats, verify)
    from ollm.layers.moe import sparse_weights

    choose = None
    if rates is not None:  # RAM experts may run on the CPU: at the measured best thread count
        import functools

        import torch

        from ollm.planning.experts import cpu_share

        torch.set_num_threads(rates.cpu_threads)
        choose = functools.partial(cpu_share, rates)
    try:
        cache = ExpertCache(experts, plan.experts, plan.device, stats, sparse_weights, choose)
        prefetcher.experts = cache
    except BaseException:
        prefetcher.close()
        raise
    _graphs_fit(cache, plan)
    return prefetcher


GRAPH_SLACK = 16 << 20  # the graphs' own small tensors (static rows, routing temporaries)


def _graphs_fit(cache, plan) -> None:
    """Keep the direct decode's CUDA graphs (``runtime/expert_graphs.py``) only where they can
    work and fit: every dense part resident in decode (a streamed one changes its weights under
    the graph), and the plan's room under the budget holding their memory pool (one row's
    gathered experts: the plan's ``expert rows``, as the eager path's temporaries, plus
    ``GRAPH_SLACK``; the pool is held for the run while prefill allocates its own)."""
    d = getattr(cache, "direct", None)
    if d is None or d.graphs is None:
        return
    why = None
    if plan.streamed_for("decode") or plan.decode_resident:
        why = "dense parts stream (or are copied in for decode)"
    elif plan.budget is not None:
        need = plan.reserved.get("expert rows", 0) + GRAPH_SLACK
        if plan.budget - plan.peak_device_bytes < need:
            why = f"the plan leaves {plan.budget - plan.peak_device_bytes} bytes, they need {need}"
    if why is not None:
        log.info("MoE decode graphs off: %s", why)
        d.graphs = None


def expert_frequencies(llm) -> dict[str, int]:
    """How often each expert was routed to so far (``"layer:expert"`` -> calls), e.g. after a
    calibration prompt; empty without an expert cache. JSON-ready for ``warm_experts``."""
    cache = getattr(llm.prefetcher, "experts", None)
    return {} if cache is None else {f"{i}:{e}": n for (i, e), n in cache.routed.items()}


def warm_experts(llm, freq: dict[str, int]) -> int:
    """Start ``llm``'s expert cache from ``expert_frequencies`` of a calibration run (LFU counts
    seeded, empty slots filled with the most used experts); returns experts loaded."""
    cache = getattr(llm.prefetcher, "experts", None)
    if cache is None:
        return 0
    parsed = {}
    for key, n in freq.items():
        i, _, e = key.partition(":")
        parsed[(int(i), int(e))] = int(n)
    return cache.warm(parsed)
