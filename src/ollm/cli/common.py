"""The typer app of ``ollm``, its shared options and helpers (see ``ollm/cli/__init__.py``).

Importing this module stays light (typer, rich and ``ollm.errors`` only): torch, transformers
and the engine load inside the command functions. Generated text and tables go to stdout;
logging, progress bars and errors go to stderr. Errors ollm raises on purpose print as one
``error: <message>`` line on stderr and exit with code 2; Ctrl-C exits with code 130 and
SIGTERM with 143, after the same clean-up (cancelled stream, per-run KV files removed).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ollm.cli.helpfmt import OllmGroup
from ollm.cli.status import configure_logging
from ollm.errors import OllmError

if TYPE_CHECKING:
    from rich.console import Console

    from ollm.api import LLM
    from ollm.engine.sampling import SamplingParams


EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # 128 + SIGTERM

app = typer.Typer(
    name="ollm",
    cls=OllmGroup,
    help="Large-context LLM inference on memory-constrained machines.",
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class CliError(OllmError):
    """A bad combination of command-line arguments."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so the same clean-up runs (the stream's
    worker is cancelled, the per-run KV directory removed) before exit code 143."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    # signal.signal works only in the main thread; elsewhere (an embedding app) leave it be.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- shared helpers ---------------------------------------------------------------------------
def stdout_console() -> Console:
    """A rich console on stdout for tables (no highlighting, long lines kept whole)."""
    from rich.console import Console

    return Console(file=sys.stdout, highlight=False, soft_wrap=True)


def one_line(message: str) -> str:
    """``message`` with every run of whitespace (new lines too) turned into one space."""
    return " ".join(str(message).split()) or "unknown error"


def fail(message: str, code: int) -> typer.Exit:
    """Write ``message`` to stderr; return the ``typer.Exit(code)`` to raise."""
    # Plain write, not rich: the message must stay one line whatever the terminal width.
    sys.stdout.flush()
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()
    return typer.Exit(code)


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn ollm's deliberate errors, Ctrl-C and SIGTERM into one stderr line and an exit code."""
    try:
        with _sigterm_as_interrupt():
            yield
    except OllmError as exc:
        raise fail(f"error: {one_line(str(exc))}", EXIT_ERROR) from None
    except Terminated:
        raise fail("terminated", EXIT_TERMINATED) from None
    except KeyboardInterrupt:
        raise fail("interrupted", EXIT_INTERRUPTED) from None


def show_progress() -> bool:
    """Conversion progress bars (on stderr) only when stderr is a terminal."""
    return sys.stderr.isatty()


def engine_kwargs(**options: Any) -> dict[str, Any]:
    """EngineConfig keyword arguments for the options the user gave (None = the default)."""
    kwargs = {k: v for k, v in options.items() if v is not None}
    kwargs["progress"] = show_progress()
    return kwargs


def physical_cores() -> int:
    """Physical CPU cores this process may use (hyper-threads share a core's FPUs, so more
    threads than cores rarely speed up matmuls); falls back to the logical count."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    phys = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "physical id":
                    phys = value.strip()
                elif key.strip() == "core id":
                    cores.add((phys, value.strip()))
    except OSError:
        pass
    return max(1, min(len(cores) or usable, usable))


def set_threads(threads: int | None) -> None:
    """torch's intra-op thread count for CPU compute (None: leave torch's choice)."""
    if threads is None:
        return
    if threads < 1:
        raise CliError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _check_device(options: dict[str, Any]) -> None:
    """Device mistakes in the CLI's own words (flags, not Python keyword arguments): a CUDA
    device or a GPU budget on a machine without a GPU, a GPU budget with ``--device cpu``."""
    device = str(options.get("device") or "auto").strip().lower()
    budget = options.get("gpu_memory")
    if budget is not None:
        from ollm.sizes import parse_size

        parse_size(budget)  # a malformed size is the first thing to say
        if device == "cpu":
            raise CliError("--gpu-memory has no effect with --device cpu; drop one of them")
    if device == "cpu" or (budget is None and not device.startswith("cuda")):
        return
    import torch

    if torch.cuda.is_available():
        return
    if device.startswith("cuda"):
        raise CliError(
            f"device {device!r} requested but this machine has no CUDA GPU; use --device cpu"
        )
    raise CliError("--gpu-memory needs a CUDA GPU and this machine has none; drop the flag")


def build_llm(model: str | None, threads: int | None = None, **options: Any) -> LLM:
    """An ``LLM`` for the given options (None = the default), saying what it does meanwhile."""
    from ollm.cli.status import is_terminal, waiting

    _check_device(options)
    set_threads(threads)
    from ollm.api import LLM

    kwargs = engine_kwargs(**options)
    kwargs["progress"] = kwargs["progress"] and not is_terminal()  # the spinner shows progress
    name = "the default model" if model is None else Path(model).name
    with waiting(f"loading {name} (convert if needed, plan, calibrate)"):
        return LLM(model, **kwargs)


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt text from the argument, a file or stdin; an empty one is refused here, before
    the model loads (a BOS-only prompt would otherwise "continue" nothing)."""
    text = _prompt_text(prompt, prompt_file)
    if not text:
        where = "stdin" if str(prompt_file) == "-" else (prompt_file or "the PROMPT argument")
        raise CliError(f"the prompt is empty ({where}): a request needs at least one token of text")
    return text


def _prompt_text(prompt: str | None, prompt_file: Path | None) -> str:
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


def sampling_params(**options: Any) -> SamplingParams:
    """SamplingParams with its defaults, except the options given (not None)."""
    from ollm.engine.sampling import SamplingParams

    return SamplingParams(**{k: v for k, v in options.items() if v is not None})


