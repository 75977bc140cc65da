"""``ollm bench --batch 1,4,16,64``: aggregate decode throughput of continuous batching.

Three workloads through `BatchEngine` on one plan (sized for the largest batch):

* ``static``: at each batch size B, B prompts of N tokens (random ids, seeded) and M new tokens
  each, all submitted at once; aggregate decode tok/s (tokens after each request's first / the
  time from the first sampled token to the end) next to the floor of a step of B sequences
  (``floors.compute_floors``: streamed bytes per step over the measured bandwidth, compute, memory
  and KV reads; floor tok/s = B / floor_s).
* ``arrivals``: as many requests as the largest batch, arriving at Poisson times (seeded) whose
  mean rate is the static batch's measured request rate; throughput, mean time to first token
  and latency, next to the static batch's.
* ``saturated`` (not in the defaults): the same arrivals at 4x that rate, so the batch runs full:
  issue 13's "continuous arrivals keep 90% of the static throughput". ``total_ratio`` compares
  the tokens delivered per second of wall time (every prompt's prefill included, in both);
  ``decode_ratio`` the decode tok/s, whose arrivals' steps carry the later prompts' prefills
  while the static batch's exclude its one prefill (a lower bound of the comparison).
* ``prefix``: 16 requests sharing a long prefix (all but their last ``TAIL`` tokens), submitted
  at once, against 16 of the same lengths sharing nothing, also at once: wall time, query
  tokens computed, prefix hits (the ones adopting blocks computed in their own step too); the
  shared requests again with opt-in settings (``prefix_resident``, ``prefix_mlp_cpu``).
"""

from __future__ import annotations

import gc
import random
import time
from collections.abc import Callable
from typing import Any

import torch

from ollm.engine.batch import BatchEngine
from ollm.engine.sampling import SamplingParams

TAIL = 32  # own tokens of each prefix-sharing request
SATURATED = 4.0  # the "saturated" workload's arrival rate, in static batch request rates
PREFIX_REQUESTS = 16
_PEAK = {"reserved": 0}  # the process's peak reserved bytes before the last per-case reset


def _case_start() -> None:
    """Reset CUDA's peak counters so a case reports its own peaks (the process-wide peak is
    kept in ``_PEAK``: the bench's probes and earlier cases may have set it)."""
    if torch.cuda.is_available():
        _PEAK["reserved"] = max(_PEAK["reserved"], torch.cuda.max_memory_reserved())
        torch.cuda.reset_peak_memory_stats()


def _case_peaks() -> dict[str, float]:
    """GiB: the peak reserved since the process began, and the peak reserved and allocated
    since ``_case_start`` (0 without CUDA)."""
    if not torch.cuda.is_available():
        return dict.fromkeys(("process", "case", "case_allocated"), 0.0)
    case = torch.cuda.max_memory_reserved()
    return {
        "process": max(_PEAK["reserved"], case) / 2**30,
        "case": case / 2**30,
        "case_allocated": torch.cuda.max_memory_allocated() / 2**30,
    }


def default_sizes(device: str) -> tuple[int, int]:
    """(prompt tokens, new tokens) per request: 2k / 128 on a GPU, 128 / 16 on the CPU."""
    return (2048, 128) if device.startswith("cuda") else (128, 16)


def prompts(n: int, tokens: int, vocab: int, seed: int, shared: int = 0) -> list[list[int]]:
    """``n`` random prompts of ``tokens`` ids; the first ``shared`` ids are the same in all."""
    rng = random.Random(seed)
    head = [rng.randrange(vocab) for _ in range(shared)]
    return [head + [rng.randrange(vocab) for _ in range(tokens - shared)] for _ in range(n)]


def _engine(llm, host_split: bool = False, hybrid: bool = True) -> BatchEngine:
    """A batch engine for ``llm``'s plan; ``hybrid`` False streams every layer in every step
    (no CPU-computed layers: the plan's ``cpu_max_tokens`` 0)."""
    from dataclasses import replace

    from ollm.engine.runner import Runner

    w = llm.workload
    runner = llm.runner
    if not hybrid and runner.plan.cpu_max_tokens:
        runner = Runner(llm.spec, replace(runner.plan, cpu_max_tokens=0), llm.prefetcher, llm.dtype)
    return BatchEngine.for_plan(
        runner, None, (), w.batch, w.context, llm._engine.kv_dir, all_disk=False,
        host_split=host_split, rates=llm.rates if hybrid else None,
    )  # fmt: skip


