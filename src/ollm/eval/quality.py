"""Quality of one option set against the exact path of the same model, on the same tokens:
perplexity, KL divergence of the per-token distributions, top-1 agreement."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass
class QualityRow:
    """One context length: the setting under test beside the exact path."""

    context: int
    tokens_scored: int
    perplexity: float
    exact_perplexity: float
    kl_mean: float  # mean over positions of KL(exact || test), nats
    kl_max: float
    top1_agreement: float  # share of positions where both argmaxes agree

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def perplexity(llm, ids: list[int]) -> float:
    """exp(mean negative log-likelihood of ids[1:]) through ``llm.score`` (teacher forcing)."""
    logp = llm.score(ids)
    return math.exp(-float(logp.double().mean()))


def compare(test, exact, ids: list[int]) -> QualityRow:
    """Score ``ids`` with both LLMs, position by position in chunks (never a whole [tokens,
    vocab] tensor): perplexity of each, KL(exact || test) and top-1 agreement."""
    target = torch.tensor(ids[1:])
    nll_t = nll_e = 0.0
    kl_sum, kl_max, agree, n = 0.0, 0.0, 0, 0
    chunks = zip(test.logprob_chunks(ids), exact.logprob_chunks(ids), strict=True)
    for lp_t, lp_e in chunks:
        lp_t, lp_e = lp_t.double().cpu(), lp_e.double().cpu()
        rows = lp_t.shape[0]
        tgt = target[n : n + rows, None]
        nll_t -= float(lp_t.gather(-1, tgt).sum())
        nll_e -= float(lp_e.gather(-1, tgt).sum())
        # KL(P||Q) = sum_v P(v) (log P(v) - log Q(v)); 0 * (-inf) terms are 0
        p = lp_e.exp()
        kl = torch.where(p > 0, p * (lp_e - lp_t), torch.zeros_like(p)).sum(-1).clamp_min(0)
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
        agree += int((lp_t.argmax(-1) == lp_e.argmax(-1)).sum())
        n += rows
    return QualityRow(
        context=len(ids),
        tokens_scored=n,
        perplexity=math.exp(nll_t / n),
        exact_perplexity=math.exp(nll_e / n),
        kl_mean=kl_sum / n,
        kl_max=kl_max,
        top1_agreement=agree / n,
    )
