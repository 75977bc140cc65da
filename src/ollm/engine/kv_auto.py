"""``--kv-codec auto`` in the engine: the pure chooser (``planning.kv_choice``) fed with this
machine's calibrated rates (``engine/calibrate.py``: GPU memory, host->GPU link, CPU decode
attention; on a CPU machine its decode attention alone), or the documented defaults where
nothing was measured (a plan that never needed the cost model), at the plan's context and the
weight time of its layers. The disk tier's rate is not measured: the page cache's or a cold
disk's default, by whether the KV files fit in the RAM available."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ollm.errors import BudgetError
from ollm.kv.codec_auto import choose
from ollm.planning.kv_choice import (
    CPU_DEFAULT_RATES,
    DEFAULT_CPU_ATTN,
    DEFAULT_DISK,
    DEFAULT_PAGE_CACHE,
    KvCodecChoice,
    KvRates,
    layer_weight_seconds,
)
from ollm.tiers import Phase


def kv_rates(device: str, rates=None, cpu_attn: float = 0.0, disk: float = DEFAULT_DISK) -> KvRates:
    """The chooser's rates from a ``MachineRates`` (None: defaults), ``cpu_attn`` measured on a
    CPU machine (0: the default) and the disk tier's read rate (``disk_rate``)."""
    if not str(device).startswith("cuda"):
        return replace(CPU_DEFAULT_RATES, cpu_attn=cpu_attn or DEFAULT_CPU_ATTN, disk=disk,
                       measured=bool(cpu_attn))  # fmt: skip
    if rates is None:
        return KvRates(disk=disk)
    cpu_attn = rates.cpu_attn or DEFAULT_CPU_ATTN
    return KvRates(rates.gpu_mem, rates.pcie, cpu_attn, disk, measured=True)


def disk_rate(kv_bytes: int) -> float:
    """The disk tier's KV read rate: KV files that fit in half the RAM available now stay in
    the page cache after they are written (read at ``DEFAULT_PAGE_CACHE``), larger ones are read
    cold (``DEFAULT_DISK``). Neither is calibrated."""
    import psutil

    fits = kv_bytes <= psutil.virtual_memory().available // 2
    return DEFAULT_PAGE_CACHE if fits else DEFAULT_DISK


def choose_for(engine, workload, rates=None, plan=None) -> KvCodecChoice | None:
    """``auto``'s codec per KV tier for ``workload`` (None unless ``kv_codec`` is ``auto``).
    With ``plan``, a layer's weight time counts its streamed and CPU-computed layers as
    crossing the link; before a plan exists, every layer as resident (the least weight time:
    KV weighs most). On a CPU machine the CPU attention rate is measured (cached)."""
    cfg = engine.config
    if str(cfg.kv_codec).strip().lower() != "auto":
        return None
    s, n = engine.spec, engine.spec.num_layers
    elem = torch.finfo(engine.dtype).bits // 8
    kv_heads = workload.batch * s.num_kv_heads
    full = sum(1 for layer in s.layers if not layer.window)
    disk = disk_rate(full * kv_heads * workload.context * 2 * s.head_dim * elem)
    cpu_attn = 0.0
    if not str(engine.device).startswith("cuda"):
        from ollm.engine.calibrate import cpu_attention_rate
        from ollm.storage.convert import default_cache_dir

        cache = Path(cfg.cache_dir or default_cache_dir())
        cpu_attn = cpu_attention_rate(s, workload.context, engine.dtype, cache)
    kr = kv_rates(engine.device, rates, cpu_attn, disk)
    moving = 0
    if plan is not None:
        moving = len(set(plan.streamed_for(Phase.DECODE)) | set(plan.cpu_layers))
    weight_s = layer_weight_seconds(kr, engine.store.max_layer_nbytes, moving, n)
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
