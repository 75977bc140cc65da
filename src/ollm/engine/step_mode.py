"""Whether a batch step runs the plan's CPU-computed (hybrid) layers or streams every layer.

The planner picks hybrid layers for one sequence; a batched step's rows and KV change what they
cost. `StepMode` asks the cost model (``predict``: True when the hybrid layers pay) and is told
each step's measured time (``record``), so a policy can correct a wrong prediction from what the
steps really took.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ollm.planning.costmodel import hybrid_step_pays
from ollm.tiers import Phase


class StepMode:
    """The per-step choice of streaming every layer (True) or running the hybrid layers."""

    def __init__(self, predict: Callable[[int, int], bool] | None) -> None:
        """``predict(rows, kv_tokens)``: whether the hybrid layers pay for a step of ``rows``
        query rows over ``kv_tokens`` held tokens (None: no CPU layers, always stream-free)."""
        self.predict = predict
        self.last: bool | None = None

    def stream(self, rows: int, kv_tokens: int) -> bool:
        """Whether this step streams every layer (skipping the plan's CPU layers)."""
        self.last = self.predict is not None and not self.predict(rows, kv_tokens)
        return self.last

    def record(self, seconds: float) -> None:
        """The measured wall time of the step `stream` was last asked about."""


def hybrid_predictor(runner, rates) -> Callable[[int, int], bool] | None:
    """The cost model's answer for ``runner``'s plan (`costmodel.hybrid_step_pays`), or None
    when the plan has no CPU layers or the rates are unknown."""
    plan = runner.plan
    if not (rates and plan.cpu_layers):
        return None
    spec, elem = runner.spec, torch.finfo(runner.dtype).bits // 8
    per_token = 2 * spec.num_kv_heads * spec.head_dim * elem  # one layer's KV bytes per token
    n_str = len(plan.streamed_for(Phase.PREFILL))

    def pays(rows: int, kv_tokens: int) -> bool:
        return hybrid_step_pays(
            rates, len(plan.cpu_layers), n_str, plan.layer_bytes, elem, rows, per_token * kv_tokens
        )

    return pays
