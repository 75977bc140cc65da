"""A request of several prompts (``LLM.generate`` with a list): continuous batching on paged KV
through `BatchEngine` where the plan allows it, else the padded batch of `Generator`; and
``run_engine``, the body of ``BatchEngine.generate``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from ollm.engine.batch import BatchEngine, batch_supported
from ollm.engine.generate import Generator, SequenceOutput, _delta, _fill_io
from ollm.engine.kvpools import batch_unsupported
from ollm.engine.sampling import SamplingParams
from ollm.engine.speculative import Speculator
from ollm.errors import RequestError
from ollm.telemetry.energy import EnergyMeter
from ollm.telemetry.metrics import GenerationMetrics

log = logging.getLogger(__name__)


def generate_many(
    generator: Generator,
    prompts: list[list[int]],
    params: SamplingParams | Sequence[SamplingParams],
    batch: int,
    context: int,
    on_text: Callable[[int, str], None] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    kv_dir: str | None = None,
    speculator: Speculator | None = None,
    rates=None,
) -> tuple[list[SequenceOutput], list[GenerationMetrics]]:
    """Run a request of several prompts: continuous batching on paged KV when the plan keeps
    every layer's KV on the device (pools for the planned ``batch x context``), else the
    padded batch of ``generator`` (one call per distinct params). Metrics per output (shared
    by the outputs of one run). ``speculator`` drafts tokens on the batch engine's path (the
    padded batch runs without it, with a warning); ``rates`` (the cost model's) let batch steps
    with much KV skip the plan's CPU layers."""
    plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(plist) != len(prompts):
        raise RequestError(f"{len(prompts)} prompts but {len(plist)} sampling params")
    runner = generator.runner
    if batch_supported(runner):  # ``kv_dir``: every layer's pools on disk there
        _warn_unapplied(runner, plist)
        eng = BatchEngine.for_plan(
            runner, generator.tokenizer, generator.eos_ids, batch, context,
            kv_dir or generator.kv_dir, all_disk=kv_dir is not None, rates=rates,
        )  # fmt: skip
        eng.speculator = speculator
        try:
            outs, metrics = eng.generate(prompts, plist, on_text, on_token)
        finally:
            eng.close()
            if speculator is not None:
                speculator.close()
        return outs, [metrics] * len(outs)
    if speculator is not None:
        why = batch_unsupported(runner) or "it needs the plan's device-resident KV on one device"
        log.warning(f"speculative decoding is off for this request: {why}")
    outs: list[SequenceOutput | None] = [None] * len(prompts)
    mets: list[GenerationMetrics | None] = [None] * len(prompts)
    for sp in dict.fromkeys(plist):  # the padded batch takes one params for all its prompts
        idx = [i for i, p in enumerate(plist) if p == sp]

        def remap(cb, idx=idx):  # the caller's callbacks see indices in the whole request
            return None if cb is None else (lambda r, x: cb(idx[r], x))

        o, m = generator.generate(
            [prompts[i] for i in idx], sp, remap(on_text), remap(on_token), kv_dir
        )
        for i, out in zip(idx, o, strict=True):
            outs[i], mets[i] = out, m
    return outs, mets  # type: ignore[return-value]


def _warn_unapplied(runner, plist: Sequence[SamplingParams]) -> None:
    """One warning line for the lossy KV options the paged batch engine does not apply (its
    attention reads every block exactly): spans marked full and eviction (attention routing
    is reported by the runner itself, once)."""
    unapplied = []
    if any(getattr(sp, "full_attention", ()) for sp in plist):
        unapplied.append("full-attention spans")
    if getattr(runner, "kv_evict", "none") != "none":
        unapplied.append("KV eviction")
    if unapplied:
        log.warning(
            "%s not applied to this request of several prompts: continuous batching keeps and "
            "attends every KV block exactly",
            " and ".join(unapplied),
        )


def run_engine(
    eng: BatchEngine,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
    on_text: Callable[[int, str], None] | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> tuple[list[SequenceOutput], GenerationMetrics]:
    """``eng.generate``: run ``prompts`` (one params for all, or one each) to completion on
    ``eng``; outputs in order, and the run's metrics."""
    plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(plist) != len(prompts):
        raise RequestError(f"{len(prompts)} prompts but {len(plist)} sampling params")
    stats = eng.runner.prefetcher.stats
    before = stats.snapshot()
    energy = EnergyMeter(str(eng.device)).start()
    t0 = time.perf_counter()
    ids: list[str] = []
    first = None
    try:
        for i, (p, sp) in enumerate(zip(prompts, plist, strict=True)):
            ids.append(eng.add(p, sp, None, on_text, on_token, i))
        sampled = eng.sampled
        while eng.has_work():
            eng.step()
            if first is None and eng.sampled > sampled:
                first = time.perf_counter()  # the first request's first token
    except BaseException:
        for rid in ids:
            eng.cancel(rid)
        raise
    t_end = time.perf_counter()
    outs = [eng.finished.pop(rid) for rid in ids]
    m = GenerationMetrics(prompt_tokens=sum(len(p) for p in prompts), device=str(eng.device))
    m.generated_tokens = sum(len(o.token_ids) for o in outs)
    m.energy_joules = energy.stop()
    if eng.speculator is not None:
        m.speculation = eng.speculator.stats.summary()
    first = t_end if first is None else first
    m.prefill_seconds = m.time_to_first_token = first - t0
    m.decode_seconds = t_end - first
    eng.runner.prefetcher.collect_timings()
    _fill_io(m, _delta(stats.snapshot(), before))
    if eng.device.type == "cuda":
        m.peak_gpu_memory = torch.cuda.max_memory_reserved(eng.device)
    reasons = {o.finish_reason for o in outs}
    m.finish_reason = str(reasons.pop()) if len(reasons) == 1 else "mixed"
    return outs, m
