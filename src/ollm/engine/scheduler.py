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
it preempts itself. A prompt whose leading full blocks are cached (same chained keys) adopts them
and prefills only the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from ollm.engine.stepplan import Request, SeqStep, SeqUpdate, StepPlan
from ollm.errors import RequestError
from ollm.kv.blocks import BlockManager, BlockMove, BlockTable, chain_keys

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

PreemptMode = Literal["swap", "recompute"]


class KVCapacityError(RequestError):
    """A request needs more KV than the allocation tiers hold, even alone."""


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
        step = _StepBuilder(self, drafts or {}, tree_parents or {})
        running = [s for s in self.seqs.values() if s.status is SeqStatus.RUNNING]
        # Decodes first (a token or a few each), then prefill chunks, each in priority order.
        for seq in sorted(running, key=lambda s: (self._pending(s) > 1, s.order)):
            if seq.status is SeqStatus.RUNNING and step.budget:
                step.run(seq)
        waiting = [s for s in self.seqs.values() if s.status in _QUEUED]
        for seq in sorted(waiting, key=lambda s: s.order):
            if not step.budget or not step.admit(seq):
                break  # strict priority: later requests do not overtake a blocked one
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
        prefix hits. Returns the ids sent back."""
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


_QUEUED = (SeqStatus.WAITING, SeqStatus.SWAPPED)


class _StepBuilder:
    """One ``schedule()`` call: budget, chosen sequences, moves and preemptions."""

    def __init__(
        self, sched: Scheduler, drafts: Mapping[str, Seq[int]], parents: Mapping[str, Seq[int]]
    ) -> None:
        self.s = sched
        self.drafts, self.parents = drafts, parents
        self.budget = sched.max_step_tokens
        self.chosen: dict[str, tuple[SeqState, int, int]] = {}  # id -> (seq, start, n_draft)
        self.moves: dict[str, list[BlockMove]] = {g: [] for g in sched.kv}
        self.preempted: list[str] = []

    def _query(self, seq: SeqState) -> tuple[int, list[int]]:
        """Uncomputed tokens this step takes, and the drafts that follow them."""
        pending = len(seq.tokens) - seq.num_computed
        n = min(pending, self.budget)
        if n < pending:
            return n, []
        # Drafts past the request's length would be generated and thrown away (a tree's
        # nodes are not its depth: its drafter bounds the depth, the budget its nodes).
        room = seq.request.max_new_tokens - seq.num_output - 1
        if seq.request.id in self.parents:
            room = self.budget - n
        return n, list(self.drafts.get(seq.request.id, ()))[: max(0, min(room, self.budget - n))]

    def _fits(self, seq: SeqState, need: Callable[[str, BlockManager], int]) -> bool:
        return all(need(g, m) <= m.num_free() for g, m in self.s.kv.items())

    def run(self, seq: SeqState) -> None:
        """Schedule a running sequence, preempting worse ones (or itself) for blocks."""
        n, d = self._query(seq)
        while not self._fits(seq, lambda g, m: m.blocks_needed(seq.tables[g], n + len(d))):
            if not self._preempt_below(seq):
                self._preempt(seq)
                return
        self._take(seq, n, d)

    def admit(self, seq: SeqState) -> bool:
        """Start (or resume) a queued sequence if blocks and the batch size allow."""
        swapped = seq.status is SeqStatus.SWAPPED
        while True:  # a preemption changes what is cached and free: look again each time
            hit = 0 if swapped else self._prefix_hit(seq)
            if not swapped:
                seq.num_computed = hit * self.s.block_tokens
            n, d = self._query(seq)
            q = n + len(d)

            def need(g: str, m: BlockManager, hit: int = hit, q: int = q) -> int:
                t = seq.tables[g]
                if swapped:
                    return m.swap_in_blocks(t) + m.blocks_needed(t, q)
                return m.revived_blocks(seq.keys, hit) + -(-q // self.s.block_tokens)

            fits = self._fits(seq, need)
            if fits and self.s._running_count() < self.s.max_running:
                break
            if not self._preempt_below(seq, running_only=fits):  # fits: short of batch room only
                if not swapped:
                    seq.num_computed = 0
                return False
        for g, m in self.s.kv.items():
            if swapped:
                self.moves[g] += m.swap_in(seq.tables[g])
            elif hit:
                m.adopt_prefix(seq.tables[g], seq.keys, hit)
        if hit:
            self.s.prefix_hits += 1
            self.s.prefix_saved_tokens += hit * self.s.block_tokens
        seq.status = SeqStatus.RUNNING
        self._take(seq, n, d)
        return True

    def _prefix_hit(self, seq: SeqState) -> int:
        """Leading blocks every KV group can take from the cache (at least one token is left
        to compute, so the step yields logits)."""
        if not self.s.prefix_caching:
            return 0
        b = self.s.block_tokens
        seq.keys = chain_keys(seq.tokens, b, seq.keys)
        n = min(m.match_prefix(seq.keys, (len(seq.tokens) - 1) // b) for m in self.s.kv.values())
        while n and not all(m.can_adopt(seq.keys, n) for m in self.s.kv.values()):
            n -= 1
        return n

    def _take(self, seq: SeqState, n: int, drafts: list[int]) -> None:
        for g, m in self.s.kv.items():
            self.moves[g] += m.append(seq.tables[g], n + len(drafts))
        self.chosen[seq.request.id] = (seq, seq.num_computed, len(drafts))
        self.budget -= n + len(drafts)

    def _preempt_below(self, seq: SeqState, running_only: bool = False) -> bool:
        """Preempt the worst sequence ordered after ``seq`` that holds allocation-tier blocks: a
        running one, or a swapped one whose shared blocks stayed behind when it was swapped
        (several swapped sequences can pin such a block). False if there is none."""
        worse = [
            s
            for s in self.s.seqs.values()
            if s.order > seq.order
            and (
                s.status is SeqStatus.RUNNING
                or (
                    not running_only
                    and s.status is SeqStatus.SWAPPED
                    and self._holds_alloc_blocks(s)
                )
            )
        ]
        if not worse:
            return False
        self._preempt(max(worse, key=lambda s: s.order))
        return True

    def _holds_alloc_blocks(self, seq: SeqState) -> bool:
        return any(
            ref is not None and ref.tier in m.alloc_tiers
            for g, m in self.s.kv.items()
            for ref in seq.tables[g].blocks
        )

    def _preempt(self, victim: SeqState) -> None:
        vid = victim.request.id
        if vid in self.chosen:  # undo its share of this step
            _, start, _ = self.chosen.pop(vid)
            q = victim.tables[next(iter(self.s.kv))].length - start
            for g, m in self.s.kv.items():
                m.trim(victim.tables[g], q)
            self.budget += q
        blocks = sum(m.swap_out_blocks(victim.tables[g]) for g, m in self.s.kv.items())
        can_swap = all(
            m.swap_tier is not None
            and m.swap_out_blocks(victim.tables[g]) <= m.num_free([m.swap_tier])
            for g, m in self.s.kv.items()
        )
        info = PreemptionInfo(vid, victim.num_computed, blocks)
        # A swapped victim already chose to keep its KV: move the rest out if that frees a block;
        # if its blocks are all shared, only dropping it (recompute) can release them.
        if victim.status is SeqStatus.SWAPPED:
            swap = can_swap and blocks > 0
        else:
            swap = can_swap and self.s.preemption(info) == "swap"
        if swap:
            for g, m in self.s.kv.items():
                self.moves[g] += m.swap_out(victim.tables[g])
            victim.status = SeqStatus.SWAPPED
        else:
            for g, m in self.s.kv.items():
                m.free(victim.tables[g])
            victim.num_computed = 0
            victim.status = SeqStatus.WAITING
        victim.num_preemptions += 1
        self.s.num_preemptions += 1
        self.preempted.append(vid)

    def plan(self) -> StepPlan:
        """The step as plain data (block tables as they stand after every preemption)."""
        steps, first = [], next(iter(self.s.kv))
        for seq, start, n_draft in self.chosen.values():
            known = seq.tables[first].length - n_draft
            toks = seq.tokens[start:known]
            if n_draft:
                toks += list(self.drafts.get(seq.request.id, ())[:n_draft])
            tables = {g: seq.tables[g].snapshot() for g in self.s.kv}
            needs = known == len(seq.tokens)
            req = seq.request
            par = self.parents.get(req.id)
            tree = None if par is None or not n_draft else tuple(par[:n_draft])
            steps.append(
                SeqStep(req.id, tuple(toks), start, n_draft, tables, needs, req.sampling, tree)
            )
        moves = {g: tuple(v) for g, v in self.moves.items()}
        return StepPlan(tuple(steps), moves, tuple(self.preempted))


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
