"""The step contract of engine v2 as plain data: requests in, step plans to the runner,
per-sequence updates out (no tensors; the runner and the scheduler both import this)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ollm.kv.blocks import BlockMove, BlockRef


@dataclass(frozen=True)
class Request:
    """One generation request: token ids in, at most ``max_new_tokens`` out."""

    id: str
    prompt: tuple[int, ...]
    max_new_tokens: int
    priority: int = 0  # lower runs first
    eos_token_ids: frozenset[int] = frozenset()
    sampling: object = None  # sampling parameters, passed through to the runner untouched


@dataclass(frozen=True)
class SeqStep:
    """One sequence's share of a step."""

    seq_id: str
    token_ids: tuple[int, ...]  # query tokens: uncomputed tokens, then ``num_draft`` drafts
    start: int  # position of token_ids[0]; the KV after the step covers [0, start + len)
    num_draft: int
    block_tables: Mapping[str, tuple[BlockRef | None, ...]]  # per KV group, after this step
    needs_logits: bool  # the step reaches the end of the known tokens
    sampling: object = None  # the request's sampling parameters
    # Drafts forming a tree (speculative trees): parent of each draft among the drafts, -1 for
    # the last uncomputed token; None: the drafts are a chain. Parents come before children.
    draft_parents: tuple[int, ...] | None = None

    @property
    def positions(self) -> range:
        """KV slots of the query tokens (their positions too, unless the drafts are a tree)."""
        return range(self.start, self.start + len(self.token_ids))

    def row_parents(self) -> list[int]:
        """Parent row of each query row (-1: the KV before ``start``): a chain, or the tree."""
        u = len(self.token_ids) - self.num_draft  # uncomputed tokens before the drafts
        if self.draft_parents is None:
            return list(range(-1, len(self.token_ids) - 1))
        return list(range(-1, u - 1)) + [u + p if p >= 0 else u - 1 for p in self.draft_parents]

    def rope_positions(self) -> list[int]:
        """Rotary position of each query row: ``start`` + its depth (its slot for a chain)."""
        if self.draft_parents is None:
            return list(self.positions)
        depth: list[int] = []
        for p in self.row_parents():
            depth.append(0 if p < 0 else depth[p] + 1)
        return [self.start + d for d in depth]

    @property
    def num_logits(self) -> int:
        """Logits wanted: of the last ``num_draft + 1`` query tokens when ``needs_logits``."""
        return self.num_draft + 1 if self.needs_logits else 0


@dataclass(frozen=True)
class StepPlan:
    """What the runner computes in one weight pass."""

    seqs: tuple[SeqStep, ...]
    moves: Mapping[str, tuple[BlockMove, ...]]  # per KV group; run in order before the forward
    preempted: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        """Query tokens of the whole step."""
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass(frozen=True)
class SeqUpdate:
    """What a step produced for one sequence."""

    seq_id: str
    new_tokens: tuple[int, ...]
    finish_reason: str | None = None  # "stop" (EOS), "length"
