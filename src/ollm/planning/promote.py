"""Budget the decode choices freed, given back to weights: the hybrid choice moves the KV of the
layers the CPU computes to pinned RAM (they attend where it sits), after placement sized the
resident layers with that KV on the device. What it freed holds more resident layers, each one
copy less per decode step and per prefill pass."""

from __future__ import annotations

from dataclasses import replace

from ollm.planning.costmodel import interleave
from ollm.tiers import Tier


def promote_freed(plan, store, offload: str = "auto"):
    """``plan`` with streamed, GPU-computed layers made resident while the budget left over
    (``budget - peak_device_bytes``) by a hybrid choice holds them, spread over the streamed ones (``interleave``:
    the copy engine still loads a streamed layer while the CPU computes its neighbours). The
    ring keeps its slots while any layer streams; with none left it is given back. Plans
    without CPU-computed layers (placement already filled the budget) and ``offload="disk"``
    (every layer read from the store) are returned as they are."""
    if plan.budget is None or plan.device == "cpu" or not plan.cpu_layers or offload == "disk":
        return plan
    spare = plan.budget - plan.peak_device_bytes
    cands = [
        i
        for i, p in enumerate(plan.layers)
        if p.tier != Tier.GPU and p.decode_device != "cpu" and p.exec_device != "cpu"
    ]
    if not cands or spare < min(store.layer_nbytes(i) for i in cands):
        return plan
    k = min(len(cands), spare // max(store.layer_nbytes(i) for i in cands))
    chosen = sorted(interleave(cands, k))
    layers = list(plan.layers)
    for i in chosen:
        layers[i] = replace(layers[i], tier=Tier.GPU)
    reserved = dict(plan.reserved)
    reserved["resident layers"] = reserved.get("resident layers", 0) + sum(
        store.layer_nbytes(i) for i in chosen
    )
    ring = plan.ring_slots
    if all(p.tier == Tier.GPU for p in layers):
        ring = 0
        reserved["stream buffers"] = 0
    return replace(plan, layers=tuple(layers), reserved=reserved, ring_slots=ring)
