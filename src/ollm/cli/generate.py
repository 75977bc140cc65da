"""``ollm run``: generate a reply to one prompt, streamed to stdout, then the metrics."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TextIO

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
    KvCodecOpt,
    KvDirOpt,
    KvEvictOpt,
    KvKeepOpt,
    KvRecentOpt,
    MaxContextOpt,
    MaxNewTokensOpt,
    OffloadOpt,
    SeedOpt,
    TemperatureOpt,
    ThreadsOpt,
    TopKOpt,
    TopPOpt,
    app,
)

if TYPE_CHECKING:
    from ollm.api import LLM, GenerationResult, TextStream
    from ollm.engine.sampling import SamplingParams


PromptArg = Annotated[
    str | None, typer.Argument(metavar="PROMPT", help="The prompt text.", show_default=False)
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="HF directory, .gguf file or layer store (default: Gemma 3 270M)."
    ),
]
PromptFileOpt = Annotated[
    Path | None,
    typer.Option("--prompt-file", "-f", help="Read the prompt from FILE ('-' = stdin)."),
]
StopOpt = Annotated[
    list[str] | None,
    typer.Option("--stop", help="Stop when this string appears (repeatable).", show_default=False),
]
RawOpt = Annotated[bool, typer.Option("--raw", help="Do not apply the model's chat template.")]
FullAttentionOpt = Annotated[
    str | None,
    typer.Option(
        "--full-attention",
        help="Routing by segment (with --attention): prompt token spans every routed layer "
        "reads whole, as START:END slices (negative: from the end of the prompt, after the chat "
        "template), e.g. 0:300 (instructions) or -64: (the last 64 tokens).",
        show_default=False,
    ),
]
SpeculateOpt = Annotated[
    str | None,
    typer.Option(
        "--speculate",
        help="Speculative decoding (lossless): off, auto (= lookup), lookup (prompt n-grams), "
        "self[:N] (the model's first N layers), draft:PATH (a small model, same tokenizer); "
        "prefixes: tree: (candidate trees), mix: (lookup or the model per span), cascade: "
        "(lookup drafts for the model), e.g. tree:mix:draft:PATH.",
        show_default=False,
    ),
]


@app.command()
def run(
    prompt: PromptArg = None,
    model: ModelOpt = None,
    prompt_file: PromptFileOpt = None,
    device: DeviceOpt = None,
    gpu_memory: GpuMemoryOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    offload: OffloadOpt = None,
    dtype: DtypeOpt = None,
    max_new_tokens: MaxNewTokensOpt = 128,
    temperature: TemperatureOpt = 1.0,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    raw: RawOpt = False,
    json_out: JsonOpt = False,
    max_context: MaxContextOpt = None,
    kv_cache: KvCacheOpt = None,
    kv_dir: KvDirOpt = None,
    kv_codec: KvCodecOpt = None,
    kv_temporal: common.KvTemporalOpt = None,
    kv_recent: KvRecentOpt = None,
    kv_evict: KvEvictOpt = None,
    kv_keep: KvKeepOpt = None,
    hybrid: HybridOpt = None,
    decode_resident: common.DecodeResidentOpt = None,
    mlp_cpu: common.MlpCpuOpt = None,
    threads: ThreadsOpt = common.physical_cores(),
    cache_dir: CacheDirOpt = None,
    speculate: SpeculateOpt = None,
    attention: common.AttentionOpt = None,
    full_attention: FullAttentionOpt = None,
    moe_offload: common.MoeOffloadOpt = None,
    expert_cache: common.ExpertCacheOpt = None,
    expert_lookahead: common.ExpertLookaheadOpt = None,
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
            full_attention=_spans(full_attention),
        )
        llm = common.build_llm(
            model,
            threads=threads,
            device=device,
            gpu_memory=gpu_memory,
            cpu_memory=cpu_memory,
            offload=offload,
            dtype=dtype,
            max_context=max_context,
            kv_cache=kv_cache,
            kv_dir=kv_dir,
            kv_codec=common.kv_schedule(kv_codec, kv_temporal),
            kv_recent=kv_recent,
            kv_evict=kv_evict,
            kv_keep=kv_keep,
            hybrid=hybrid,
            decode_resident=decode_resident,
            mlp_cpu=mlp_cpu,
            cache_dir=cache_dir,
            speculate=speculate,
            attention=attention,
            moe_offload=moe_offload,
            expert_cache=expert_cache,
            expert_lookahead=expert_lookahead,
        )
        with llm:
            _generate(llm, text, params, raw=raw, json_out=json_out)


def _spans(text: str | None):
    """``--full-attention``'s slices (None: none); a bad one is a one-line error."""
    if text is None:
        return None
    from ollm.layers.segments import parse_spans

    try:
        return parse_spans(text)
    except ValueError as exc:
        raise CliError(f"--full-attention: {exc}") from None


