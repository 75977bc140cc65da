"""The MLP of some streamed layers on the CPU in decode (``EngineConfig.mlp_cpu``, default on).

A batch-engine decode step whose KV sits on the device streams every non-resident layer over a
saturated link (Llama-3.1-8B shapes on an H200 at 8 GiB, 16 sequences sharing a 6k prefix: 21 x
436 MB per step, the copies' floor). A layer marked ``mlp_cpu`` whose weights sit in pinned
RAM copies only its attention's tensors to the GPU in a decode step (84 of 436 MB there); the
attention runs on the GPU over its KV as before, and the MLP (gated, dense) runs on the CPU from
the RAM copy, the hidden states moved over and back (``models.decoder.mlp``: an MLP runs where
its weights sit). Prefill copies the whole layer, as before. Worth it where the CPU's MLP of a
decode step's rows (its weight read at the measured ``cpu_mem``, its matmuls at the row count's
rate) fits in the time the copy engine saves, which the ring can cover only a layer or two
ahead: the count and positions (spread by ``interleave``) are the ones whose decode step,
simulated layer by layer (``decode_split.choose_kv_fetch`` with the engine's chain), is
shortest. A planner-only estimate at one H200 host's rates (CPU weight read 65 GB/s): about 6 ms
per CPU MLP at 16 rows, 8-10 layers, a 143 ms step against 166.5 ms; at 9 ms per MLP no gain.
Dense layers only (no experts), batch-engine GPU plans with measured rates, without CPU-computed
or decode-resident layers. The engine measures the choice against streaming every layer
(``engine/step_mode.py``), as it does for CPU-computed layers.

The layout (which layers are resident, whose KV sits where) is chosen without it
(``plan_placement``); it only marks layers of that layout. When the choice saw it, an H200's
batch-16 layout (3 resident layers, 14 marked) stepped in 0.57 s against its predicted 0.19 s,
and the engine fell back to streaming (0.244 s against the plain layout's 0.17 s). Measured on
H200s (docs/benchmarks.md, twelfth session): 7 layers marked on the shared-prefix plan, decode
steps 0.124-0.13 s against 0.166 s, the 16 requests in 2.35-2.37 s against 2.81 s."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ollm.tiers import Tier

if TYPE_CHECKING:
    from ollm.planning.placement import PlacementPlan, Workload
    from ollm.planning.sizing import PlanSizes


# Layers are marked only for a predicted step at least this much shorter than streaming whole
# layers: the shared-prefix plans predicted 5.5-19% at six H200 hosts' rates and measured ~25%
# (2026-12-02); plans whose RAM KV the CPU also attends predicted 0-7% and are unmeasured, and
# a near-tie is not worth the steps StepMode spends probing it.
MIN_GAIN = 0.03


def mlp_share(spec) -> float:
    """The MLP's share of a dense layer's parameters (``ModelSpec.layer_param_count``)."""
    return 3 * spec.hidden_size * spec.intermediate_size / spec.layer_param_count()


def mlp_cpu_s(spec, store, rates, rows: int) -> tuple[float, int]:
    """(seconds a decode step's MLP of ``rows`` rows adds to the chain on the CPU, the MLP's
    bytes a decode step no longer copies) for the largest layer: its weight read while copies
    run, its matmuls at the rows' rate, the hidden states' hand-over both ways."""
    from ollm.planning.costmodel import CPU_HANDOFF_S

    share = mlp_share(spec)
    nbytes = int(store.max_layer_nbytes * share)
    params = int(spec.layer_param_count() * share)
    return rates.cpu_layer_s(nbytes, params, rows, True) + CPU_HANDOFF_S, nbytes


def mlp_cpu_layers(plan: PlacementPlan) -> list[int]:
    """Layers whose MLP the CPU computes in decode."""
    return [i for i, p in enumerate(plan.layers) if p.mlp_cpu]


def mlp_cpu_rows(plan: PlacementPlan) -> list[tuple[str, str]]:
    """``describe`` rows: the layers whose MLP the CPU computes in decode."""
    chosen = mlp_cpu_layers(plan)
    if not chosen:
        return []
    return [
        (
            "MLP on the CPU in decode",
            f"{len(chosen)} streamed layers copy only their attention (forwards of <= "
            f"{plan.cpu_max_tokens} tokens): {chosen}",
        )
    ]


def plan_mlp_cpu(plan: PlacementPlan, spec, store, sz: PlanSizes, rates, work: Workload,
                 kv_read=None) -> PlacementPlan:  # fmt: skip
    """``plan`` with ``mlp_cpu`` layers where the simulated decode step is shorter (see the
    module docstring); forwards of at most ``work.batch`` rows (one per sequence) use them.
    Returned as it is when none shortens the step by ``MIN_GAIN`` or the plan does not
    qualify."""
    from ollm.planning.costmodel import interleave
    from ollm.planning.decode_split import choose_kv_fetch

    if (not sz.engine or rates is None or not plan.device.startswith("cuda")
            or spec.moe is not None or spec.linear_attn is not None
            or plan.decode_resident or plan.cpu_layers):  # fmt: skip
        return plan  # (a step that streams every layer must copy whole layers: StepMode)
    cands = [i for i, p in enumerate(plan.layers) if p.tier == Tier.CPU]  # all streamed here
    if not cands:
        return plan
    rows = max(1, work.batch)
    mlp = mlp_cpu_s(spec, store, rates, rows)

    def step(k: int) -> float:
        chosen = interleave(cands, k)
        layers = [replace(p, mlp_cpu=i in chosen) for i, p in enumerate(plan.layers)]
        return choose_kv_fetch(store, layers, rates, work, sz.per_token, dict(plan.predicted),
                               plan.ring_slots, kv_read, False, True, mlp)[2]  # fmt: skip

    steps = {k: step(k) for k in range(len(cands) + 1)}
    k = min(steps, key=lambda x: (round(steps[x], 6), x))
    if k == 0 or steps[k] > steps[0] * (1 - MIN_GAIN):
        return plan
    chosen = interleave(cands, k)
    layers = tuple(replace(p, mlp_cpu=i in chosen) for i, p in enumerate(plan.layers))
    predicted = {**plan.predicted, "decode s (KV split)": steps[k]}
    return replace(plan, layers=layers, predicted=predicted,
                   cpu_max_tokens=max(plan.cpu_max_tokens, rows))  # fmt: skip
