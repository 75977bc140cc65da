"""Continuous-batching scheduler of engine v2: plain data in, plain data out, no tensors.

Every step ``schedule()`` returns a `StepPlan`: for each chosen sequence the query tokens of this
step (a prefill chunk, the one token to decode, or that token plus k draft tokens), their
positions, its block tables (one per KV group) and whether logits are needed, plus the block
moves (copy-on-write, swaps) to run before the forward. ``update(outputs)`` takes the tokens
accepted per sequence (sampled, or verified drafts plus one), trims rejected drafts' KV, finishes
sequences (EOS, length) and frees their blocks.

Policy (as in nano-vllm / vLLM v1, token-centric): sequences that are decoding go first (one
token, or a few with drafts, each), then running prefills continue chunk by chunk, then waiting
requests are admitted, all within ``max_step_tokens``; each pass in priority order (lower value
first, then arrival). A sequence short of KV blocks preempts the worst running sequence below it
(swap to the swap tier, or drop and recompute, as ``preemption`` decides); one with nothing below
it preempts itself. A prompt whose leading full blocks are cached (same chained keys), or are
computed in full by a sequence chosen before it in the same step (`engine/step_builder.py`),
adopts them and prefills only the rest. The step builder lives in `engine/step_builder.py`, the
per-request data in `engine/sequences.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from collections.abc import Sequence as Seq

from ollm.engine.sequences import (
    QUEUED,
    PreemptionInfo,
    PreemptMode,
    SeqState,
    SeqStatus,
    by_cost,
    prefer_swap,
)
from ollm.engine.step_builder import StepBuilder
from ollm.engine.stepplan import Request, SeqStep, SeqUpdate, StepPlan
from ollm.errors import RequestError
from ollm.kv.blocks import BlockManager, chain_keys

__all__ = [
    "KVCapacityError",
    "PreemptionInfo",
    "Request",
    "Scheduler",
    "SeqStatus",
    "SeqStep",
    "SeqUpdate",
    "StepPlan",
    "by_cost",
    "prefer_swap",
]


class KVCapacityError(RequestError):
    """A request needs more KV than the allocation tiers hold, even alone."""


class Scheduler:
    """Continuous batching over one `BlockManager` per KV group (e.g. ``{"full": ...,
    "sliding": ...}``); all groups use the same ``block_tokens``."""

    def __init__(
        self,
        kv: Mapping[str, BlockManager],
        max_step_tokens: int,
        max_running: int = 256,
        preemption: Callable[[PreemptionInfo], PreemptMode] = prefer_swap,
        prefix_caching: bool = True,
    ) -> None:
        if not kv:
            raise ValueError("at least one KV group is needed")
        sizes = {m.block_tokens for m in kv.values()}
        if len(sizes) != 1:
            raise ValueError(f"KV groups disagree on block_tokens: {sorted(sizes)}")
        if max_step_tokens < 1 or max_running < 1:
            raise ValueError("max_step_tokens and max_running must be >= 1")
        self.kv = dict(kv)
        self.block_tokens = sizes.pop()
        self.max_step_tokens = max_step_tokens
        self.max_running = max_running
        self.preemption = preemption
        self.prefix_caching = prefix_caching
        self.seqs: dict[str, SeqState] = {}
        self._arrivals = 0
        self._inflight: StepPlan | None = None
        self.prefix_hits = 0
        self.prefix_saved_tokens = 0
        self.inflight_hits = 0  # prefix hits that took blocks computed in their own step
        self.num_preemptions = 0

    # -- requests ---------------------------------------------------------------------------

    def max_request_tokens(self) -> int | None:
        """The most prompt + output tokens one request may have (it must fit alone); None when
        every KV group is a sliding window that fits."""
        limits = [
            m.capacity_blocks() * self.block_tokens
            for m in self.kv.values()
            if m.max_live_blocks(1 << 62, self.max_step_tokens) > m.capacity_blocks()
        ]
        return min(limits, default=None)

    def add(self, request: Request) -> None:
        """Queue a request; raises `KVCapacityError` if it could never fit."""
        if not request.prompt:
            raise RequestError(f"request {request.id!r}: empty prompt")
        if request.max_new_tokens < 1:
            raise RequestError(f"request {request.id!r}: max_new_tokens must be >= 1")
        if request.id in self.seqs:
            raise RequestError(f"request id {request.id!r} is already queued")
        total = len(request.prompt) + request.max_new_tokens
        for name, m in self.kv.items():
            if m.max_live_blocks(total, self.max_step_tokens) > m.capacity_blocks():
                raise KVCapacityError(
                    f"request {request.id!r} needs KV for {total} tokens (prompt "
                    f"{len(request.prompt)} + max_new_tokens {request.max_new_tokens}); KV group "
                    f"{name!r} holds at most {self.max_request_tokens()} tokens"
                )
        tables = {g: m.new_table() for g, m in self.kv.items()}
        self.seqs[request.id] = SeqState(request, self._arrivals, tables, list(request.prompt))
        self._arrivals += 1

    def cancel(self, seq_id: str) -> bool:
        """Drop a request and free its blocks; False if it is unknown or already finished."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return False
        self._release(seq)
        return True

    def has_work(self) -> bool:
        """Whether any request is unfinished."""
        return bool(self.seqs)

    def _release(self, seq: SeqState) -> None:
        for g, m in self.kv.items():
            m.free(seq.tables[g])
        seq.status = SeqStatus.FINISHED

    # -- scheduling -------------------------------------------------------------------------

    def schedule(
        self,
        drafts: Mapping[str, Seq[int]] | None = None,
        tree_parents: Mapping[str, Seq[int]] | None = None,
    ) -> StepPlan:
        """Choose this step's sequences and tokens; ``drafts`` proposes tokens per decoding
        sequence (truncated to the budget and to the request's remaining length), a tree when
        ``tree_parents`` has the sequence (each draft's parent, see `SeqStep.draft_parents`;
        parents first, so any truncation is a tree)."""
        if self._inflight is not None:
            raise RuntimeError("schedule() called twice without update()")
        step = StepBuilder(self, drafts or {}, tree_parents or {})
        try:
            running = [s for s in self.seqs.values() if s.status is SeqStatus.RUNNING]
            # Decodes first (a token or a few each), then prefill chunks, each in priority order.
            for seq in sorted(running, key=lambda s: (self._pending(s) > 1, s.order)):
                if seq.status is SeqStatus.RUNNING and step.budget:
                    step.run(seq)
            waiting = [s for s in self.seqs.values() if s.status in QUEUED]
            for seq in sorted(waiting, key=lambda s: s.order):
                if not step.budget or not step.admit(seq):
                    break  # strict priority: later requests do not overtake a blocked one
        finally:  # this step's offered blocks are for its own admissions only
            for m in self.kv.values():
                m.clear_inflight()
        self._inflight = step.plan()
        return self._inflight

    @staticmethod
    def _pending(seq: SeqState) -> int:
        return len(seq.tokens) - seq.num_computed

    def _running_count(self) -> int:
        return sum(s.status is SeqStatus.RUNNING for s in self.seqs.values())

    # -- results ----------------------------------------------------------------------------

    def update(self, outputs: Mapping[str, Seq[int]]) -> list[SeqUpdate]:
        """Apply a step's accepted tokens (for each sequence with ``needs_logits``: the accepted
        drafts followed by one sampled token)."""
        plan, self._inflight = self._inflight, None
        if plan is None:
            raise RuntimeError("update() without a scheduled step")
        updates = []
        for st in plan.seqs:
            seq = self.seqs.get(st.seq_id)
            if seq is None:  # cancelled while the step ran
                continue
            if not st.needs_logits:
                seq.num_computed = st.start + len(st.token_ids)
                self._register(seq)
                continue
            if st.seq_id not in outputs:
                raise KeyError(f"no output for sequence {st.seq_id!r}, which needed logits")
            update = self._accept(seq, st, list(outputs[st.seq_id]))
            updates.append(update)
            if update.finish_reason is not None:
                del self.seqs[seq.request.id]
                self._release(seq)
        return updates

    def abort_step(self) -> list[str]:
        """Abandon the step in flight (the runner failed): every sequence it touched drops its
        KV and waits to be recomputed, since its moves and writes may have half run. Cached
        prefix blocks stay valid (no step writes into a keyed block), so recomputing is mostly
        prefix hits; blocks adopted from a writer of the same step are dropped with it (its
        adopters are in the step too), never keyed. Returns the ids sent back."""
        plan, self._inflight = self._inflight, None
        if plan is None:
            return []
        touched = [s.seq_id for s in plan.seqs] + list(plan.preempted)
        for sid in dict.fromkeys(touched):
            seq = self.seqs.get(sid)
            if seq is not None:
                for g, m in self.kv.items():
                    m.free(seq.tables[g])
                seq.num_computed, seq.status = 0, SeqStatus.WAITING
        return list(dict.fromkeys(touched))

    def _accept(self, seq: SeqState, st: SeqStep, accepted: list[int]) -> SeqUpdate:
        drafts = list(st.token_ids[len(st.token_ids) - st.num_draft :])
        if st.draft_parents is not None:  # a tree: the accepted drafts are a path (its KV
            drafts = _tree_path(drafts, st.draft_parents, accepted[:-1])  # moved to the front)
        if (
            not 1 <= len(accepted) <= st.num_draft + 1
            or accepted[:-1] != drafts[: len(accepted) - 1]
        ):
            raise ValueError(
                f"sequence {st.seq_id!r}: outputs {accepted} are not accepted drafts of "
                f"{drafts} plus one token"
            )
        rejected = st.num_draft - (len(accepted) - 1)
        if rejected:  # trimming no token changes nothing
            for g, m in self.kv.items():
                m.trim(seq.tables[g], rejected)
        seq.num_computed = st.start + len(st.token_ids) - rejected
        req, new, reason = seq.request, [], None
        for tok in accepted:
            new.append(tok)
            if tok in req.eos_token_ids:
                reason = "stop"
            elif seq.num_output + len(new) >= req.max_new_tokens:
                reason = "length"
            if reason:
                break
        seq.tokens += new
        self._register(seq)
        return SeqUpdate(req.id, tuple(new), reason)

    def _register(self, seq: SeqState) -> None:
        if self.prefix_caching:
            if seq.num_computed // self.block_tokens != len(seq.keys):  # else keys are whole
                seq.keys = chain_keys(seq.tokens[: seq.num_computed], self.block_tokens, seq.keys)
            for g, m in self.kv.items():
                m.register(seq.tables[g], seq.keys)

    def usage(self) -> dict[str, dict[str, tuple[int, int]]]:
        """(used, free) blocks per tier, per KV group."""
        return {g: m.usage() for g, m in self.kv.items()}


def _tree_path(drafts: list[int], parents: Seq[int], tokens: list[int]) -> list[int]:
    """The draft tokens of the tree path that ``tokens`` follows from the root, as far as it
    follows one (the caller compares it with ``tokens``)."""
    node, path = -1, []
    for tok in tokens:
        nxt = next((i for i, p in enumerate(parents) if p == node and drafts[i] == tok), None)
        if nxt is None:
            break
        node = nxt
        path.append(tok)
    return path
