"""``ollm bench``: prefill and decode timings next to this machine's physical floors."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ollm.cli import common
from ollm.cli.common import (
    CacheDirOpt,
    CliError,
    CpuMemoryOpt,
    DeviceOpt,
    GpuMemoryOpt,
    HybridOpt,
    JsonOpt,
    KvCodecOpt,
    KvEvictOpt,
    KvKeepOpt,
    KvRecentOpt,
    OffloadOpt,
    app,
)
from ollm.cli.generate import SpeculateOpt

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="HF directory, .gguf file or layer store (default: Gemma 3 270M)."
    ),
]
SyntheticOpt = Annotated[
    str | None,
    typer.Option(
        "--synthetic",
        help="Random weights with a real architecture's shapes: llama3-1b, llama3-8b, "
        "qwen3-8b, gemma3-12b, or the mixtures of experts qwen3-30b-a3b, gpt-oss-20b and "
        "qwen3-next-80b-a3b (cached under the cache dir).",
    ),
]
ContextOpt = Annotated[
    str | None,
    typer.Option(
        "--context",
        help="Prompt lengths, comma-separated; k = 1024 (8k,32k; 1.5k = 1536). Default 8k; "
        "with --batch one length per request (default 2k on a GPU, 128 on the CPU).",
    ),
]
NewTokensOpt = Annotated[
    int | None,
    typer.Option(
        "--new-tokens",
        "-n",
        help="Tokens to generate per case (default 64; with --batch per request: 128 on a "
        "GPU, 16 on the CPU).",
    ),
]
BatchOpt = Annotated[
    str | None,
    typer.Option(
        "--batch",
        help="Batch sizes, comma-separated (e.g. 1,4,16,64): aggregate decode throughput of "
        "continuous batching at each, next to its floor, plus Poisson arrivals and 16 "
        "requests sharing a prefix.",
    ),
]
PlotOpt = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        help="Draw a per-layer timeline of reads, copies and compute (PNG; one per context, "
        "suffixed -8k etc. when several). Needs matplotlib.",
    ),
]
OutputOpt = Annotated[
    Path | None, typer.Option("--output", "-o", help="Also write the JSON report to FILE.")
]


@app.command()
def bench(
    model: ModelOpt = None,
    synthetic: SyntheticOpt = None,
    device: DeviceOpt = None,
    gpu_memory: GpuMemoryOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    offload: OffloadOpt = None,
    hybrid: HybridOpt = None,
    decode_resident: common.DecodeResidentOpt = None,
    mlp_cpu: common.MlpCpuOpt = None,
    kv_codec: KvCodecOpt = None,
    kv_recent: KvRecentOpt = None,
    kv_evict: KvEvictOpt = None,
    kv_keep: KvKeepOpt = None,
    context: ContextOpt = None,
    new_tokens: NewTokensOpt = None,
    batch: BatchOpt = None,
    plot: PlotOpt = None,
    json_out: JsonOpt = False,
    output: OutputOpt = None,
    cache_dir: CacheDirOpt = None,
    attention: common.AttentionOpt = None,
    speculate: SpeculateOpt = None,
    moe_offload: common.MoeOffloadOpt = None,
    expert_cache: common.ExpertCacheOpt = None,
    expert_lookahead: common.ExpertLookaheadOpt = None,
) -> None:
    """Time prefill and decode per context next to this machine's floors (bandwidth measured now)."""
    with common.cli_errors():
        if model is not None and synthetic is not None:
            raise CliError("give either --model or --synthetic, not both")
        from ollm.bench.run import parse_contexts, run_bench

        options = dict(
            device=device,
            gpu_memory=gpu_memory,
            cpu_memory=cpu_memory,
            offload=offload,
            hybrid=hybrid,
            decode_resident=decode_resident,
            mlp_cpu=mlp_cpu,
            kv_codec=kv_codec,
            kv_recent=kv_recent,
            kv_evict=kv_evict,
            kv_keep=kv_keep,
            cache_dir=cache_dir,
            attention=attention,
            speculate=speculate,  # results then carry acceptance and tokens per target pass
            moe_offload=moe_offload,
            expert_cache=expert_cache,
            expert_lookahead=expert_lookahead,
        )
        llm_kwargs = {k: v for k, v in options.items() if v is not None}
        if batch is not None:
            report = _batch_bench(model, synthetic, batch, context, new_tokens, llm_kwargs)
        else:
            report = run_bench(
                model=model,
                synthetic=synthetic,
                contexts=parse_contexts(context or "8k"),
                new_tokens=64 if new_tokens is None else new_tokens,
                llm_kwargs=llm_kwargs,
                plot=plot,
                progress=common.show_progress(),
                on_case=_bench_progress,
            )
        _emit(report, output, json_out, batched=batch is not None)


def _emit(report: dict, output: Path | None, json_out: bool, batched: bool) -> None:
    """The report as JSON (to ``output`` and, with ``--json``, stdout) or as tables."""
    text = json.dumps(report, ensure_ascii=False)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")
    if json_out:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return
    from rich.console import Console

    from ollm.bench.report import render

    width = None if sys.stdout.isatty() else 140  # pipes and logs: do not wrap at 80
    console = Console(file=sys.stdout, highlight=False, width=width)
    if batched:
        from ollm.bench.batching import render_batch

        render_batch(report, console)
    else:
        render(report, console)


def _batch_bench(model, synthetic, batch: str, context, new_tokens, llm_kwargs) -> dict:
    """``--batch``: the batching workloads of `ollm.bench.batching`."""
    from ollm.bench.batching import run_batch_bench
    from ollm.bench.run import parse_contexts

    try:
        sizes = [int(b) for b in batch.split(",") if b.strip()]
    except ValueError:
        raise CliError(f"--batch takes comma-separated integers, not {batch!r}") from None
    if not sizes or min(sizes) < 1:
        raise CliError("--batch needs batch sizes >= 1")
    lengths = parse_contexts(context) if context else [None]
    if len(lengths) != 1:
        raise CliError("with --batch, --context takes one prompt length")

    def progress(kind: str, case: dict) -> None:
        sys.stderr.write(f"bench --batch {kind}: {_short(case)}\n")
        sys.stderr.flush()

    return run_batch_bench(
        model=model, synthetic=synthetic, batches=sizes, prompt_tokens=lengths[0],
        new_tokens=new_tokens, llm_kwargs=llm_kwargs, progress=common.show_progress(),
        on_case=progress,
    )  # fmt: skip


def _short(case: dict) -> str:
    """A case's headline numbers for the progress line."""
    keys = ("batch", "decode_tok_s", "floor_tok_s", "total_tok_s", "speedup")
    return ", ".join(
        f"{k} {case[k]:.3g}" if isinstance(case[k], float) else f"{k} {case[k]}"
        for k in keys
        if case.get(k) is not None
    )


def _bench_progress(case: dict[str, Any]) -> None:
    """One line per finished case on stderr, so a long benchmark shows where it is."""
    if case.get("status") == "ok":
        line = (
            f"bench {case['label']}: prefill {case['prefill_s']:.2f} s, "
            f"decode {case['decode_tok_s']:.2f} tok/s"
        )
    else:
        line = f"bench {case['label']}: error: {case.get('error')}"
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
