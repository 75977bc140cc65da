"""KV of one packed step over paged pools: the per-layer objects ``decoder_block`` attends through.

Engine v2 packs every scheduled sequence's query tokens into one row ``[1, N]`` (no padding, each
sequence at its own positions). `PackedStep` turns a `StepPlan` into, per KV group, the pool slot
of every row (block id and offset, for one indexed write per layer) and each sequence's held
block ids (for one indexed gather per layer and sequence). `PackedLayerKV` is the per-layer
object: ``attend(q, k, v, ...)`` writes the rows' new K/V through the tables, then attends each
sequence's queries over its own gathered K/V with its own causal (and window) mask.

A layer's pool may sit in host memory (pinned RAM, a mapped file) while the layer computes on
the GPU: rows of few queries (decodes) are then attended by the CPU where the K/V sits, longer
ones (prefill) over K/V gathered to the GPU; prefill rows reach a pinned pool by asynchronous
copies, one per (K/V, head, sequence) (`kv.prefill_rows`), not through a host sync.

Cost: one-token sequences (decodes) are attended together (one gather and one kernel call per
batch of them), longer ones each in turn; the projections and MLP, which dominate, run once for
all rows. Everything that depends only on the step (each sequence's rows and blocks, the decode
batches' gather rows, key masks and row order) is built once per step and group and shared by
all layers, so a layer's host work does not grow with the batch when the call covers the whole
step (no per-sequence loop, no host sync). A varlen/paged kernel over the block ids would remove
the gather copy.

The runner may split the rows into consecutive prefill chunks (``Runner._chunked_block``): each
layer object keeps a row cursor, and a sequence whose rows straddle two chunks attends, in each,
only over the keys written so far (the later ones are in its causal future anyway).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ollm.kv.decode_batch import (  # noqa: F401  (_decode_batches: for tests and callers)
    DecodeBatch,
    _decode_batches,
    _make_batches,
    _plan_batches,
    host_blocks,
)
from ollm.kv.paged import PagedKVStore
from ollm.kv.prefill_rows import aligned_chunks, run_pieces, write_runs
from ollm.kv.run_copy import MAX_COPY_RUNS, block_runs, copy_runs
from ollm.kv.shared_prefill import attend_prefills, with_prefills
from ollm.kv.step_ids import FlatInts, HeldMemo
from ollm.kv.strided import row_mask, run_view, scatter_rows
from ollm.layers.tree_mask import TreeMask
from ollm.runtime.uva import to_device

if TYPE_CHECKING:  # plain data from the engine, read by attribute only (kv sits below engine)
    from ollm.engine.stepplan import StepPlan
    from ollm.layers.attention import AttentionMask


@dataclass(frozen=True)
class SeqRows:
    """One sequence's share of a packed step in one KV group."""

    row0: int  # first row of its query tokens in the packed step
    n: int  # query rows
    start: int  # position of its first query token
    key0: int  # first position whose KV is held (a window may have released earlier blocks)
    block_ids: torch.Tensor  # ids of the held blocks, from position key0 on (on the pool device)
    tree: TreeMask | None = None  # its rows as a speculative tree (slots from key0), else causal
    ids: tuple[int, ...] = ()  # block_ids as Python ints (for building batches without syncs)
    run0: int | None = None  # the first held block when the held blocks are consecutive ids


# Most query rows of one sequence the CPU attends over a pool in host memory (a decode token
# with a few drafts); more rows gather the K/V to the queries' device instead.
CPU_ATTEND_ROWS = 8


