"""Command line: ``ollm run``, ``ollm convert``, ``ollm info`` and ``ollm bench``.

Importing this module stays light (typer, rich and ``ollm.errors`` only): torch, transformers
and the engine load inside the command functions. Generated text and tables go to stdout;
logging, progress bars and errors go to stderr. Errors ollm raises on purpose print as one
``error: <message>`` line on stderr and exit with code 2; Ctrl-C exits with code 130.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ollm.errors import OllmError

if TYPE_CHECKING:
    from rich.console import Console

    from ollm.api import LLM
    from ollm.engine.sampling import SamplingParams

__all__ = ["app", "main"]

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

app = typer.Typer(
    name="ollm",
    help="Large-context LLM inference on memory-constrained machines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


class CliError(OllmError):
    """A bad combination of command-line arguments."""


# -- shared helpers ---------------------------------------------------------------------------
def _stdout() -> Console:
    from rich.console import Console

    return Console(file=sys.stdout, highlight=False, soft_wrap=True)


def _one_line(message: str) -> str:
    return " ".join(str(message).split()) or "unknown error"


def _fail(message: str, code: int) -> typer.Exit:
    # Plain write, not rich: the message must stay one line whatever the terminal width.
    sys.stdout.flush()
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()
    return typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn ollm's deliberate errors and Ctrl-C into one stderr line and an exit code."""
    try:
        yield
    except OllmError as exc:
        raise _fail(f"error: {_one_line(str(exc))}", EXIT_ERROR) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", EXIT_INTERRUPTED) from None


def _progress() -> bool:
    """Conversion progress bars (on stderr) only when stderr is a terminal."""
    return sys.stderr.isatty()


def _engine_kwargs(**options: Any) -> dict[str, Any]:
    """EngineConfig keyword arguments for the options the user gave (None = the default)."""
    kwargs = {k: v for k, v in options.items() if v is not None}
    kwargs["progress"] = _progress()
    return kwargs


def _build_llm(model: str | None, **options: Any) -> LLM:
    from ollm.api import LLM

    return LLM(model, **_engine_kwargs(**options))


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise CliError("give the prompt either as an argument or with --prompt-file, not both")
    if prompt is None and prompt_file is None:
        raise CliError("no prompt: pass PROMPT or --prompt-file FILE ('-' reads stdin)")
    if prompt_file is None:
        return prompt  # type: ignore[return-value]
    if str(prompt_file) == "-":
        return sys.stdin.read()
    try:
        return prompt_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(f"prompt file not found: {prompt_file}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read prompt file {prompt_file}: {exc}") from None


def _sampling_params(**options: Any) -> SamplingParams:
    """SamplingParams with its defaults, except the options given (not None)."""
    from ollm.engine.sampling import SamplingParams

    return SamplingParams(**{k: v for k, v in options.items() if v is not None})


def _table(rows: list[tuple[str, str]], title: str | None = None):
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for label, value in rows:
        table.add_row(label, value)
    return table


# -- options shared by run and info -----------------------------------------------------------
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N (default: auto).")
]
GpuMemoryOpt = Annotated[
    str | None,
    typer.Option("--gpu-memory", help="GPU budget, e.g. 4GiB (default: 90% of free memory)."),
]
CpuMemoryOpt = Annotated[
    str | None,
    typer.Option("--cpu-memory", help="RAM budget for resident weights, e.g. 16GiB."),
]
OffloadOpt = Annotated[
    str | None,
    typer.Option("--offload", help="Where non-resident layers live: auto, cpu or disk."),
]
DtypeOpt = Annotated[
    str | None,
    typer.Option("--dtype", help="float32, bfloat16 or float16 (default: the source's)."),
]
MaxContextOpt = Annotated[
    int | None,
    typer.Option("--max-context", help="Tokens per sequence to reserve KV memory for."),
]
CacheDirOpt = Annotated[
    str | None,
    typer.Option("--cache-dir", help="Where converted layer stores live (default ~/.cache/ollm)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
KvCacheOpt = Annotated[
    str | None,
    typer.Option("--kv-cache", help="auto (GPU, then pinned RAM) or disk (offloaded KV on disk)."),
]
KvDirOpt = Annotated[
    str | None,
    typer.Option("--kv-dir", help="Directory for the disk KV tier (default: <cache-dir>/kv)."),
]
HybridOpt = Annotated[
    str | None,
    typer.Option("--hybrid", help="auto: the CPU may compute RAM layers in decode; off."),
]


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log progress details to stderr.")
    ] = False,
) -> None:
    """Large-context LLM inference on memory-constrained machines."""
    logger = logging.getLogger("ollm")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    # transformers' own deprecation chatter is not the user's business unless asked for.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "error")


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at emit time (so test runners can capture it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


# -- commands -----------------------------------------------------------------------------------
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
    with _errors():
        text = _read_prompt(prompt, prompt_file)
        params = _sampling_params(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=tuple(stop) if stop else None,
        )
        llm = _build_llm(
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
    _stdout().print(_table(result.metrics.rows(), title="metrics"))


@app.command()
def convert(
    src: Annotated[str, typer.Argument(metavar="SRC", help="HF model directory or .gguf file.")],
    dst: Annotated[
        str, typer.Argument(metavar="DST", help="Directory of the layer store to create.")
    ],
    dtype: DtypeOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace DST if it exists.")
    ] = False,
) -> None:
    """Convert a model into a layer store (one file per decoder layer)."""
    with _errors():
        torch_dtype = None
        if dtype is not None:
            from ollm.config import EngineConfig

            name = EngineConfig(dtype=dtype).dtype  # validates, one-line error otherwise
            import torch

            torch_dtype = getattr(torch, str(name))
        from ollm.sizes import format_size
        from ollm.weights.convert import convert as convert_model

        path = convert_model(src, dst, torch_dtype, overwrite, progress=_progress())
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        _stdout().print(f"{path} ({format_size(size)})")


@app.command()
def info(
    model: Annotated[
        str | None,
        typer.Argument(
            metavar="MODEL",
            help="HF directory, .gguf file or layer store (default: Gemma 3 270M).",
            show_default=False,
        ),
    ] = None,
    device: DeviceOpt = None,
    gpu_memory: GpuMemoryOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    offload: OffloadOpt = None,
    max_context: MaxContextOpt = None,
    kv_cache: KvCacheOpt = None,
    hybrid: HybridOpt = None,
    json_out: JsonOpt = False,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Show the model's architecture, sizes and placement plan under the given budgets."""
    with _errors():
        llm = _build_llm(
            model,
            device=device,
            gpu_memory=gpu_memory,
            cpu_memory=cpu_memory,
            offload=offload,
            max_context=max_context,
            kv_cache=kv_cache,
            hybrid=hybrid,
            cache_dir=cache_dir,
        )
        with llm:
            data = llm.info()
        if json_out:
            sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
            sys.stdout.flush()
            return
        plan = data.pop("plan", {})
        table = _table([(k, str(v)) for k, v in data.items()], title="model")
        table.add_section()
        for label, value in dict(plan).items():  # type: ignore[call-overload]
            table.add_row(f"plan: {label}", str(value))
        _stdout().print(table)


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
    with _errors():
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
            progress=_progress(),
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


def main() -> None:
    """Console-script entry point (``ollm``)."""
    try:
        app()
    except KeyboardInterrupt:  # raised outside a command (e.g. while parsing or importing)
        sys.stderr.write("interrupted\n")
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
