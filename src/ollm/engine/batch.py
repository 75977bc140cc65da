"""Continuous batching through the real runner: `Scheduler` steps over paged KV pools.

Each step: ``Scheduler.schedule()`` -> block moves run on the pools -> one forward pass of the
runner (weights streamed once for every sequence of the step) over the step's query tokens
packed into one row, each sequence at its own positions and attending over its own blocks
(`ollm.kv.packed`) -> logits only at the rows that need them -> one `Sampler` per request ->
``Scheduler.update()``; EOS, stop token ids, stop strings and ``max_new_tokens`` end a request
and free its blocks. Sequences join and leave at every step; no left padding.

KV lives in paged pools per KV group (all full-attention layers, each sliding window), each
layer's in the tier its plan puts its KV in (device, pinned RAM, disk files: `engine.kvpools`),
with ``plan.kv_pools`` blocks per group (the planner's ``max_batch x max_context`` in blocks;
windowed groups only what a window keeps live) and an optional swap tier for preempted
sequences. Pools in host memory are attended by the CPU in decode, gathered to the GPU in
prefill (`kv.packed`). With ``kv_codec`` a home's full-attention blocks are stored encoded
(`kv.codec_paged`): blocks of whole codec groups, exact slots for the recent windows, at most
``max_batch`` sequences and ``kvpools.ENCODED_STEP_TOKENS`` tokens a step, no drafts yet.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ollm.engine.drafting import Draft
from ollm.engine.generate import SequenceOutput
from ollm.engine.kvpools import (
    DEVICE_TIER,
    batch_supported,
    build_pools,
    codec_block_tokens,
    encoded_limits,
    kv_groups,
    planned_blocks,
    workload_blocks,
)
from ollm.engine.runner import Runner
from ollm.engine.sampling import (
    Sampler,
    SamplingParams,
    TokenLogprob,
    greedy_picks,
    token_logprobs,
)
from ollm.engine.scheduler import Request, Scheduler, SeqStatus, StepPlan
from ollm.engine.speculative import Drafter, Speculator, as_speculator, verify_step
from ollm.engine.step_mode import StepMode, step_shape
from ollm.engine.textstream import IncrementalDetokenizer, StopMatcher
from ollm.engine.tree import compact_path
from ollm.kv.hostsplit import attach, split_budget
from ollm.kv.packed import HeldMemo, PackedStep
from ollm.kv.paged import PagedKVStore
from ollm.planning.accounting import PAGE_TOKENS
from ollm.telemetry.metrics import EngineMetrics, GenerationMetrics
from ollm.telemetry.timeline import phase as span

log = logging.getLogger(__name__)
BLOCK_TOKENS = PAGE_TOKENS  # tokens per KV block (planning.accounting says why 16)


@dataclass
class _Live:
    """Request-side state the scheduler does not keep: sampler, stops, text."""

    index: int
    out: SequenceOutput
    sampler: Sampler
    stops: set[int]
    max_new_tokens: int
    detok: IncrementalDetokenizer | None = None
    matcher: StopMatcher | None = None
    on_text: Callable[[int, str], None] | None = None
    on_token: Callable[[int, int], None] | None = None
    logprobs: int | None = None  # top log-probs to report per token (None: none)
    on_logprob: Callable[[int, TokenLogprob], None] | None = None
    step_logprobs: list[TokenLogprob] = field(default_factory=list)  # of the step's tokens


class BatchEngine:
    """Runs many requests at once through ``runner`` (see the module docstring)."""

    def __init__(
        self,
        runner: Runner,
        tokenizer=None,
        eos_ids: Sequence[int] = (),
        *,
        block_tokens: int = BLOCK_TOKENS,
        max_batch: int = 1,
        max_context: int = 4096,
        max_step_tokens: int | None = None,
        max_running: int = 256,
        swap_tokens: int = 0,
        prefix_caching: bool = True,
        pool_blocks: Mapping[str, int] | None = None,
        kv_dir: str | None = None,
        all_disk: bool = False,
        drafter: Speculator | Drafter | Callable[[Sequence[int]], Sequence[int]] | None = None,
        host_split: int = 0,
        rates=None,
    ) -> None:
        """Pools hold ``pool_blocks[group]`` blocks per KV group (default ``max_batch x
        max_context`` tokens per full-attention group), each layer's in its plan's KV tier
        (disk pools in a run directory under ``kv_dir``, every layer's with ``all_disk``), and
        ``swap_tokens`` tokens of swap for preempted sequences; a step
        carries at most ``max_step_tokens`` query tokens (default ``max_batch x
        max_context``, the planner's activation rows) of at most ``max_running`` sequences
        (each needs a float32 logits row). ``drafter`` (a `Speculator`, a `Drafter`, whose
        draft length adapts, or a plain ``fn(tokens) -> draft tokens``) proposes continuations
        of decoding requests, verified in the same pass without changing the output
        distribution (`ollm.engine.speculative`: greedy requests keep exactly the tokens greedy
        decoding picks). ``host_split``: GPU bytes to attend part of the RAM pools on the GPU
        (`ollm.kv.hostsplit`); ``rates``: the prior of the measured choice to skip the plan's
        CPU layers in a step (`ollm.engine.step_mode`)."""
        if not batch_supported(runner):
            raise ValueError("the batch engine needs the device-resident KV on one device")
        self.runner, self.tokenizer, self.eos_ids = runner, tokenizer, set(eos_ids)
        self.rates, self.streamed_steps = rates, 0
        self.speculator = as_speculator(drafter)
        self.speculate_default = True  # requests whose params leave ``speculate`` None draft
        self._draft_of: dict[str, Draft] = {}  # this step's drafts (distributions, trees)
        self._paths: dict[str, list[int]] = {}  # accepted tree nodes, for `compact_path`
        self._picked: dict[str, int] = {}  # this step's greedy tokens (`greedy_picks`)
        self.drafted = self.accepted_drafts = 0
        spec, plan = runner.spec, runner.plan
        self.layer_groups = kv_groups(runner)
        step_tokens = max_step_tokens or max_batch * max_context
        windows = {
            g: layer.window for layer, (g, _) in zip(spec.layers, self.layer_groups, strict=True)
        }
        if pool_blocks is None:
            pool_blocks = workload_blocks(
                windows, block_tokens, max_batch, max_context, step_tokens
            )
        swap = -(-swap_tokens // block_tokens)
        self.pools = build_pools(
            runner, self.layer_groups, pool_blocks, swap, block_tokens, windows, kv_dir, all_disk,
            (max_running, step_tokens), max_context,
        )  # fmt: skip
        self.device = torch.device(plan.device)
        self.splits = attach(self.pools.stores, self.device, host_split)
        self.step_mode = StepMode.for_runner(runner, rates, self.pools)  # measured: `summary()`
        managers = self.pools.managers
        self.scheduler = Scheduler(
            managers, step_tokens, max_running, prefix_caching=prefix_caching
        )
        self.live: dict[str, _Live] = {}
        self.finished: dict[str, SequenceOutput] = {}
        self._ids, self._held = itertools.count(), HeldMemo()  # block ids kept across steps
        self.steps = self.step_tokens = self.sampled = 0

    @classmethod
    def for_plan(
        cls,
        runner: Runner,
        tokenizer,
        eos_ids: Sequence[int],
        batch: int,
        context: int,
        kv_dir: str | None = None,
        all_disk: bool = False,
        host_split: bool = False,
        rates=None,
    ) -> BatchEngine:
        """An engine whose pools are the planner's (``plan.kv_pools`` blocks per KV group, each
        layer's in its KV tier; disk pools under ``kv_dir``, every layer's with ``all_disk``)
        when it planned for ``batch x context``, else that many tokens per full-attention
        group; with sliding-window layers a step
        carries at most one prefill chunk (the planner reserves ``2 window + chunk`` slots per
        sequence for them, and a paged window group must hold a whole step's tokens at once),
        else every sequence's whole prompt in one weight pass (at most ``plan.step_tokens``
        when planned for this engine). More than ``batch`` sequences may run while the pools
        hold them, as many as the plan's ``logit_rows`` (else what its activations hold)."""
        plan = runner.plan
        chunk = plan.prefill_chunk_tokens
        windowed = any(layer.window for layer in runner.spec.layers)
        step = chunk if windowed and chunk else batch * context
        step = min(step, plan.step_tokens or step)  # planning/batch_step.py sized the step
        rows = plan.logit_rows or plan.reserved.get("activations", 0) // 4 // runner.spec.vocab_size
        step, running = encoded_limits(runner, step, max(batch, min(256, rows)), batch)
        bt = codec_block_tokens(runner, BLOCK_TOKENS)  # whole codec groups when encoded
        pools = planned_blocks(plan, {g for g, _ in kv_groups(runner)}, bt, batch, context)
        split = 0 if pools is None or not host_split else split_budget(runner, batch, context)
        if plan.step_tokens and plan.budget:  # no scratch reserved to lend: only what is left
            split = min(split, max(0, plan.budget - plan.peak_device_bytes))
        return cls(
            runner, tokenizer, eos_ids, block_tokens=bt, max_batch=batch,
            max_context=context, max_step_tokens=step, max_running=running,
            pool_blocks=pools, kv_dir=kv_dir, all_disk=all_disk,
            host_split=split,
            rates=rates,
        )  # fmt: skip

    @property
    def stores(self) -> dict[str, PagedKVStore]:
        """One store per KV group (the first home's: they share shapes and block ids)."""
        return {g: self.pools.first_store(g) for g in self.pools.stores}

    # -- requests ---------------------------------------------------------------------------

    def add(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        on_text: Callable[[int, str], None] | None = None,
        on_token: Callable[[int, int], None] | None = None,
        index: int = 0,
        *,
        priority: int = 0,
        logprobs: int | None = None,
        on_logprob: Callable[[int, TokenLogprob], None] | None = None,
        sampler: Sampler | None = None,
    ) -> str:
        """Queue a prompt (token ids); returns its id. ``on_text(index, piece)`` and
        ``on_token(index, token)`` are called as its output becomes final, and with
        ``logprobs`` (>= 0) ``on_logprob(index, TokenLogprob)`` before each token. Lower
        ``priority`` runs first. ``sampler`` replaces the request's own (a draft model's
        requests record their distributions through it)."""
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        req = Request(
            rid, tuple(int(t) for t in prompt), params.max_new_tokens, priority,
            frozenset(stops), params,
        )  # fmt: skip
        self.scheduler.add(req)  # validates (empty prompt, capacity) before anything is kept
        live = _Live(
            index,
            SequenceOutput(list(req.prompt)),
            sampler or Sampler(params, self.runner.plan.head_device),
            stops,
            params.max_new_tokens,
            on_text=on_text,
            on_token=on_token,
            logprobs=logprobs,
            on_logprob=on_logprob,
        )
        if self.tokenizer is not None:
            live.detok = IncrementalDetokenizer(self.tokenizer)
            live.matcher = StopMatcher(params.stop)
        self.live[rid] = live
        return rid

    def cancel(self, request_id: str) -> bool:
        """Drop a request (between steps) and free its KV; False if it is not running."""
        live = self.live.pop(request_id, None)
        if live is None:
            return False
        self.scheduler.cancel(request_id)
        live.out.finish_reason = "cancelled"
        self.finished[request_id] = live.out
        return True

    def has_work(self) -> bool:
        """Whether any request is unfinished."""
        return self.scheduler.has_work()

    # -- steps ------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[str]:
        """Run one step; returns the ids of the requests that finished in it. With a timeline
        on the runner each phase is a span (`ollm.telemetry.timeline.phase`)."""
        tl = getattr(self.runner, "timeline", None)  # a stand-in runner may have none
        with span(tl, "schedule"):  # free blocks swept, drafts, the scheduler's choice
            self.pools.sweep(lambda g: [s.tables[g] for s in self.scheduler.seqs.values()])
            plan = self.scheduler.schedule(*self._drafts())
        if not plan.seqs:
            self.scheduler.update({})
            if self.has_work():  # add() admits only requests that fit alone: a scheduler bug
                raise RuntimeError("the scheduler chose nothing while requests wait")
            return []
        try:
            with span(tl, "moves"):  # block copies the scheduler asked for (swap, fork)
                for g, moves in plan.moves.items():
                    self.pools.copy_blocks(g, moves)
            t0 = time.perf_counter()
            logits, rows = self._forward(plan)
            if self.speculator is not None:
                decode = all(len(st.token_ids) == st.num_draft + 1 for st in plan.seqs)
                self.speculator.passed(plan.num_tokens, time.perf_counter() - t0, decode)
        except BaseException:
            self.scheduler.abort_step()  # touched sequences recompute; cached prefixes stay
            raise
        outputs, self._paths = {}, {}
        with span(tl, "sample", sync=True):  # the greedy picks read to the host: a device sync
            self._picked = greedy_picks(logits, {
                st.seq_id: (rows[st.seq_id], self.live[st.seq_id].sampler)
                for st in plan.seqs if st.seq_id in rows and not st.num_draft
            })  # fmt: skip
        self.step_mode.record(time.perf_counter() - t0)  # picks synced: the step's whole time
        done = []
        with span(tl, "update"):  # other samplers, drafts verified, scheduler update, text
            for st in plan.seqs:
                if st.seq_id in rows:
                    j = rows[st.seq_id]
                    outputs[st.seq_id] = self._verify(st, logits[j : j + st.num_logits])
                    if self._paths.get(st.seq_id):  # the accepted tree path's KV to the front
                        compact_path(self.pools, st, self._paths[st.seq_id])
            for u in self.scheduler.update(outputs):
                if self._accept(u.seq_id, u.new_tokens, u.finish_reason):
                    done.append(u.seq_id)
        self.sampled += len(outputs)
        self.steps += 1
        self.step_tokens += plan.num_tokens
        return done

    def _drafts(self) -> tuple[dict[str, Sequence[int]], dict[str, Sequence[int]]]:
        """Draft tokens for each decoding request (one uncomputed token, room for more) and
        the parents of those that are trees; their distributions kept for `_verify`."""
        self._draft_of = {}
        if self.speculator is not None and self.pools.encoded:  # tree compaction writes by id
            if self.speculate_default:
                log.warning("speculative decoding is off: drafts over encoded KV pools not built")
            self.speculator = None
        if self.speculator is None:
            return {}, {}
        asks = {}
        for rid, live in self.live.items():
            seq = self.scheduler.seqs.get(rid)
            if seq is None or seq.status is not SeqStatus.RUNNING:
                continue
            asked = getattr(seq.request.sampling, "speculate", None)
            if asked == "off" or (asked is None and not self.speculate_default):
                continue  # no drafts for this request (`SamplingParams.speculate`)
            room = seq.request.max_new_tokens - seq.num_output - 1  # drafts worth verifying
            if len(seq.tokens) - seq.num_computed == 1 and room > 0:
                asks[rid] = (seq.tokens, live.sampler.params, room)
        self._draft_of = drafts = self.speculator.propose(asks)
        parents = {rid: d.parents for rid, d in drafts.items() if d.parents is not None}
        return {rid: d.tokens for rid, d in drafts.items()}, parents  # type: ignore[return-value]

    def _verify(self, st, logits: torch.Tensor) -> list[int]:
        """Accepted tokens from ``logits`` [1 + drafts, V]: the drafts speculative verification
        keeps (`ollm.engine.speculative.verify_step`: a chain or a tree), then one token from
        the target (a greedy one already picked for the whole step by `greedy_picks`)."""
        live = self.live[st.seq_id]
        sampler = live.sampler
        if not st.num_draft:
            tok = self._picked.get(st.seq_id)
            picked = [int(sampler.sample(logits)[0]) if tok is None else tok]
            if self.speculator is not None:  # a pass that made one token (no drafts fit)
                self.speculator.verified(st.seq_id, 0, 0)
        else:
            picked, verdict = verify_step(sampler, st, logits, self._draft_of.get(st.seq_id))
            if verdict is not None:
                self._paths[st.seq_id] = verdict.path
            self.drafted += st.num_draft
            self.accepted_drafts += len(picked) - 1
            if self.speculator is not None:
                self.speculator.record(st.seq_id, st.num_draft, picked, verdict)
        if live.logprobs is not None:
            live.step_logprobs = token_logprobs(logits[: len(picked)], picked, live.logprobs)
        return picked

    def _forward(self, plan: StepPlan) -> tuple[torch.Tensor, dict[str, int]]:
        """Float32 logits [M, V] at the rows each sequence needs (its last ``num_logits`` query
        rows), and where each such sequence's rows start in them."""
        tl = getattr(self.runner, "timeline", None)  # a stand-in runner may have none
        with span(tl, "layout"):  # the packed step, its index tensors, ids and positions
            packed = PackedStep(plan, self.stores, DEVICE_TIER, self._held)
            kv = packed.layer_kv(self.pools.layers)
            ids, pos = packed.input_ids(), packed.positions()
            rows: dict[str, int] = {}
            idx: list[int] = []
            r = 0
            for st in plan.seqs:
                r += len(st.token_ids)
                if st.needs_logits:  # the last token's row, after each draft's prefix
                    rows[st.seq_id] = len(idx)
                    idx += range(r - st.num_logits, r)

        def head(h: torch.Tensor) -> torch.Tensor:
            if len(idx) < h.shape[1]:  # not every row (prefill, drafts): the rows with logits
                h = h.index_select(1, torch.tensor(idx, dtype=torch.long, device=h.device))
            return self.runner.logits(h)[0]

        stream = self.step_mode.stream(*step_shape(plan))  # rows, KV tokens, prefill
        self.streamed_steps += stream
        logits = self.runner.forward(ids, pos, kv, head=head, stream_all=stream)
        with span(tl, "writes"):
            packed.wait_writes()  # host pools complete before block moves or CPU reads
        return logits, rows

    def _accept(self, rid: str, tokens: Sequence[int], reason: str | None) -> bool:
        """Record a request's new tokens (stops excluded, as the single-request path does);
        returns whether it finished."""
        live = self.live[rid]
        out = live.out
        step_lps, live.step_logprobs = live.step_logprobs, []
        for k, tok in enumerate(tokens):
            if live.on_logprob is not None and k < len(step_lps) and tok not in live.stops:
                live.on_logprob(live.index, step_lps[k])
            if tok in live.stops:
                out.finish_reason = "stop"
                break
            out.token_ids.append(tok)
            if live.on_token is not None:
                live.on_token(live.index, tok)
            if live.detok is not None and live.matcher is not None:
                piece, stopped = live.matcher.feed(live.detok.push(tok))
                self._emit(live, piece)
                if stopped:
                    out.finish_reason, out.stopped_by_string = "stop", True
                    break
            if len(out.token_ids) >= live.max_new_tokens:
                out.finish_reason = "length"
                break
        if out.finish_reason is None and reason is not None:
            out.finish_reason = reason
        if out.finish_reason is None:
            return False
        if rid in self.scheduler.seqs:  # a stop string: the scheduler did not see it
            self.scheduler.cancel(rid)
        if live.detok is not None and live.matcher is not None and not out.stopped_by_string:
            piece, stopped = live.matcher.feed(live.detok.flush())
            self._emit(live, piece + ("" if stopped else live.matcher.flush()))
        del self.live[rid]
        if self.speculator is not None:
            self.speculator.forget(rid)
        self.finished[rid] = out
        return True

    @staticmethod
    def _emit(live: _Live, piece: str) -> None:
        if piece:
            live.out.text += piece
            if live.on_text is not None:
                live.on_text(live.index, piece)

    def run(self) -> None:
        """Step until every request has finished."""
        while self.has_work():
            self.step()

    # -- whole batches ----------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        on_text: Callable[[int, str], None] | None = None,
        on_token: Callable[[int, int], None] | None = None,
    ) -> tuple[list[SequenceOutput], GenerationMetrics]:
        """Run ``prompts`` (one params for all, or one each) to completion; outputs in order
        (`ollm.engine.batch_generate.run_engine`)."""
        from ollm.engine.batch_generate import run_engine

        return run_engine(self, prompts, params, on_text, on_token)

    # -- state ------------------------------------------------------------------------------

    def metrics(self) -> EngineMetrics:
        """Counts of requests by state, blocks used per group and tier, prefix reuse."""
        from ollm.engine.batch_metrics import engine_metrics

        return engine_metrics(self)

    def kv_blocks_used(self) -> int:
        """Referenced KV blocks over every group and tier (0 once every request has ended)."""
        return sum(u for g in self.scheduler.usage().values() for u, _ in g.values())

    def close(self) -> None:
        """Drop every request and the pools."""
        for rid in list(self.live):
            self.cancel(rid)
        self.pools.close()
