"""Query rows of a packed step over a shared prefix: the prefix attended once for all of them.

Requests admitted over a cached prompt prefix (prefix sharing, `kv/blocks.py`) compute only their
tails, and every tail's queries see the whole prefix. Attending each tail over its own gathered
keys copies the prefix once per tail and layer (15 tails over a 6k-token prefix on 8B shapes:
15 x 25 MB per layer) and costs a dozen kernel launches per tail and layer. The sequences of a
step outside decode batches (no speculative tree) that hold the same leading blocks from the same
first slot, every query after them, form a `PrefillGroup`, attended in two parts merged exactly
as one softmax (`merge_lse`), as `kv/shared_prefix.py` does for decode batches:

* the shared blocks: every query row of the group folded into each KV head's rows, one flash call
  per run of consecutive blocks (`shared_prefix.prefix_lse`), no mask
  (each query comes after every shared key);
* each sequence's blocks after them, gathered for an `OwnBatch` of members (queries padded to the
  longest: batches cut so that padding stays under half the rows, and by ``GATHER_BYTES``),
  under a causal key mask made once per step.

Layers with a window, and pools off the queries' device (a host pool's prefill copies its runs,
`kv/run_copy.py`), attend one sequence at a time as before. Cost per layer: a fixed number of
calls whatever the group's size, and the prefix's bytes read once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from ollm.kv.decode_batch import GATHER_BYTES, SHARED_MIN_BLOCKS
from ollm.kv.shared_prefix import prefix_lse
from ollm.layers.attention import AttentionMask, blocked_attention_lse, merge_lse, with_sinks

if TYPE_CHECKING:
    from ollm.kv.packed import GroupLayout, SeqRows


@dataclass(frozen=True)
class OwnBatch:
    """Members of a group whose blocks after the shared ones are gathered together into
    ``[B, kv_heads, num_blocks * block_tokens, D]`` (the `DecodeBatch` fields
    ``PackedLayerKV._gather_rows`` reads), their queries padded to ``q_len`` rows each."""

    seqs: tuple[SeqRows, ...]
    pad_rows: torch.Tensor  # [B * q_len] packed row of each padded query (a pad: its last row)
    real: torch.Tensor  # [rows] where each real query sits in that padded order
    limits: torch.Tensor  # [B * q_len] the last key slot each padded query sees (a pad: -1)
    block_ids: torch.Tensor  # [B * num_blocks] blocks after the shared ones, padded
    num_blocks: int
    q_len: int
    shared: int  # the group's shared blocks (key slots start after them)
    cache: dict = field(default_factory=dict)  # per-step masks and rows on each device

    def mask(self, block_tokens: int, device: torch.device) -> torch.Tensor:
        """``[B, 1, q_len, num_blocks * block_tokens]``: query ``i`` of member ``b`` sees the
        gathered keys up to its own position (none for a pad); made once per step."""
        key = ("mask", torch.device(device))
        if key not in self.cache:  # from the layout's tensor: no copy to the device
            j0 = self.shared * block_tokens
            j = torch.arange(j0, j0 + self.num_blocks * block_tokens, device=device)
            keep = j[None] <= self.limits.to(device)[:, None]
            self.cache[key] = keep.view(len(self.seqs), 1, self.q_len, -1)
        return self.cache[key]

    def rows_on(self, device: torch.device, r0: int) -> torch.Tensor:
        """``pad_rows - r0`` on ``device`` (once per step, device and chunk start)."""
        return _shifted(self.cache, self.pad_rows, device, r0)


@dataclass(frozen=True)
class PrefillGroup:
    """Sequences of a step attended over their ``shared`` common leading blocks at once."""

    seqs: tuple[SeqRows, ...]
    rows: torch.Tensor  # [rows] every member's query rows, in its own batches' order
    own: tuple[OwnBatch, ...]
    shared: int
    shared_ids: tuple[int, ...]
    first: int  # the lowest row of a member
    end: int  # one past the highest
    row0s: frozenset[int] = frozenset()  # the members' first rows
    cache: dict = field(default_factory=dict)

    def rows_on(self, device: torch.device, r0: int) -> torch.Tensor:
        """``rows - r0`` on ``device`` (once per step, device and chunk start)."""
        return _shifted(self.cache, self.rows, device, r0)


def _shifted(cache: dict, rows: torch.Tensor, device: torch.device, r0: int) -> torch.Tensor:
    key = (torch.device(device), r0)
    if key not in cache:
        cache[key] = rows.to(device) - r0
    return cache[key]


def with_prefills(lay: GroupLayout, store, device: torch.device) -> GroupLayout:
    """``lay`` (a step's `GroupLayout` over ``store``, a `PagedKVStore`) with its
    `PrefillGroup`s: its sequences outside decode batches (``rest``), not trees, grouped by
    the leading blocks they hold in common; their index tensors in one copy to ``device``."""
    by_first: dict[tuple[int, int], list[SeqRows]] = {}
    bt = store.block_tokens
    for s in lay.rest:
        # Fewer blocks before its first query than a group shares: not a member (e.g. the
        # sequence computing a prefix its members adopted in this same step).
        if s.tree is None and (s.start - s.key0) // bt >= SHARED_MIN_BLOCKS:
            by_first.setdefault((s.key0, s.ids[0]), []).append(s)
    slot = 2 * store.kv_heads * store.head_dim * torch.empty((), dtype=store.dtype).element_size()
    plans, flat = [], []
    for members in by_first.values():
        p = _common_blocks(members, bt)
        if p < SHARED_MIN_BLOCKS:
            continue
        batches = [_append_own(b, p, flat) for b in _own_batches(members, p, bt, slot)]
        plans.append((p, batches, len(flat)))
        flat.extend(s.row0 + i for b in batches for s in b[0] for i in range(s.n))
    if not plans:
        return lay
    t = torch.tensor(flat, dtype=torch.long, device=device)
    return replace(lay, prefills=_make_groups(plans, t))


def _common_blocks(members: Sequence[SeqRows], block_tokens: int) -> int:
    """Leading blocks every member holds with the same ids, all before its first query."""
    if len(members) < 2:
        return 0
    first = members[0].ids
    p = min((s.start - s.key0) // block_tokens for s in members)
    for s in members[1:]:
        if s.ids[:p] != first[:p]:
            p = next(j for j in range(p) if s.ids[j] != first[j])
    return p


def _own_batches(
    members: Sequence[SeqRows], p: int, bt: int, slot: int
) -> list[list[tuple[SeqRows, int]]]:
    """Members as (sequence, blocks it needs) in batches sorted by rows: a batch's longest has
    at most twice the rows of its shortest, and its gathered blocks after ``p`` (``slot``
    bytes of K/V a token) stay under ``GATHER_BYTES``."""
    out: list[list[tuple[SeqRows, int]]] = []
    cur: list[tuple[SeqRows, int]] = []
    most = 0  # the current batch's most blocks after p
    for s in sorted(members, key=lambda s: s.n):
        need = -(-(s.start + s.n - s.key0) // bt)
        wide = max(most, need - p)
        if cur and (s.n > 2 * cur[0][0].n or (len(cur) + 1) * wide * bt * slot > GATHER_BYTES):
            out.append(cur)
            cur, most = [], 0
        cur.append((s, need))
        most = max(most, need - p)
    out.append(cur)
    return out


def _append_own(group: list[tuple[SeqRows, int]], p: int, flat: list[int]) -> tuple:
    """One own batch's padded rows, real indices and padded block ids appended to ``flat``:
    (its members, where they start in ``flat``, blocks after ``p``, query rows each)."""
    t = max(s.n for s, _ in group)
    nb = max(need for _, need in group) - p
    at = len(flat)
    for s, _ in group:  # a pad repeats its sequence's last row (its output is dropped)
        flat.extend(s.row0 + min(i, s.n - 1) for i in range(t))
    flat.extend(b * t + i for b, (s, _) in enumerate(group) for i in range(s.n))
    for s, _ in group:  # query i sees slots up to its own, start - key0 + i (a pad: none)
        flat.extend(s.start - s.key0 + i if i < s.n else -1 for i in range(t))
    for s, need in group:  # padded with its last needed block (masked)
        flat.extend(s.ids[p:need] + (s.ids[need - 1],) * (nb + p - need))
    return (tuple(s for s, _ in group), at, nb, t)


def _make_groups(plans: list[tuple], t: torch.Tensor) -> tuple[PrefillGroup, ...]:
    """`PrefillGroup`s of `with_prefills`' plans over ``t``, the tensor of its index lists."""
    out = []
    for p, batches, at_rows in plans:
        own = []
        for seqs, at, nb, q in batches:
            b, rows = len(seqs), sum(s.n for s in seqs)
            pad, real = t[at : at + b * q], t[at + b * q : at + b * q + rows]
            limits = t[at + b * q + rows : at + 2 * b * q + rows]
            ids = t[at + 2 * b * q + rows : at + 2 * b * q + rows + b * nb]
            own.append(OwnBatch(seqs, pad, real, limits, ids, nb, q, p))
        members = tuple(s for b in own for s in b.seqs)
        total = sum(s.n for s in members)
        out.append(
            PrefillGroup(
                members,
                t[at_rows : at_rows + total],
                tuple(own),
                p,
                members[0].ids[:p],
                min(s.row0 for s in members),
                max(s.row0 + s.n for s in members),
                frozenset(s.row0 for s in members),
            )  # fmt: skip
        )
    return tuple(out)


def attend_prefills(layer, lay: GroupLayout, q: torch.Tensor, out: torch.Tensor, span, mask,
                    scale: float, todo: tuple) -> tuple:  # fmt: skip
    """Attend ``lay``'s prefill groups whose rows lie in ``span`` (the call's rows ``[r0,
    r1)``) into ``out`` where they apply (no window, the pool on the queries' device); the
    sequences of ``todo`` left to attend one by one."""
    r0, r1 = span
    if not lay.prefills or mask.window is not None or layer.pool.device != q.device:
        return todo
    done: set[int] = set()
    for g in lay.prefills:
        if r0 <= g.first and g.end <= r1:
            if layer.pool.device.type == "cpu":
                layer._host_read()
            attend_group(layer, g, q, out, r0, mask, scale)
            done |= g.row0s
    return tuple(s for s in todo if s.row0 not in done) if done else todo


def attend_group(
    layer, g: PrefillGroup, q: torch.Tensor, out: torch.Tensor, r0: int, mask, scale: float
) -> None:
    """``g``'s attention into ``out`` ``[1, heads, rows, D]`` (``q`` likewise, rows from
    ``r0``): the shared blocks once for all its queries, each own batch over its own blocks,
    merged (sinks after)."""
    bt = layer.store.block_tokens
    rows = g.rows_on(q.device, r0)
    qb = q[0].index_select(1, rows).transpose(0, 1).unsqueeze(2)  # [R, heads, 1, D]
    o, lse = prefix_lse(layer.pool, g.shared_ids, bt, qb, scale, None, g)
    parts = [_attend_own(layer, b, q, r0, scale) for b in g.own]
    oo = parts[0][0] if len(parts) == 1 else torch.cat([x for x, _ in parts])
    lo = parts[0][1] if len(parts) == 1 else torch.cat([x for _, x in parts])
    assert o is not None and lse is not None
    o, lse = merge_lse(o, lse, oo.unsqueeze(2), lo.unsqueeze(2))
    if mask.sinks is not None:
        o = with_sinks(o, lse, mask.sinks)
    out[0].index_copy_(1, rows, o[:, :, 0].transpose(0, 1))


def _attend_own(
    layer, b: OwnBatch, q: torch.Tensor, r0: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``b``'s real queries over their own blocks: (out ``[rows, heads, D]``, log-sum-exp
    ``[rows, heads]`` float32)."""
    bt = layer.store.block_tokens
    h, d = q.shape[1], q.shape[3]
    n = len(b.seqs)
    qp = q[0].index_select(1, b.rows_on(q.device, r0)).view(h, n, b.q_len, d).transpose(0, 1)
    kv = [layer._gather_rows(i, b).to(q.device, q.dtype) for i in (0, 1)]
    keep = b.mask(bt, q.device)
    s = keep.shape[-1]
    o, lse = blocked_attention_lse(qp, kv[0], kv[1], AttentionMask(s, b.q_len, s + b.q_len),
                                   scale, keep)  # fmt: skip
    o = o.transpose(1, 2).reshape(n * b.q_len, h, d).index_select(0, b.real)
    return o, lse.transpose(1, 2).reshape(n * b.q_len, h).index_select(0, b.real)
