"""``ollm serve``: the OpenAI-compatible HTTP server (`ollm.serve`) on one model.

FastAPI and uvicorn are imported only when the command runs; without them the command says
``pip install 'ollm[serve]'`` in one line. Binds 127.0.0.1 unless ``--host`` says otherwise.
Ctrl-C (or SIGTERM) stops accepting, lets running requests finish for ``--drain`` seconds, then
cancels the rest and frees the model (its KV pools and any per-run KV files).
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from ollm.cli import common
from ollm.cli.common import (
    CacheDirOpt,
    CliError,
    CpuMemoryOpt,
    DeviceOpt,
    DtypeOpt,
    GpuMemoryOpt,
    MaxContextOpt,
    OffloadOpt,
    ThreadsOpt,
    app,
)


def _listen(host: str, port: int) -> socket.socket:
    """A bound socket (a taken port is a one-line error here, not uvicorn's exit)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


@app.command()
def serve(
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="HF directory, .gguf file or layer store to serve."),
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="OLLM_API_KEY",
            show_default=False,
            help="Require 'Authorization: Bearer KEY' on every route but /health.",
        ),
    ] = None,  # fmt: skip
    served_model_name: Annotated[
        str | None,
        typer.Option(
            "--served-model-name",
            help="The model name clients use (default: the model directory's name).",
            show_default=False,
        ),
    ] = None,  # fmt: skip
    max_batch: Annotated[
        int, typer.Option("--max-batch", help="Sequences of max-context tokens the KV pools hold.")
    ] = 4,
    shared_prefix: Annotated[
        int,
        typer.Option(
            "--shared-prefix",
            help="Leading prompt tokens every request shares (a system prompt): the plan holds "
            "their KV once, leaving the room to resident layers.",
        ),
    ] = 0,
    max_pending: Annotated[
        int, typer.Option("--max-pending", help="Sequences held at once; beyond it: HTTP 429.")
    ] = 256,
    chunking: Annotated[
        str, typer.Option("--chunking", help="Streamed pieces: token, sentence or paragraph.")
    ] = "token",
    drain: Annotated[
        float, typer.Option("--drain", help="Seconds running requests may finish at Ctrl-C.")
    ] = 10.0,
    device: DeviceOpt = None,
    gpu_memory: GpuMemoryOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    offload: OffloadOpt = None,
    dtype: DtypeOpt = None,
    max_context: MaxContextOpt = None,
    threads: ThreadsOpt = common.physical_cores(),
    cache_dir: CacheDirOpt = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,
    /v1/models, /metrics, /health)."""
    with common.cli_errors():
        from ollm.serve import missing_dependencies

        if missing := missing_dependencies():
            raise CliError(f"ollm serve needs {', '.join(missing)}: pip install 'ollm[serve]'")
        if not 0 <= port <= 65535:
            raise CliError(f"--port must be in 0..65535, got {port}")
        if max_batch < 1 or drain < 0:
            raise CliError("--max-batch must be >= 1 and --drain >= 0")
        from ollm.serve.app import ServeConfig

        name = served_model_name or (Path(model).name if model else "default")
        try:
            config = ServeConfig(name, api_key, max_pending=max_pending, chunking=chunking)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        sock = _listen(host, port)
        llm = common.build_llm(
            model, threads=threads, device=device, gpu_memory=gpu_memory,
            cpu_memory=cpu_memory, offload=offload, dtype=dtype, max_context=max_context,
            max_batch=max_batch, cache_dir=cache_dir, shared_prefix=shared_prefix or None,
        )  # fmt: skip
        with llm:
            _run(llm, config, sock, drain)


def _run(llm, config, sock: socket.socket, drain: float) -> None:
    """Say where it listens, the plan and the budget; serve until Ctrl-C."""
    import uvicorn

    from ollm.engine.batch import batch_supported
    from ollm.engine.kvpools import batch_unsupported
    from ollm.serve import create_app

    why = batch_unsupported(llm.runner)
    if why is not None:
        raise CliError(f"ollm serve needs the batch engine, and {why}")
    if not batch_supported(llm.runner):
        raise CliError(
            "ollm serve needs the plan's device-resident KV on one device; use one --device"
        )
    app_ = create_app(llm, config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    out = sys.stdout
    out.write(f"ollm serve: {config.model_name} on http://{shown}:{port}/v1\n")
    w = llm.workload
    out.write(f"  context {w.context} tokens x batch {w.batch}; queue bound {config.max_pending}")
    out.write(f"; auth {'on' if config.api_key else 'off'}\n")
    for label, value in llm.plan.describe():
        out.write(f"  {label}: {value}\n")
    out.flush()
    cfg = uvicorn.Config(
        app_, log_level="warning", timeout_graceful_shutdown=max(1, round(drain)),
        access_log=False,
    )  # fmt: skip
    uvicorn.Server(cfg).run(sockets=[sock])
