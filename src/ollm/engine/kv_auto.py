"""``--kv-codec auto`` in the engine: the pure chooser (``planning.kv_choice``) fed with this
machine's calibrated rates (``engine/calibrate.py``: GPU memory, host->GPU link, CPU decode
attention), or the documented defaults where nothing was measured (a CPU machine, or a plan
that never needed the cost model), at the plan's context and the weight time of its layers."""

from __future__ import annotations

from dataclasses import replace

import torch

from ollm.errors import BudgetError
from ollm.kv.codec_auto import choose
from ollm.planning.kv_choice import (
    CPU_DEFAULT_RATES,
    DEFAULT_CPU_ATTN,
    KvCodecChoice,
    KvRates,
    layer_weight_seconds,
)
from ollm.tiers import Phase


def kv_rates(device: str, rates=None) -> KvRates:
    """The chooser's rates from a ``MachineRates`` (None: defaults). The disk's KV read rate is
    not calibrated: ``planning.kv_choice.DEFAULT_DISK`` stands in."""
    if not str(device).startswith("cuda"):
        return CPU_DEFAULT_RATES
    if rates is None:
        return KvRates()
    cpu_attn = rates.cpu_attn or DEFAULT_CPU_ATTN
    return KvRates(device=rates.gpu_mem, link=rates.pcie, cpu_attn=cpu_attn, measured=True)


def choose_for(engine, workload, rates=None, plan=None) -> KvCodecChoice | None:
    """``auto``'s codec per KV tier for ``workload`` (None unless ``kv_codec`` is ``auto``).
    With ``plan``, a layer's weight time counts its streamed and CPU-computed layers as
    crossing the link; before a plan exists, every layer as resident (the least weight time:
    KV weighs most)."""
    cfg = engine.config
    if str(cfg.kv_codec).strip().lower() != "auto":
        return None
    kr = kv_rates(engine.device, rates)
    s, n = engine.spec, engine.spec.num_layers
    moving = 0
    if plan is not None:
        moving = len(set(plan.streamed_for(Phase.DECODE)) | set(plan.cpu_layers))
    weight_s = layer_weight_seconds(kr, engine.store.max_layer_nbytes, moving, n)
    elem = torch.finfo(engine.dtype).bits // 8
    kv_heads = workload.batch * s.num_kv_heads
    return choose(kr, kv_heads, s.head_dim, elem, workload.context, cfg.kv_recent, weight_s)


def settle(engine, workload, rates, plan, choice, plan_with):
    """The plan and the choice remade with the plan's weight time (and the measured rates):
    ``plan_with(kv_format)`` plans again when a tier's codec changed (kept as it was if that
    does not fit). Returns the plan carrying its choice (``PlacementPlan.kv_codecs``)."""
    if choice is None:
        return plan
    again = choose_for(engine, workload, rates, plan)
    if _specs(again) != _specs(choice):
        from ollm.kv.codecs import kv_format

        elem = torch.finfo(engine.dtype).bits // 8
        fmt = kv_format(again, engine.config.kv_recent, engine.spec.head_dim, elem)
        try:
            plan, choice = plan_with(fmt), again
        except BudgetError:  # a lighter codec than the first plan's does not fit the budget
            pass
    return replace(plan, kv_codecs=choice)


def runner_codec(plan, kv_codec: str):
    """What the runner holds: the plan's ``auto`` choice (``codec_for_tier`` reads it), "none"
    when it keeps every tier exact, else the configured text."""
    choice = getattr(plan, "kv_codecs", None)
    if choice is None:
        return kv_codec
    return "none" if set(_specs(choice)) == {"none"} else choice


def _specs(choice: KvCodecChoice | None) -> tuple[str, ...]:
    return () if choice is None else tuple(c.spec for c in choice.tiers.values())