def _split_stats(eng: BatchEngine, steps: int) -> dict | None:
    """The host-pool split's final share and bytes per step (None when no pool is split)."""
    if not eng.splits:
        return None
    n = max(1, steps)
    return {
        "share": [round(s.share, 3) for s in eng.splits],
        "fetched_GB_per_step": sum(s.fetched_bytes for s in eng.splits) / n / 1e9,
        "cpu_GB_per_step": sum(s.cpu_bytes for s in eng.splits) / n / 1e9,
    }


def _params(new_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)


def static_case(
    llm,
    batch: int,
    tokens: int,
    new_tokens: int,
    seed: int,
    probes,
    host_split: bool = False,
    hybrid: bool = True,
) -> dict:
    """B prompts at once: aggregate decode tok/s, weight passes, the floor of a step of B;
    ``host_split`` attends part of the pinned-RAM pools on the GPU, ``hybrid`` False streams the
    plan's CPU-computed layers too (variants of the same plan, for A/B in one process)."""
    from ollm.bench.floors import compute_floors

    _case_start()
    eng = _engine(llm, host_split, hybrid)
    try:
        ps = prompts(batch, tokens, llm.spec.vocab_size, seed)
        t0 = time.perf_counter()
        outs, m = eng.generate(ps, _params(new_tokens))
        wall = time.perf_counter() - t0
        steps = eng.metrics().steps
        split = _split_stats(eng, steps)
        streamed = eng.streamed_steps
        step_mode = eng.step_mode.summary()
        kv_bytes = sum(eng.pools.nbytes.values())  # every pool, encoded ones at their size
    finally:
        eng.close()
    decode_tokens = sum(len(o.token_ids) - 1 for o in outs)
    floors = compute_floors(llm.spec, llm.store, llm.plan, probes, tokens + new_tokens // 2, batch)
    floor_s = floors["decode"]["floor_s"]
    tok_s = decode_tokens / m.decode_seconds if m.decode_seconds else None
    peak = _case_peaks()
    return {
        "batch": batch,
        "hybrid": hybrid,
        "streamed_steps": streamed,  # steps that skipped the plan's CPU layers
        # the measured choice: mean step seconds per mode, probes, switches, per shape bucket
        "step_mode": step_mode,
        "host_split": split,
        "peak_reserved_GiB_process": peak["process"],  # since the process began (probes too)
        # this case alone (its engine's pools, steps and frees; the LLM's weights included)
        "peak_reserved_GiB_case": peak["case"],
        "peak_allocated_GiB_case": peak["case_allocated"],
        "wall_s": wall,
        "steps": steps,
        "prefill_s": m.prefill_seconds,
        "decode_s": m.decode_seconds,
        "decode_tok_s": tok_s,
        "total_tok_s": m.generated_tokens / wall,
        "floor_step_s": floor_s,
        "floor_bound": floors["decode"]["bound"],
        "floor_tok_s": batch / floor_s if floor_s else None,
        "floor_io_tok_s": batch / floors["decode"]["io_s"]
        if floors["decode"].get("io_s")
        else None,
        "streamed_bytes_per_step": floors["streamed_bytes_decode"],
        "kv_pool_bytes": kv_bytes,
        # per token the pools were sized for (the planned batch x context), all layers
        "kv_bytes_per_token": kv_bytes / (llm.workload.batch * llm.workload.context),
    }


def arrivals_case(llm, n: int, tokens: int, new_tokens: int, seed: int, rate: float) -> dict:
    """``n`` requests arriving at Poisson times of mean ``rate`` per second (seeded)."""
    rng = random.Random(seed + 1)
    at, t = [], 0.0
    for _ in range(n):
        at.append(t)
        t += rng.expovariate(rate)
    ps = prompts(n, tokens, llm.spec.vocab_size, seed)
    eng = _engine(llm)
    first: dict[str, float] = {}
    added: dict[str, float] = {}
    done: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        nxt = 0
        while nxt < n or eng.has_work():
            now = time.perf_counter() - t0
            while nxt < n and at[nxt] <= now:
                rid = eng.add(ps[nxt], _params(new_tokens))
                added[rid] = now
                nxt += 1
            if not eng.has_work():
                time.sleep(max(0.0, min(at[nxt] - now, 0.05)))
                continue
            for rid in eng.step():
                done[rid] = time.perf_counter() - t0
            now = time.perf_counter() - t0
            for rid, live in eng.live.items():
                if live.out.token_ids and rid not in first:
                    first[rid] = now
        wall = time.perf_counter() - t0
        tokens_out = sum(len(o.token_ids) for o in eng.finished.values())
    finally:
        eng.close()
    for rid in done:  # a request of one token finishes in the step that sampled it
        first.setdefault(rid, done[rid])
    # as the static case's: tokens after each request's first, over the time from the first
    # sampled token to the end (the engine's decode period, arrivals' gaps included)
    span = max(done.values(), default=0.0) - min(first.values(), default=0.0)
    return {
        "requests": n,
        "rate_per_s": rate,
        "wall_s": wall,
        "total_tok_s": tokens_out / wall,
        "decode_tok_s": (tokens_out - len(done)) / span if span > 0 else None,
        "mean_ttft_s": sum(first[r] - added[r] for r in added) / n,
        "mean_latency_s": sum(done[r] - added[r] for r in added) / n,
    }


def prefix_run(llm, tokens: int, new_tokens: int, seed: int, head: int) -> dict:
    """``PREFIX_REQUESTS`` requests of ``tokens`` tokens whose first ``head`` are the same in
    all, submitted at once (both cases: the same arrivals): the first step admits them all, the
    later ones adopting the prefix blocks the first computes in that step (in-step adoption,
    `engine/step_builder.py`), so the prefix and every tail take one weight pass. Per step:
    [wall seconds, query tokens]."""
    eng = _engine(llm)
    try:
        ps = prompts(PREFIX_REQUESTS, tokens, llm.spec.vocab_size, seed, head)
        _case_start()
        t0 = time.perf_counter()
        ids = [eng.add(p, _params(new_tokens)) for p in ps]
        steps = []
        while eng.has_work():
            steps.append(_timed_step(eng))
        wall = time.perf_counter() - t0
        m = eng.metrics()
        generated = sum(len(eng.finished[r].token_ids) for r in ids)
        inflight = eng.scheduler.inflight_hits
    finally:
        eng.close()
    return {
        "wall_s": wall,
        "total_tok_s": generated / wall,
        "query_tokens": m.step_tokens,
        "prefix_hits": m.prefix_hits,
        "inflight_hits": inflight,
        "prefix_saved_tokens": m.prefix_saved_tokens,
        "prompt_tokens": tokens,
        "steps": steps,
        "plan": dict(llm.plan.describe()),
        # streamed layers held on the GPU while decode runs (opt-in ``decode_resident``)
        "decode_resident_layers": llm.plan.decode_resident,
        "peak_reserved_gib": _case_peaks(),
    }


def _timed_step(eng) -> list[float]:
    """One ``eng.step()``: [wall seconds, query tokens it carried]."""
    t, n = time.perf_counter(), eng.step_tokens
    eng.step()
    return [round(time.perf_counter() - t, 4), eng.step_tokens - n]


def prefix_rounds(llm, tokens: int, new_tokens: int, seed: int, head: int, rounds: int) -> dict:
    """``prefix_run`` ``rounds`` times on ``llm``, each with prompts of its own seed (no prefix
    cached by an earlier round is hit); the round of the median wall, with every round's wall
    (``walls_s``) and the highest peaks of any round (``peak_reserved_gib``)."""
    runs = [prefix_run(llm, tokens, new_tokens, seed + 1000 * r, head) for r in range(rounds)]
    out = dict(sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2])
    out["walls_s"] = [r["wall_s"] for r in runs]
    peaks = [r["peak_reserved_gib"] for r in runs]
    out["peak_reserved_gib"] = {k: max(p[k] for p in peaks) for k in peaks[0]}
    return out