def table(rows: list[tuple[str, str]], title: str | None = None):
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for label, value in rows:
        table.add_row(label, value)
    return table


# -- options shared by several commands -----------------------------------------------------------
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
    typer.Option(
        "--dtype",
        help="float32, bfloat16 or float16 (default: the source's; float32 becomes bfloat16 on a GPU).",
    ),
]
MaxContextOpt = Annotated[
    int | None,
    typer.Option("--max-context", help="Tokens per sequence to reserve KV memory for."),
]
CacheDirOpt = Annotated[
    str | None,
    typer.Option("--cache-dir", help="Where converted layer stores live (default ~/.cache/ollm)."),
]
ThreadsOpt = Annotated[
    int,
    typer.Option(
        "--threads",
        "-t",
        help="CPU threads for compute; the default is this machine's physical cores.",
    ),
]
MaxNewTokensOpt = Annotated[
    int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate.")
]
TemperatureOpt = Annotated[
    float, typer.Option("--temperature", "--temp", help="Sampling temperature; 0 = greedy.")
]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Keep the k likeliest tokens; 0 = off.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass; 1.0 = off.")]
SeedOpt = Annotated[
    int | None, typer.Option("--seed", help="Sampler seed (default: random).", show_default=False)
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
KvCodecOpt = Annotated[
    str | None,
    typer.Option(
        "--kv-codec",
        help="KV compression (lossy): none, int8, int4, fp8, k:int4,v:int8 (keys per channel, "
        "values per token), auto (per KV tier from the measured rates: the fastest codec the "
        "quality rule allows where it saves >= 10% of a layer's decode step, else exact; "
        "int4 only with --kv-recent >= 128).",
    ),
]
KvTemporalOpt = Annotated[
    str | None,
    typer.Option(
        "--kv-temporal",
        help="KV tiers by age (lossy), e.g. 4k:bf16,32k:int8,rest:int4: the newest 4k tokens "
        "exact, blocks re-encoded int8 then int4 as they age.",
    ),
]


def kv_schedule(codec: str | None, temporal: str | None) -> str | None:
    """The ``kv_codec`` of a run from --kv-codec and --kv-temporal (a schedule is a codec)."""
    if temporal is None:
        return codec
    if "rest" not in temporal.lower():
        raise OllmError(f"--kv-temporal {temporal!r}: use AGE:KIND,...,rest:KIND")
    if codec not in (None, "none"):
        raise OllmError("--kv-codec and --kv-temporal cannot be combined: the schedule sets both")
    return temporal


KvEvictOpt = Annotated[
    str | None,
    typer.Option(
        "--kv-evict",
        help="KV eviction (lossy): none, streaming (sinks + recent), h2o (heavy hitters), "
        "snapkv (prompt observation window).",
    ),
]
KvKeepOpt = Annotated[
    str | None,
    typer.Option("--kv-keep", help="Tokens --kv-evict keeps: a share (25%) or a count (50%)."),
]
KvRecentOpt = Annotated[
    int | None,
    typer.Option("--kv-recent", help="Newest tokens a compressed KV cache keeps exact (128)."),
]
MoeOffloadOpt = Annotated[
    str | None,
    typer.Option(
        "--moe-offload",
        help="Mixture of experts: auto (experts placed and cached one by one when layers would "
        "stream), expert, or layer (whole layers stream).",
        show_default=False,
    ),
]
ExpertCacheOpt = Annotated[
    str | None,
    typer.Option(
        "--expert-cache", help="The GPU expert cache's policy: lru or lfu.", show_default=False
    ),
]
ExpertLookaheadOpt = Annotated[
    bool | None,
    typer.Option(
        "--expert-lookahead/--no-expert-lookahead",
        help="Mixture of experts: prefetch the experts the next layer's router predicts from the "
        "current layer's input (off by default; pays only where routers are predictable).",
        show_default=False,
    ),
]
DecodeResidentOpt = Annotated[
    bool | None,
    typer.Option(
        "--decode-resident/--no-decode-resident",
        help="Hold extra streamed layers on the GPU while decode runs, in the bytes the "
        "prefill's activations used (off by default: its GPU budget is not yet checked on a "
        "device).",
        show_default=False,
    ),
]
MlpCpuOpt = Annotated[
    bool | None,
    typer.Option(
        "--mlp-cpu/--no-mlp-cpu",
        help="Batched decode: copy only the attention of some streamed layers and run their MLP "
        "on the CPU from RAM where the cost model says the step is shorter (default: on).",
        show_default=False,
    ),
]
AttentionOpt = Annotated[
    str | None,
    typer.Option(
        "--attention",
        help="Decode attention routing (lossy unless full): full, auto (needs `ollm calibrate`), "
        "window:W,sinks:S, topk:PAGES.",
        show_default=False,
    ),
]
HybridOpt = Annotated[
    str | None,
    typer.Option("--hybrid", help="auto: the CPU may compute RAM layers in decode; off."),
]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            sys.stdout.write(f"ollm {version('ollm')}\n")
        except PackageNotFoundError:  # running from a source tree that is not installed
            sys.stdout.write("ollm (not installed)\n")
        raise typer.Exit(0)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Show progress lines on stderr on a terminal too."),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Large-context LLM inference on memory-constrained machines."""
    configure_logging(verbose)
    if ctx.invoked_subcommand is None:  # plain `ollm`: the help, as a successful answer
        sys.stdout.write(ctx.get_help() + "\n")
        raise typer.Exit(0)
