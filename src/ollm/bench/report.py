"""Tables of an ``ollm bench`` report: the machine's probes, then one column per case."""

from __future__ import annotations

from ollm.sizes import format_size

__all__ = ["probe_rows", "case_rows", "render"]


def _f(value: object, fmt: str, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{format(value, fmt)}{unit}"


def probe_rows(probes: dict[str, object]) -> list[tuple[str, str]]:
    """(label, value) rows of ``measure_bandwidth``'s dict."""
    rows = [("device", f"{probes.get('device')} ({probes.get('device_name', '')})")]
    table = [
        ("disk_cold_GBps", "disk read, cold", ".2f", " GB/s"),
        ("disk_warm_GBps", "disk read, page cache", ".2f", " GB/s"),
        ("h2d_pinned_GBps", "host->GPU, pinned", ".1f", " GB/s"),
        ("h2d_pageable_GBps", "host->GPU, pageable", ".1f", " GB/s"),
        ("gpu_mem_GBps", "GPU memory (copy traffic)", ".0f", " GB/s"),
        ("ram_GBps", "RAM (copy traffic)", ".1f", " GB/s"),
        ("ram_read_GBps", "RAM read", ".1f", " GB/s"),
        ("matmul_TFLOPs", f"matmul {probes.get('dtype')}", ".1f", " TFLOP/s"),
        ("cpu_matmul_GFLOPs", f"CPU matmul {probes.get('dtype')}", ".1f", " GFLOP/s"),
    ]
    for key, label, fmt, unit in table:
        if key in probes:
            value = _f(probes[key], fmt, unit)
            if probes[key] is None and key == "disk_cold_GBps":
                value = "- (page cache cannot be dropped here)"
            rows.append((label, value))
    rows.append(("probe time", _f(probes.get("seconds"), ".2f", " s")))
    return rows


def _floor(phase: dict | None, unit: str, measured_ratio: object) -> str:
    if not phase or phase.get("floor_s") is None:
        return "-"
    text = f"{phase['floor_s']:.3f} {unit} ({phase['bound']})"
    if measured_ratio is not None:
        text += f", measured {measured_ratio:.2f}x"
        if measured_ratio < 1:
            from ollm.bench.floors import NOTE_BELOW_FLOOR

            text += f" ({NOTE_BELOW_FLOOR})"
    return text


def case_rows(case: dict[str, object]) -> list[tuple[str, str]]:
    """(label, value) rows of one case (or its error)."""
    if case.get("status") != "ok":
        return [("status", f"error: {case.get('error')}")]
    plan = case.get("plan") or {}
    floors = case.get("floors") or {}
    ratios = case.get("ratios") or {}
    layers = f"{plan.get('gpu_layers')} GPU / {plan.get('ram_layers')} RAM / {plan.get('disk_layers')} disk"  # type: ignore[union-attr]
    if plan.get("cpu_layers"):  # type: ignore[union-attr]
        layers += f" ({plan['cpu_layers']} CPU-computed)"  # type: ignore[index]
    if plan.get("kv_ram_layers"):  # type: ignore[union-attr]
        layers += f"; KV of {plan['kv_ram_layers']} in RAM"  # type: ignore[index]
    if plan.get("kv_disk_layers"):  # type: ignore[union-attr]
        layers += f"; KV of {plan['kv_disk_layers']} on disk"  # type: ignore[index]
    if plan.get("prefill_chunk_tokens"):  # type: ignore[union-attr]
        layers += f"; prefill chunks of {plan['prefill_chunk_tokens']}"  # type: ignore[index]
    g = case.get
    steps = g("decode_step_median_s")
    return [
        ("layers", layers),
        ("prefill", f"{g('prefill_s'):.3f} s ({g('prefill_tok_s'):.0f} tok/s)"),
        ("time to first token", f"{g('ttft_s'):.3f} s"),
        (
            "decode",
            f"{g('decode_tok_s'):.2f} tok/s (median step {_f(steps, '.3f', ' s')})",
        ),
        ("peak GPU memory", format_size(g("peak_gpu_bytes") or 0)),  # type: ignore[arg-type]
        ("peak RAM (process)", format_size(g("ram_peak_bytes") or 0)),  # type: ignore[arg-type]
        ("store on disk", format_size(g("disk_bytes") or 0)),  # type: ignore[arg-type]
        ("read from disk", format_size(g("bytes_read_disk") or 0)),  # type: ignore[arg-type]
        ("copied host->GPU", format_size(g("bytes_copied_h2d") or 0)),  # type: ignore[arg-type]
        (
            "compute waited on I/O",
            f"{g('io_wait_s'):.3f} s (prefill {g('prefill_io_wait_s'):.3f} s)",
        ),
        ("disk read / copy time", f"{g('read_s'):.3f} s / {g('copy_s'):.3f} s"),
        ("prefill floor", _floor(floors.get("prefill"), "s", ratios.get("prefill"))),  # type: ignore[union-attr]
        ("decode floor", _floor(floors.get("decode"), "s/token", ratios.get("decode"))),  # type: ignore[union-attr]
        ("warm-up / load", f"{g('warmup_s'):.2f} s / {g('load_s'):.2f} s"),
    ]


def render(report: dict[str, object], console) -> None:
    """Print the probes and the cases (one column per context) on a rich console."""
    from rich.table import Table

    model = report["model"]
    probes = Table(title="machine (measured now)", show_header=False, title_justify="left")
    probes.add_column(style="bold")
    probes.add_column()
    for label, value in probe_rows(report["probes"]):  # type: ignore[arg-type]
        probes.add_row(label, value)
    console.print(probes)
    s = report["settings"]
    title = (
        f"{model['name']} ({model['layers']} layers, {format_size(model['weights_bytes'])} "  # type: ignore[index]
        f"{model['dtype']}), {s.get('new_tokens')} new tokens"  # type: ignore[index, union-attr]
    )
    if s.get("gpu_memory"):  # type: ignore[union-attr]
        title += f", GPU budget {s['gpu_memory']}"  # type: ignore[index]
    table = Table(title=title, title_justify="left")
    table.add_column("context", style="bold")
    cases = report["cases"]
    for case in cases:  # type: ignore[attr-defined]
        table.add_column(str(case["label"]))
    per_case = [dict(case_rows(c)) for c in cases]  # type: ignore[attr-defined]
    labels: list[str] = []
    for rows in per_case:
        labels += [k for k in rows if k not in labels]
    for label in labels:
        table.add_row(label, *[rows.get(label, "") for rows in per_case])
    console.print(table)
    for case in cases:  # type: ignore[attr-defined]
        if case.get("plot"):
            console.print(f"timeline ({case['label']}): {case['plot']}")
