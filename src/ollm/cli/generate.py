"""``ollm run``: generate a reply to one prompt, streamed to stdout, then the metrics."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ollm.cli import common
from ollm.cli.common import (
    CacheDirOpt,
    CliError,
    CpuMemoryOpt,
    DeviceOpt,
    DtypeOpt,
    GpuMemoryOpt,
    HybridOpt,
    JsonOpt,
    KvCacheOpt,
    KvDirOpt,
    MaxContextOpt,
    OffloadOpt,
    app,
)

if TYPE_CHECKING:
    from ollm.api import LLM
    from ollm.engine.sampling import SamplingParams


@app.command()
def run(
    prompt: Annotated[
        str | None, typer.Argument(metavar="PROMPT", help="The prompt text.", show_default=False)
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="HF directory, .gguf file or layer store (default: Gemma 3 270M)."
        ),
    ] = None,
    prompt_file: Annotated[
        Path | None,
        typer.Option("--prompt-file", "-f", help="Read the prompt from FILE ('-' = stdin)."),
    ] = None,
    device: DeviceOpt = None,
    gpu_memory: GpuMemoryOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    offload: OffloadOpt = None,
    dtype: DtypeOpt = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate.")
    ] = None,
    temperature: Annotated[
        float | None, typer.Option("--temperature", "-t", help="0 = greedy.")
    ] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="0 = off.")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="1.0 = off.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Sampler seed.")] = None,
    stop: Annotated[
        list[str] | None,
        typer.Option("--stop", help="Stop when this string appears (repeatable)."),
    ] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Do not apply the model's chat template.")
    ] = False,
    json_out: JsonOpt = False,
    max_context: MaxContextOpt = None,
    kv_cache: KvCacheOpt = None,
    kv_dir: KvDirOpt = None,
    hybrid: HybridOpt = None,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Generate a reply to PROMPT, streaming it to stdout, then print the metrics."""
    with common.cli_errors():
        text = common.read_prompt(prompt, prompt_file)
        params = common.sampling_params(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=tuple(stop) if stop else None,
        )
        llm = common.build_llm(
            model,
            device=device,
            gpu_memory=gpu_memory,
            cpu_memory=cpu_memory,
            offload=offload,
            dtype=dtype,
            max_context=max_context,
            kv_cache=kv_cache,
            kv_dir=kv_dir,
            hybrid=hybrid,
            cache_dir=cache_dir,
        )
        with llm:
            _generate(llm, text, params, raw=raw, json_out=json_out)


def _generate(llm: LLM, prompt: str, params: SamplingParams, *, raw: bool, json_out: bool) -> None:
    if llm.tokenizer is None:
        raise CliError(f"{llm.store_path} has no tokenizer, so it cannot take a text prompt")
    use_chat = not raw and bool(getattr(llm.tokenizer, "chat_template", None))
    if use_chat:
        stream = llm.stream([{"role": "user", "content": prompt}], params, chat=True)
    else:
        stream = llm.stream(prompt, params)
    out = sys.stdout
    last = "\n"
    try:
        for piece in stream:
            if not json_out and piece:
                out.write(piece)
                out.flush()
                last = piece
    except KeyboardInterrupt:
        if not json_out and not last.endswith("\n"):
            out.write("\n")
            out.flush()
        raise
    result = stream.result
    if result is None:  # cancelled before finishing
        raise KeyboardInterrupt
    if json_out:
        payload = {
            "text": result.text,
            "token_ids": list(result.token_ids),
            "finish_reason": result.finish_reason,
            "metrics": result.metrics.to_dict(),
        }
        out.write(json.dumps(payload, ensure_ascii=False) + "\n")
        out.flush()
        return
    if not last.endswith("\n"):
        out.write("\n")
    out.write("\n")
    out.flush()
    common.stdout_console().print(common.table(result.metrics.rows(), title="metrics"))