def prefix_report(distinct: dict, shared: dict) -> dict:
    """16 requests sharing all but ``TAIL`` tokens (`prefix_run`, on a plan that counts the
    prefix's KV once) against 16 sharing nothing (on the bench's plan)."""
    tokens = shared["prompt_tokens"]
    return {
        "shared": shared,
        "distinct": distinct,
        "shared_prefix_tokens": max(0, tokens - TAIL),
        "speedup": distinct["wall_s"] / shared["wall_s"],
    }


def _machine_probes(device: str, store, tokens: int) -> dict:
    """``bench.probes.measure_bandwidth`` for ``store``'s dtype and largest projection."""
    from ollm.bench.probes import measure_bandwidth
    from ollm.bench.run import linear_shape
    from ollm.models.registry import build_spec
    from ollm.storage.store import LayerStore

    meta = LayerStore(store)
    try:
        linear = linear_shape(build_spec(meta.hf_config()), tokens)
        dtype = meta.dtype
    finally:
        meta.close()
    return measure_bandwidth(device, store, dtype, linear)


def run_batch_bench(
    *,
    model: str | None,
    synthetic: str | None,
    batches: list[int],
    prompt_tokens: int | None,
    new_tokens: int | None,
    llm_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
    seed: int = 0,
    on_case: Callable[[str, dict], None] | None = None,
    workloads: tuple[str, ...] = ("static", "arrivals", "prefix"),
    split_batches: tuple[int, ...] = (),
    stream_all_batches: tuple[int, ...] = (),
    prefix_resident: bool = False,
    prefix_rounds: int = 1,
    prefix_mlp_cpu: bool = False,
) -> dict[str, object]:
    """Probe the machine, plan for the largest batch, run the ``workloads``; the report.
    ``split_batches``: static batches also run with the host-pool split (`kv.hostsplit`, off by
    default: measured slower), ``stream_all_batches`` with no CPU-computed layers, in the same
    process. ``prefix_resident``: the prefix case's shared requests also run on a plan with
    ``decode_resident=True`` (``shared_resident``; the distinct case and ``shared`` keep
    ``llm_kwargs``' setting, the engine's default off); ``prefix_mlp_cpu`` likewise with
    ``mlp_cpu=True``. ``prefix_rounds``: each prefix case that many times, the median reported."""
    from ollm import LLM
    from ollm.bench.run import _CONFIG_KEYS, resolve_model
    from ollm.config import EngineConfig

    kw = dict(llm_kwargs or {})
    cfg = EngineConfig(**{k: v for k, v in kw.items() if k in _CONFIG_KEYS})
    device = cfg.resolve_device()
    n_default, m_default = default_sizes(device)
    n, m = prompt_tokens or n_default, new_tokens or m_default
    store, name = resolve_model(model, synthetic, cfg.cache_dir, progress, device, cfg.offload)
    top = max(*batches, PREFIX_REQUESTS)
    # The machine's probes before the engine exists, as `ollm bench` does: their buffers then
    # never sit beside the engine's (the process's peak reserved memory stays the engine's).
    probes = _machine_probes(device, store, n)
    llm = LLM(store, **{**kw, "device": device, "progress": progress}, max_batch=top,
              max_context=n + m)  # fmt: skip
    try:
        warm = BatchEngine.for_plan(llm.runner, None, (), 1, n + m)  # first-pass costs
        warm.generate(prompts(1, min(n, 32), llm.spec.vocab_size, seed), _params(2))
        warm.close()
        report: dict[str, Any] = {
            "model": name,
            "settings": {"device": device, "prompt_tokens": n, "new_tokens": m, "seed": seed},
            "plan": dict(llm.plan.describe()),
            "probes": probes,
            # the rates the engine's cost model decides with (hybrid steps, KV fetch)
            "rates": _rates(llm),
            "static": [],
        }
        for b in batches if "static" in workloads else ():
            case = static_case(llm, b, n, m, seed, probes)
            report["static"].append(case)
            if on_case:
                on_case("static", case)
        for b in split_batches:
            case = static_case(llm, b, n, m, seed, probes, host_split=True)
            report.setdefault("static_split", []).append(case)
            if on_case:
                on_case("static_split", case)
        for b in stream_all_batches:
            case = static_case(llm, b, n, m, seed, probes, hybrid=False)
            report.setdefault("static_stream_all", []).append(case)
            if on_case:
                on_case("static_stream_all", case)
        _arrival_cases(llm, report, max(batches), workloads, (n, m, seed), probes, on_case)
        if "prefix" in workloads:
            own, llm = llm, None  # the prefix cases close it (and their own LLMs) on an error
            options = ("decode_resident",) * prefix_resident + ("mlp_cpu",) * prefix_mlp_cpu
            llm = _prefix_cases(own, report, store, kw, device, progress, (n, m, seed),
                                options, on_case, prefix_rounds)  # fmt: skip
        return report
    finally:
        if llm is not None:
            llm.close()


