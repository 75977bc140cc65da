"""Placement under attention routing (issue 18): how much KV leaves the device for weights.

A decode step of a routed layer (``--attention topk:P``, window, or a calibrated ``auto`` whose
heads all read a part) reads only its sinks, window and chosen pages, where they sit: KV in
pinned RAM costs the step a CPU read of that share (``kv/page_read``), never a fetch, so such
layers need no fetch buffers and their KV on the device saves little; the same bytes as
resident weights save a whole layer copy per step. ``choose_routed_kv_off`` lets the cost model
weigh the two (``decode_split.choose_kv_fetch`` simulates the step with the routed reads)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from ollm.tiers import KvTier

if TYPE_CHECKING:
    from ollm.planning.sizing import PlanSizes


def kv_fixed(sz: PlanSizes, fixed: dict[str, int], kv_min: int, kv_off: int, extra: int):
    """``fixed`` (counted with the last ``kv_min`` layers' KV off the device, by
    ``PlanSizes.offload_kv``) with the last ``kv_off`` >= ``kv_min`` off: less their KV, plus the
    prefill scratch and ``extra`` fetch buffers if none had left before."""
    n = len(sz.layer_kv)
    kv = fixed["kv cache"] - sum(sz.layer_kv[n - kv_off : n - kv_min])
    if kv_off and not kv_min:
        kv += sz.scratch * (1 + extra)
    return {**fixed, "kv cache": kv}


def choose_routed_kv_off(layout, splits, sz: PlanSizes, fixed, kv_min, extra, room, finish=None):
    """How many layers' KV leave the device (the last ones first) when routing reads a share of
    it, and where the resident layers sit. Every count from the minimum (``kv_min``) up to all
    layers is laid out (``layout``: the resident layers the freed bytes hold, first or spread
    between streamed ones, the ring, device blocks of the first offloaded layer) and its decode
    step simulated layer by layer (``splits``: hybrid, fetches, and routed reads at the
    measured CPU rate, ``costmodel.pipeline_step``: resident layers first leave the copy engine
    idle once the ring is full, spread ones let it keep loading while they compute, but then the
    KV left on the device is that of streamed layers). The fastest wins; on a tie the fewest
    offloaded, resident layers first. ``room``: the budget less the minimum ring; every count
    within it keeps the budget (the prefill scratch and activations stay counted: prefill is
    exact). ``finish(fixed, laid out, split)``: the whole plan of a count, whose predicted step
    (with decode-resident layers in what prefill-only activations leave) is the one compared.
    Returns (the count, ``fixed`` with it, ``layout`` with the arrangement chosen)."""
    best = (float("inf"), kv_min, False)
    for k in range(kv_min, len(sz.layer_kv) + 1):
        trial = kv_fixed(sz, fixed, kv_min, k, extra)
        if sum(trial.values()) > room:
            continue  # the scratch and buffers outweigh the KV that left (small last layers)
        for spread in (False, True):
            grown = dict(trial)
            laid = layout(k, grown, spread=spread)  # it adds device blocks to ``grown``
            layers, n_res, ring, _ = laid
            split = splits(layers, n_res, ring=ring, fetch=k and extra, simulate=True)
            pred = split[2] if finish is None else finish(grown, laid, split).predicted
            best = min(best, (round(pred["decode s (KV split)"], 6), k, spread))
    _, k, spread = best
    return k, kv_fixed(sz, fixed, kv_min, k, extra), partial(layout, spread=spread)


def routed_rows(kv_read: tuple[float, ...], layers) -> list[tuple[str, str]]:
    """``describe`` rows: the layers whose decode reads a share of their KV where it sits."""
    routed = [i for i, r in enumerate(kv_read[: len(layers)]) if r < 1.0]  # a sub-plan's too
    if not routed:
        return []
    share = max(kv_read[i] for i in routed)
    off = [i for i in routed if layers[i].kv_tier != KvTier.DEVICE]
    return [
        (
            "KV routed in decode",
            f"{len(routed)} layers read <= {share:.1%} of their KV per step where it sits (never "
            f"fetched); {len(off)} of them keep it in RAM/disk: {off}",
        )
    ]
