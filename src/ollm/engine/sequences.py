"""The scheduler's plain data per request: lifecycle, state, and what a preemption weighs.

Split out of `engine/scheduler.py` (file size) so that the step builder (`engine/step_builder.py`)
and the scheduler share them without importing each other; the scheduler re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from ollm.engine.stepplan import Request
from ollm.kv.blocks import BlockTable

PreemptMode = Literal["swap", "recompute"]


@dataclass(frozen=True)
class PreemptionInfo:
    """What a preemption policy weighs: recompute ``num_tokens`` or move ``num_blocks``."""

    seq_id: str
    num_tokens: int  # tokens whose KV would be recomputed
    num_blocks: int  # blocks a swap would move out (and later back in), over all KV groups


def prefer_swap(info: PreemptionInfo) -> PreemptMode:
    """Default policy: keep computed KV (swap) whenever the swap tier has room."""
    return "swap"


def by_cost(block_bytes: int, link_bytes_per_s: float, recompute_tokens_per_s: float):
    """A policy that swaps when moving the blocks out and back is faster than recomputing."""

    def policy(info: PreemptionInfo) -> PreemptMode:
        swap_s = 2 * info.num_blocks * block_bytes / link_bytes_per_s
        return "swap" if swap_s < info.num_tokens / recompute_tokens_per_s else "recompute"

    return policy


class SeqStatus(Enum):
    """Lifecycle of a sequence."""

    WAITING = "waiting"  # no KV (new, or preempted by recompute)
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted, its KV in the swap tier
    FINISHED = "finished"


QUEUED = (SeqStatus.WAITING, SeqStatus.SWAPPED)


@dataclass
class SeqState:
    """Scheduler-side state of one request (plain data)."""

    request: Request
    arrival: int
    tables: dict[str, BlockTable]
    tokens: list[int] = field(default_factory=list)  # prompt + accepted output tokens
    num_computed: int = 0  # leading tokens whose KV is in the tables
    status: SeqStatus = SeqStatus.WAITING
    keys: list[bytes] = field(default_factory=list)  # chained prefix keys of full blocks
    num_preemptions: int = 0

    @property
    def order(self) -> tuple[int, int]:
        """Priority order: lower first."""
        return (self.request.priority, self.arrival)

    @property
    def num_output(self) -> int:
        """Tokens generated so far."""
        return len(self.tokens) - len(self.request.prompt)
