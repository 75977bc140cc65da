"""What ``plan_placement`` fits on the device before it places layers: the KV fetch buffers
kept, the layers whose KV leaves the device, and the minimum the budget must reach (smaller
prefill chunks tried first, then the refusal naming it). Pure; no placement types, so
``placement.py`` imports it and not the other way round."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ollm.planning.sizing import MIN_CHUNK, PlanSizes, smaller_chunks, too_small

if TYPE_CHECKING:
    from ollm.planning.accounting import KVFormat
    from ollm.planning.placement import PlacementPlan, Workload


def fetch_buffers(spec, kv_format: KVFormat | None, kv_read, buffers: int) -> int:
    """The KV fetch buffers to plan: ``buffers``, or none when no layer would use them."""
    if kv_format is not None and kv_format.ram and not any(layer.window for layer in spec.layers):
        return 0  # compressed layers copy their own encoded KV (no fetch buffers)
    if kv_read and all(r < 1.0 for r in kv_read):  # routed layers read pages where they sit
        return 0
    return buffers


def kv_offload(
    sz: PlanSizes,
    fixed: dict[str, int],
    budget: int | None,
    slots: int,
    buffers: int,
    rates,
    on_gpu: bool,
    kv_cache: str,
) -> tuple[int, int] | None:
    """(layers whose KV leaves the device, fetch buffers counted beside it), updating
    ``fixed["kv cache"]``; None when the fetch buffers do not fit beside the minimum weights
    (plan again without them). Without a budget, or on the CPU unless KV goes to disk: (0, 0)."""
    if budget is None or not (on_gpu or kv_cache == "disk"):
        return 0, 0
    # Fetch buffers exist only with the cost model; re-planned without them if they do not
    # fit or none is worth fetching.
    extra = buffers if rates is not None else 0
    kv_off = sz.offload_kv(fixed, budget, slots, extra)
    if extra and sum(fixed.values()) + slots * sz.layer > budget:  # no room for them
        return None
    return kv_off, extra


def below_minimum(
    again: Callable[[int | None, int], PlacementPlan],
    sz: PlanSizes,
    fixed: dict[str, int],
    slots: int,
    budget: int | None,
    work: Workload,
    chunk_tokens: int | None,
    buffers: int,
    on_gpu: bool,
) -> PlacementPlan | None:
    """None when ``budget`` holds ``fixed`` and ``slots`` stream buffers; else the plan with
    smaller prefill chunks (``again(rows, buffers)``) when the chunk was sized from the budget
    and can shrink, or ``BudgetError`` naming the minimum."""
    minimum = sum(fixed.values()) + slots * sz.layer
    if budget is None or budget >= minimum:
        return None
    rows = sz.chunk or work.prefill_tokens
    if chunk_tokens is None and rows > MIN_CHUNK:
        return smaller_chunks(again, rows, buffers)
    raise too_small(budget, minimum, on_gpu, sz, fixed, slots)