@dataclass(frozen=True)
class GroupLayout:
    """Where each row of the step writes its K/V in one KV group, and each sequence's blocks."""

    row_block: torch.Tensor  # [N] block id per row
    row_offset: torch.Tensor  # [N] slot offset in that block per row
    seqs: tuple[SeqRows, ...]
    decodes: tuple[DecodeBatch, ...]  # one-token sequences (two or more), attended together
    rest: tuple[SeqRows, ...] = ()  # the sequences no decode batch holds, attended one by one
    slots: dict = field(default_factory=dict)  # write_slots' index tensors
    starts: tuple[int, ...] = ()  # each sequence's first row (seqs are in row order)
    prefills: tuple = ()  # `PrefillGroup`s: rows over a shared prefix (kv/shared_prefill.py)

    def overlapping(self, r0: int, r1: int) -> tuple[SeqRows, ...]:
        """The sequences with rows in ``[r0, r1)`` (found by bisection: no loop over the
        step's sequences per chunk)."""
        i = max(0, bisect_right(self.starts, r0) - 1)
        return self.seqs[i : bisect_left(self.starts, r1)]

    def write_slots(self, pool: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Where rows ``[r0, r1)``'s K and V go in ``pool`` ``[2, kv_heads, blocks,
        block_tokens, D]`` seen as ``[-1, D]``, in the order of ``cat([k, v])`` ``[2 kv_heads,
        rows, D]`` (one index per K/V, head and row; made once per step and chunk)."""
        _, kvh, blocks, bt, _ = pool.shape
        key = (blocks, kvh, bt, r0, r1)
        idx = self.slots.get(key)
        if idx is None:
            dev = self.row_block.device
            blk = self.row_block[r0:r1].view(1, 1, -1)
            off = self.row_offset[r0:r1].view(1, 1, -1)
            kv = torch.arange(2, device=dev).view(2, 1, 1)
            heads = torch.arange(kvh, device=dev).view(1, kvh, 1)
            idx = self.slots[key] = (((kv * kvh + heads) * blocks + blk) * bt + off).reshape(-1)
        return idx


class PackedStep:
    """The tensor-side layout of one `StepPlan` over per-group `PagedKVStore`s (all running
    sequences' blocks sit in ``tier``, the allocation tier). A group's layers may keep their
    pools on different devices (GPU, pinned RAM, a memory-mapped file): the index tensors are
    made once per group and device that asks for them."""

    def __init__(
        self,
        plan: StepPlan,
        stores: Mapping[str, PagedKVStore],
        tier: str,
        memo: HeldMemo | None = None,
    ) -> None:
        self.plan = plan
        self.tier = tier
        self.memo = HeldMemo() if memo is None else memo  # the engine's: kept across steps
        self.memo.keep(st.seq_id for st in plan.seqs)
        self.num_rows = plan.num_tokens
        self.stores = dict(stores)  # one store per group (any home: only its shapes are read)
        self._layouts: dict[tuple[str, torch.device], GroupLayout] = {}
        self.pending: list = []  # CUDA events after asynchronous writes into host pools
        self._chunks: dict[int, list[tuple[int, int]]] = {}

    def layout(self, group: str, device: torch.device) -> GroupLayout:
        """The layout of ``group`` with its index tensors on ``device`` (made once per step)."""
        key = (group, device)
        lay = self._layouts.get(key)
        if lay is None:
            dev = torch.device(device)
            lay = self._layouts[key] = self._layout(
                self.plan, group, self.stores[group], self.tier, dev, self.memo
            )
        return lay

    @staticmethod
    def _layout(
        plan: StepPlan,
        group: str,
        store: PagedKVStore,
        tier: str,
        device: torch.device,
        memo: HeldMemo,
    ) -> GroupLayout:
        """Every index tensor of the group's step in one host-to-device copy (views of one
        tensor): each row's block and offset, each sequence's held blocks, the decode batches'
        rows and padded blocks. Held blocks come from ``memo`` while a table is unchanged (no
        per-block Python for a decoding sequence between its new blocks)."""
        bt = store.block_tokens
        row_block: list[int] = []
        row_offset: list[int] = []
        infos = []  # (row0, rows, start, key0, held block ids, tree, their bytes) per sequence
        row = 0
        for st in plan.seqs:
            blocks = st.block_tables[group]
            held = memo.held(group, st.seq_id, blocks, tier)
            for pos in st.positions:
                row_block.append(blocks[pos // bt].block)  # type: ignore[union-attr]
                row_offset.append(pos % bt)
            tree = None
            if st.draft_parents is not None:
                tree = TreeMask.from_parents(st.start - held.first * bt, st.row_parents())
            infos.append(
                (row, len(st.token_ids), st.start, held.first * bt, held.ids, tree, held)
            )  # fmt: skip
            row += len(st.token_ids)
        n = len(row_block)
        flat = FlatInts()  # row blocks, row offsets, then each part below, one tensor
        flat.extend(row_block + row_offset)
        where = []
        for info in infos:
            where.append(len(flat))
            flat.extend_bytes(info[6].raw)
        blocks = host_blocks(store, tier, device)
        batches = _plan_batches([i for i in infos if i[1] == 1], store, flat, blocks)
        t = flat.tensor(device)
        seqs = tuple(
            SeqRows(r0, k, start, key0, t[w : w + len(ids)], tree, ids, h.run0)
            for (r0, k, start, key0, ids, tree, h), w in zip(infos, where, strict=True)
        )
        decodes = _make_batches(batches, t, {s.row0: s for s in seqs})
        batched = {s.row0 for d in decodes for s in d.seqs}
        rest = tuple(s for s in seqs if s.row0 not in batched)
        starts = tuple(s.row0 for s in seqs)
        lay = GroupLayout(t[:n], t[n : 2 * n], seqs, tuple(decodes), rest, starts=starts)
        return with_prefills(lay, store, device)  # rows over a shared prefix, grouped

    def row_chunks(self, chunk: int) -> list[tuple[int, int]]:
        """The step's rows in chunks of at most ``chunk``, cut at sequence starts where one
        lies in a chunk's second half (`aligned_chunks`; made once per step)."""
        if chunk not in self._chunks:
            lengths = [len(st.token_ids) for st in self.plan.seqs]
            self._chunks[chunk] = aligned_chunks(lengths, chunk)
        return self._chunks[chunk]

    def wait_writes(self) -> None:
        """Block until every asynchronous pool write of the step has landed in host memory."""
        for ev in self.pending:
            ev.synchronize()
        self.pending.clear()

    def input_ids(self) -> torch.Tensor:
        """The step's query tokens as one row ``[1, N]``."""
        ids = [t for st in self.plan.seqs for t in st.token_ids]
        return torch.tensor([ids], dtype=torch.long)

    def positions(self) -> torch.Tensor:
        """Each query token's own position ``[1, N]`` (sequences restart at their lengths; a
        tree node's is its depth past the sequence's length, not its slot)."""
        pos = [p for st in self.plan.seqs for p in st.rope_positions()]
        return torch.tensor([pos], dtype=torch.long)

    def layer_kv(self, layers: Sequence[tuple[str, PagedKVStore, int]]) -> list[PackedLayerKV]:
        """One `PackedLayerKV` per model layer; ``layers[i]`` = (group of layer i, the store
        holding its pool, its index in that store)."""
        out = []
        for group, store, local in layers:
            pool = store.layer_pool(self.tier, local)
            layout = self.layout(group, pool.device)
            if hasattr(store, "layer_kv"):  # an encoded pool (kv/codec_paged.py)
                out.append(store.layer_kv(self, layout, local))
            else:
                out.append(PackedLayerKV(self, store, layout, local, self.tier))
        return out


