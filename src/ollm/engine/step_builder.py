"""One ``Scheduler.schedule()`` call: budget, chosen sequences, block moves and preemptions.

Sequences are chosen in order (running decodes, running prefill chunks, then admissions), and
their query rows are packed in that order. An admission adopts the leading full blocks of its
prompt that are cached (keyed once computed) or that a sequence chosen before it in this same
step computes in full (*in-step adoption*: the blocks are offered under their chained prefix
keys, `BlockManager.offer_inflight`, reference counted like any shared block and keyed by
``register`` after the step). That is exact because every KV layer object writes all rows of a
call before it attends any of them, and the runner runs a layer's row chunks in row order
(`Runner._chunked_block`), so at each layer the writer's K/V is in the pool before a later row
reads it: `kv/packed.py` (device pools; host pools written asynchronously from a GPU are read
by the CPU only after ``_host_read`` waits on the layer's writes, and copied to the GPU on the
same stream after them), `kv/codec_paged.py` (a block is encoded in the call whose rows fill
it, before that call attends), `kv/shared_prefill.py` (groups attended in calls holding all
their rows). A writer whose offered blocks were adopted is not preempted in that step (its
adopters would read blocks never written); one preempted before is withdrawn. An aborted step
frees the writer and its adopters alike (`Scheduler.abort_step`), and the offered blocks, never
keyed, go back to the free list.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

from ollm.engine.sequences import PreemptionInfo, SeqState, SeqStatus
from ollm.engine.stepplan import SeqStep, StepPlan
from ollm.kv.blocks import BlockManager, BlockMove, chain_keys

if TYPE_CHECKING:
    from ollm.engine.scheduler import Scheduler


class StepBuilder:
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
        # In-step adoption: only worth offering blocks while a new request may be admitted.
        self.offering = sched.prefix_caching and any(
            s.status is SeqStatus.WAITING for s in sched.seqs.values()
        )
        self.offered: dict[str, dict[str, list[bytes]]] = {}  # writer -> group -> keys offered
        self.writers: dict[bytes, set[str]] = {}  # offered key -> the sequences that offered it
        self.pinned: set[str] = set()  # writers whose offered blocks were adopted this step

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
            self._pin_writers(seq.keys[:hit])
        seq.status = SeqStatus.RUNNING
        self._take(seq, n, d)
        return True

    def _prefix_hit(self, seq: SeqState) -> int:
        """Leading blocks every KV group can take from the cache or this step's offers (at
        least one token is left to compute, so the step yields logits)."""
        if not self.s.prefix_caching:
            return 0
        b = self.s.block_tokens
        seq.keys = chain_keys(seq.tokens, b, seq.keys)
        n = min(m.match_prefix(seq.keys, (len(seq.tokens) - 1) // b) for m in self.s.kv.values())
        while n and not all(m.can_adopt(seq.keys, n) for m in self.s.kv.values()):
            n -= 1
        return n

    def _pin_writers(self, keys: Seq[bytes]) -> None:
        """The sequences whose offered blocks an admission may have taken (a block a group
        found cached instead counts too: pinning more only narrows this step's preemptions)."""
        found = {w for k in keys for w in self.writers.get(k, ())}
        if found:
            self.pinned |= found
            self.s.inflight_hits += 1

    def _take(self, seq: SeqState, n: int, drafts: list[int]) -> None:
        for g, m in self.s.kv.items():
            self.moves[g] += m.append(seq.tables[g], n + len(drafts))
        self.chosen[seq.request.id] = (seq, seq.num_computed, len(drafts))
        self.budget -= n + len(drafts)
        if self.offering:
            self._offer(seq, n)

    def _offer(self, seq: SeqState, n: int) -> None:
        """Offer the full blocks ``seq``'s ``n`` query tokens complete (drafts excluded: their
        KV may be trimmed) to later admissions of this step."""
        b = self.s.block_tokens
        lo, hi = seq.num_computed // b, (seq.num_computed + n) // b
        if hi <= lo:
            return
        if len(seq.keys) < hi:
            seq.keys = chain_keys(seq.tokens[: hi * b], b, seq.keys)
        sid = seq.request.id
        for g, m in self.s.kv.items():
            keys = m.offer_inflight(seq.tables[g], seq.keys, lo, hi)
            if keys:
                self.offered.setdefault(sid, {})[g] = keys
                for k in keys:
                    self.writers.setdefault(k, set()).add(sid)

    def _withdraw(self, sid: str) -> None:
        """Take back what ``sid`` offered (it leaves the step; nobody adopted it: pinned)."""
        assert sid not in self.pinned, f"{sid!r} was adopted from in this step"
        for g, keys in self.offered.pop(sid, {}).items():
            self.s.kv[g].withdraw_inflight(keys)
            for k in keys:
                self.writers.get(k, set()).discard(sid)

    def _preempt_below(self, seq: SeqState, running_only: bool = False) -> bool:
        """Preempt the worst sequence ordered after ``seq`` that holds allocation-tier blocks: a
        running one, or a swapped one whose shared blocks stayed behind when it was swapped
        (several swapped sequences can pin such a block); never a writer adopted from in this
        step. False if there is none."""
        worse = [
            s
            for s in self.s.seqs.values()
            if s.order > seq.order
            and s.request.id not in self.pinned
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
            self._withdraw(vid)
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
