"""Results of peer engines (``scripts/peers.py``): the worker's event log turned into cases,
ratios to ollm on the same workload (only for engines run on this machine in the same run), the
llama.cpp figures quoted from another machine (printed as reference lines, never as ratios) and the
printed table."""

from __future__ import annotations

import json
import statistics
import sys
from typing import TextIO

from ollm.bench.run import context_label
from ollm.sizes import format_size

__all__ = ["LLAMA_CPP", "parse_events", "summarize_ollm", "add_ratios", "print_table"]

# llama.cpp measured earlier on another machine: a reference line beside the run, never a ratio
# (a different host's disk, PCIe and CPU). llama.cpp itself runs as a peer (``bench.llamacpp``).
LLAMA_CPP: dict = {
    "status": "reference, other machine",
    "source": "llama.cpp commit 0c1e57098 on an H100, F16 GGUF of llama3-8b shapes",
    "applies_to": {"synthetic": "llama3-8b", "context": 8192},
    "rows": [
        {"config": "-ngl 14 (7.8 GiB)", "context": 8192, "prefill_s": 16.4, "decode_tok_s": 6.68},
        {
            "config": "-ngl 14 -ub 2048 --no-mmap (8.6 GiB)",
            "context": 8192,
            "prefill_s": 1.44,
            "decode_tok_s": None,
        },
        {
            "config": "-ngl 99 (every layer on the GPU)",
            "context": 8192,
            "prefill_s": 0.38,
            "decode_tok_s": 148.0,
        },
    ],
}


def parse_events(text: str, contexts: list[int], killed: bool) -> dict:
    """A peer's result from its worker output (``@@ {json}`` lines; see ``peer_worker``).

    A context without a final ``case`` event (killed at the time limit) becomes a partial case
    from its ``start`` and ``token`` events: prefill up to the first token, then the steps so far.
    """
    events = []
    for line in text.splitlines():
        if line.startswith("@@ "):
            try:
                events.append(json.loads(line[3:]))
            except json.JSONDecodeError:
                pass
    out: dict = {"cases": [], "errors": []}
    for e in events:
        if e["event"] == "loaded":
            out.update(load_s=e["load_s"], info=e.get("info"), versions=e.get("versions"))
            out["load_peak_gpu_bytes"] = e.get("load_peak_gpu_bytes")
        elif e["event"] == "warmup":
            out.setdefault("warmup", {})[e["context"]] = {
                k: v for k, v in e.items() if k not in ("event", "context")
            }
        elif e["event"] == "error":
            out["errors"].append(f"{e['stage']}: {' '.join(str(e['message']).split())[:300]}")
    for ctx in contexts:
        done = [e for e in events if e["event"] == "case" and e["context"] == ctx]
        if done:
            case = {k: v for k, v in done[0].items() if k != "event"}
            case["status"] = "partial" if case.get("stopped_at_deadline") else "ok"
            out["cases"].append(case)
            continue
        start = [e["t"] for e in events if e["event"] == "start" and e["context"] == ctx]
        toks = [e["t"] for e in events if e["event"] == "token" and e["context"] == ctx]
        warm = out.get("warmup", {}).get(ctx, {})
        if start or warm:
            steps = [b - a for a, b in zip(toks, toks[1:], strict=False)]
            out["cases"].append(
                {
                    "context": ctx,
                    **warm,
                    "status": "partial",
                    "prefill_s": toks[0] - start[0] if toks and start else None,
                    "generated_tokens": len(toks),
                    "decode_step_median_s": statistics.median(steps) if steps else None,
                    "decode_steps_s": steps,
                }
            )
    out.pop("warmup", None)  # merged into the cases
    n_ok = sum(c["status"] == "ok" for c in out["cases"])
    if "load_s" not in out:
        out["status"] = "timed out while loading" if killed else "failed"
    elif n_ok == len(contexts):
        out["status"] = "ran"
    elif out["cases"]:
        out["status"] = "partial"
    else:
        out["status"] = "timed out" if killed else "failed"
    out["reason"] = "; ".join(out["errors"])
    if killed:
        out["reason"] = (out["reason"] + "; " if out["reason"] else "") + "killed at its time limit"
    return out


