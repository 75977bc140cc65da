"""A `BatchEngine`'s state as `EngineMetrics` (split out of ``engine/batch.py``)."""

from __future__ import annotations

from ollm.engine.scheduler import SeqStatus
from ollm.telemetry.metrics import EngineMetrics


def engine_metrics(eng) -> EngineMetrics:
    """Counts of ``eng``'s requests by state, blocks used per group and tier, prefix reuse,
    speculation."""
    states = [s.status for s in eng.scheduler.seqs.values()]
    return EngineMetrics(
        steps=eng.steps,
        running=states.count(SeqStatus.RUNNING),
        waiting=states.count(SeqStatus.WAITING),
        swapped=states.count(SeqStatus.SWAPPED),
        kv_blocks=eng.scheduler.usage(),
        prefix_hits=eng.scheduler.prefix_hits,
        prefix_saved_tokens=eng.scheduler.prefix_saved_tokens,
        preemptions=eng.scheduler.num_preemptions,
        step_tokens=eng.step_tokens,
        drafted=eng.drafted,
        accepted_drafts=eng.accepted_drafts,
        **_spec_metrics(eng.speculator),
    )


def _spec_metrics(speculator) -> dict[str, object]:
    """Speculation's share of `EngineMetrics` (empty without a drafter)."""
    if speculator is None:
        return {}
    s = speculator.stats
    return {
        "drafter": s.drafter,
        "acceptance_rate": s.acceptance_rate,
        "tokens_per_pass": s.tokens_per_pass,
        "drafter_share": s.drafter_share,
    }
