"""Which heads need their whole KV (issue 18): ``ollm calibrate`` runs real text through the
model and, for every full-attention layer and KV head, measures how much the head's attention
output changes when it sees only the sinks and the recent window (DuoAttention's streaming
vs retrieval heads). The result is saved next to the layer store; ``--attention auto`` routes
each head to the cheapest mechanism (window + sinks, top-k pages, full) that stayed close.

Deviation of a KV head = mean over its query heads of sum_rows |o_full - o_window|^2 /
sum_rows |o_full|^2, over the rows where every candidate leaves pages out (``pruning_row``;
in a calibration too short for that, every row beyond sinks + window, as version 1 did).

A top-k choice is a share of the pages that compete (the middle between sinks and window at
the calibration length): at a longer context ``auto`` keeps that share, never fewer pages than
calibrated (``scaled_pages``), since an absolute count calibrated at 4k leaves more out at 8k."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from ollm.errors import OllmError
from ollm.kv.cache import LayerKVCache
from ollm.layers.attention import attend
from ollm.layers.routing import (
    DEFAULT_PAGES,
    DEFAULT_SINKS,
    DEFAULT_WINDOW,
    FULL,
    TOPK,
    WINDOW,
    KeySummaries,
    LayerRouting,
    parse_attention,
    routed_dense,
)

CALIBRATION_FILE = "attention_calibration.json"
# A head takes the cheapest mechanism whose output moves by at most this share of its energy.
DEFAULT_THRESHOLD = 0.02
DEFAULT_TOKENS = 4096
CANDIDATE_PAGES = (4, 8, 16, 32, 64)  # top-k budgets tried, cheapest first (after window)


class _ProbeKV(LayerKVCache):
    """A full-attention layer's KV during calibration: attends exactly (the forward is the
    model's own) and adds each candidate's per-KV-head deviation to ``num`` / ``den``."""

    def __init__(
        self, batch, kv_heads, head_dim, capacity, dtype, device, probes, first_row=0
    ) -> None:
        super().__init__(batch, kv_heads, head_dim, capacity, dtype, device)
        self.probes = probes  # candidate name -> LayerRouting (prefill=True)
        self.first_row = first_row  # rows before it are not measured
        page = next(iter(probes.values())).page_tokens
        self.summaries = KeySummaries(batch, kv_heads, head_dim, capacity, page, dtype, device)
        self.num = {name: torch.zeros(kv_heads, dtype=torch.float64) for name in probes}
        self.den = torch.zeros(kv_heads, dtype=torch.float64)

    def attend(self, q, k, v, mask, scale, dense_mask):
        k_all, v_all = self.append(k, v)
        self.summaries.update(k, mask.q_start)
        out = attend(q, k_all, v_all, mask, scale, dense_mask)
        r = next(iter(self.probes.values()))
        # rows before sinks + window differ in nothing; rows before first_row are not measured
        first = max(0, r.sinks + r.window - mask.q_start, self.first_row - mask.q_start)
        if first >= mask.q_len:
            return out
        g = q.shape[1] // self.k.shape[1]
        full = out[:, :, first:].double()
        self.den += full.pow(2).sum((0, 2, 3)).view(-1, g).cpu().mean(1)
        for name, probe in self.probes.items():
            got, _ = routed_dense(
                q[:, :, first:], k_all, v_all, probe, self.summaries, mask.q_start + first, scale
            )
            diff = (full - got.double()).pow(2).sum((0, 2, 3)).view(-1, g)
            self.num[name] += diff.cpu().mean(1)
        return out


def _probes(kv_heads: int, window: int, sinks: int, page_tokens: int) -> dict:
    probes = {"window": LayerRouting((WINDOW,) * kv_heads, window, sinks, 1, page_tokens, True)}
    for k in CANDIDATE_PAGES:
        probes[f"topk:{k}"] = LayerRouting((TOPK,) * kv_heads, window, sinks, k, page_tokens, True)
    return probes


def calibrate(
    llm,
    tokens: int = DEFAULT_TOKENS,
    window: int = DEFAULT_WINDOW,
    sinks: int = DEFAULT_SINKS,
    threshold: float = DEFAULT_THRESHOLD,
    text: str | None = None,
    ids: list[int] | None = None,
    first_row: int | None = None,
) -> dict:
    """Deviation of window + sinks and of top-k pages (``CANDIDATE_PAGES``) from full attention
    for every full-attention layer's KV heads on ``tokens`` tokens of real text (the standard
    library's docs, or the file ``text``), and each head's choice: the cheapest candidate within
    ``threshold``, else full. Deterministic (fixed text, no sampling). ``ids``: token ids to
    run instead of text (a model without a tokenizer). ``first_row``: measure only the rows
    from that slot on (recorded when not 0); None: from the first row where every candidate
    prunes (``pruning_row``), so a budget's deviation is measured where it is a share."""
    from ollm.corpus import load_text

    if llm.spec.linear_attn is not None:
        raise OllmError(f"attention routing does not apply to {llm.spec.family}'s recurrent state")
    if first_row is None:
        first_row = pruning_row(tokens, window, sinks, llm.config.attention_page_tokens)
    if tokens <= window + sinks:
        raise OllmError(f"calibration needs more than window + sinks = {window + sinks} tokens")
    if ids is None:
        ids = llm.encode(load_text(text, 6 * tokens))
    ids = list(ids)[:tokens]
    if len(ids) < tokens:
        raise OllmError(f"the text has {len(ids)} tokens, fewer than --tokens {tokens}")
    spec, page = llm.spec, llm.config.attention_page_tokens
    probes = _probes(spec.num_kv_heads, window, sinks, page)
    with llm._lock:
        llm.ensure_context(tokens)
        runner = llm.runner
        kv = runner.new_kv(1, tokens)
        try:
            for i, layer in enumerate(spec.layers):
                if layer.window is None:
                    dev = runner.plan.layers[i].exec_device
                    kv[i].close()
                    kv[i] = _ProbeKV(
                        1, spec.num_kv_heads, spec.head_dim, tokens, llm.dtype, dev, probes,
                        first_row,
                    )  # fmt: skip
            ids_t = torch.tensor([ids])
            runner.forward(ids_t, torch.arange(tokens)[None], kv, head=lambda h: None)
        finally:
            for cache in kv:
                cache.close()
    deviation, choice = _choices(kv, probes, threshold)
    middle = middle_pages(tokens, window, sinks, page)
    out = {
        "version": 2,  # 2: middle_pages, share; deviations from first_row (default since v2)
        "model_type": spec.family,
        "layers": spec.num_layers,
        "kv_heads": spec.num_kv_heads,
        "tokens": tokens,
        "window": window,
        "sinks": sinks,
        "page_tokens": page,
        "threshold": threshold,
        "text": "stdlib" if text is None else Path(text).name,
        "deviation": deviation,
        "choice": choice,
        # top-k as a share of the competing pages at `tokens` (what auto keeps at any context)
        "middle_pages": middle,
        "share": [_shares(c, d, middle) for c, d in zip(choice, deviation, strict=True)],
    }
    if first_row:
        out["first_row"] = first_row
    return out