def summarize_ollm(report: dict | None) -> dict | None:
    """The parts of an ``ollm bench`` report the peers table needs."""
    if not report:
        return None
    keep = (
        "context",
        "status",
        "error",
        "load_s",
        "warmup_s",
        "prefill_s",
        "decode_tok_s",
        "decode_step_median_s",
        "peak_gpu_bytes",
        "ram_peak_bytes",
        "ratios",
    )
    cases = [{k: c[k] for k in keep if k in c} for c in report.get("cases", [])]
    return {"probes": report.get("probes"), "model": report.get("model"), "cases": cases}


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def add_ratios(peers: list[dict], ollm: dict | None) -> None:
    """Set ``prefill_x_ollm`` / ``decode_x_ollm`` (peer time / ollm time, decode by median step)
    on every peer case with an ollm case of the same context from this run."""
    base = {c["context"]: c for c in (ollm or {}).get("cases", []) if c.get("status") == "ok"}
    for p in peers:
        for c in p.get("cases", []):
            o = base.get(c["context"])
            if o:
                c["prefill_x_ollm"] = _div(c.get("prefill_s"), o.get("prefill_s"))
                c["decode_x_ollm"] = _div(
                    c.get("decode_step_median_s"), o.get("decode_step_median_s")
                )


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _size(v: int | None) -> str:
    return format_size(v) if v else "-"


def print_table(result: dict, file: TextIO | None = None) -> None:
    """ollm's cases, each peer's cases (or why it did not run), then the reference lines."""
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title="peers on the same workload, same machine, same warm-up "
        "(x ollm = peer time / ollm time; decode = median step)",
        title_justify="left",
    )
    cols = ["engine", "context", "status", "load s", "warm-up s", "prefill s", "x ollm"]
    for col in (*cols, "s/token", "x ollm", "peak GPU", "peak RAM", "note"):
        t.add_column(col)
    for c in (result.get("ollm") or {}).get("cases", []):
        ok = c.get("status") == "ok"
        t.add_row(
            "ollm",
            context_label(c["context"]),
            c.get("status", ""),
            _f(c.get("load_s"), ".1f"),
            _f(c.get("warmup_s"), ".1f"),
            _f(c.get("prefill_s"), ".2f"),
            "1" if ok else "-",
            _f(c.get("decode_step_median_s"), ".3f"),
            "1" if ok else "-",
            _size(c.get("peak_gpu_bytes")),
            _size(c.get("ram_peak_bytes")),
            (c.get("error") or "")[:160],
        )
    for p in result["peers"]:
        for k, c in enumerate(p.get("cases") or [{}]):
            notes = [p.get("reason", "")] if k == 0 else []
            if c.get("ngl") is not None:
                notes.insert(0, f"-ngl {c['ngl']}; peak GPU by nvidia-smi (CUDA context in)")
            if c.get("decode_step_median_s") is None and c.get("warmup_step_s"):
                notes.insert(0, f"cold step in the warm-up {c['warmup_step_s']:.2f} s")
            note = "; ".join(n for n in notes if n)
            t.add_row(
                p["peer"] if k == 0 else "",
                context_label(c["context"]) if c else "-",
                c.get("status", p.get("status", "")),
                _f(p.get("load_s"), ".1f") if k == 0 else "",
                _f(c.get("warmup_s"), ".1f"),
                _f(c.get("prefill_s"), ".2f"),
                _f(c.get("prefill_x_ollm"), ".1f"),
                _f(c.get("decode_step_median_s"), ".3f"),
                _f(c.get("decode_x_ollm"), ".1f"),
                _size(c.get("peak_gpu_bytes")),
                _size(c.get("ram_peak_bytes")),
                note[:200],
            )
    quote = result.get("reference") or LLAMA_CPP
    for row in quote["rows"]:
        step = 1 / row["decode_tok_s"] if row["decode_tok_s"] else None
        t.add_row(
            "llama.cpp " + row["config"],
            context_label(row["context"]),
            quote["status"],
            "-",
            "-",
            _f(row["prefill_s"], ".2f"),
            "-",  # another machine: no ratio
            _f(step, ".3f"),
            "-",
            "-",
            "-",
            quote["source"],
        )
    Console(file=file or sys.stdout, width=230, highlight=False).print(t)