def _generate(llm: LLM, prompt: str, params: SamplingParams, *, raw: bool, json_out: bool) -> None:
    if llm.tokenizer is None:
        raise CliError(f"{llm.store_path} has no tokenizer, so it cannot take a text prompt")
    use_chat = not raw and bool(getattr(llm.tokenizer, "chat_template", None))
    if use_chat:
        stream = llm.stream([{"role": "user", "content": prompt}], params, chat=True)
    else:
        stream = llm.stream(prompt, params)
    out = sys.stdout
    result = stream_reply(stream, None if json_out else out)
    if json_out:
        payload = {
            "text": result.text,
            "token_ids": list(result.token_ids),
            "finish_reason": result.finish_reason,
            "metrics": result.metrics.to_dict(),
        }
        if llm.last_speculation is not None:
            payload["speculation"] = dict(spec_rows(llm.last_speculation))
        out.write(json.dumps(payload, ensure_ascii=False) + "\n")
        out.flush()
        return
    out.write("\n")
    out.flush()
    rows = metric_rows(result.metrics.rows(), llm.device) + spec_rows(llm.last_speculation)
    common.stdout_console().print(common.table(rows, title="metrics"))


def stream_reply(stream: TextStream, out: TextIO | None) -> GenerationResult:
    """Write ``stream``'s pieces to ``out`` (None: only collect), ending on a new line; the
    wait for the first piece (the prefill) is announced. Ctrl-C / SIGTERM cancel the stream."""
    from ollm.cli.status import waiting

    last = "\n"
    pieces = iter(stream)
    try:
        with waiting("reading the prompt"):
            first = next(pieces, None)
        for piece in itertools.chain([] if first is None else [first], pieces):
            if out is not None and piece:
                out.write(piece)
                out.flush()
                last = piece
    finally:
        if out is not None and not last.endswith("\n"):  # also when interrupted mid-line
            out.write("\n")
            out.flush()
    if stream.result is None:  # cancelled before finishing
        raise KeyboardInterrupt
    return stream.result


def spec_rows(stats) -> list[tuple[str, str]]:
    """Metrics rows of speculative decoding (``LLM.last_speculation``; none when it was off)."""
    if stats is None:
        return []
    return [
        ("drafter", stats.drafter),
        ("draft acceptance", f"{stats.acceptance_rate:.1%} of {stats.drafted}"),
        ("tokens per target pass", f"{stats.tokens_per_pass:.2f}"),
        ("drafter share of time", f"{stats.drafter_share:.1%}"),
        *(
            (
                f"  {name}",
                f"{n} drafts, {acc} of {tok} tokens accepted, {stats.share_of(name):.1%} of time",
            )
            for name, (n, tok, acc) in stats.by_drafter.items()
        ),
    ]


def metric_rows(rows: list[tuple[str, str]], device: str) -> list[tuple[str, str]]:
    """The metrics table's rows for a run on ``device``: a CPU run shows only CPU rows (rows
    about the GPU, such as its peak memory or copies to it, are always zero there)."""
    if device.startswith("cuda"):
        return rows
    return [(label, value) for label, value in rows if "GPU" not in label]
