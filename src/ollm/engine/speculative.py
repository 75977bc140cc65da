"""Speculative decoding: drafters propose tokens, the target verifies them in one weight pass.

A pass with ``1 + k`` query tokens streams the weights once, so every accepted draft is a token
that cost no extra weight pass. Verification is lossless:

* greedy: a draft is accepted while it equals the target's argmax after its prefix;
* sampling (Leviathan et al. 2023, Chen et al. 2023): draft ``x ~ q`` is accepted with
  probability ``min(1, p(x) / q(x))``; on rejection the token is drawn from
  ``norm(max(0, p - q))``; if every draft is accepted one more token is drawn from the
  target's next distribution. The emitted tokens are distributed exactly as the target's.
  ``p`` and ``q`` are both filtered with the request's temperature, top-k and top-p
  (`ollm.engine.sampling.probabilities`); a deterministic drafter (prompt lookup) has
  ``q = one-hot(x)``, so it is accepted with probability ``p(x)``.

The scheduler trims the KV of rejected drafts. `AdaptiveK` chooses how many tokens to draft from
the running acceptance rate and measured pass costs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ollm.engine.drafting import (
    CallableDrafter,
    Draft,
    Drafter,
    DraftRequest,
    LookupDrafter,
    ModelDrafter,
    self_draft_runner,
)
from ollm.engine.sampling import Sampler, SamplingParams, probabilities
from ollm.engine.tree import TreePolicy, TreeVerdict, verify_tree

if TYPE_CHECKING:
    from ollm.engine.runner import Runner
    from ollm.engine.stepplan import SeqStep

log = logging.getLogger(__name__)
MAX_DRAFT = 8  # most tokens drafted per sequence and step while pass costs are unmeasured
MAX_CHAIN = 32  # most once the pass-cost fit has seen a spread of sizes (the cost decides)


def verify(
    sampler: Sampler, logits: torch.Tensor, drafts: Sequence[int], q: torch.Tensor | None
) -> list[int]:
    """Accepted tokens from target ``logits`` [1 + d, V] (row i follows draft i's prefix):
    the accepted drafts, then one token from the target (the correction or the bonus)."""
    params = sampler.params
    if params.greedy:
        picks = torch.argmax(logits, dim=-1).tolist()
        n = 0
        while n < len(drafts) and drafts[n] == picks[n]:
            n += 1
        return [*drafts[:n], picks[n]]
    p = probabilities(params, logits)  # [1 + d, V]
    out: list[int] = []
    for i, x in enumerate(drafts):
        px = float(p[i, x])
        qx = 1.0 if q is None else float(q[i, x])
        # Accept with probability min(1, p(x)/q(x)): u < p/q  <=>  u q < p.
        if sampler.uniform() * qx < px:
            out.append(int(x))
            continue
        # Rejected: the residual max(0, p - q) (one-hot q: p without x), renormalised.
        if q is None:
            resid = p[i].clone()
            resid[x] = 0.0
        else:
            resid = (p[i] - q[i].to(p.device)).clamp_min(0.0)
        total = float(resid.sum())
        resid = resid / total if total > 0 else p[i]  # total 0 only by rounding when p == q
        return [*out, int(sampler.draw(resid[None])[0])]
    return [*out, int(sampler.draw(p[len(drafts)][None])[0])]


def verify_step(
    sampler: Sampler, st: SeqStep, logits: torch.Tensor, draft: Draft | None
) -> tuple[list[int], TreeVerdict | None]:
    """One sequence's drafted step: its accepted tokens from ``logits`` [1 + drafts, V] (a
    chain by `verify`, a tree by `ollm.engine.tree.verify_tree`, whose verdict comes too);
    ``draft`` is what the drafter proposed (its distributions; None: deterministic)."""
    drafts = list(st.token_ids[len(st.token_ids) - st.num_draft :])
    if st.draft_parents is not None:
        dists = None if draft is None else draft.dists
        verdict = verify_tree(sampler, logits, drafts, st.draft_parents, dists)
        return verdict.tokens, verdict
    q = None if draft is None or draft.q is None else draft.q[: len(drafts)]
    picked = verify(sampler, logits, drafts, q)
    observe = getattr(sampler, "observe_rows", None)  # a draft model's own drafts (cascade)
    if observe is not None:
        observe(logits[: len(picked)])
    return picked, None


def expected_tokens(a: float, k: int) -> float:
    """Tokens one pass yields with ``k`` drafts each accepted with probability ``a``
    (independently): 1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a)."""
    return k + 1.0 if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


@dataclass
class _LinearFit:
    """Exponentially weighted least squares fit of y = c0 + c1 x (recent passes count most)."""

    decay: float = 0.9
    s: list[float] = field(default_factory=lambda: [0.0] * 5)  # w, wx, wy, wxx, wxy

    def add(self, x: float, y: float) -> None:
        self.s = [v * self.decay for v in self.s]
        for j, v in enumerate((1.0, x, y, x * x, x * y)):
            self.s[j] += v

    def coef(self) -> tuple[float, float] | None:
        w, sx, sy, sxx, sxy = self.s
        if w == 0:
            return None
        var = w * sxx - sx * sx
        c1 = max(0.0, (w * sxy - sx * sy) / var) if var > 1e-9 * max(1.0, w * sxx) else 0.0
        return max(0.0, (sy - c1 * sx) / w), c1

    def varied(self, cv: float = 0.3) -> bool:
        """Whether the recent x spread enough (coefficient of variation >= ``cv``) for c1 to
        mean something: passes of one size say nothing about how cost grows with size."""
        w, sx, _, sxx, _ = self.s
        if w < 2 or sx <= 0:
            return False
        return max(0.0, w * sxx - sx * sx) ** 0.5 >= cv * sx


class AdaptiveK:
    """Chooses draft lengths: per sequence the running acceptance rate ``a`` (an exponential
    average of accepted / drafted), per step the measured cost of a target pass as a linear
    function of its query tokens, ``t(N) = c0 + c1 N``, and the drafter's seconds per drafted
    token ``d``. A sequence sharing a step with ``B - 1`` others pays ``cost(n) = c0 / B + c1 n``
    for its ``n`` rows; ``k`` maximises ``E(k) / (d k + cost(k + 1))`` (tokens per second),
    increasing k while the rate grows, up to `MAX_DRAFT` until passes of several sizes were
    measured (a flat unfitted cost would take any k), then up to ``max_k``. At k = 0 a sequence
    still probes k = 1 every ``probe`` steps so a rate that recovers is noticed."""

    def __init__(
        self, max_k: int = MAX_CHAIN, prior: float = 0.5, decay: float = 0.7, probe: int = 8
    ) -> None:
        self.max_k, self.prior, self.decay, self.probe = max_k, prior, decay, probe
        self.rate: dict[str, float] = {}
        self.idle: dict[str, int] = {}
        self.target = _LinearFit()
        self.draft_s = 0.0  # seconds per drafted token, exponential average
        self.draft_s_of: dict[str, float] = {}  # the same per drafter (under a choice)

    def observe_pass(self, tokens: int, seconds: float) -> None:
        """A target pass over ``tokens`` query tokens took ``seconds``."""
        self.target.add(float(tokens), seconds)

    def observe_draft(self, tokens: int, seconds: float, name: str | None = None) -> None:
        """The drafter proposed ``tokens`` tokens in ``seconds`` (with ``name``: what one drafter
        of those it chose among made and spent, kept apart)."""
        if not tokens:
            return
        per = seconds / tokens
        if name is None:
            self.draft_s = per if not self.draft_s else 0.7 * self.draft_s + 0.3 * per
        else:
            old = self.draft_s_of.get(name)
            self.draft_s_of[name] = per if old is None else 0.7 * old + 0.3 * per

    def draft_cost(self, name: str | None) -> float:
        """Seconds per drafted token of drafter ``name`` (all drafters' when not measured):
        lookup's nearly nothing must not be priced at a draft model's pass per token."""
        return self.draft_s_of.get(name, self.draft_s) if name is not None else self.draft_s

    def observe_accept(self, rid: str, drafted: int, accepted: int) -> None:
        """Sequence ``rid`` had ``accepted`` of ``drafted`` drafts accepted."""
        if drafted:
            a = self.rate.get(rid, self.prior)
            w = self.decay**drafted  # each verified draft is one observation
            self.rate[rid] = w * a + (1 - w) * accepted / drafted

    def forget(self, rid: str) -> None:
        """Drop a finished sequence's state."""
        self.rate.pop(rid, None)
        self.idle.pop(rid, None)

    def choose(self, rid: str, batch: int = 1, draft_s: float | None = None) -> int:
        """Draft length for ``rid`` in a step of ``batch`` decoding sequences (``draft_s``:
        seconds per drafted token of the drafter it will use; default all drafters')."""
        a = self.rate.get(rid, self.prior)
        c0, c1 = self.target.coef() or (1.0, 0.0)
        d = self.draft_s if draft_s is None else draft_s
        best_k, best = 0, 1.0 / (c0 / batch + c1)
        top = self.max_k if self.target.varied() else min(self.max_k, MAX_DRAFT)
        for k in range(1, top + 1):
            r = expected_tokens(a, k) / (d * k + c0 / batch + c1 * (k + 1))
            if r <= best:
                break  # E(k) is concave in k and the cost linear: the rate peaks once
            best_k, best = k, r
        if best_k == 0:
            self.idle[rid] = self.idle.get(rid, 0) + 1
            if self.idle[rid] % self.probe == 0:
                return 1
        else:
            self.idle[rid] = 0
        return best_k


@dataclass
class SpecStats:
    """Counters of speculative decoding (plain numbers for metrics)."""

    drafter: str = ""
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # of them, accepted
    verify_passes: int = 0  # (sequence, step) pairs that produced tokens
    tokens: int = 0  # tokens those produced (accepted drafts + one each)
    draft_seconds: float = 0.0
    target_seconds: float = 0.0
    # Per drafter (several under a content-aware choice): [proposals, drafted, accepted].
    by_drafter: dict[str, list[int]] = field(default_factory=dict)
    # Seconds each drafter spent drafting (under a choice, also drafts that were not taken).
    draft_seconds_by: dict[str, float] = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens per sequence per target pass (1.0 without speculation)."""
        return self.tokens / self.verify_passes if self.verify_passes else 0.0

    @property
    def drafter_share(self) -> float:
        """Fraction of step time spent drafting."""
        total = self.draft_seconds + self.target_seconds
        return self.draft_seconds / total if total else 0.0

    def share_of(self, name: str) -> float:
        """Fraction of step time drafter ``name`` spent drafting."""
        total = self.draft_seconds + self.target_seconds
        return self.draft_seconds_by.get(name, 0.0) / total if total else 0.0

    def summary(self) -> dict[str, object]:
        """The numbers a result carries (`GenerationMetrics.speculation`)."""
        return {
            "drafter": self.drafter,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "target_passes": self.verify_passes,
            "tokens_per_pass": self.tokens_per_pass,
            "drafter_share": self.drafter_share,
            "by_drafter": {
                k: self._drafter_row(k)
                for k in dict.fromkeys([*self.by_drafter, *self.draft_seconds_by])
            },
        }

    def _drafter_row(self, name: str) -> dict[str, object]:
        n, tokens, accepted = self.by_drafter.get(name, (0, 0, 0))
        return {
            "drafts": n, "tokens": tokens, "accepted": accepted,
            "draft_seconds": self.draft_seconds_by.get(name, 0.0), "share": self.share_of(name),
        }  # fmt: skip


class Speculator:
    """A drafter, its draft-length (or tree-shape) policy and its counters, as a `BatchEngine`
    uses them."""

    def __init__(
        self, drafter: Drafter, policy: AdaptiveK | None = None, k: int = 0, tree: bool = False
    ) -> None:
        """``k`` > 0 fixes the draft length instead of the adaptive ``policy``; ``tree`` drafts
        trees shaped per sequence by a `TreePolicy` (the drafter must take ``widths``)."""
        self.drafter, self.k, self.tree = drafter, k, tree
        self.policy = policy or AdaptiveK()
        self.trees: dict[str, TreePolicy] = {}
        self._explore = 0  # steps whose tree size was set to learn the pass-cost slope
        self.stats = SpecStats(drafter=drafter.name + (" tree" if tree else ""))

    def _ask(self, rid: str, tokens, params, room: int, batch: int) -> DraftRequest | None:
        """What to ask the drafter for one sequence (None: no draft this step)."""
        draft_s = self.policy.draft_cost(self._drafter_of(rid))
        if not self.tree:
            k = min(room, self.k or self.policy.choose(rid, batch, draft_s))
            return DraftRequest(tokens, k, params) if k > 0 else None
        pol = self.trees.setdefault(rid, TreePolicy())
        cost = self.policy.target.coef() or (1.0, 0.0)
        limit = None
        if not self.policy.target.varied():  # learn how a pass's cost grows: vary the size
            self._explore += 1
            limit = (4, 16, 64)[self._explore % 3]
        widths = pol.shape(cost, draft_s, batch, room, limit)
        if not widths:  # not worth it now: probe one draft now and then, as AdaptiveK does
            idle = self.policy.idle[rid] = self.policy.idle.get(rid, 0) + 1
            widths = [1] if idle % self.policy.probe == 0 and room > 0 else []
        return DraftRequest(tokens, len(widths), params, tuple(widths)) if widths else None

    def _drafter_of(self, rid: str) -> str:
        """The drafter that drafts for ``rid`` now (a choice's latest pick for it)."""
        chosen = getattr(self.drafter, "chosen", None)
        return chosen.get(rid, self.drafter.name) if chosen else self.drafter.name

    def propose(self, requests: Mapping[str, tuple[Sequence[int], SamplingParams, int]]):
        """Drafts for ``rid -> (tokens, params, room)`` (room: most drafts worth making)."""
        batch = max(1, len(requests))
        asks = {}
        for rid, (tokens, params, room) in requests.items():
            ask = self._ask(rid, tokens, params, room, batch)
            if ask is not None:
                asks[rid] = ask
        if not asks:
            return {}
        t0 = time.perf_counter()
        drafts = self.drafter.propose(asks)
        dt = time.perf_counter() - t0
        self.stats.draft_seconds += dt
        # Drafting time per chain token: a tree's siblings come free with its chain. A choice
        # says what each of its drafters made and spent (`ChoiceDrafter.spent`).
        chain = sum(len(asks[r].widths) or len(d.tokens) for r, d in drafts.items())
        parts = getattr(self.drafter, "spent", None) or {self.drafter.name: (chain, dt)}
        self.policy.observe_draft(chain, dt)
        for name, (n, sec) in parts.items():
            by = self.stats.draft_seconds_by
            by[name] = by.get(name, 0.0) + sec
            self.policy.observe_draft(n, sec, name)
        return {rid: d for rid, d in drafts.items() if d.tokens}

    def verified(self, rid: str, drafted: int, accepted: int, depth: int | None = None) -> None:
        """Record one sequence's verification of a step (``depth``: a tree's, when a tree)."""
        s = self.stats
        s.drafted += drafted
        s.accepted += accepted
        s.verify_passes += 1
        s.tokens += accepted + 1
        self.policy.observe_accept(rid, drafted, accepted)
        if drafted:
            chosen = getattr(self.drafter, "chosen", None)  # a content-aware choice
            name = chosen.get(rid, self.drafter.name) if chosen else self.drafter.name
            c = s.by_drafter.setdefault(name, [0, 0, 0])
            c[0], c[1], c[2] = c[0] + 1, c[1] + drafted, c[2] + accepted
            feedback = getattr(self.drafter, "feedback", None)
            if feedback is not None:
                feedback(rid, drafted if depth is None else depth, accepted)

    def record(
        self, rid: str, drafted: int, picked: Sequence[int], verdict: TreeVerdict | None
    ) -> None:
        """Record a drafted step's outcome (`verify_step`'s)."""
        if verdict is None:
            self.verified(rid, drafted, len(picked) - 1)
        else:
            self.verified_tree(rid, drafted, verdict)

    def verified_tree(self, rid: str, drafted: int, verdict: TreeVerdict) -> None:
        """Record one sequence's tree verification (its trials shape its next trees)."""
        self.verified(rid, drafted, len(verdict.path), verdict.depth)
        if rid in self.trees:
            self.trees[rid].observe(verdict.trials)

    def forget(self, rid: str) -> None:
        """Drop a finished sequence's state."""
        self.policy.forget(rid)
        self.trees.pop(rid, None)
        forget = getattr(self.drafter, "forget", None)
        if forget is not None:
            forget(rid)

    def close(self) -> None:
        """Release what the drafter holds (a draft model's KV pools)."""
        close = getattr(self.drafter, "close", None)
        if close is not None:
            close()

    def passed(self, tokens: int, seconds: float, decode: bool = True) -> None:
        """Record a target pass; only passes of decodes (and drafts) feed the cost fit, since a
        prefill's rows cost attention over the whole prompt, not what a draft row costs."""
        self.stats.target_seconds += seconds
        if decode:
            self.policy.observe_pass(tokens, seconds)


def as_speculator(drafter: Speculator | Drafter | Callable | None) -> Speculator | None:
    """A `Speculator` from what a caller passes: itself, a `Drafter` (adaptive length), or a
    plain ``fn(tokens) -> tokens`` (its drafts used as they are, at most `MAX_DRAFT`)."""
    if drafter is None or isinstance(drafter, Speculator):
        return drafter
    if hasattr(drafter, "propose"):
        return Speculator(drafter)  # type: ignore[arg-type]
    return Speculator(CallableDrafter(drafter), k=MAX_DRAFT)  # type: ignore[arg-type]


def build_speculator(
    speculate: str, runner: Runner, batch: int, context: int, draft: Runner | None = None
) -> Speculator | None:
    """The `Speculator` for an ``EngineConfig.speculate`` value (None for "off"): "auto" and
    "lookup" draft by prompt lookup; "self[:N]" by the target's first N layers (default a
    quarter) with its head; "draft:PATH" by the ``draft`` runner (a model loaded from PATH
    with the target's vocabulary). Modes (`ollm.config.parse_speculate`): "tree:" drafts
    trees (`ollm.engine.tree`), "mix:" chooses lookup or the model per request and span
    (`ChoiceDrafter`), "cascade:" lets lookup draft for the draft model (multi-level). Draft
    models run on a `BatchEngine` sized ``batch x context``. A self-draft the plan cannot run
    falls back to lookup with a warning."""
    from ollm.config import parse_speculate
    from ollm.engine.batch import BatchEngine
    from ollm.engine.drafter_choice import ChoiceDrafter

    modes, kind, arg = parse_speculate(speculate)
    tree = "tree" in modes
    if kind == "off":
        return None
    if kind in ("auto", "lookup"):
        return Speculator(LookupDrafter(), tree=tree)
    if kind == "self":
        n = int(arg) if arg else max(1, len(runner.plan.layers) // 4)
        try:
            draft, name = self_draft_runner(runner, n), f"self:{n}"
        except ValueError as exc:
            log.warning("%s; drafting by prompt lookup instead", exc)
            return Speculator(LookupDrafter(), tree=tree)
    elif kind == "draft" and draft is not None:
        if draft.spec.vocab_size != runner.spec.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({draft.spec.vocab_size}) differs from the "
                f"target's ({runner.spec.vocab_size}): it must share the tokenizer"
            )
        name = f"draft:{arg}"
    else:
        raise ValueError(f"speculate={speculate!r} needs a draft model")
    engine = BatchEngine.for_plan(draft, None, (), batch, context)
    if "cascade" in modes:  # lookup drafts for the draft model: fewer of its passes per token
        engine.speculator, name = Speculator(LookupDrafter()), f"lookup>{name}"
    model: Drafter = ModelDrafter(engine, name)
    if "mix" in modes:
        model = ChoiceDrafter([LookupDrafter(), model])
    return Speculator(model, tree=tree)
