"""Encoded paged KV pools (issue 17): the tensor side of `kv.codec_blocks.CodecBlockManager`.

A `CodecPagedStore` keeps, per layer, the codes of every block id (a `CodeStore` whose batch
axis is the block id: K per channel over groups of the codec's block, V per token) and an exact
pool of ``manager.exact_slots`` blocks (the `PagedKVStore` pool, indexed by exact slot) for the
recent windows and the blocks being filled. Its bytes per block are the encoded ones, so the
same memory holds more blocks; only the exact slots are at full precision.

`CodecLayerKV` is one layer's object for a packed step (as `kv.packed.PackedLayerKV`): it writes
the rows' K/V into their blocks' exact slots, encodes every block these rows fill, then attends
each sequence decode-faithfully, as the single-request `CompressedKVCache` does: a query at
``q`` sees blocks before ``(q + 1) // block_tokens - recent_blocks`` encoded and the rest exact.
The blocks all of a sequence's rows see encoded are read as codes, for every sequence of the
step with as many rows in one call (``kv/codec_paged_attend.py``: a Triton kernel over the
block tables on the GPU, chunks of codes in torch elsewhere; never a full-precision copy of the
cache); the rest (the exact window, and the few blocks a prefill chunk crossing a block edge
sees encoded for some rows only, decoded) in one dense-masked call; both merged by their
log-sum-exps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ollm.kv.codec_blocks import CodecBlockManager
from ollm.kv.codecs import CodeStore, KVCodec, decode, encode
from ollm.kv.paged import PagedKVStore
from ollm.layers.attention import merge_lse, with_sinks
from ollm.runtime.uva import to_device

if TYPE_CHECKING:
    from ollm.kv.packed import GroupLayout, PackedStep, SeqRows
    from ollm.layers.attention import AttentionMask


class CodecPagedStore(PagedKVStore):
    """Codes of every block plus exact slots, for ``num_layers`` layers of one KV group."""

    HEAD_MAJOR = False  # exact slots [2, slots, kv_heads, bt, D], indexed by slot

    def __init__(
        self,
        num_layers: int,
        manager: CodecBlockManager,
        codec: KVCodec,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        storage=None,
    ) -> None:
        """``storage(nbytes)`` (pinned RAM, a KV file) allocates the exact pool and each
        layer's codes; else they are plain tensors on ``device``."""
        bt, tier = manager.block_tokens, manager.tier
        if bt % codec.block:
            raise ValueError(
                f"KV blocks of {bt} tokens are not whole codec groups of {codec.block}"
            )
        super().__init__(
            num_layers, {tier: manager.exact_slots}, kv_heads, bt, head_dim, dtype,
            {tier: device}, storage={tier: storage} if storage is not None else None,
        )  # fmt: skip
        self.codec, self.manager, self.tier = codec, manager, tier
        blocks = manager.pools[tier].num_blocks
        self.codes = [
            CodeStore(codec, blocks, kv_heads, bt, head_dim, dtype, device, storage)
            for _ in range(num_layers)
        ]
        self._slots: tuple[int, torch.device, torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the exact slots and every layer's codes."""
        return super().nbytes + sum(c.nbytes for c in self.codes)

    def encoded_block_bytes(self) -> int:
        """Bytes one block takes in one layer's codes (K and V, parameters included)."""
        return self.codes[0].nbytes // self.codes[0].kc.shape[0] if self.codes else 0

    def slot_index(self, device: torch.device) -> torch.Tensor:
        """``manager.exact_of`` as a long tensor on ``device`` (rebuilt when it changed)."""
        v = self.manager.version
        if self._slots is None or self._slots[0] != v or self._slots[1] != device:
            t = torch.tensor(self.manager.exact_of, dtype=torch.long, device=device)
            self._slots = (v, device, t)
        return self._slots[2]

    def exact_slots_of(self, blocks: list[int]) -> list[int]:
        """The exact slots of ``blocks`` (each must have one)."""
        slots = [self.manager.exact_of[b] for b in blocks]
        if min(slots, default=0) < 0:
            raise RuntimeError(f"a block of {blocks} has no exact copy to read")
        return slots

    def encode_blocks(self, layer: int, blocks: list[int]) -> None:
        """Encode the full ``blocks`` of ``layer`` from their exact slots into their codes."""
        if not blocks:
            return
        pool = self.pools[self.tier][layer]
        slots = torch.tensor(self.exact_slots_of(blocks), dtype=torch.long, device=pool.device)
        k, v = pool[0].index_select(0, slots), pool[1].index_select(0, slots)  # [n, H, bt, D]
        n, h, bt, d = k.shape
        g = self.codec.block
        kc, kp = encode(k.reshape(n, h * (bt // g), g, d), self.codec.key)  # per block group
        vc, vp = encode(v, self.codec.value)
        store = self.codes[layer]
        ids = torch.tensor(blocks, dtype=torch.long, device=store.device)
        parts = (kc.reshape(n, h, bt, -1), None if kp is None else kp.reshape(n, h, bt // g, *kp.shape[3:]), vc, vp)  # fmt: skip
        for dst, src in zip(store.tensors(), parts, strict=True):
            if src is not None:
                dst.index_copy_(0, ids, src.to(dst.device, dst.dtype))

    def decode_blocks(self, layer: int, ids: torch.Tensor, k_out, v_out) -> None:
        """Decode blocks ``ids`` of ``layer`` into ``k_out``/``v_out`` [kv_heads, n, bt, D]."""
        store = self.codes[layer]
        ids = ids.to(store.device)
        kc, kp, vc, vp = (t.index_select(0, ids).transpose(0, 1) for t in store.tensors())
        decode(kc, kp, self.codec.key, k_out)
        decode(vc, vp, self.codec.value, v_out)

    def copy_blocks(self, moves) -> None:
        """Copy-on-write moves of partial blocks: their exact slots (they have no codes yet)."""
        from ollm.kv.blocks import BlockMove

        slot = self.manager.exact_of
        super().copy_blocks(
            BlockMove(m.src_tier, slot[m.src_block], m.dst_tier, slot[m.dst_block]) for m in moves
        )

    def layer_kv(self, step: PackedStep, layout: GroupLayout, layer: int) -> CodecLayerKV:
        """This store's layer ``layer`` for one packed step."""
        return CodecLayerKV(step, self, layout, layer)


class CodecLayerKV:
    """One layer's encoded KV for one packed step (see the module docstring); the protocol of
    `kv.packed.PackedLayerKV`."""

    length = 0
    fetcher = None

    def __init__(
        self, step: PackedStep, store: CodecPagedStore, layout: GroupLayout, layer: int
    ) -> None:
        self.step, self.store, self.layout, self.layer = step, store, layout, layer
        self.pool = store.pools[store.tier][layer]  # [2, exact slots, kv_heads, bt, head_dim]
        self._cursor = 0

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: AttentionMask,
        scale: float,
        dense_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Store rows ``[cursor, cursor + T)``'s K/V, encode the blocks they fill, and return the
        attention of their queries ``[1, heads, T, D]`` (``dense_mask`` is ignored)."""
        from ollm.kv.packed import take_rows

        r0, r1 = take_rows(self, q, mask)
        lay, pool = self.layout, self.pool
        slots = self.store.slot_index(pool.device)[lay.row_block[r0:r1].to(pool.device)]
        off = lay.row_offset[r0:r1].to(pool.device)
        pool[0][slots, :, off] = k[0].transpose(0, 1).to(pool.device, pool.dtype)
        pool[1][slots, :, off] = v[0].transpose(0, 1).to(pool.device, pool.dtype)
        spans, filled = [], []
        bt = self.store.block_tokens
        for s in lay.seqs:
            a, b = max(s.row0, r0), min(s.row0 + s.n, r1)
            if a < b:
                p0, p1 = s.start + a - s.row0, s.start + b - s.row0
                if p1 // bt > p0 // bt:  # blocks these rows fill (most decode steps: none)
                    ids = s.block_ids.tolist()
                    filled += [ids[j - s.key0 // bt] for j in range(p0 // bt, p1 // bt)]
                spans.append((s, a, b, p0, p1))
        self.store.encode_blocks(self.layer, filled)  # each block once, when it fills
        enc = self._encoded_parts(q[0], r0, spans, scale)
        out = torch.empty_like(q)
        for i, (s, a, b, p0, p1) in enumerate(spans):
            qs = q[:, :, a - r0 : b - r0]
            o, lse = self._recent_part(qs, s, p0, p1, scale, enc.get(i, (None, None))[0])
            if i in enc:  # merged with the blocks every row sees encoded
                eo, el = enc[i][1]
                o, lse = merge_lse(eo.to(o.device), el.to(o.device), o, lse)
            if mask.sinks is not None:
                o = with_sinks(o, lse, mask.sinks)
            out[:, :, a - r0 : b - r0] = to_device(o, q.device).to(q.dtype)
        return out

    def _encoded_parts(self, q: torch.Tensor, r0: int, spans: list, scale: float) -> dict:
        """Per span index: (the device it attends on, (out, lse) over the blocks every one of
        its rows sees encoded), for all sequences with as many rows in one paged call
        (``kv/codec_paged_attend.py``: codes read in place, never a full-precision copy)."""
        from ollm.kv.codec_paged_attend import block_table, paged_encoded_lse

        bt, w = self.store.block_tokens, self.store.manager.recent_blocks
        codes = self.store.codes[self.layer]
        groups: dict[int, list[tuple[int, int]]] = {}
        for i, (_s, _a, _b, p0, p1) in enumerate(spans):
            ab = max(0, (p0 + 1) // bt - w)  # blocks every row of the span sees encoded
            if ab:
                groups.setdefault(p1 - p0, []).append((i, ab))
        enc: dict = {}
        for rows, items in groups.items():
            dev = self._device(rows, q.device, codes.raw)
            qs = torch.stack(
                [q[:, a - r0 : b - r0] for _, a, b, _, _ in (spans[i] for i, _ in items)]
            )
            blocks = [ab for _, ab in items]
            table = block_table([spans[i][0].block_ids for i, _ in items], blocks, dev)
            o, lse = paged_encoded_lse(qs.to(dev), codes, table, blocks, scale)
            for j, (i, _) in enumerate(items):
                enc[i] = (dev, (o[j : j + 1], lse[j : j + 1]))
        return enc

    def _recent_part(self, q, s: SeqRows, p0: int, p1: int, scale: float, dev=None):
        """(out, lse) of queries at [p0, p1) over their keys after the blocks all of them see
        encoded: blocks [ab, eb) decoded (encoded for the rows past their boundary; a prefill
        chunk's few blocks) and positions [ab * bt, p1) exact, per (row, key) by the boundary."""
        from ollm.layers.attention import AttentionMask as Mask
        from ollm.layers.attention import blocked_attention_lse

        st, bt = self.store, self.store.block_tokens
        w = st.manager.recent_blocks
        ab, eb = max(0, (p0 + 1) // bt - w), max(0, p1 // bt - w)
        nb = -(-p1 // bt)
        h, d, rows = st.kv_heads, st.head_dim, p1 - p0
        dev = dev if dev is not None else self._device(rows, q.device, self.pool)
        ids = s.block_ids
        slots = st.slot_index(self.pool.device)[ids[ab:nb].to(self.pool.device)]
        exact = [
            self.pool[i].index_select(0, slots).transpose(0, 1).reshape(h, -1, d)[:, : p1 - ab * bt]
            for i in (0, 1)
        ]
        ks, vs = (x.unsqueeze(0).to(dev, q.dtype) for x in exact)
        qd = q.to(dev)
        if eb == ab:  # every row sees [ab * bt, p1) exact, causally
            return blocked_attention_lse(
                qd, ks, vs, Mask(ks.shape[2] - rows, rows, ks.shape[2]), scale
            )
        kd = torch.empty(h, eb - ab, bt, d, dtype=st.dtype, device=self.pool.device)
        vd = torch.empty_like(kd)
        st.decode_blocks(self.layer, ids[ab:eb], kd, vd)
        ks = torch.cat([kd.reshape(1, h, -1, d).to(dev, q.dtype), ks], 2)
        vs = torch.cat([vd.reshape(1, h, -1, d).to(dev, q.dtype), vs], 2)
        # Keys are [decoded ab*bt..eb*bt) + [exact ab*bt..p1): a row sees key k decoded iff
        # k < its boundary, exact iff boundary <= k <= its position.
        qpos = torch.arange(p0, p1, device=dev)[:, None]
        bound = ((qpos + 1) // bt - w).clamp_min(0) * bt
        kpos = torch.arange(ab * bt, p1, device=dev)[None]
        dense = torch.cat([kpos[:, : (eb - ab) * bt] < bound, (kpos >= bound) & (kpos <= qpos)], 1)
        total = ks.shape[2]
        return blocked_attention_lse(
            qd, ks, vs, Mask(total - rows, rows, total), scale, dense[None, None]
        )

    def _device(self, rows: int, q_device: torch.device, held: torch.Tensor) -> torch.device:
        """Where a sequence's rows attend: by the CPU over a pool in host memory for a few rows
        (as `PackedLayerKV`), else on the queries' device."""
        from ollm.kv.packed import attend_device

        return attend_device(held, rows, q_device)

    def flush(self) -> bool:
        """Nothing is buffered elsewhere."""
        return False

    def close(self) -> None:
        """The pools belong to the engine."""

    @property
    def nbytes(self) -> int:
        """Bytes of this layer's exact slots and codes."""
        return self.pool.numel() * self.pool.element_size() + self.store.codes[self.layer].nbytes
