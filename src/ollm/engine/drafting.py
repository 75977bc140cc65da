"""Drafters for speculative decoding: they propose tokens (a chain or a tree) per sequence.

A draft costs only query rows of the same weight pass (streamed weights are read once for all of
them), and verification keeps exactly what the target would produce (`ollm.engine.speculative`,
`ollm.engine.tree`), so a drafter that is often right raises tokens per pass and one that is
wrong costs only those rows. Drafters: prompt lookup (n-gram match in the prompt and output),
a plain function, a draft model run by its own `BatchEngine` (another model sharing the
tokenizer, or the target's first layers: `self_draft_runner`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from ollm.engine.sampling import Sampler, SamplingParams, probabilities
from ollm.engine.tree import MAX_WIDTH, alternatives, chain_with_siblings, lookup_tree
from ollm.tiers import Phase

if TYPE_CHECKING:
    from ollm.engine.batch import BatchEngine
    from ollm.engine.runner import Runner


def lookup(tokens: Sequence[int], k: int, ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """The ``k`` tokens that followed the most recent earlier occurrence of the last ``ngram``
    tokens of ``tokens`` (trying shorter tails down to ``min_ngram``); [] when none recurs."""
    toks = list(tokens)
    for n in range(min(ngram, len(toks) - 1), min_ngram - 1, -1):
        tail = toks[-n:]
        # Latest match first: recent context predicts best.
        for i in range(len(toks) - n - 1, -1, -1):
            if toks[i : i + n] == tail:
                return toks[i + n : i + n + k]
    return []


def prompt_lookup(
    ngram: int = 3, k: int = 4, min_ngram: int = 1
) -> Callable[[Sequence[int]], list[int]]:
    """Prompt-lookup drafting (as in transformers' ``prompt_lookup_num_tokens``): find the most
    recent earlier occurrence of the last ``ngram`` tokens (down to ``min_ngram``) and propose
    the ``k`` tokens that followed it. Repetitive text (code, quotes, summaries of the prompt)
    is where it pays."""
    if not 1 <= min_ngram <= ngram or k < 1:
        raise ValueError(f"need 1 <= min_ngram <= ngram and k >= 1 (got {min_ngram}, {ngram}, {k})")

    def draft(tokens: Sequence[int]) -> list[int]:
        return lookup(tokens, k, ngram, min_ngram)

    return draft


@dataclass
class Draft:
    """Proposed continuation of one sequence."""

    tokens: list[int]
    q: torch.Tensor | None = None  # [len(tokens), V] draft probabilities; None: deterministic
    # A tree (`ollm.engine.tree`): each token's parent (-1: the context's last token), and the
    # draft distribution a node's children were drawn from, by node (-1: the root).
    parents: list[int] | None = None
    dists: dict[int, torch.Tensor] | None = None


@dataclass(frozen=True)
class DraftRequest:
    """What a drafter gets for one sequence: its tokens so far, how many to propose, and the
    request's sampling parameters (a drafter with distributions filters them the same way)."""

    tokens: Sequence[int]
    k: int
    params: SamplingParams
    widths: tuple[int, ...] = ()  # a tree: children per depth (see `TreePolicy.shape`)


class Drafter(Protocol):
    """Proposes up to ``k`` tokens per sequence (one call for every decoding sequence)."""

    name: str

    def propose(self, requests: Mapping[str, DraftRequest]) -> dict[str, Draft]:
        """Drafts per sequence id (fewer than ``k`` tokens, or none, is allowed)."""
        ...


class LookupDrafter:
    """Prompt lookup: the tokens that followed the latest earlier match of the context's last
    n-gram (in the prompt or the output); deterministic, nearly free."""

    name = "lookup"

    def __init__(self, ngram: int = 3, min_ngram: int = 1) -> None:
        self.ngram, self.min_ngram = ngram, min_ngram

    def propose(self, requests: Mapping[str, DraftRequest]) -> dict[str, Draft]:
        out = {}
        for rid, r in requests.items():
            if r.widths:  # several earlier matches' continuations, merged into a trie
                toks, parents = lookup_tree(r.tokens, sum(r.widths), len(r.widths), self.ngram)
                out[rid] = Draft(toks, None, parents)
            else:
                out[rid] = Draft(lookup(r.tokens, r.k, self.ngram, self.min_ngram))
        return out


class CallableDrafter:
    """Adapts a plain ``fn(tokens) -> tokens`` drafter (deterministic), cut to ``k``."""

    def __init__(self, fn: Callable[[Sequence[int]], Sequence[int]], name: str = "custom") -> None:
        self.fn, self.name = fn, name

    def propose(self, requests: Mapping[str, DraftRequest]) -> dict[str, Draft]:
        return {rid: Draft(list(self.fn(r.tokens))[: r.k]) for rid, r in requests.items()}


class _RecordingSampler:
    """Stands in for a draft request's `Sampler`: draws each token from the target request's
    filtered distribution of the draft logits and records that distribution as ``q``."""

    def __init__(self, params: SamplingParams, gen_sampler: Sampler, top: int = 0) -> None:
        self.params, self._draws, self.top = params, gen_sampler, top
        self.q: list[torch.Tensor] = []
        self.rows: list[torch.Tensor] = []  # greedy trees: the likeliest ``top`` logits' row

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        q = probabilities(self.params, logits[-1:])
        self.q.append(q[0])
        if self.top and self.params.greedy:
            self.rows.append(logits[-1].float())
        if self.params.greedy:
            return torch.argmax(q, dim=-1)
        return self._draws.draw(q).to(logits.device)

    def observe_rows(self, logits: torch.Tensor) -> None:
        """Tokens the draft engine took by verifying its own drafts (a cascade: greedy only),
        one per row of ``logits``: recorded as `sample` records what it picks."""
        for row in logits:
            self.q.append(probabilities(self.params, row[None])[0])
            if self.top and self.params.greedy:
                self.rows.append(row.float())


class ModelDrafter:
    """A small model sharing the target's tokenizer, run by its own `BatchEngine`: each step
    every decoding sequence's context is queued there (its blocks computed in earlier steps are
    reused through the prefix cache, so only the new tail is prefilled) and ``k`` tokens are
    sampled from the draft's filtered distribution ``q`` (argmax when greedy)."""

    def __init__(self, engine: BatchEngine, name: str = "draft", seed: int = 0) -> None:
        self.engine, self.name = engine, name
        self._draws = Sampler(SamplingParams(temperature=1.0, seed=seed), engine.device)
        self._gen = torch.Generator().manual_seed(seed + 1)  # sibling draws (on the CPU)

    def propose(self, requests: Mapping[str, DraftRequest]) -> dict[str, Draft]:
        eng, recorders, ids = self.engine, {}, {}
        for rid, r in requests.items():
            k = len(r.widths) or r.k
            if k < 1:
                continue
            # A cascade (the draft engine drafts too) verifies greedy requests only: a sampled
            # request's q must be the draft's own distribution at every token.
            sp = SamplingParams(
                max_new_tokens=k, ignore_eos=True, temperature=0,
                speculate=None if r.params.greedy else "off",
            )  # fmt: skip
            rec = _RecordingSampler(r.params, self._draws, MAX_WIDTH if r.widths else 0)
            ids[rid] = eng.add(r.tokens, sp, sampler=rec)  # type: ignore[arg-type]
            recorders[rid] = rec
        eng.run()
        out = {}
        for rid, did in ids.items():
            toks = eng.finished.pop(did).token_ids
            rec = recorders[rid]
            if requests[rid].widths:
                out[rid] = self._tree(toks, rec, requests[rid].widths)
                continue
            q = None if rec.params.greedy else torch.stack(rec.q[: len(toks)])
            out[rid] = Draft(list(toks), q)
        return out

    def _tree(self, chain: list[int], rec: _RecordingSampler, widths: tuple[int, ...]) -> Draft:
        """The chain with ``widths[d] - 1`` siblings at depth d: the draft's next-likeliest
        tokens (greedy) or draws without replacement from its ``q`` (sampling)."""
        greedy = rec.params.greedy
        rows = rec.rows if greedy else rec.q
        alts = [
            alternatives(rows[d], t, widths[d] - 1, greedy, self._gen) for d, t in enumerate(chain)
        ]
        toks, parents, at = chain_with_siblings(chain, alts)
        dists = None if greedy else {at[d]: rec.q[d] for d in range(len(chain))}
        return Draft(toks, None, parents, dists)

    def close(self) -> None:
        """Free the draft engine's KV pools."""
        self.engine.close()


def self_draft_runner(runner: Runner, layers: int) -> Runner:
    """Self-speculation: a runner of the target's first ``layers`` layers and its own norm and
    head (early exit), sharing the target's loaded weights. Only layers the plan keeps resident
    on the device in every phase qualify: the prefetcher streams the others in a fixed cyclic
    order that a partial pass would break (and drafting from streamed layers would cost the
    very weight traffic speculation saves). ValueError when the plan does not allow it."""
    from ollm.engine.runner import Runner

    plan = runner.plan
    if not 1 <= layers < len(plan.layers):
        raise ValueError(f"self-speculation needs 1 <= layers < {len(plan.layers)}, got {layers}")
    moving = set(plan.streamed_for(Phase.PREFILL)) | set(plan.streamed_for(Phase.DECODE))
    if moving & set(range(layers)) or any(
        p.device_for(Phase.DECODE) != p.device_for(Phase.PREFILL) for p in plan.layers[:layers]
    ):
        raise ValueError(
            f"self-speculation needs the first {layers} layers resident on the device; this plan "
            "streams or moves some of them (use fewer layers, a larger budget, or lookup)"
        )
    sub_plan = dataclasses.replace(plan, layers=plan.layers[:layers])
    sub_spec = dataclasses.replace(runner.spec, layers=runner.spec.layers[:layers])
    return Runner(sub_spec, sub_plan, runner.prefetcher, runner.dtype)
