"""Quality and A/B harness: every lossy option is judged against the exact path of the same model
on real text, and every speed claim by an alternating A/B run (uses the public API only).

>>> from ollm.eval import evaluate, ab
>>> report = evaluate(None, "--offload cpu", contexts=[512])     # default model
>>> ab(None, "--offload cpu", "--offload disk", context=512, runs=6).differences
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ollm.corpus import load_text
from ollm.errors import OllmError
from ollm.eval.ab import METRICS, ABReport, order, summarize
from ollm.eval.options import exact_options, parse_options
from ollm.eval.passkey import PasskeyRow, run_passkey
from ollm.eval.quality import QualityRow, compare

__all__ = ["evaluate", "ab", "EvalReport", "ABReport", "parse_options"]


@dataclass
class EvalReport:
    """Quality rows per context, passkey rows, and the cost of the setting's own runs."""

    model: str | None
    options: dict[str, object]
    exact_options: dict[str, object]
    quality: list[QualityRow] = field(default_factory=list)
    passkey: list[PasskeyRow] = field(default_factory=list)
    cost: dict[str, float | None] = field(default_factory=dict)  # per token, passkey runs
    passkey_full: str | None = None  # the passkey prompts' part marked full (routing by segment)

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "options": self.options,
            "exact_options": self.exact_options,
            "quality": [r.to_dict() for r in self.quality],
            "passkey": [r.to_dict() for r in self.passkey],
            "cost": self.cost,
            "passkey_full": self.passkey_full,
        }


def _options(options: str | list[str] | dict[str, object] | None) -> dict[str, object]:
    if options is None:
        return {}
    return dict(options) if isinstance(options, dict) else parse_options(options)


def _tokens(llm, text: str, context: int) -> list[int]:
    ids = llm.tokenizer(text)["input_ids"]
    if len(ids) < context:
        raise OllmError(
            f"the text has {len(ids)} tokens, fewer than the context {context}: "
            "pass a longer --text file or a shorter --context"
        )
    return list(ids[:context])


def evaluate(
    model: str | None = None,
    options: str | list[str] | dict[str, object] | None = None,
    contexts: list[int] = (512, 2048),  # type: ignore[assignment]
    *,
    text: str | None = None,
    passkey_contexts: list[int] | None = None,
    depths: list[float] = (0.1, 0.5, 0.9),  # type: ignore[assignment]
    trials: int = 1,
    progress=None,
    passkey_full: str | None = None,
) -> EvalReport:
    """Perplexity, KL from the exact path and top-1 agreement at each context (on the standard
    library's documentation, or the file ``text``), and passkey retrieval (single and multi-key)
    at ``passkey_contexts`` (default: the same contexts; [] for none). ``passkey_full`` marks
    a part of the passkey prompts full (routing by segment: "question", or "facts")."""
    from ollm import LLM

    opts = _options(options)
    exact = exact_options(opts)
    report = EvalReport(model, opts, exact, passkey_full=passkey_full)
    say = progress or (lambda _msg: None)
    with LLM(model, **opts) as llm:
        ref = llm if exact == opts else LLM(model, **exact)
        scorer = llm
        if str(opts.get("attention", "full")) != "full" and not opts.get("attention_prefill"):
            # Attention routing leaves prefill exact: score each position as if decoded.
            scorer = LLM(model, **opts, attention_prefill=True)
        try:
            corpus = load_text(text, 6 * max(contexts))
            for c in contexts:
                say(f"scoring {c} tokens")
                report.quality.append(compare(scorer, ref, _tokens(llm, corpus, c)))
            pk = list(contexts) if passkey_contexts is None else passkey_contexts
            if pk:
                say(f"passkey at {pk} tokens, depths {list(depths)}")
                costs: list[dict[str, float | None]] = []
                report.passkey = run_passkey(
                    llm, pk, list(depths), trials, costs=costs, full=passkey_full
                )
                report.cost = _mean_cost(costs)  # per generated token of the passkey answers
        finally:
            for other in {id(ref): ref, id(scorer): scorer}.values():
                if other is not llm:
                    other.close()
    return report


def ab(
    model: str | None,
    a: str | list[str] | dict[str, object] | None,
    b: str | list[str] | dict[str, object] | None,
    *,
    context: int = 512,
    runs: int = 6,
    new_tokens: int = 16,
    level: float = 0.95,
    quality: bool = False,
    text: str | None = None,
    progress=None,
) -> ABReport:
    """Run option sets A and B on the same prompts, alternating, ``runs`` times each after one
    discarded warm-up each; paired bootstrap intervals of B - A for speed, memory and bytes
    moved, and (``quality``) KL / top-1 of B against A on the prompt."""
    from ollm import LLM, SamplingParams

    if runs < 2:
        raise OllmError("an A/B comparison needs at least 2 runs per side")
    oa, ob = _options(a), _options(b)
    say = progress or (lambda _msg: None)
    report = ABReport(oa, ob, runs, level)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    llms = {"A": LLM(model, **oa), "B": LLM(model, **ob)}
    try:
        corpus = load_text(text, 8 * context * (runs + 1))
        ids = llms["A"].tokenizer(corpus)["input_ids"]
        prompts = [ids[i * context // 2 :][:context] for i in range(runs + 1)]
        if len(prompts[-1]) < context:
            raise OllmError(f"the text is too short for {runs} prompts of {context} tokens")
        for side in ("A", "B"):  # warm-up: first-call costs (allocations, calibration)
            llms[side].generate(prompts[-1], params)
        samples = {s: {k: [] for k in METRICS} for s in ("A", "B")}
        costs: dict[str, list] = {"A": [], "B": []}
        for i, side in enumerate(order(runs)):
            say(f"run {i // 2 + 1}/{runs} {side}")
            res = llms[side].generate(prompts[i // 2], params)
            costs[side].append(res.metrics.cost_per_token)
            for name, (read, _) in METRICS.items():
                samples[side][name].append(float(read(res.metrics)))
        report.samples_a, report.samples_b = samples["A"], samples["B"]
        report.cost_a, report.cost_b = _mean_cost(costs["A"]), _mean_cost(costs["B"])
        summarize(report, level)
        if quality:
            q = compare(llms["B"], llms["A"], prompts[0])
            report.quality = {"kl_mean": q.kl_mean, "kl_max": q.kl_max, "top1": q.top1_agreement}
    finally:
        for llm in llms.values():
            llm.close()
    return report


def _mean_cost(costs: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Mean of per-run cost-per-token dicts (None where any run had no energy reading)."""
    out: dict[str, float | None] = {}
    for key in costs[0]:
        values = [c[key] for c in costs]
        out[key] = None if any(v is None for v in values) else sum(values) / len(values)
    return out
