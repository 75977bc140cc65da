"""``ollm bench --plot``: a per-layer timeline of disk reads, host->GPU copies and compute.

One row per kind of span (read / copy / compute / cpu), time on the x axis, each bar colored by
its layer number. Only the prefill and the first few decode steps are drawn, so bars stay legible.
matplotlib is imported here only (``pip install 'ollm[bench]'``); no pyplot global state is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ollm.errors import OllmError

__all__ = ["plot_timeline", "step_starts"]

KINDS = ("read", "copy", "compute", "cpu")
_LABELS = {
    "read": "disk read",
    "copy": "host->GPU copy",
    "compute": "compute",
    "cpu": "CPU compute (hybrid)",
}


def step_starts(spans: Sequence) -> list[float]:
    """Start times of each forward pass: a compute span whose layer is not above the previous
    compute span's layer begins a new pass (pass 0 is the prefill)."""
    starts: list[float] = []
    last = None
    for sp in sorted((s for s in spans if s.kind in ("compute", "cpu")), key=lambda s: s.start):
        if last is None or sp.layer <= last:
            starts.append(sp.start)
        last = sp.layer
    return starts


def plot_timeline(
    spans: Sequence, path: str | Path, steps: int = 3, title: str | None = None
) -> Path:
    """Draw ``spans`` (``ollm.telemetry.timeline.Span``) of the prefill and the first ``steps``
    decode steps into an image at ``path`` (format from the suffix, PNG by default)."""
    try:
        from matplotlib import cm, colormaps, colors
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise OllmError("--plot needs matplotlib: pip install 'ollm[bench]'") from exc

    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    starts = step_starts(spans)
    end = starts[steps + 1] if len(starts) > steps + 1 else float("inf")
    shown = [s for s in spans if s.start < end]
    if not shown:
        raise OllmError("no timeline spans were recorded")
    t0 = min(s.start for s in shown)
    t_end = max(s.end for s in shown)
    kinds = [k for k in KINDS if any(s.kind == k for s in shown)]
    n_layers = max(s.layer for s in shown) + 1
    cmap = colormaps["viridis"]
    norm = colors.Normalize(vmin=0, vmax=max(1, n_layers - 1))

    fig = Figure(figsize=(14, 1.2 + 0.9 * len(kinds)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for row, kind in enumerate(kinds):
        bars = [(s.start - t0, max(s.end - s.start, 1e-6)) for s in shown if s.kind == kind]
        layers = [s.layer for s in shown if s.kind == kind]
        ax.broken_barh(
            bars,
            (row - 0.4, 0.8),
            facecolors=[cmap(norm(i)) for i in layers],
            edgecolors="white",
            linewidth=0.3,
        )
    for k, s in enumerate(x for x in starts if x < end):
        ax.axvline(s - t0, color="0.3", linestyle="--", linewidth=0.8)
        label = "prefill" if k == 0 else f"decode {k}"
        ax.text(s - t0, len(kinds) - 0.45, f" {label}", fontsize=8, va="bottom", color="0.2")
    ax.set_yticks(range(len(kinds)))
    ax.set_yticklabels([_LABELS[k] for k in kinds])
    ax.set_ylim(-0.6, len(kinds) - 0.1)
    ax.set_xlim(0, (t_end - t0) * 1.01)
    ax.set_xlabel("seconds")
    ax.set_title(title or "per-layer timeline", loc="left", fontsize=10)
    sm = cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, label="layer", pad=0.01)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
    return path
