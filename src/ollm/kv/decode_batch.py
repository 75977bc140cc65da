"""Decode batches of a packed step: the one-token sequences attended together in one call.

`PackedStep._layout` (kv/packed.py) groups a step's one-token sequences: over a head-major host
pool whose sequences are one strided view (`kv/strided.py`), all of them in row order, read in
place; otherwise sorted by length (little padding) and cut so that one batch's gathered K/V
stays under ``GATHER_BYTES``.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ollm.kv.paged import PagedKVStore
from ollm.kv.step_ids import FlatInts, Held
from ollm.kv.strided import StridedRun, strided_run

if TYPE_CHECKING:
    from ollm.kv.packed import SeqRows


# Most bytes of K/V one batched decode call gathers (a copy the planner does not reserve; longer
# batches are cut into several calls).
GATHER_BYTES = 64 << 20


@dataclass(frozen=True)
class DecodeBatch:
    """The sequences of a step with one query token each, attended in one batched call over
    their K/V gathered into ``[B, kv_heads, blocks * block_tokens, D]`` (padded to the longest;
    the padding is masked)."""

    seqs: tuple[SeqRows, ...]
    rows: torch.Tensor  # [B] their rows in the packed step
    block_ids: torch.Tensor  # [B * blocks] their held blocks, each padded with its last one
    num_blocks: int  # blocks per sequence after padding
    masks: dict = field(default_factory=dict)  # (window, device) -> [B, 1, 1, S] True = attend
    # (and ("run", window, device): the same on a strided view's rows, kv/packed.py)
    host_rows: dict = field(default_factory=dict)  # per-step caches (kv/hostsplit.py)
    span: int | None = None  # first row when ``rows`` are consecutive rows in order, else None
    dev_rows: dict = field(default_factory=dict)  # (device, r0) -> rows - r0 on that device
    run: StridedRun | None = None  # the sequences as one view of a host pool (`kv/strided.py`)
    run_rows: torch.Tensor | None = None  # [B] each sequence's view row (``run.rows``)
    # Leading blocks every sequence holds (the same ids: a shared prefix), attended once for
    # all the batch's queries (`kv/shared_prefix.py`); ``block_ids`` / ``num_blocks`` are then
    # the blocks after them.
    shared: int = 0
    shared_ids: tuple[int, ...] = ()

    def mask(
        self, window: int | None, block_tokens: int, device: torch.device | None = None
    ) -> torch.Tensor:
        """Which gathered keys each query sees: its own, causal, inside ``window`` (on
        ``device``, default that of ``rows``; made once per step)."""
        dev = self.rows.device if device is None else torch.device(device)
        key = (window, dev)
        if key not in self.masks:
            j0 = self.shared * block_tokens  # the keys after the shared blocks
            j = torch.arange(j0, j0 + self.num_blocks * block_tokens, device=dev)[None]
            pos = self.positions(dev)
            keep = j <= pos
            if window is not None:
                keep &= j > pos - window
            self.masks[key] = keep[:, None, None]
        return self.masks[key]

    def positions(self, device: torch.device) -> torch.Tensor:
        """Each sequence's query slot (from its first held one), ``[B, 1]`` on ``device``
        (made once per step and device)."""
        key = ("pos", torch.device(device))
        if key not in self.masks:
            pos = [s.start - s.key0 for s in self.seqs]
            self.masks[key] = torch.tensor(pos, device=device)[:, None]
        return self.masks[key]

    def rows_on(self, device: torch.device, r0: int) -> torch.Tensor:
        """``rows - r0`` on ``device`` (made once per step, device and chunk start)."""
        key = (torch.device(device), r0)
        if key not in self.dev_rows:
            self.dev_rows[key] = self.rows.to(device) - r0
        return self.dev_rows[key]


def _decode_batches(
    seqs: Sequence[SeqRows], store: PagedKVStore, device: torch.device
) -> tuple[DecodeBatch, ...]:
    """The decode batches of one-token ``seqs`` on their own (``PackedStep._layout`` makes them
    with the step's other index tensors)."""
    infos = []
    for s in seqs:
        ids = s.ids or tuple(s.block_ids.tolist())
        raw = Held((), 0, ids, array("q", ids).tobytes(), None)
        infos.append((s.row0, s.n, s.start, s.key0, ids, s.tree, raw))
    flat = FlatInts()
    tier = next(iter(store.pools))
    batches = _plan_batches(infos, store, flat, host_blocks(store, tier, torch.device(device)))
    t = flat.tensor(torch.device(device))
    return _make_batches(batches, t, {s.row0: s for s in seqs})


def host_blocks(store: PagedKVStore, tier: str, device: torch.device) -> int | None:
    """Blocks of ``store``'s head-major pool in ``tier`` when its decode batches are attended
    by the CPU where it sits (a layout on the CPU: `kv/strided.py` views it), else None."""
    if device.type != "cpu" or not store.HEAD_MAJOR or tier not in store.pools:
        return None
    return store.pools[tier].shape[3]  # [layers, 2, kv_heads, blocks, bt, D]


def _plan_batches(
    infos: list[tuple], store: PagedKVStore, flat: FlatInts, host_blocks: int | None = None
) -> list[tuple]:
    """`_decode_groups` of ``infos``, each batch's rows and padded block ids appended to
    ``flat``: (its (info, need) pairs, where its rows start in ``flat``, blocks per sequence,
    its first row when its rows are consecutive else None, its `StridedRun` or None). With
    ``host_blocks`` (a host pool of that many blocks) a batch whose sequences are one strided
    view of the pool is one batch in row order, whatever its size (no gather to bound)."""
    out: list[tuple] = []
    shared, infos = _shared_groups(infos, store.block_tokens)
    for p, members in shared:  # attended once each; the gather bound counts the blocks after
        for group in _decode_groups(members, store, p):
            _append_batch(out, flat, group, None, p)
    run, groups = _one_run(infos, store, host_blocks)
    for group in groups if run is None else [groups[0]]:
        _append_batch(out, flat, group, run, 0)
    return out


def _append_batch(out: list, flat: FlatInts, group: list, run: StridedRun | None, p: int) -> None:
    """One batch's plan appended to ``out`` and its rows and padded block ids (those after
    ``p`` shared blocks) to ``flat`` (`_plan_batches`)."""
    nb = max(need for _, need in group)
    rows = [info[0] for info, _ in group]
    at = len(flat)
    flat.extend(rows)
    for info, need in group:  # each padded with its last needed block (any held one)
        raw = info[6].raw  # the held ids' int64 bytes (`kv.step_ids.Held`)
        flat.extend_bytes(raw[8 * p : 8 * need] + raw[8 * need - 8 : 8 * need] * (nb - need))
    if run is not None:
        flat.extend(run.rows)
    span = rows[0] if rows == list(range(rows[0], rows[0] + len(rows))) else None
    out.append((group, at, nb - p, span, run, p))


def _shared_groups(infos: list[tuple], block_tokens: int) -> tuple[list, list[tuple]]:
    """([(shared blocks, infos)] of the sequences that share a prefix with at least one other
    (same first slot and first block, then `shared_blocks`), the other infos)."""
    by_first: dict[tuple[int, int], list[tuple]] = {}
    for info in infos:
        if len(info[4]) > SHARED_MIN_BLOCKS:
            by_first.setdefault((info[3], info[4][0]), []).append(info)
    shared, taken = [], set()
    for members in by_first.values():
        p = shared_blocks(members, block_tokens)
        if p:
            shared.append((p, members))
            taken.update(info[0] for info in members)
    return shared, [i for i in infos if i[0] not in taken]


# Fewest leading blocks held in common by a decode batch's sequences for them to be attended
# once for the whole batch (`kv/shared_prefix.py`) rather than gathered per sequence.
SHARED_MIN_BLOCKS = 2


def shared_blocks(infos: Sequence[tuple], block_tokens: int) -> int:
    """How many leading blocks every sequence of ``infos`` (`_plan_batches`' infos) holds with
    the same ids from the same first slot, each keeping at least its last needed block of its
    own (the one its new token was written to); 0 under ``SHARED_MIN_BLOCKS``."""
    if len(infos) < 2 or any(i[3] != infos[0][3] for i in infos):
        return 0
    first = infos[0][4]
    p = min(-(-(i[2] + 1 - i[3]) // block_tokens) for i in infos) - 1
    for info in infos[1:]:
        ids = info[4]
        if ids[:p] != first[:p]:
            p = next(j for j in range(p) if ids[j] != first[j])
        if p < SHARED_MIN_BLOCKS:
            return 0
    return p


def _one_run(infos: list[tuple], store: PagedKVStore, host_blocks: int | None):
    """(`StridedRun` of all ``infos`` in row order, [their (info, need) pairs]) when they form
    one, else (None, `_decode_groups`)."""
    if host_blocks is not None and len(infos) >= 2:
        bt = store.block_tokens
        group = [(i, -(-(i[2] + 1 - i[3]) // bt)) for i in sorted(infos, key=lambda i: i[0])]
        runs = [i[6].run0 is not None for i, _ in group]  # consecutive held ids (`Held`)
        run = strided_run([i[4] for i, _ in group], [n for _, n in group], host_blocks, runs)
        if run is not None:
            return run, [group]
    return None, _decode_groups(infos, store)


def _make_batches(
    batches: list[tuple], t: torch.Tensor, by_row: Mapping[int, SeqRows]
) -> tuple[DecodeBatch, ...]:
    """`DecodeBatch`es of `_plan_batches`' plans over ``t``, the tensor of its ``flat``."""
    out = []
    for group, at, nb, span, run, p in batches:
        b = len(group)
        members = tuple(by_row[info[0]] for info, _ in group)
        ids = t[at + b : at + b + b * nb]
        run_rows = None if run is None else t[at + b + b * nb : at + 2 * b + b * nb]
        shared_ids = tuple(group[0][0][4][:p])
        out.append(
            DecodeBatch(
                members,
                t[at : at + b],
                ids,
                nb,
                span=span,
                run=run,
                run_rows=run_rows,
                shared=p,
                shared_ids=shared_ids,
            )  # fmt: skip
        )
    return tuple(out)


def _decode_groups(
    infos: list[tuple], store: PagedKVStore, shared: int = 0
) -> list[list[tuple[tuple, int]]]:
    """Batches of one-token sequences (``PackedStep._layout``'s infos; none for fewer than two),
    each as (info, blocks it needs): sorted by length so that little is padded, cut so that one
    batch's gathered K/V (the blocks after ``shared`` leading ones) stays under
    ``GATHER_BYTES``, each batch then in row order (so that a step of decodes only is one span
    of rows)."""
    if len(infos) < 2:
        return []
    bt = store.block_tokens
    slot = 2 * store.kv_heads * store.head_dim * torch.empty((), dtype=store.dtype).element_size()
    need = [-(-(i[2] + 1 - i[3]) // bt) for i in infos]
    batches: list[list[tuple[tuple, int]]] = []
    cur: list[tuple[tuple, int]] = []
    for j in sorted(range(len(infos)), key=lambda j: need[j]):
        # Sorted: the newcomer is the longest, so it sets the padded length.
        if cur and (len(cur) + 1) * (need[j] - shared) * bt * slot > GATHER_BYTES:
            batches.append(cur)
            cur = []
        cur.append((infos[j], need[j]))
    batches.append(cur)
    return [sorted(b, key=lambda x: x[0][0]) for b in batches]