def _prefix_cases(llm, report: dict, store, kw: dict, device: str, progress: bool, sizes: tuple,
                  options: tuple[str, ...], on_case, rounds: int = 1):  # fmt: skip
    """The prefix case: the distinct requests on the bench's plan, then the shared ones on a plan
    counting the prefix's KV once and again with each of ``options`` on (``decode_resident``:
    ``shared_resident``, ``mlp_cpu``: ``shared_mlp_cpu``); each LLM closed and dropped before
    the next is made (their buffers never coexist); each case ``rounds`` times
    (``prefix_rounds``: the median round). Returns the LLM left open; on an error closes the
    one it holds."""
    from ollm import LLM

    n, m, seed = sizes
    try:
        distinct = prefix_rounds(llm, n, m, seed, 0, rounds)
        for option in (None, *options):
            llm.close()
            llm = None
            gc.collect()
            if torch.cuda.is_available():  # the closed LLM's freed tensors back to the device
                torch.cuda.empty_cache()
            llm = LLM(store, **{**kw, "device": device, "progress": progress,
                                **({option: True} if option else {})},
                      max_batch=PREFIX_REQUESTS, max_context=n + m,
                      shared_prefix=max(0, n - TAIL))  # fmt: skip
            case = prefix_rounds(llm, n, m, seed, max(0, n - TAIL), rounds)
            if option is None:
                report["prefix"] = prefix_report(distinct, case)
                continue
            name = {"decode_resident": "resident"}.get(option, option)
            report["prefix"][f"shared_{name}"] = case
            report["prefix"][f"speedup_{name}"] = distinct["wall_s"] / case["wall_s"]
    except BaseException:
        if llm is not None:
            llm.close()
        raise
    if on_case:
        on_case("prefix", report["prefix"])
    return llm


