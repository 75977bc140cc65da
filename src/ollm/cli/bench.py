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
    OffloadOpt,
    app,
)


@app.command()
def bench(
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="HF directory, .gguf file or layer store (default: Gemma 3 270M)."
        ),
    ] = None,
    synthetic: Annotated[
        str | None,
        typer.Option(
            "--synthetic",
            help="Random weights with a real architecture's shapes: llama3-1b, llama3-8b, "
            "qwen3-8b or gemma3-12b (cached under the cache dir).",
        ),
    ] = None,
    device: DeviceOpt = None,
    gpu_memory: GpuMemoryOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    offload: OffloadOpt = None,
    hybrid: HybridOpt = None,
    context: Annotated[
        str,
        typer.Option(
            "--context", help="Prompt lengths, comma-separated; k = 1024 (8k,32k; 1.5k = 1536)."
        ),
    ] = "8k",
    new_tokens: Annotated[
        int, typer.Option("--new-tokens", "-n", help="Tokens to generate per case.")
    ] = 64,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Draw a per-layer timeline of reads, copies and compute (PNG; one per context, "
            "suffixed -8k etc. when several). Needs matplotlib.",
        ),
    ] = None,
    json_out: JsonOpt = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Also write the JSON report to FILE.")
    ] = None,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Time prefill and decode per context next to this machine's floors (bandwidth measured now)."""
    with common.cli_errors():
        if model is not None and synthetic is not None:
            raise CliError("give either --model or --synthetic, not both")
        from ollm.bench.run import parse_contexts, run_bench

        contexts = parse_contexts(context)
        options = dict(
            device=device,
            gpu_memory=gpu_memory,
            cpu_memory=cpu_memory,
            offload=offload,
            hybrid=hybrid,
            cache_dir=cache_dir,
        )
        report = run_bench(
            model=model,
            synthetic=synthetic,
            contexts=contexts,
            new_tokens=new_tokens,
            llm_kwargs={k: v for k, v in options.items() if v is not None},
            plot=plot,
            progress=common.show_progress(),
            on_case=_bench_progress,
        )
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
        render(report, Console(file=sys.stdout, highlight=False, width=width))


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