def pruning_row(tokens: int, window: int, sinks: int, page_tokens: int) -> int:
    """The first row at which the largest candidate (``CANDIDATE_PAGES``) leaves pages out:
    its middle then holds more pages; 0 when no row of ``tokens`` gets there (every row from
    sinks + window is measured, as in version 1)."""
    # the middle of row t ends at (t - W + 1) // P pages; it starts at ceil(S / P) pages
    row = (-(-sinks // page_tokens) + max(CANDIDATE_PAGES) + 1) * page_tokens + window - 1
    return row if row < tokens else 0


def _choices(kv: list, probes: dict, threshold: float) -> tuple[list, list]:
    """Per layer the probes' deviations per KV head and each head's cheapest candidate within
    ``threshold`` (else full); None for layers without a probe (sliding-window ones)."""
    deviation: list[dict | None] = []
    choice: list[list[str] | None] = []
    for cache in kv:
        if not isinstance(cache, _ProbeKV):
            deviation.append(None)
            choice.append(None)
            continue
        den = cache.den.clamp_min(1e-30)
        dev_ = {n: [float(f"{x:.6g}") for x in (cache.num[n] / den).tolist()] for n in probes}
        deviation.append(dev_)
        heads = []
        for h in range(len(cache.den)):  # probes are ordered cheapest first
            heads.append(next((n for n in probes if dev_[n][h] <= threshold), FULL))
        choice.append(heads)
    return deviation, choice


def _shares(row: list[str] | None, dev: dict | None, middle: int) -> list[dict | None] | None:
    """Per head of a calibration row: a top-k choice's pages, share of ``middle`` and measured
    deviation (None for window / full heads)."""
    if row is None or dev is None:
        return None
    out: list[dict | None] = []
    for h, c in enumerate(row):
        kind, _, k = c.partition(":")
        if kind != TOPK or middle <= 0:
            out.append(None)
            continue
        share = float(f"{int(k) / middle:.6g}")
        out.append({"pages": int(k), "share": share, "deviation": dev[c][h]})
    return out


def middle_pages(tokens: int, window: int, sinks: int, page_tokens: int) -> int:
    """Pages a top-k head chooses among at a decode step with ``tokens`` keys: the whole pages
    between the sinks and the recent window (``LayerRouting.middle`` of the last row)."""
    lo, hi = LayerRouting((FULL,), window, sinks, 1, page_tokens).middle(tokens - 1)
    return (hi - lo) // page_tokens


def scaled_pages(pages: int, calibrated: int, context: int | None) -> int:
    """Top-k budget at ``context`` competing pages of a choice of ``pages`` of ``calibrated``:
    the same share, ceil(pages * context / calibrated), never fewer than ``pages`` (None or a
    shorter context: ``pages``). Exact integer maths, so the budget is deterministic."""
    if context is None or calibrated <= 0 or context <= calibrated:
        return pages
    return max(pages, -(-pages * context // calibrated))


def calibration_path(store_path: str | Path) -> Path:
    """Where the calibration of the store at ``store_path`` lives (beside its layer files)."""
    return Path(store_path) / CALIBRATION_FILE


def save_calibration(store_path: str | Path, data: dict) -> Path:
    """Write atomically (temporary file, then rename): a reader never sees half a file."""
    path = calibration_path(store_path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_calibration(store_path: str | Path) -> dict | None:
    """The saved calibration, or None when there is none."""
    path = calibration_path(store_path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OllmError(
            f"{path}: unreadable attention calibration ({exc}); run ollm calibrate"
        ) from None


def plan_routing(
    attention: str,
    spec,
    store_path: str | Path,
    page_tokens: int = 32,
    prefill: bool = False,
    model: str | None = None,
    context: int | None = None,
) -> list[LayerRouting | None] | None:
    """Per layer the routing of ``--attention`` (None: full everywhere). Sliding-window layers
    already read a bounded window and are left alone; ``auto`` needs ``ollm calibrate`` and
    keeps each top-k choice's share of the competing pages at ``context`` tokens (None: the
    calibrated page count as it is)."""
    s = parse_attention(attention)
    if not s.lossy:
        return None
    kvh = spec.num_kv_heads
    choice: list | None = None
    if s.mode == "auto":
        cal = load_calibration(store_path)
        if cal is None:
            where = "" if model is None else f" --model {model}"
            raise OllmError(
                f"--attention auto needs a calibration of this model: run `ollm calibrate{where}`"
            )
        choice = cal.get("choice")
        if not isinstance(choice, list) or len(choice) != spec.num_layers:
            path = calibration_path(store_path)
            raise OllmError(f"{path} does not match this model; run ollm calibrate again")
        if (s.window, s.sinks) == (DEFAULT_WINDOW, DEFAULT_SINKS):  # not given: as calibrated
            s = replace(s, window=cal.get("window", s.window), sinks=cal.get("sinks", s.sinks))
        fit = _fit(cal, s, page_tokens, context)
    out: list[LayerRouting | None] = []
    for i, layer in enumerate(spec.layers):
        if layer.window is not None:
            out.append(None)
            continue
        pages = s.pages or DEFAULT_PAGES
        if s.mode == "window":
            heads = (WINDOW,) * kvh
        elif s.mode == "topk":
            heads = (TOPK,) * kvh
        else:
            heads, pages = _auto_heads(choice[i] or [FULL] * kvh, s.pages, fit)
        out.append(LayerRouting(heads, s.window, s.sinks, pages, page_tokens, prefill))
    return out


def _fit(cal: dict, s, page_tokens: int, context: int | None) -> tuple[float, int, int]:
    """(this run's pages per calibration page, competing pages at calibration, at ``context``
    in this run's pages); a file without ``middle_pages`` (version 1) counts as calibrated at
    its recorded ``tokens``, window and sinks."""
    page = cal.get("page_tokens", page_tokens)
    middle = cal.get("middle_pages")
    if middle is None:
        win, sinks = cal.get("window", s.window), cal.get("sinks", s.sinks)
        middle = middle_pages(cal.get("tokens", DEFAULT_TOKENS), win, sinks, page)
    now = 0 if context is None else middle_pages(context, s.window, s.sinks, page_tokens)
    # shares are of tokens: the calibrated middle in this run's pages
    return page / page_tokens, round(middle * page / page_tokens), now


def _auto_heads(
    row: list[str], pages: int | None, fit: tuple[float, int, int] = (1.0, 0, 0)
) -> tuple[tuple[str, ...], int]:
    """Per-head mechanisms from a calibration row ("window", "topk:K" or "full") and the
    layer's page budget: the largest K, in this run's pages (``fit``: pages per calibration
    page, competing pages at calibration and now), keeping its share of the competing pages
    now (``scaled_pages``); ``pages`` given with auto overrides it."""
    scale, calibrated, now = fit
    heads, ks = [], [pages or 0]
    for c in row:
        kind, _, k = c.partition(":")
        heads.append(kind if kind in (FULL, WINDOW, TOPK) else FULL)
        if kind == TOPK and not pages:
            ks.append(scaled_pages(max(1, round(int(k) * scale)), calibrated, now))
    return tuple(heads), max(ks) or DEFAULT_PAGES
