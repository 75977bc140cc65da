"""The draft model of ``speculate="draft:PATH"`` shares the target's memory budget.

A draft model drafts every step, so it must sit wholly on the device (streaming it would cost the
very weight traffic speculation saves). It is loaded before the target and planned first; the
bytes its plan reserves on the device (weights, KV, activations) leave the target's budget
(``gpu_memory`` on a GPU, ``cpu_memory`` on a CPU machine), so the two never overcommit the
device. When both cannot fit, the request is refused with the minimum budget that would fit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ollm.config import parse_speculate
from ollm.errors import BudgetError
from ollm.sizes import format_size

if TYPE_CHECKING:
    from ollm.engine.core import Engine


def draft_path(speculate: str) -> str | None:
    """PATH of a ``[modes:]draft:PATH`` setting (None for other drafters)."""
    _, kind, arg = parse_speculate(speculate)
    return arg if kind == "draft" else None


def open_draft(target: Engine, path: str, budget: int | None) -> Engine:
    """Load the draft model for ``target`` (same device and workload) under ``budget`` bytes of
    the device; BudgetError when it would not be wholly resident there."""
    from ollm.config import EngineConfig
    from ollm.engine.core import Engine

    cfg, on_gpu = target.config, target.device.startswith("cuda")
    mem = {"gpu_memory": budget} if on_gpu else {"cpu_memory": budget}
    try:
        draft = Engine(EngineConfig(
            model=str(path), device=target.device, max_context=cfg.max_context,
            max_batch=cfg.max_batch, cache_dir=cfg.cache_dir, progress=cfg.progress, **mem,
        ))  # fmt: skip
    except BudgetError as exc:
        raise BudgetError(f"the draft model {path} does not fit the budget: {exc}") from None
    if budget is not None and draft.plan.streamed:
        draft.close()
        raise BudgetError(
            f"the draft model {path} must be wholly resident but {format_size(budget)} holds "
            f"only {len(draft.plan.layers) - len(draft.plan.streamed)} of its "
            f"{len(draft.plan.layers)} layers; raise the budget or draft by lookup/self"
        )
    return draft


def reserve_draft(target: Engine) -> int:
    """Load the configured draft model first (``target.draft``) and take its device bytes out
    of the target's budget; returns those bytes (0 without a draft model or a budget)."""
    path = draft_path(target.config.speculate)
    if path is None:
        return 0
    on_gpu = target.device.startswith("cuda")
    budget = target.gpu_memory if on_gpu else target.config.cpu_memory
    target.draft = open_draft(target, path, budget)
    if budget is None:
        return 0
    used = target.draft.plan.peak_device_bytes
    if on_gpu:
        target.gpu_memory = budget - used
    else:
        import dataclasses

        target.config = dataclasses.replace(target.config, cpu_memory=budget - used)
    return used


def budget_error(target: Engine, exc: BudgetError, draft_bytes: int) -> BudgetError:
    """The target's refusal, saying the draft model took ``draft_bytes`` of the budget."""
    what = "gpu_memory" if target.device.startswith("cuda") else "cpu_memory"
    return BudgetError(
        f"{exc} -- after the draft model's {format_size(draft_bytes)} (resident on the device, "
        f"taken from {what}); with the draft model {what} must be at least the minimum above "
        f"plus {format_size(draft_bytes)}"
    )
