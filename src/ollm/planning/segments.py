"""Segmented prefill: a long prompt prefilled in segments of ``segment`` tokens, each a whole
forward over every layer (its KV appended, positions continuing), so that no tensor of the whole
prompt exists (the residual stream, on the GPU or pinned in RAM, is one segment's). The plan
sizes prefill's activations for ``min(prompt, segment)`` rows (``Workload.prefill_tokens``); the
price is one more pass of the streamed weights per segment, and, for KV held off the GPU, each
segment copying the earlier segments' KV of every offloaded layer back to the GPU to attend to
it (``kv/offload.py`` ``KVScratch.claim``; compressed layers copy their encoded bytes).

``auto`` (the default) segments only when the one-forward plan, with its RAM-residual fallback,
is refused (``BudgetError``), or pins more host RAM than ``host_limit`` (the engine's
``cpu_memory``) while a segmented plan fits it; it then takes the largest power-of-two segment
of at least ``MIN_SEGMENT`` tokens that fits (fewest weight passes). Plans that fit in one
forward are the plans of before (``segment`` 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from ollm.errors import BudgetError, OllmError

if TYPE_CHECKING:
    from ollm.planning.placement import PlacementPlan, Workload

MIN_SEGMENT = 16384  # auto: no segment shorter (each one streams every layer's weights again)


def check_segment(value: int | str | None) -> None:
    """A one-line error for a ``prefill_segment`` that is not None, "auto" or an int >= 0."""
    if value is None or value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OllmError(
            f"prefill_segment must be 'auto', None (auto), 0 (one forward) or a positive "
            f"number of tokens, not {value!r}"
        )


def segment_sizes(prompt: int, floor: int = MIN_SEGMENT) -> list[int]:
    """Candidate segments for ``prompt`` tokens, largest first: powers of two below the prompt,
    down to ``floor``."""
    out, s = [], floor
    while s < prompt:
        out.append(s)
        s *= 2
    return out[::-1]


def plan_segmented(
    plan: Callable[[Workload], PlacementPlan],
    work: Workload,
    segment: int | str | None = "auto",
    host_limit: int | None = None,
    pinned: Callable[[PlacementPlan], int] | None = None,
) -> PlacementPlan:
    """``plan(work)`` with prefill in segments as ``segment`` says (see the module docstring);
    the plan records its segment in ``prefill_segment`` (0: one forward). ``pinned(plan)``: the
    host RAM a plan pins, compared with ``host_limit`` in auto (both needed for that test)."""
    check_segment(segment)

    def at(seg: int) -> PlacementPlan:
        w = replace(work, prefill_tokens=min(work.prefill_tokens, seg))
        p = plan(w)
        return mark(p, seg) if seg < work.prefill_tokens else p

    if isinstance(segment, int) and not isinstance(segment, bool):
        return plan(work) if segment == 0 or segment >= work.prefill_tokens else at(segment)

    def too_big(p: PlacementPlan) -> bool:
        return host_limit is not None and pinned is not None and pinned(p) > host_limit

    try:
        whole = plan(work)
        if not too_big(whole):
            return whole
        refused: BudgetError | None = None
    except BudgetError as exc:
        whole, refused = None, exc
    for seg in segment_sizes(work.prefill_tokens):
        try:
            p = at(seg)
        except BudgetError:
            continue
        if not too_big(p):
            return p
    if refused is not None:
        raise refused
    return whole  # nothing segmented fits the RAM limit either: the plan of before


def mark(plan: PlacementPlan, seg: int) -> PlacementPlan:
    """``plan`` (made for ``seg`` rows per forward) as one prefilling in segments of ``seg``
    tokens; its row chunks at most a segment (a forward of a whole prompt, as the batch engine
    runs, then goes in chunks of the rows the plan holds activations for)."""
    return replace(plan, prefill_segment=seg, prefill_chunk_tokens=plan.prefill_chunk_tokens or seg)


def pinned_host_bytes(spec, store, plan: PlacementPlan, kv_format, context: int,
                      batch: int = 1, elem: int = 2) -> int:  # fmt: skip
    """Host RAM ``plan`` pins for a request of ``context`` tokens: the weights of RAM layers,
    the KV of RAM-tier layers (stored bytes under a codec ``kv_format``; an exact split layer's
    device blocks excluded) and, when prefill keeps it there, the residual stream of one
    forward (the whole prompt, or one segment), as the Runner allocates."""
    total = sum(store.layer_nbytes(i) for i, p in enumerate(plan.layers) if p.tier == "cpu")
    if plan.residual_ram:  # Runner._embed's pinned [rows, hidden]
        rows = min(context, plan.prefill_segment or context)
        total += batch * rows * spec.hidden_size * elem
    h, d = spec.num_kv_heads, spec.head_dim
    for layer, p in zip(spec.layers, plan.layers, strict=True):
        if p.kv_tier != "cpu":
            continue
        if kv_format is not None and layer.window is None:
            total += kv_format.layer_bytes(batch, h, d, elem, context)
        else:
            total += 2 * batch * h * d * elem * max(0, context - p.kv_device_tokens)
    return total


COST_KEY = "prefill segment copies s"


def segment_copy_bytes(spec, store, plan: PlacementPlan, kv_format, work: Workload,
                       elem: int = 2) -> int:  # fmt: skip
    """Bytes segmenting adds to a prefill of ``work.prefill_tokens`` tokens over the host link:
    every segment after the first streams the prefill's streamed layers again, and copies the
    earlier segments' KV of each exact layer whose KV is off the device (RAM or disk, less an
    exact split layer's device blocks) into the prefill scratch to attend to it. A compressed
    layer homed off the device copies its encoded prefix into the staging store at every
    attention call (every row chunk) in one forward as well: nothing is added for it."""
    seg, n = plan.prefill_segment, work.prefill_tokens
    if not seg or seg >= n:
        return 0
    from ollm.tiers import Phase

    starts = range(seg, n, seg)  # the first slot of every segment after the first
    weights = sum(store.layer_nbytes(i) for i in plan.streamed_for(Phase.PREFILL))
    total = len(starts) * weights
    b, h, d = work.batch, spec.num_kv_heads, spec.head_dim
    for layer, p in zip(spec.layers, plan.layers, strict=True):
        if p.kv_tier == "device" or layer.linear:
            continue
        if kv_format is not None and kv_format.ram and layer.window is None:
            continue  # compressed: its encoded prefix crosses per attention call either way
        for s in starts:
            total += 2 * b * h * d * elem * max(0, s - p.kv_device_tokens)
    return total
