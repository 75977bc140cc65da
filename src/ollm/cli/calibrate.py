"""``ollm calibrate``: mark each full-attention KV head as streaming (window + sinks), top-k
pages or full, from real text, for ``--attention auto`` (saved beside the layer store)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ollm.cli import common
from ollm.cli.common import CacheDirOpt, CliError, DeviceOpt, JsonOpt, ThreadsOpt, app


@app.command()
def calibrate(
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model path (default: Gemma 3 270M)."),
    ] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens of text to run.")] = 4096,
    window: Annotated[int, typer.Option("--window", help="Recent-window tokens.")] = 256,
    sinks: Annotated[int, typer.Option("--sinks", help="Sink tokens (the first ones).")] = 64,
    threshold: Annotated[
        float,
        typer.Option("--threshold", help="Largest relative change of a head's output accepted."),
    ] = 0.02,
    page_tokens: Annotated[
        int, typer.Option("--page-tokens", help="Key slots per top-k page.")
    ] = 32,
    text: Annotated[
        str | None, typer.Option("--text", help="Text file (default: the Python stdlib's docs).")
    ] = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = common.physical_cores(),
    cache_dir: CacheDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure how much each full-attention head's output changes when it sees only sinks +
    window, or those plus its best top-k pages; save each head's cheapest close mechanism."""
    with common.cli_errors():
        if tokens < 2 or window < 1 or sinks < 0 or not 0 <= threshold:
            raise CliError("--tokens >= 2, --window >= 1, --sinks >= 0 and --threshold >= 0")
        from ollm.engine.routing_calibration import calibrate as run_calibration
        from ollm.engine.routing_calibration import save_calibration

        llm = common.build_llm(
            model, threads=threads, device=device, cache_dir=cache_dir,
            max_context=tokens, attention_page_tokens=page_tokens,
        )  # fmt: skip
        with llm:
            data = run_calibration(llm, tokens, window, sinks, threshold, text)
            path = save_calibration(llm.store_path, data)
        if as_json:
            print(json.dumps({**data, "path": str(path)}, indent=1))
            return
        rows = []
        for i, (dev, choice) in enumerate(zip(data["deviation"], data["choice"], strict=True)):
            if dev is None:
                continue
            for h, c in enumerate(choice):
                devs = "  ".join(f"{n} {d[h]:.3f}" for n, d in dev.items())
                rows.append((f"layer {i} kv head {h}", f"{c}   ({devs})"))
        rows.append(("saved", str(path)))
        common.stdout_console().print(common.table(rows, title="attention calibration"))
