"""The typer app of ``ollm``, its shared options and helpers (see ``ollm/cli/__init__.py``).

Importing this module stays light (typer, rich and ``ollm.errors`` only): torch, transformers
and the engine load inside the command functions. Generated text and tables go to stdout;
logging, progress bars and errors go to stderr. Errors ollm raises on purpose print as one
``error: <message>`` line on stderr and exit with code 2; Ctrl-C exits with code 130.
"""

from __future__ import annotations

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
def stdout_console() -> Console:
    from rich.console import Console

    return Console(file=sys.stdout, highlight=False, soft_wrap=True)


def one_line(message: str) -> str:
    return " ".join(str(message).split()) or "unknown error"


def fail(message: str, code: int) -> typer.Exit:
    # Plain write, not rich: the message must stay one line whatever the terminal width.
    sys.stdout.flush()
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()
    return typer.Exit(code)


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn ollm's deliberate errors and Ctrl-C into one stderr line and an exit code."""
    try:
        yield
    except OllmError as exc:
        raise fail(f"error: {one_line(str(exc))}", EXIT_ERROR) from None
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


def build_llm(model: str | None, **options: Any) -> LLM:
    from ollm.api import LLM

    return LLM(model, **engine_kwargs(**options))


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
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
