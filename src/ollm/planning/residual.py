"""Where a long prompt's residual stream lives during prefill: on the device (the default) or in
pinned RAM, each row chunk copied to the device before a layer computes it and back after
(``Runner._host_residual_block``). Prefill runs layer-major, so the hidden states of the whole
prompt wait between layers; in RAM they leave the device two chunks of rows (counted by
``accounting.activation_parts``). Chosen only when the device plan is otherwise refused."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from ollm.errors import BudgetError, OllmError
from ollm.planning.sizing import MIN_CHUNK

if TYPE_CHECKING:
    from ollm.planning.placement import PlacementPlan, Workload
    from ollm.planning.sizing import PlanSizes

RESIDUAL_MODES = ("auto", "gpu", "ram")
COST_KEY = "prefill residual copies s"


def check_mode(mode: str) -> None:
    """A one-line error for an unknown ``prefill_residual``."""
    if mode not in RESIDUAL_MODES:
        raise OllmError(
            f"prefill_residual must be one of {', '.join(RESIDUAL_MODES)}, not {mode!r}"
        )


def plan_auto(
    plan: Callable[[str], PlacementPlan], work: Workload, on_gpu: bool, budget: int | None
) -> PlacementPlan:
    """The device-residual plan when it fits (plans that fit keep it: same plan as without the
    option); else, on a GPU with a budget and a prompt long enough to chunk, the plan with the
    residual stream in pinned RAM, whose refusal names the smaller minimum."""
    try:
        return plan("gpu")
    except BudgetError:
        if not on_gpu or budget is None or work.prefill_tokens <= MIN_CHUNK:
            raise
    return plan("ram")


def with_cost(plan: PlacementPlan, sz: PlanSizes, rates, layers: int) -> PlacementPlan:
    """``plan`` marked ``residual_ram`` when ``sz`` is, with the prefill time its copies add
    when rates were measured: each layer moves the residual stream in and out once over the
    host->GPU link."""
    if not sz.residual_ram:
        return plan
    predicted = dict(plan.predicted)
    if rates is not None and getattr(rates, "pcie", 0):
        predicted[COST_KEY] = 2 * sz.residual * layers / rates.pcie
    return replace(plan, residual_ram=True, predicted=predicted)
