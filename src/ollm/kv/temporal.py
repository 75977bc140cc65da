"""Temporal KV tiers (issue 17 part 2): blocks re-encoded to a lower precision as they age.

``"4k:bf16,32k:int8,rest:int4"``: the newest 4k tokens exact, tokens up to 32k old int8 (keys
per channel, values per token, as ``kv/codecs.py``), older ones int4, re-encoded from their int8
codes (the exact values are gone by then). A ``TemporalKVCache`` is a ``CompressedKVCache``
whose middle tier sits in a ring of ``temporal_ring_slots`` (the 28k-token span plus one
forward), and whose oldest blocks sit in a second store in the deepest codec: bytes held and
read per step are the deep codec's for all but the newest ~32k tokens.

Which version a query sees: the middle/exact boundary is decode-faithful per row (as in
``kv/compressed.py``); the deep boundary is the one of the forward's first row (a decode step
sees exactly what decode sees; later rows of a prefill chunk see up to one chunk of blocks still
in the middle tier that decode would already read in the deepest codec, never less precise)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ollm.kv.codecs import KINDS, CodeStore, KVCodec, SideCodec
from ollm.kv.compressed import CompressedKVCache
from ollm.layers.attention import merge_lse
from ollm.planning.footprint import temporal_ring_slots
from ollm.runtime.pinned import unpin

_EXACT = ("bf16", "fp16", "f16", "exact", "none")


@dataclass(frozen=True)
class TemporalCodec:
    """A schedule of two codecs: ``mid`` (its ``recent``: the exact window) and ``deep`` (its
    ``recent``: the age where blocks leave the middle tier)."""

    mid: KVCodec
    deep: KVCodec

    @property
    def block(self) -> int:
        return self.mid.block

    @property
    def recent(self) -> int:
        return self.mid.recent

    def boundary(self, n: int) -> int:
        """End of the encoded slots (either tier) when ``n`` tokens are cached."""
        return self.mid.boundary(n)

    def bytes_per_token(self, head_dim: int, elem_bytes: int) -> float:
        """Stored bytes per token and KV head of the deep tier (the middle one is a ring)."""
        return self.deep.bytes_per_token(head_dim, elem_bytes)

    @property
    def cpu_attn_cost(self) -> float:
        return max(self.mid.cpu_attn_cost, self.deep.cpu_attn_cost)

    def ring_slots(self, forward: int, capacity: int) -> int:
        span = self.deep.recent - self.mid.recent
        return temporal_ring_slots(span, forward, self.block, capacity)

    def describe(self) -> str:
        m, d = self.mid, self.deep
        return f"exact {m.recent}, {m.key.kind} to {d.recent}, then {d.key.kind}"


def _tokens(text: str) -> int:
    """``4k`` -> 4096, ``1m`` -> 1048576, ``300`` -> 300."""
    scale = {"k": 1 << 10, "m": 1 << 20}.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def parse_kv_temporal(spec: str, group: int = 32) -> KVCodec | TemporalCodec:
    """``"4k:bf16,32k:int8,rest:int4"`` -> a TemporalCodec; ``"4k:bf16,rest:int4"`` -> a
    KVCodec with a 4k exact window. ValueError with one line on a schedule that cannot work."""
    bad = f"bad KV schedule {spec!r}"
    tiers = []
    for part in str(spec).lower().split(","):
        age, sep, kind = (x.strip() for x in part.partition(":"))
        kind = "none" if kind in _EXACT else kind
        if not sep or kind not in KINDS:
            raise ValueError(f"{bad}: use AGE:KIND,...,rest:KIND with kinds bf16, {KINDS[1:]}")
        tiers.append((age, kind))
    if tiers[-1][0] != "rest" or any(age == "rest" for age, _ in tiers[:-1]):
        raise ValueError(f"{bad}: the last tier, and only it, is rest:KIND")
    try:
        ages = [_tokens(age) for age, _ in tiers[:-1]]
    except ValueError:
        raise ValueError(f"{bad}: ages are token counts such as 4096, 4k or 1m") from None
    kinds = [kind for _, kind in tiers]
    if len(tiers) < 2 or kinds[0] != "none" or "none" in kinds[1:]:
        raise ValueError(f"{bad}: the first tier, and only it, is the exact window (4k:bf16)")
    if len(tiers) > 3:
        raise ValueError(f"{bad}: at most three tiers (exact, one middle codec, the rest)")
    if len(ages) == 2 and ages[1] - ages[0] < group:
        raise ValueError(f"{bad}: each tier spans at least one block ({group} tokens)")

    def codec(kind: str, recent: int) -> KVCodec:
        return KVCodec(SideCodec(kind, "channel", group), SideCodec(kind, "token", group), recent)

    mid = codec(kinds[1], ages[0])
    if len(tiers) == 2 or kinds[1] == kinds[2]:
        return mid
    deep = codec(kinds[2], ages[1])
    if deep.bytes_per_token(128, 2) > mid.bytes_per_token(128, 2):
        raise ValueError(f"{bad}: older tiers cannot take more bytes than newer ones")
    return TemporalCodec(mid, deep)


class RingStore:
    """Encoded slots of a sliding range kept in a CodeStore of ``slots`` (whole blocks): slot
    ``s`` at ``s % slots``; reads and writes of whole blocks split where the ring wraps."""

    def __init__(self, inner: CodeStore, slots: int | None = None) -> None:
        self.inner, self.codec, self.slots = inner, inner.codec, slots or inner.slots

    @property
    def raw(self) -> torch.Tensor:
        return self.inner.raw

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes

    def parts(self, a: int, b: int) -> list[tuple[int, int, int]]:
        """(slot, ring position, length) pieces of [a, b)."""
        out = []
        while a < b:
            p = a % self.slots
            n = min(b - a, self.slots - p)
            out.append((a, p, n))
            a += n
        return out

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for s, p, n in self.parts(start, start + k.shape[2]):
            i = s - start
            self.inner.write(p, k[:, :, i : i + n], v[:, :, i : i + n])

    def read(self, a: int, b: int, k_out: torch.Tensor, v_out: torch.Tensor) -> None:
        for s, p, n in self.parts(a, b):
            i = s - a
            self.inner.read(p, p + n, k_out[:, :, i : i + n], v_out[:, :, i : i + n])

    def range_nbytes(self, a: int, b: int) -> int:
        return sum(self.inner.range_nbytes(p, p + n) for _, p, n in self.parts(a, b))


class TemporalKVCache(CompressedKVCache):
    """A ``CompressedKVCache`` over a ``TemporalCodec``: exact tail, middle tier in a ring,
    deepest tier in its own store; blocks move to the deep store (decoded from their middle
    codes, encoded again) once they reach its age."""

    def __init__(self, batch, kv_heads, head_dim, capacity, dtype, codec: TemporalCodec, home,
                 workspace, storage=None, forward: int | None = None, **kw) -> None:  # fmt: skip
        self.temporal = codec
        self._ring_slots = codec.ring_slots(forward or capacity, capacity)
        super().__init__(batch, kv_heads, head_dim, capacity, dtype, codec.mid, home, workspace,
                         storage, **kw)  # fmt: skip
        deep = max(codec.block, capacity - codec.deep.recent)  # what ever gets that old
        args = (codec.deep, batch, kv_heads, deep, head_dim, dtype, self.home, storage)
        self.deep = CodeStore(*args)
        self.deep_len = 0  # slots [0, deep_len) in the deep store, [deep_len, encoded) the ring

    def _new_store(self, batch, kv_heads, capacity, head_dim, storage):
        args = (self.codec, batch, kv_heads, self._ring_slots, head_dim, self.dtype, self.home)
        return RingStore(CodeStore(*args, storage))

    def attend(self, q, k, v, mask, scale, dense_mask):
        """Age the blocks the first row sees in the deep codec, then attend as the parent."""
        start, end = self.length, self.length + k.shape[2]
        self._age(self.temporal.deep.boundary(start + 1))
        if self.codec.boundary(end) - self.deep_len > self.store.slots:
            raise RuntimeError(
                f"a forward of {k.shape[2]} tokens overflows the KV schedule's middle tier "
                f"({self.store.slots} slots, sized for the plan's prefill chunk)"
            )
        return super().attend(q, k, v, mask, scale, dense_mask)

    def _age(self, upto: int) -> None:
        """Move slots [deep_len, upto) from the ring to the deep store."""
        if upto <= self.deep_len:
            return
        self._sync()
        b, h, _, d = self.tail_k.shape
        step = max(self.codec.block, 2048 // self.codec.block * self.codec.block)
        for c0 in range(self.deep_len, upto, step):
            c1 = min(upto, c0 + step)
            kb, vb = self.workspace.decoded((b, h, c1 - c0, d), self.dtype, self.home)
            self.store.read(c0, c1, kb, vb)
            self.deep.write(c0, kb, vb)
        self.deep_len = upto

    def _attend_encoded(self, q, src, a: int, mask, scale: float):
        """The deep slots [0, deep_len) (the parent's kernels), then the ring's [deep_len, a)."""
        d = self.deep_len
        out = lse = None
        if d:
            out, lse = super()._attend_encoded(q, self._deep_source(q.device), d, mask, scale)
        if a > d:
            o, s = self._encoded_torch(q, src, a, scale, mask, start=d)
            out, lse = (o, s) if out is None else merge_lse(out, lse, o, s)
        return out, lse

    def _deep_source(self, device: torch.device) -> CodeStore:
        if device == self.home:
            return self.deep
        staging = self.workspace.staging(self.deep, device)
        staging.copy_from(self.deep, 0, self.deep_len)
        if self.stats is not None and device.type == "cuda":
            self.stats.add(bytes_h2d=self.deep.range_nbytes(0, self.deep_len))
        return staging

    def _source(self, device: torch.device, upto: int):
        """The ring readable on ``device``: its live slots [deep_len, upto) copied to a staging
        ring of the same size when the queries are elsewhere."""
        if device == self.home or upto <= self.deep_len:
            return self.store
        staging = self.workspace.staging(self.store.inner, device)
        for _, p, n in self.store.parts(self.deep_len, upto):
            staging.copy_from(self.store.inner, p, p + n)
        if self.stats is not None and device.type == "cuda":
            self.stats.add(bytes_h2d=self.store.range_nbytes(self.deep_len, upto))
        return RingStore(staging, self.store.slots)  # a larger staging store: same positions

    def trim(self, length: int) -> None:
        """As the parent; below the deep boundary, blocks the ring still holds move back."""
        length = min(self.length, max(0, length))
        d = self.temporal.deep.boundary(length)
        if d < self.deep_len:
            if d < self.encoded - self.store.slots:
                raise RuntimeError("trim below what the KV schedule's middle tier still holds")
            self.deep_len = d
        super().trim(length)

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.deep.nbytes

    def bytes_read(self) -> int:
        tail = 2 * (self.length - self.encoded) * self.tail_k[:, :, :1].numel()
        ring = self.store.range_nbytes(self.deep_len, self.encoded)
        return self.deep.range_nbytes(0, self.deep_len) + ring + tail * self.tail_k.element_size()

    def close(self) -> None:
        super().close()
        if self._pinned:
            unpin(self.deep.raw)
