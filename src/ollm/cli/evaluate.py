"""``ollm eval`` (quality of a setting against the exact path) and ``ollm ab`` (two settings,
alternating runs, bootstrap intervals)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from ollm.cli import common
from ollm.cli.common import CliError, JsonOpt, app

ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="Model path (default: Gemma 3 270M).")
]
TextOpt = Annotated[
    str | None,
    typer.Option("--text", help="Text file to score (default: the Python stdlib's docs)."),
]


def _sizes(spec: str) -> list[int]:
    """``"2k,8k,512"`` -> [2048, 8192, 512] (the parser of ``ollm bench --context``)."""
    from ollm.bench.run import parse_contexts

    out = parse_contexts(spec)
    if min(out) < 2:
        raise CliError(f"bad size list {spec!r}: give at least one size >= 2, e.g. 2k,8k")
    return out


def _say(message: str) -> None:
    sys.stderr.write(f"... {message}\n")


@app.command(
    name="eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def eval_cmd(
    ctx: typer.Context,
    model: ModelOpt = None,
    context: Annotated[
        str, typer.Option("--context", help="Context lengths to score, e.g. 2k,8k.")
    ] = "512,2k",
    passkey: Annotated[
        str | None,
        typer.Option("--passkey", help="Passkey contexts (default: --context; 'none' skips)."),
    ] = None,
    depths: Annotated[
        str, typer.Option("--depths", help="Passkey depths as fractions.")
    ] = "0.1,0.5,0.9",
    trials: Annotated[int, typer.Option("--trials", help="Passkey trials per cell.")] = 1,
    passkey_full: Annotated[
        str | None,
        typer.Option(
            "--passkey-full",
            help="Mark a part of the passkey prompts full (routing by segment, with "
            "--attention): question, or facts (an oracle: where the keys are).",
            show_default=False,
        ),
    ] = None,
    text: TextOpt = None,
    as_json: JsonOpt = False,
    plot: Annotated[
        str | None, typer.Option("--plot", help="Save quality vs context as a PNG.")
    ] = None,
) -> None:
    """Quality of a run setting (any run option after the command, e.g. --offload disk)
    against the exact path of the same model: perplexity, KL, top-1, passkey."""
    with common.cli_errors():
        from ollm.eval import evaluate, parse_options

        options = {**parse_options(ctx.args), "progress": common.show_progress()}
        pk = None if passkey is None else ([] if passkey == "none" else _sizes(passkey))
        try:
            ds = [float(d) for d in depths.split(",")]
        except ValueError:
            raise CliError(f"bad --depths {depths!r}: use fractions like 0.1,0.5") from None
        report = evaluate(
            model, options, _sizes(context), text=text, passkey_contexts=pk, depths=ds,
            trials=trials, progress=_say, passkey_full=_part(passkey_full),
        )  # fmt: skip
        if plot:
            _plot(report, plot)
        if as_json:
            print(json.dumps(report.to_dict(), indent=1))
            return
        rows = [
            (
                f"{r.context} tokens",
                f"ppl {r.perplexity:.4f} (exact {r.exact_perplexity:.4f})  KL mean {r.kl_mean:.2e}"
                f" max {r.kl_max:.2e}  top-1 {100 * r.top1_agreement:.1f}%",
            )
            for r in report.quality
        ]
        rows += [
            (f"passkey {r.variant} {r.context} @ {r.depth:.0%}", f"{r.correct}/{r.trials}")
            for r in report.passkey
        ]
        if report.cost:
            rows.append(("cost per token (passkey answers)", _cost_text(report.cost)))
        common.stdout_console().print(common.table(rows, title="quality vs the exact path"))


def _part(name: str | None) -> str | None:
    """``--passkey-full``'s value checked against the passkey prompt's parts."""
    from ollm.eval.passkey import PARTS

    if name is not None and name not in PARTS:
        raise CliError(f"bad --passkey-full {name!r}: use one of {', '.join(PARTS)}")
    return name


def _cost_text(cost: dict[str, float | None]) -> str:
    from ollm.sizes import format_size

    joules = cost.get("joules")
    return (
        f"{cost['device_seconds']:.4f} device-s, {format_size(int(cost['h2d_bytes']))} to GPU, "
        f"{format_size(int(cost['disk_bytes']))} from disk"
        + ("" if joules is None else f", {joules:.2f} J")
    )


def _plot(report, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.context for r in report.quality]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, [r.perplexity for r in report.quality], "o-", label="setting")
    ax.plot(xs, [r.exact_perplexity for r in report.quality], "s--", label="exact")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@app.command(name="ab")
def ab_cmd(
    a: Annotated[str, typer.Option("--a", help='Run options of A, e.g. "--offload cpu".')],
    b: Annotated[str, typer.Option("--b", help='Run options of B, e.g. "--offload disk".')],
    model: ModelOpt = None,
    context: Annotated[str, typer.Option("--context", help="Prompt length.")] = "512",
    runs: Annotated[int, typer.Option("--runs", help="Measured runs per side.")] = 6,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Tokens per run.")] = 16,
    quality: Annotated[
        bool, typer.Option("--quality", help="Also KL / top-1 of B against A.")
    ] = False,
    text: TextOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare two run settings on the same prompts, alternating A/B/B/A, with paired bootstrap
    95% intervals; says which differences are within noise."""
    with common.cli_errors():
        from ollm.eval import ab, parse_options

        progress = {"progress": common.show_progress()}
        ctx_len = _sizes(context)[0]
        report = ab(
            model, {**parse_options(a), **progress}, {**parse_options(b), **progress},
            context=ctx_len, runs=runs, new_tokens=new_tokens, quality=quality, text=text,
            progress=_say,
        )  # fmt: skip
        if as_json:
            print(json.dumps(report.to_dict(), indent=1, default=str))
            return
        rows = [
            (
                d.metric,
                f"A {d.mean_a:.4g}  B {d.mean_b:.4g}  B-A {d.diff:+.4g} ({100 * d.relative:+.1f}%)"
                f"  95% CI [{d.low:+.4g}, {d.high:+.4g}]  {d.verdict()}",
            )
            for d in report.differences
        ]
        for side, cost in (("A", report.cost_a), ("B", report.cost_b)):
            rows.append((f"cost per token {side}", _cost_text(cost)))
        if report.quality:
            q = report.quality
            rows.append(
                ("quality B vs A", f"KL mean {q['kl_mean']:.2e}  top-1 {100 * q['top1']:.1f}%")
            )
        common.stdout_console().print(common.table(rows, title=f"A/B over {runs} runs each"))
