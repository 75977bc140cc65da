"""Attention routing for long-context decode: each KV head of a layer attends with one of

* ``full``: every cached key;
* ``window``: the first ``sinks`` keys and the last ``window`` keys (StreamingLLM's sinks +
  recent window; DuoAttention's streaming heads);
* ``topk``: sinks + window + the ``pages`` best pages of the keys between them (Quest): the
  keys are cut into pages of ``page_tokens`` slots, each summarised by its per-channel min and
  max (``KeySummaries``, kept on the compute device); q.k <= sum_d max(q_d min_d, q_d max_d),
  so a page's upper bound is ``q+ . max + q- . min``, and only the best pages are read.

A head's keys are the disjoint parts sinks [0, lo), middle [lo, hi) (whole pages) and window
[hi, end): lo is S rounded up to a page, hi the window's start (start - W + 1 for the first
query row) rounded down to a page, so every part is page-aligned and a chosen page is read
whole (one contiguous copy per page and head). The parts of one head are attended as parts of
one softmax (``merge_lse``). Different heads of a layer may use different
mechanisms (a head's softmax is its own). With ``topk`` covering every page the key set is all
keys: the result is full attention. Prefill stays exact unless ``LayerRouting.prefill``, which
routes every query row as if it were decoded (``routed_dense``: what ``ollm eval`` scores).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ollm.errors import OllmError

FULL, WINDOW, TOPK = "full", "window", "topk"
MODES = ("full", "auto", "window", "topk")
DEFAULT_WINDOW = 256  # DuoAttention's recent window
DEFAULT_SINKS = 64  # DuoAttention's sinks (attention sinks: the first tokens soak up mass)
DEFAULT_PAGES = 16
# Rows of a routed prefill block: bounds its [heads, rows, keys] float32 scores.
ROUTED_SCORE_BYTES = 64 << 20


@dataclass(frozen=True)
class AttentionSetting:
    """A parsed ``--attention`` value: ``full``, ``auto`` (calibrated: streaming heads window,
    retrieval heads full, or top-k with ``topk:P``), ``window:W,sinks:S`` or ``topk:P``
    (with optional ``window:W,sinks:S``)."""

    mode: str = "full"
    window: int = DEFAULT_WINDOW
    sinks: int = DEFAULT_SINKS
    pages: int | None = None  # top-k pages (topk; auto's retrieval heads when given)

    @property
    def lossy(self) -> bool:
        return self.mode != "full"


def parse_attention(value: str) -> AttentionSetting:
    """``"topk:32,window:128"`` -> AttentionSetting; a bad value is a one-line OllmError."""
    text = str(value).strip().lower()
    usage = "use full, auto, window:W,sinks:S or topk:PAGES (e.g. topk:32)"
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise OllmError(f"--attention is empty: {usage}")
    fields: dict[str, int] = {}
    mode = None
    for part in parts:
        key, sep, arg = part.partition(":")
        if key in ("full", "auto") and not sep:
            if mode is not None:
                raise OllmError(f"--attention {value!r} names two modes: {usage}")
            mode = key
            continue
        if key not in ("window", "sinks", "topk") or not arg.isdigit() or key in fields:
            raise OllmError(f"bad --attention {value!r}: {usage}")
        fields[key] = int(arg)
    if mode == "full" and fields:
        raise OllmError(f"--attention full takes no window, sinks or topk ({value!r})")
    if mode is None:
        mode = "topk" if "topk" in fields else "window"
        if mode == "window" and "window" not in fields:
            raise OllmError(f"bad --attention {value!r}: {usage}")
    setting = AttentionSetting(
        mode,
        fields.get("window", DEFAULT_WINDOW),
        fields.get("sinks", DEFAULT_SINKS),
        fields.get("topk"),
    )
    if setting.window < 1 or (setting.pages is not None and setting.pages < 1):
        raise OllmError(f"--attention {value!r}: window and topk must be >= 1")
    return setting


@dataclass(frozen=True)
class LayerRouting:
    """How one layer's decode attention reads its KV: one mechanism per KV head."""

    heads: tuple[str, ...]  # per KV head: FULL, WINDOW or TOPK
    window: int = DEFAULT_WINDOW
    sinks: int = DEFAULT_SINKS
    pages: int = DEFAULT_PAGES
    page_tokens: int = 32
    prefill: bool = False  # route prefill rows too (each as if decoded); else prefill is exact

    def __post_init__(self) -> None:
        if any(h not in (FULL, WINDOW, TOPK) for h in self.heads):
            raise OllmError(f"unknown head mechanism in {self.heads}")
        if TOPK in self.heads and self.window < self.page_tokens:
            # A routed prefill row's middle pages then never hold keys after the row.
            raise OllmError(
                f"attention window {self.window} must be >= the page size {self.page_tokens}"
            )

    @property
    def partial(self) -> bool:
        """Whether no head reads every key (a layer's KV fetch is then replaced by reads)."""
        return FULL not in self.heads

    @property
    def routed(self) -> bool:
        return any(h != FULL for h in self.heads)

    def middle(self, start: int) -> tuple[int, int]:
        """Slots [lo, hi) (whole pages) the query row at slot ``start`` reaches only through
        chosen pages: lo = sinks rounded up, hi = the window's start rounded down to a page."""
        p = self.page_tokens
        lo = -(-self.sinks // p) * p
        return lo, max(lo, (start - self.window + 1) // p * p)

    def read_tokens(self, start: int, end: int, forced: int = 0) -> int:
        """Key slots one decode step (queries from ``start``, keys [0, end)) reads, all KV heads;
        ``forced``: pages of the middle a span marks full (read by every routed head, besides
        the top-k pages, which are chosen among the others)."""
        lo, hi = self.middle(start)
        plain = end - (hi - lo)  # sinks + window
        mid = (hi - lo) // self.page_tokens
        forced = min(forced, mid)
        extra = forced * self.page_tokens
        top = min(self.pages, mid - forced) * self.page_tokens
        per = {FULL: end, WINDOW: plain + extra, TOPK: plain + extra + top}
        return sum(per[h] for h in self.heads)


class KeySummaries:
    """Per page of ``page_tokens`` key slots, the per-channel min and max of its keys
    [B, kv_heads, pages, D] on the compute device, updated as keys are appended or trimmed."""

    def __init__(self, batch, kv_heads, head_dim, capacity, page_tokens, dtype, device) -> None:
        shape = self.shape(batch, kv_heads, head_dim, capacity, page_tokens)
        self.kmin = torch.empty(shape, dtype=dtype, device=device)
        self.kmax = torch.empty(shape, dtype=dtype, device=device)
        self.page_tokens, self.length = page_tokens, 0

    @staticmethod
    def shape(batch: int, kv_heads: int, head_dim: int, capacity: int, page_tokens: int):
        """Shape of ``kmin`` (and ``kmax``): one summary per page of ``capacity`` slots."""
        return (batch, kv_heads, -(-capacity // page_tokens), head_dim)

    def update(self, k: torch.Tensor, start: int) -> None:
        """Fold in keys ``k`` [B, kv_heads, T, D] of slots [start, start + T)."""
        if start != self.length:
            raise RuntimeError(f"summaries hold {self.length} slots, append at {start}")
        if k.device != self.kmin.device:
            k = k.to(self.kmin.device)
        p_, pos, end = self.page_tokens, start, start + k.shape[2]
        if pos % p_:  # finish a partly filled page: fold into its summary
            p, stop = pos // p_, min(end, (pos // p_ + 1) * p_)
            one = stop - start == 1  # a decode token: its key is its own min and max
            lo = k[:, :, 0] if one else k[:, :, : stop - start].amin(2)
            hi = k[:, :, 0] if one else k[:, :, : stop - start].amax(2)
            torch.minimum(self.kmin[:, :, p], lo, out=self.kmin[:, :, p])
            torch.maximum(self.kmax[:, :, p], hi, out=self.kmax[:, :, p])
            pos = stop
        while pos < end:  # whole pages, then a new partial one
            p, n = pos // p_, min((end - pos) // p_, 4096) or 1
            stop = min(end, pos + n * p_)
            rows = k[:, :, pos - start : stop - start]
            if stop - pos == n * p_:
                rows = rows.reshape(*rows.shape[:2], n, p_, rows.shape[-1])
                self.kmin[:, :, p : p + n] = rows.amin(3)
                self.kmax[:, :, p : p + n] = rows.amax(3)
            else:
                self.kmin[:, :, p] = rows.amin(2)
                self.kmax[:, :, p] = rows.amax(2)
            pos = stop
        self.length = end

    def trim(self, length: int, keys) -> None:
        """Forget slots from ``length`` on; ``keys(a, b)`` returns the cached keys [B, H, b-a, D]
        of slots [a, b), read to rebuild the summary of a page left partly filled."""
        if length >= self.length:
            return
        self.length = p0 = length - length % self.page_tokens
        if length > p0:
            self.update(keys(p0, length), p0)


def page_scores(
    q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, per_row: int = 0
) -> torch.Tensor:
    """Upper bounds of q.k per page, maxed over the query heads (and rows) of each KV head:
    q [B, H, T, D], kmin/kmax [B, KVH, P, D] -> float32 [B, KVH, P]. With ``per_row`` = g, q's
    rows are g consecutive heads per row and each row keeps its own: [B, KVH, rows, P]."""
    b, h, t, d = q.shape
    kvh = kmin.shape[1]
    ct = _compute_dtype(q)
    qg = q.to(ct).reshape(b, kvh, h // kvh * t, d)
    up = qg.clamp(min=0) @ kmax.to(ct).transpose(-1, -2)
    up += qg.clamp(max=0) @ kmin.to(ct).transpose(-1, -2)
    if per_row:
        return up.view(b, kvh, -1, per_row, up.shape[-1]).amax(3)
    return up.amax(2)


def select_pages(
    q: torch.Tensor,
    summaries: KeySummaries,
    lo: int,
    hi: int,
    k: int,
    heads: torch.Tensor | None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ids of the ``k`` best pages of slots [lo, hi) (page-aligned) for KV heads ``heads``
    (None: all, in order; no gather of the summaries), sorted: LongTensor [B, len(heads), k] on
    the summaries' device. ``exclude`` (bool [B, >= pages], pages read anyway: spans marked
    full) scores its pages -inf: chosen only when fewer than ``k`` others remain."""
    p_ = summaries.page_tokens
    p0, p1 = lo // p_, hi // p_
    dev = summaries.kmin.device
    qh = (q if q.device == dev else q.to(dev)).reshape(
        q.shape[0], summaries.kmin.shape[1], -1, q.shape[-1]
    )
    mn, mx = summaries.kmin[:, :, p0:p1], summaries.kmax[:, :, p0:p1]
    if heads is not None:
        qh, mn, mx = qh[:, heads], mn[:, heads], mx[:, heads]
    s = page_scores(qh, mn, mx)
    if exclude is not None:
        s.masked_fill_(exclude[:, None, p0:p1].to(s.device), -torch.inf)
    return s.topk(min(k, p1 - p0), dim=-1).indices.sort(-1).values + p0


def page_slots(pages: torch.Tensor, page_tokens: int, lo: int, hi: int):
    """Slots of ``pages`` [..., k] -> (slots [..., k * page_tokens], valid: inside [lo, hi))."""
    off = torch.arange(page_tokens, device=pages.device)
    slots = (pages[..., None] * page_tokens + off).flatten(-2)
    return slots, (slots >= lo) & (slots < hi)


def gathered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: torch.Tensor,
    slots: torch.Tensor,
    valid: torch.Tensor,
    q_start: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the query heads of KV heads ``heads`` over the key slots ``slots``
    [B, R, L] (of k/v [B, KVH, S, D]; ``valid`` marks the ones to attend), rows at slots
    q_start + t, causal. Only the listed slots are read. q [B, R*G, T, D] ->
    (out [B, R*G, T, D], lse float32 [B, R*G, T]); a row that sees nothing gets 0, -inf."""
    b, rg, t, d = q.shape
    r = heads.shape[0]
    bi = torch.arange(b, device=k.device)[:, None, None]
    hi = heads.to(k.device)[None, :, None]
    idx = slots.to(k.device)
    ks, vs = k[bi, hi, idx], v[bi, hi, idx]  # [B, R, L, D]: reads only these rows
    ct = _compute_dtype(q)
    qg = q.to(k.device, ct).reshape(b, r, rg // r * t, d)
    s = (qg @ ks.to(ct).transpose(-1, -2)).mul_(scale)
    s = s.view(b, r, rg // r, t, -1)
    rows = torch.arange(q_start, q_start + t, device=k.device)
    keep = valid.to(k.device)[:, :, None, None, :] & (idx[:, :, None, None, :] <= rows[:, None])
    s.masked_fill_(~keep, -torch.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.nan_to_num(0.0, neginf=0.0)[..., None])
    out = (p.view(b, r, rg // r * t, -1) @ vs.to(ct)).view(b, rg, t, d)
    return out.to(q.dtype), lse.view(b, rg, t).float()


def routed_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routing: LayerRouting,
    summaries: KeySummaries | None,
    q_start: int,
    scale: float,
    key_keep: torch.Tensor | None = None,
    forced: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query row routed as if decoded (row at slot i: sinks, window (i - W, i], and for
    top-k heads its own best pages of [S, i - W + 1)), over k/v [B, KVH, S, D] holding slots
    [0, S) and the summaries of those keys; (out, lse) in blocks of rows, float32 math.
    ``forced`` (bool [B, >= pages]): pages spans mark full, read by every routed head (causal),
    never among the top-k choices."""
    b, h, t, d = q.shape
    kvh, n = k.shape[1], k.shape[2]
    g = h // kvh
    out = torch.empty_like(q)
    lse = torch.empty(b, h, t, device=q.device)
    rows_per = max(1, ROUTED_SCORE_BYTES // (4 * b * h * n * 3))
    ct = _compute_dtype(q)
    kf, vf = k.to(ct)[:, :, None], v.to(ct)[:, :, None]
    for r0 in range(0, t, rows_per):
        r1 = min(t, r0 + rows_per)
        keep = _routed_keep(q[:, :, r0:r1], routing, summaries, q_start + r0, n, kvh, forced)
        if key_keep is not None:
            keep &= key_keep.to(q.device)[:, None, None, None, :n]
        qg = q[:, :, r0:r1].to(ct).reshape(b, kvh, g, r1 - r0, d)
        s = (qg @ kf.transpose(-1, -2)).mul_(scale)
        s.masked_fill_(~keep, -torch.inf)
        part = torch.logsumexp(s, -1)
        p = torch.exp(s - part.nan_to_num(0.0, neginf=0.0)[..., None])
        out[:, :, r0:r1] = (p @ vf).reshape(b, h, r1 - r0, d).to(q.dtype)
        lse[:, :, r0:r1] = part.reshape(b, h, r1 - r0)
    return out, lse


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    """float32 for half inputs (scores and softmax), float64 stays float64 (references)."""
    return torch.promote_types(q.dtype, torch.float32)


def _routed_keep(q, routing, summaries, first, n, kvh, forced=None) -> torch.Tensor:
    """Boolean [B, KVH, 1, rows, n]: the keys each row's routing lets it see (causal)."""
    b, _, t, _ = q.shape
    dev = q.device
    rows = torch.arange(first, first + t, device=dev)[:, None]
    keys = torch.arange(n, device=dev)[None, :]
    causal = keys <= rows
    p_ = routing.page_tokens
    lo = -(-routing.sinks // p_) * p_
    hi = ((rows - routing.window + 1).div(p_, rounding_mode="floor") * p_).clamp(min=lo)
    plain = causal & ((keys < lo) | (keys >= hi))  # [t, n]: sinks and window, page-aligned
    keep = torch.empty(b, kvh, 1, t, n, dtype=torch.bool, device=dev)
    npg = -(-n // p_)
    if forced is not None:  # pages marked full: read like sinks by every routed head
        forced = forced[:, :npg].to(dev)
        plain = plain | (forced.repeat_interleave(p_, -1)[:, None, :n] & causal)
    for hd, mech in enumerate(routing.heads):
        keep[:, hd, 0] = causal if mech == FULL else plain
    top = [hd for hd, mech in enumerate(routing.heads) if mech == TOPK]
    if top and summaries is not None:
        idx = torch.tensor(top, device=dev)
        g = q.shape[1] // kvh
        qh = q.reshape(b, kvh, g, t, -1)[:, idx].transpose(2, 3).reshape(b, len(top), t * g, -1)
        # per row (not maxed over rows as in decode): [B, R, t, g, P] maxed over g
        mn, mx = summaries.kmin[:, idx, :npg].to(dev), summaries.kmax[:, idx, :npg].to(dev)
        s = page_scores(qh, mn, mx, per_row=g)
        s = s.view(b, len(top), t, npg)
        page_lo = torch.arange(npg, device=dev) * p_
        cand = (page_lo[None] >= lo) & (page_lo[None] + p_ <= hi)  # pages of the row's middle
        if forced is not None:  # read anyway: the budget goes to the other pages
            cand = cand & ~forced[:, None, None]
        s.masked_fill_(~cand, -torch.inf)
        kk = min(routing.pages, npg)
        best = s.topk(kk, dim=-1)
        chosen = torch.zeros_like(s, dtype=torch.bool)
        chosen.scatter_(-1, best.indices, best.values > -torch.inf)
        keep[:, idx, 0] |= chosen.repeat_interleave(p_, -1)[..., :n]
    return keep