def _arrival_cases(llm, report: dict, big: int, workloads, sizes: tuple, probes, on_case) -> None:
    """The ``arrivals`` (the static batch's request rate) and ``saturated`` (SATURATED x that
    rate: the engine runs full, so its decode rate compares with the static batch's) cases of
    ``big`` requests, added to ``report`` (the static batch measured for them if not there)."""
    n, m, seed = sizes
    for name, scale in (("arrivals", 1.0), ("saturated", SATURATED)):
        if name not in workloads:
            continue
        ref = next((c for c in report["static"] if c["batch"] == big), None)
        if ref is None:  # the static batch not run here: measure it for the arrival rate
            ref = static_case(llm, big, n, m, seed, probes)
            report["static"].append(ref)
        rate = scale * big / ref["wall_s"]  # requests per second the static batch served
        case = arrivals_case(llm, big, n, m, seed, rate)
        case["static_total_tok_s"] = ref["total_tok_s"]
        case["static_decode_tok_s"] = ref["decode_tok_s"]
        case["total_ratio"] = case["total_tok_s"] / ref["total_tok_s"]
        if case["decode_tok_s"] and ref["decode_tok_s"]:
            case["decode_ratio"] = case["decode_tok_s"] / ref["decode_tok_s"]
        report["arrivals" if name == "arrivals" else f"arrivals_{name}"] = case
        if on_case:
            on_case(name, case)


def _fmt(x: object, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def render_batch(report: dict, console) -> None:
    """The report as three tables (static batches, arrivals, prefix sharing)."""
    from rich.table import Table

    s = report["settings"]
    t = Table(
        title=f"{report['model']} on {s['device']}: {s['prompt_tokens']}-token prompts, "
        f"{s['new_tokens']} new tokens each (continuous batching)"
    )
    cols = ("batch", "passes", "decode tok/s", "floor tok/s", "bound", "of floor", "total tok/s")
    for col in cols:
        t.add_column(col, justify="right")
    for c in report["static"]:
        share = (
            c["decode_tok_s"] / c["floor_tok_s"] if c["decode_tok_s"] and c["floor_tok_s"] else None
        )
        t.add_row(
            str(c["batch"]), str(c["steps"]), _fmt(c["decode_tok_s"]), _fmt(c["floor_tok_s"]),
            str(c["floor_bound"]), _fmt(share, 2), _fmt(c["total_tok_s"]),
        )  # fmt: skip
    console.print(t)
    a = report["arrivals"]
    console.print(
        f"Poisson arrivals ({a['requests']} requests, {a['rate_per_s']:.2f}/s): "
        f"{a['total_tok_s']:.1f} tok/s vs {a['static_total_tok_s']:.1f} static; mean time to "
        f"first token {a['mean_ttft_s']:.2f} s, latency {a['mean_latency_s']:.2f} s"
    )
    p = report["prefix"]
    console.print(
        f"{PREFIX_REQUESTS} requests sharing a {p['shared_prefix_tokens']}-token prefix: "
        f"{p['shared']['wall_s']:.2f} s ({p['shared']['query_tokens']} query tokens, "
        f"{p['shared']['prefix_hits']} prefix hits) vs {p['distinct']['wall_s']:.2f} s without "
        f"sharing ({p['distinct']['query_tokens']} query tokens): {p['speedup']:.2f}x"
    )
    for name in ("resident", "mlp_cpu"):  # the shared requests with an opt-in setting
        if f"shared_{name}" in p:
            wall = p[f"shared_{name}"]["wall_s"]
            console.print(f"  shared, {name}: {wall:.2f} s: {p[f'speedup_{name}']:.2f}x")


def _rates(llm) -> dict[str, float] | None:
    """The engine's measured ``MachineRates`` as a dict (None when it has none)."""
    import dataclasses

    rates = getattr(llm, "rates", None)
    return dataclasses.asdict(rates) if dataclasses.is_dataclass(rates) else None