class PackedLayerKV:
    """One layer's KV for one packed step: writes the rows' K/V into the pool, attends each
    sequence over its own blocks. ``length`` is 0, so the runner's mask starts each call at its
    first row (``mask.q_start`` = row offset, checked against the cursor)."""

    length = 0
    fetcher = None
    run_writes = False  # tests: write runs as from another device even on the pool's own

    def __init__(
        self, step: PackedStep, store: PagedKVStore, layout: GroupLayout, layer: int, tier: str
    ) -> None:
        self.step, self.store, self.layout, self.layer = step, store, layout, layer
        self.pool = store.layer_pool(tier, layer)  # [2, kv_heads, blocks, block_tokens, D]
        self._cursor = 0
        self._pending = None  # a CUDA event after this layer's asynchronous pool writes
        cpu = self.pool.device.type == "cpu"
        self._pinned = cpu and torch.cuda.is_available() and self.pool.is_pinned()

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: AttentionMask,
        scale: float,
        dense_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Store rows ``[cursor, cursor + T)``'s K/V ``[1, kv_heads, T, D]`` and return the
        attention output ``[1, heads, T, D]`` of their queries; ``mask`` only gives the window
        (each sequence gets its own causal mask) and ``dense_mask`` is ignored."""
        from ollm.layers.attention import AttentionMask as Mask  # lazily, as kv/cache.py
        from ollm.layers.attention import attend

        r0, r1 = take_rows(self, q, mask)
        lay = self.layout
        self._write(torch.cat([k[0], v[0]]), r0, r1)  # [2 heads, T, D]
        out = torch.empty_like(q)
        if r0 == 0 and r1 == self.step.num_rows:  # the whole step: batches as laid out
            for d in lay.decodes:
                self._attend_decodes(d, q, out, r0, mask, scale)
            todo = lay.rest
        else:  # a prefill chunk: batches all inside it, the other sequences one by one
            done = set()  # first rows of the sequences attended in a batch
            for d in lay.decodes:
                if all(r0 <= s.row0 < r1 for s in d.seqs):
                    self._attend_decodes(d, q, out, r0, mask, scale)
                    done.update(s.row0 for s in d.seqs)
            todo = tuple(s for s in lay.overlapping(r0, r1) if s.row0 not in done)
        todo = attend_prefills(self, lay, q, out, (r0, r1), mask, scale, todo)
        for s in todo:
            a, b = max(s.row0, r0), min(s.row0 + s.n, r1)
            if a >= b:
                continue
            q_pos = s.start + (a - s.row0)  # position of the first query row here
            upto = s.start + (b - s.row0)  # keys written so far for this sequence
            qs = q[:, :, a - r0 : b - r0]
            if s.key0 == s.start and a == s.row0:  # its only keys are these rows: no gather
                ks, vs = k[:, :, a - r0 : b - r0], v[:, :, a - r0 : b - r0]
            else:
                # by the sequence's rows in the step: a prefill's short tail in this chunk
                # attends where its other chunks did (no host read, no sync)
                ks, vs = self._gather(s, upto, self._attend_device(s.n, q.device))
            m = Mask(q_pos - s.key0, b - a, upto - s.key0, None, mask.window, mask.sinks, s.tree)
            o = attend(qs.to(ks.device), ks, vs, m, scale)
            out[:, :, a - r0 : b - r0] = to_device(o, q.device)
        return out

    def _write(self, new: torch.Tensor, r0: int, r1: int) -> None:
        """Rows ``[r0, r1)``'s K/V ``new`` ``[2 kv_heads, T, D]`` into the pool: from a GPU into
        a pinned host pool where every sequence of the rows is a run with more than
        ``CPU_ATTEND_ROWS`` rows in the step (prefill), one copy per (K/V, head, sequence)
        (`write_runs`: asynchronous, an event for the host's readers); else one indexed copy
        through the step's slot indices (to a host pool: a host sync on a GPU)."""
        pool, lay = self.pool, self.layout
        new = new.to(dtype=pool.dtype)
        # From a GPU only into pinned RAM (a copy into pageable memory waits for the GPU).
        host = self.run_writes or (new.device.type == "cuda" and self._pinned)
        host = host and pool.device.type == "cpu" and pool.is_contiguous()
        seqs = lay.overlapping(r0, r1)
        # Only rows the GPU attends: a sequence the CPU attends (decodes) reads the pool at once.
        host = host and all(s.n > CPU_ATTEND_ROWS for s in seqs)
        pieces = run_pieces(seqs, r0, r1, self.store.block_tokens) if host else None
        if pieces:
            write_runs(pool, new, pieces)
            if new.device.type == "cuda":
                self._pending = torch.cuda.Event()
                self._pending.record()
                self.step.pending.append(self._pending)
            return
        new = new.to(pool.device)
        d = new.shape[-1]
        pool.view(-1, d).index_copy_(0, lay.write_slots(pool, r0, r1), new.view(-1, d))

    def _host_read(self) -> None:
        """Before the host reads this layer's pool: the step's asynchronous writes into it
        have landed (copies to the GPU need no wait: they follow them on the stream)."""
        if self._pending is not None:
            self._pending.synchronize()
            self._pending = None

    def _attend_device(self, rows: int, q_device: torch.device) -> torch.device:
        """Where a sequence's ``rows`` queries attend over this layer's pool (`attend_device`)."""
        return attend_device(self.pool, rows, q_device)

    def _attend_decodes(
        self,
        d: DecodeBatch,
        q: torch.Tensor,
        out: torch.Tensor,
        r0: int,
        mask: AttentionMask,
        scale: float,
    ) -> None:
        """One attention call for the one-token sequences of ``d``: their K/V gathered by one
        indexed read per pool, padded keys masked (same maths as one call each, other kernels).
        A pool in host memory (pinned RAM, a mapped file) is attended by the CPU where it sits:
        only the queries and outputs cross the link, not the K/V (as ``OffloadedKVCache``)."""
        from ollm.layers.attention import AttentionMask as Mask
        from ollm.layers.attention import attend

        bt = self.store.block_tokens
        split = self.store.split
        if self.pool.device.type == "cpu":
            self._host_read()  # the CPU attends (or gathers) over the pool itself
        if d.shared:  # a shared prefix: read once for the whole batch (kv/shared_prefix.py)
            self._attend_shared(d, q, out, r0, mask, scale)
            return
        if split is not None and split.applies(self.pool, q.device):  # CPU and GPU at once
            rows = d.rows_on(q.device, r0)
            qb = q[0].index_select(1, rows).transpose(0, 1).unsqueeze(2)
            o = split.attend(d, self.pool, qb, mask, scale, self.store.host_scratch)
            out[0].index_copy_(1, rows, to_device(o[:, :, 0].transpose(0, 1), q.device))
            return
        dev = self.pool.device if self.pool.device.type == "cpu" else q.device
        if d.span is not None:  # consecutive rows in order: views, no index tensors
            a = d.span - r0
            qb = q[0, :, a : a + len(d.seqs)].transpose(0, 1).unsqueeze(2).to(dev)
        else:
            rows = d.rows_on(q.device, r0)
            qb = q[0].index_select(1, rows).transpose(0, 1).unsqueeze(2).to(dev)  # [B, H, 1, D]
        keep = d.mask(mask.window, bt, dev)
        if d.run is not None:  # a host pool's view (layouts on the CPU only): no gather
            assert d.run_rows is not None
            kv = [x.to(dtype=q.dtype) for x in run_view(self.pool, d.run, d.num_blocks)]
            key = ("run", mask.window, dev)  # the key mask on the view's rows, once per step
            if key not in d.masks:
                d.masks[key] = row_mask(keep, d.run, d.run_rows)
            qb, keep = scatter_rows(qb, d.run, d.run_rows), d.masks[key]
        else:
            kv = [self._gather_rows(i, d).to(dev, q.dtype) for i in (0, 1)]
        s = keep.shape[-1]
        # key_keep marks the mask as not plain causal, so attend uses the dense mask given.
        m = Mask(s - 1, 1, s, keep[:, 0, 0], None, mask.sinks)
        o = attend(qb, kv[0], kv[1], m, scale, keep)  # [B, heads, 1, D]
        if d.run is not None and not d.run.identity:
            o = o.index_select(0, d.run_rows)  # the view rows of the batch's sequences
        o = to_device(o[:, :, 0].transpose(0, 1), q.device)
        if d.span is not None:
            out[0, :, a : a + len(d.seqs)] = o
        else:
            out[0].index_copy_(1, rows, o)

    def _attend_shared(
        self, d: DecodeBatch, q: torch.Tensor, out: torch.Tensor, r0: int, mask, scale: float
    ) -> None:
        """``_attend_decodes`` of a batch with shared leading blocks (`attend_shared`)."""
        from ollm.kv.shared_prefix import attend_shared

        dev = self.pool.device if self.pool.device.type == "cpu" else q.device
        rows = d.rows_on(q.device, r0)
        qb = q[0].index_select(1, rows).transpose(0, 1).unsqueeze(2).to(dev)  # [B, H, 1, D]
        o = to_device(attend_shared(self, d, qb, mask, scale)[:, :, 0].transpose(0, 1), q.device)
        out[0].index_copy_(1, rows, o)

    def _gather_rows(self, i: int, d: DecodeBatch) -> torch.Tensor:
        """K (``i`` 0) or V of ``d``'s sequences as ``[B, kv_heads, blocks * block_tokens, D]``
        on the pool's device; from a host pool into the store's kept host buffers (a fresh
        tensor per layer and step would be fresh pages)."""
        b, nb, bt = len(d.seqs), d.num_blocks, self.store.block_tokens
        kvh, blocks, hd = self.pool.shape[1], self.pool.shape[2], self.pool.shape[4]
        # One copy of every head's blocks, [kv_heads, B * blocks, bt * D] (each row bt x D
        # contiguous), seen as [B, kv_heads, blocks * bt, D] (strided: attention reads it so).
        src = self.pool[i].view(kvh, blocks, bt * hd)
        if self.pool.device.type != "cpu":
            out = src.index_select(1, d.block_ids)
        else:
            out = self.store.host_scratch(i, (kvh, b * nb, bt * hd))
            torch.index_select(src, 1, d.block_ids, out=out)
        return out.view(kvh, b, nb * bt, hd).transpose(0, 1)

    def _gather(self, s: SeqRows, upto: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """K/V of positions ``[key0, upto)`` as ``[1, kv_heads, n, D]`` on ``device``: a view of a
        host pool where the sequence's blocks are one run (slabs), copied head by head when the
        device is another (each head's run is contiguous: pinned memory copies at the link's
        rate, where a strided or gathered source goes through a pageable copy), else a gather."""
        bt = self.store.block_tokens
        nb = -(-(upto - s.key0) // bt)
        host = self.pool.device.type == "cpu"
        other = torch.device(device) != self.pool.device
        runs = block_runs(s.ids[:nb]) if host and other and s.run0 is None and s.ids else ()
        if len(runs) > MAX_COPY_RUNS:
            runs = ()
        if host and (s.run0 is None or not other) and not runs:
            self._host_read()  # the host reads the pool itself (a view or a gather)
        if s.run0 is not None and host:
            return tuple(self._run_kv(kv, s.run0, nb, upto - s.key0, device) for kv in (0, 1))
        if runs:  # a shared prefix and its own blocks: each run copied as such (kv/run_copy.py)
            return tuple(copy_runs(self.pool[kv], runs, upto - s.key0, device) for kv in (0, 1))
        ids = s.block_ids[:nb]
        out = []
        for kv in (0, 1):
            x = self.pool[kv].index_select(1, ids)  # [heads, nb, bt, D]
            x = x.view(x.shape[0], nb * bt, x.shape[3])[:, : upto - s.key0]
            out.append(x.unsqueeze(0).to(device))
        return tuple(out)

    def _run_kv(self, kv: int, b0: int, nb: int, n: int, device: torch.device) -> torch.Tensor:
        """K (``kv`` 0) or V of blocks ``[b0, b0 + nb)``'s first ``n`` slots, ``[1, kv_heads,
        n, D]`` on ``device`` (a view on the pool's own device)."""
        pool = self.pool[kv]  # [kv_heads, blocks, bt, D]
        if torch.device(device) != pool.device:
            return copy_runs(pool, [(0, b0, nb)], n, device)
        return pool[:, b0 : b0 + nb].reshape(pool.shape[0], -1, pool.shape[3])[:, :n].unsqueeze(0)

    def row_chunks(self, chunk: int) -> list[tuple[int, int]]:
        """The runner's prefill chunk edges for this step (`PackedStep.row_chunks`)."""
        return self.step.row_chunks(chunk)

    def flush(self) -> bool:
        """Nothing is buffered elsewhere."""
        return False

    def close(self) -> None:
        """The pools belong to the engine."""

    @property
    def nbytes(self) -> int:
        """Bytes of this layer's pool."""
        return self.pool.numel() * self.pool.element_size()


def attend_device(pool: torch.Tensor, rows: int, q_device: torch.device) -> torch.device:
    """Where ``rows`` queries of one sequence attend over ``pool``: by the CPU over a pool in
    host memory for a few rows (a decode token and its drafts: the queries cross the link, not
    the K/V), else on the queries' device (prefill: the K/V is gathered there)."""
    host = pool.device.type == "cpu" and q_device.type != "cpu"
    return pool.device if host and rows <= CPU_ATTEND_ROWS else q_device


def take_rows(layer, q: torch.Tensor, mask: AttentionMask) -> tuple[int, int]:
    """The rows ``[r0, r1)`` of a packed step that ``layer``'s (a packed layer KV with ``step``
    and ``_cursor``) attend call carries, checked to be the next chunk of one row; the
    cursor moves past them (back to 0 after the step's last row)."""
    r0 = layer._cursor
    r1 = r0 + q.shape[2]
    if q.shape[0] != 1 or mask.q_start != r0 or r1 > layer.step.num_rows:
        raise RuntimeError(
            f"packed KV expects one row of consecutive chunks: rows [{mask.q_start}, "
            f"+{q.shape[2]}) at cursor {r0} of {layer.step.num_rows} (batch {q.shape[0]})"
        )
    layer._cursor = 0 if r1 == layer.step.num_rows else r1
    return r0, r1
