"""A KV cache that stores its older tokens encoded (``kv/codecs.py``): the compression is this
object, a conversion of the per-layer KV cache; attention code never sees a codec flag.

Storage: a ``CodeStore`` of encoded blocks for slots [0, encoded) and an exact tail for slots
[encoded, length) (the recent window plus the block being filled), both in the cache's ``home``
(the GPU, pinned RAM or a file). Bytes read per decode step: the encoded prefix plus the tail.

Every query sees the KV as a decode step at its position would (decode-faithful): the keys
before ``codec.boundary(q + 1)`` encoded, the rest exact. So a whole-prompt forward, a chunked
prefill and token-by-token decoding give the same attention, and teacher-forced perplexity
(``ollm eval``) measures what generation sees. A forward of T rows starting at slot s attends
in parts merged by their log-sum-exps: the encoded keys every row sees ([0, boundary(s + 1)):
a decode step reads them in a Triton kernel on the GPU (``kv/codec_triton.py``) or weights the
values without dequantizing them on the CPU (``kv/codec_cpu.py``); a prefill chunk decodes
them chunk by chunk into a small buffer, never as a whole full-precision copy), then the keys
encoded for some rows only and the exact keys: one causal flash call plus banded tiles
(``kv/codec_attend.py``), or with padding masks of [MASK_ROWS, T + recent + block].

Where attention runs: on the device of the queries, except a decode step whose queries come
from another device and the cache was not asked to ``fetch``: then on ``home`` (pinned RAM:
the CPU reads the compressed bytes; only q and the output cross the link). With ``fetch`` (the
plan's ``kv_fetch``) the encoded bytes are copied to the GPU and decoded there.
"""

from __future__ import annotations

import torch

from ollm.kv import codec_cpu, codec_triton
from ollm.kv.codec_attend import recent_lse
from ollm.kv.codecs import CodeStore, KVCodec
from ollm.layers.attention import AttentionMask, blocked_attention_lse, merge_lse, with_sinks
from ollm.layers.attention import _attend_lse as attend_lse  # unmasked, with its log-sum-exp
from ollm.planning.footprint import CODEC_CPU_CHUNK, CODEC_GPU_CHUNK, codec_decoded_slots
from ollm.runtime.pinned import unpin
from ollm.runtime.uva import to_device
from ollm.tiers import KvTier

# Slots decoded per chunk: CPU chunks stay in cache; GPU chunks are few large kernels.
CPU_CHUNK = CODEC_CPU_CHUNK
GPU_CHUNK = CODEC_GPU_CHUNK
MASK_ROWS = 2048  # query rows per mask of the partly encoded and exact parts


class CodecWorkspace:
    """Buffers shared by the compressed caches of one request (one layer attends at a time):
    decoded K/V chunks per device, and on an accelerator a store for encoded bytes copied from
    RAM (``fetch`` and prefill of RAM-homed layers). ``planned`` (device type -> slots): the
    decoded buffers' size there, allocated once (``planning.footprint.codec_decoded_slots``, what
    the planner counts); elsewhere a chunk, grown to a larger request."""

    def __init__(self, planned: dict[str, int] | None = None) -> None:
        self.planned = dict(planned or {})
        self._decoded: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._scores: dict[tuple, torch.Tensor] = {}
        self._staging: dict[tuple, CodeStore] = {}

    def decoded(self, shape: tuple[int, int, int, int], dtype, device) -> tuple:
        """(k, v) views [B, H, n, D] of buffers at least ``n`` slots long."""
        b, h, n, d = shape
        key = (b, h, d, dtype, str(device))
        have = self._decoded.get(key)
        if have is None or have[0].shape[2] < n:
            kind = torch.device(device).type
            floor = self.planned.get(kind, CPU_CHUNK if kind == "cpu" else GPU_CHUNK)
            have = None  # the old pair is freed before its replacement is made
            self._decoded.pop(key, None)
            cap = max(n, floor)
            have = tuple(torch.empty((b, h, cap, d), dtype=dtype, device=device) for _ in "kv")
            self._decoded[key] = have  # type: ignore[assignment]
        return have[0][:, :, :n], have[1][:, :, :n]

    def scores(self, shape: tuple[int, int, int, int], device) -> torch.Tensor:
        """One float32 [B, H, n, D] buffer (the CPU decode step's decoded keys), >= CPU_CHUNK."""
        b, h, n, d = shape
        key = (b, h, d, str(device))
        have = self._scores.get(key)
        if have is None or have.shape[2] < n:
            self._scores.pop(key, None)
            have = torch.empty((b, h, max(n, CPU_CHUNK), d), dtype=torch.float32, device=device)
            self._scores[key] = have
        return have[:, :, :n]

    def staging(self, store: CodeStore, device) -> CodeStore:
        """A store like ``store`` on ``device`` (grown to its slots; reused by every layer)."""
        kc = store.kc
        key = (store.codec, kc.shape[0], kc.shape[1], store.dtype, str(device))
        have = self._staging.get(key)
        if have is None or have.slots < store.slots:
            b, h = kc.shape[:2]
            d = store.head_dim
            have = CodeStore(store.codec, b, h, store.slots, d, store.dtype, device)
            self._staging[key] = have
        return have


class CompressedKVCache:
    """LayerKVCache protocol (``attend``, ``length``, ``trim``, ``nbytes``, ``flush``, ``close``)
    over encoded blocks plus an exact tail, for a full-attention layer (no window)."""

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        codec: KVCodec,
        home: torch.device | str,
        workspace: CodecWorkspace,
        storage=None,
        decode_tokens: int = 8,
        fetch: bool = False,
        stats=None,
        tail_device: torch.device | str | None = None,
    ) -> None:
        self.codec, self.dtype, self.capacity = codec, dtype, capacity
        self.home = torch.device(home)
        self.workspace, self.decode_tokens, self.fetch = workspace, decode_tokens, fetch
        self.stats = stats  # an IOStats: encoded bytes copied to the GPU count as host->GPU
        self.store = self._new_store(batch, kv_heads, capacity, head_dim, storage)
        self._pinned = storage is not None
        # The exact tail (a few hundred slots) sits where decode attends (``tail_device``, e.g.
        # the GPU for RAM-homed blocks): a copy of it each step would be a pageable, blocking one.
        tail = (batch, kv_heads, min(capacity, codec.recent + codec.block), head_dim)
        where = self.home if tail_device is None else torch.device(tail_device)
        self.tail_k = torch.empty(tail, dtype=dtype, device=where)
        self.tail_v = torch.empty(tail, dtype=dtype, device=where)
        # Attention sinks (``KVCodec.sink_slots``): the first slots' exact values, kept beside
        # their codes; every read of encoded slots sees these in their place.
        self.sink_slots = min(getattr(codec, "sink_slots", 0), capacity)
        sink = (batch, kv_heads, self.sink_slots, head_dim)
        self.sink_k = torch.empty(sink, dtype=dtype, device=where)
        self.sink_v = torch.empty(sink, dtype=dtype, device=where)
        self.length = self.encoded = 0
        self._copied: torch.cuda.Event | None = None  # writes to RAM the CPU must wait for

    def _new_store(self, batch, kv_heads, capacity, head_dim, storage):
        """The store of encoded slots (``kv/temporal.py`` keeps a ring of its middle tier)."""
        args = (self.codec, batch, kv_heads, capacity, head_dim, self.dtype, self.home, storage)
        return CodeStore(*args)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: AttentionMask,
        scale: float,
        dense_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Append this forward's keys/values, then attend ``q`` over everything cached."""
        t = k.shape[2]
        start, end = self.length, self.length + t
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {self.capacity}")
        if mask.window is not None:
            raise RuntimeError("compressed KV caches hold full-attention layers only")
        work = q.device
        if t <= self.decode_tokens and work != self.home and not self.fetch:
            work = self.home  # attend where the KV lives: only q and the output move
        if work.type == "cpu":
            self._sync()
        e0, e1 = self.encoded, self.codec.boundary(end)
        # The exact slots [e0, end): the stored tail, then this forward's.
        ek = torch.cat([self.tail_k[:, :, : start - e0].to(work), k.to(work, self.dtype)], 2)
        ev = torch.cat([self.tail_v[:, :, : start - e0].to(work), v.to(work, self.dtype)], 2)
        self.store.write(e0, ek[:, :, : e1 - e0], ev[:, :, : e1 - e0])
        if e0 < min(e1, self.sink_slots):  # sinks being encoded: keep their exact values
            n = min(e1, self.sink_slots)
            self.sink_k[:, :, e0:n].copy_(ek[:, :, : n - e0])
            self.sink_v[:, :, e0:n].copy_(ev[:, :, : n - e0])
        out = self._attend(q.to(work), ek, ev, (e0, e1, start, end), mask, scale)
        n = end - e1
        self.tail_k[:, :, :n].copy_(ek[:, :, e1 - e0 :], non_blocking=True)
        self.tail_v[:, :, :n].copy_(ev[:, :, e1 - e0 :], non_blocking=True)
        if work.type == "cuda" and self.home.type == "cpu":
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(work))
        self.length, self.encoded = end, e1
        return to_device(out, q.device)

    def _attend(self, q, ek, ev, span, mask: AttentionMask, scale: float) -> torch.Tensor:
        """Decode-faithful attention of q (slots [start, end)) in the three parts above."""
        e0, e1, start, end = span
        t = end - start
        a = self.codec.boundary(start + 1)  # encoded for every row of this forward
        src = self._source(q.device, e1)
        out, lse = self._attend_encoded(q, src, a, mask, scale)
        if t == 1 and mask.key_keep is None:  # one query sees every exact key, no partial part
            if end > a:
                o, s = attend_lse(q, ek[:, :, a - e0 :], ev[:, :, a - e0 :], scale)
                out, lse = (o, s) if out is None else merge_lse(out, lse, o, s)
            return out if mask.sinks is None else with_sinks(out, lse, mask.sinks)
        if mask.key_keep is None:  # causal flash + banded tiles, O(rows) (kv/codec_attend.py)
            o, s = recent_lse(q, ek, ev, src, span, a, self.codec, scale, self.workspace)
            out, lse = (o, s) if out is None else merge_lse(out, lse, o, s)
            return out if mask.sinks is None else with_sinks(out, lse, mask.sinks)
        b, h, _, d = ek.shape
        kb = vb = None
        if e1 > a:  # the keys encoded for some rows of this forward only
            kb, vb = self.workspace.decoded((b, h, e1 - a, d), self.dtype, q.device)
            src.read(a, e1, kb, vb)
        outs, lses = [], []
        for r0 in range(0, t, MASK_ROWS):  # masks of [MASK_ROWS, keys], not [T, keys]
            r1 = min(t, r0 + MASK_ROWS)
            o, s = self._attend_rows(q[:, :, r0:r1], ek, ev, kb, vb, span, a, r0, r1, mask, scale)
            if out is not None:
                o, s = merge_lse(out[:, :, r0:r1], lse[:, :, r0:r1], o, s)
            outs.append(o)
            lses.append(s)
        out, lse = torch.cat(outs, 2), torch.cat(lses, 2)
        return out if mask.sinks is None else with_sinks(out, lse, mask.sinks)

    def _attend_encoded(self, q, src, a: int, mask: AttentionMask, scale: float):
        """(out, lse) of q over the encoded slots [0, a) every row sees: a decode step on the
        GPU reads the codes in a Triton kernel (``kv/codec_triton.py``), anything else decodes
        them chunk by chunk; (None, None) when there are none. Exact sinks: attended apart,
        then the slots [sinks, a) as a store of their own (the kernels' format unchanged)."""
        s = min(self.sink_slots, a)
        if not s or mask.key_keep is not None:  # masked: ``_Sinked.read`` puts them back
            return self._attend_codes(q, src, a, mask, scale)
        dev = q.device
        out, lse = attend_lse(
            q, self.sink_k[:, :, :s].to(dev), self.sink_v[:, :, :s].to(dev), scale
        )
        if a > s:
            o, l2 = self._attend_codes(q, src.inner.shifted(s), a - s, mask, scale)
            out, lse = merge_lse(out, lse, o, l2)
        return out, lse

    def _attend_codes(self, q, src, a: int, mask: AttentionMask, scale: float):
        """``_attend_encoded`` over codes only (no exact sinks)."""
        if a and mask.key_keep is None:
            fast = codec_triton.fast_lse(q, src, a, scale, self._encoded_torch)
            if fast is not None:
                return fast
        return self._encoded_torch(q, src, a, scale, mask)

    def _encoded_torch(self, q, src: CodeStore, a: int, scale: float, mask=None, start: int = 0):
        """``_attend_encoded`` decoding ``CPU_CHUNK`` / ``GPU_CHUNK`` slots at a time into the
        workspace (never the whole prefix at full precision), one attention per chunk, over the
        encoded slots [start, a) (``start`` block-aligned)."""
        out = lse = None
        chunk = CPU_CHUNK if q.device.type == "cpu" else GPU_CHUNK
        b, h, d = q.shape[0], self.tail_k.shape[1], q.shape[3]
        plain = mask is None or mask.key_keep is None
        small = q.shape[2] <= self.decode_tokens
        fast = isinstance(src, CodeStore) and not start  # a ring (kv/temporal.py) reads pieces
        if a and fast and plain and q.device.type == "cpu" and small:
            # a CPU decode step: values weighted without being dequantized (kv/codec_cpu.py)
            def buffer(n: int) -> torch.Tensor:
                return self.workspace.scores((b, h, n, d), q.device)

            return codec_cpu.encoded_lse(q, src, a, scale, chunk, buffer)
        for c0 in range(start, a, chunk):
            c1 = min(a, c0 + chunk)
            kb, vb = self.workspace.decoded((b, h, c1 - c0, d), self.dtype, q.device)
            src.read(c0, c1, kb, vb)
            if plain:
                o, s = attend_lse(q, kb, vb, scale)
            else:
                o, s = blocked_attention_lse(q, kb, vb, mask, scale, None, c0)
            out, lse = (o, s) if out is None else merge_lse(out, lse, o, s)
        return out, lse

    def _attend_rows(self, qr, ek, ev, kb, vb, span, a, r0, r1, mask, scale):
        """(out, lse) of query rows [r0, r1) of this forward over the keys [a, start + r1)
        they can see: exact (``ek``/``ev`` hold slots [e0, end)) or encoded (``kb``/``vb``
        hold slots [a, e1) decoded), chosen per (row, key) by the boundary."""
        e0, e1, start, _ = span
        lo, hi = start + r0, start + r1
        enc_mask, exact_mask = self._masks(lo, hi, a, min(e1, hi), mask.key_keep, qr.device)
        shifted = AttentionMask(lo - a, r1 - r0, hi - a)  # keys [a, hi) as slots [0, hi - a)
        parts = [(ek[:, :, a - e0 : hi - e0], ev[:, :, a - e0 : hi - e0], exact_mask)]
        if kb is not None and min(e1, hi) > a:
            n = min(e1, hi) - a
            parts.append((kb[:, :, :n], vb[:, :, :n], enc_mask))
        out = lse = None
        for kp, vp, m in parts:
            if kp.shape[2] == 0:  # recent 0: a whole block just encoded leaves no exact key
                continue
            o, s = blocked_attention_lse(qr, kp, vp, shifted, scale, m)
            out, lse = (o, s) if out is None else merge_lse(out, lse, o, s)
        return out, lse

    def _masks(self, start, end, a, e1, keep, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks [B or 1, 1, rows, keys] of query slots [start, end) over the partly encoded
        keys [a, e1) and the exact keys [a, end): a row sees key k encoded iff
        k < boundary(q + 1)."""
        qpos = torch.arange(start, end, device=device)[:, None]
        kpos = torch.arange(a, end, device=device)[None, :]
        g, r = self.codec.block, self.codec.recent
        bq = torch.div((qpos + 1 - r).clamp_min(0), g, rounding_mode="floor") * g
        allowed = (kpos <= qpos)[None, None]
        if keep is not None:
            # padding keys are hidden; a padding query sees itself (never a row of NaN)
            keep = keep.to(device)[:, None, None, a:end]
            allowed = (allowed & keep) | (kpos == qpos)[None, None]
        enc = (kpos < bq)[None, None]
        return (allowed & enc)[..., : e1 - a], allowed & ~enc

    def _source(self, device: torch.device, upto: int) -> CodeStore:
        """The encoded slots [0, upto) readable on ``device``: the store, or a copy of its bytes
        in the workspace's staging store (compressed bytes cross the link, not decoded ones)."""
        if device == self.home or upto == 0:
            return self._sinked(self.store)
        staging = self.workspace.staging(self.store, device)
        staging.copy_from(self.store, 0, upto)
        if self.stats is not None and device.type == "cuda":
            self.stats.add(bytes_h2d=self.store.range_nbytes(0, upto))
        return self._sinked(staging)

    def _sinked(self, store: CodeStore):
        """``store``, or with exact sinks a reader of it that puts them in place."""
        return _Sinked(store, self.sink_k, self.sink_v) if self.sink_slots else store

    def _sync(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None

    def trim(self, length: int) -> None:
        """Forget slots from ``length`` on. Encoded slots a query at ``length`` sees exact,
        [boundary(length), encoded), come back to the tail decoded from their blocks (the exact
        values are gone); exact tail slots below ``length`` stay, moved after them."""
        length = min(self.length, max(0, length))
        e = self.codec.boundary(length)
        if e < self.encoded:
            self._sync()
            keep = min(length, self.encoded)  # encoded slots [e, keep) return decoded
            exact = length - keep  # tail slots [encoded, length): shifted by encoded - e
            if exact:
                for t in (self.tail_k, self.tail_v):
                    t[:, :, keep - e : keep - e + exact] = t[:, :, :exact].clone()
            g = self.codec.block
            b, h, _, d = self.tail_k.shape
            hi = -(-keep // g) * g
            kb, vb = self.workspace.decoded((b, h, hi - e, d), self.dtype, self.home)
            self._sinked(self.store).read(e, hi, kb, vb)
            self.tail_k[:, :, : keep - e] = kb[:, :, : keep - e]
            self.tail_v[:, :, : keep - e] = vb[:, :, : keep - e]
            self.encoded = e
        self.length = length

    @property
    def nbytes(self) -> int:
        """Bytes held: encoded store plus exact tail and sinks."""
        exact = self.tail_k.numel() + self.sink_k.numel()
        return self.store.nbytes + 2 * exact * self.tail_k.element_size()

    def bytes_read(self) -> int:
        """Bytes a decode step reads now: the encoded prefix (parameters included; the sinks'
        codes are not read), the exact tail and sinks (``CodeStore.range_nbytes``)."""
        s = min(self.sink_slots, self.encoded)
        exact = 2 * (self.length - self.encoded + s) * self.tail_k[:, :, :1].numel()
        codes = self.store.range_nbytes(s, self.encoded)
        return codes + exact * self.tail_k.element_size()

    def flush(self) -> bool:
        """Nothing is buffered elsewhere."""
        return False

    def __len__(self) -> int:
        return self.length

    def close(self) -> None:
        if self.home.type == "cuda":
            torch.cuda.synchronize(self.home)
        elif self._copied is not None:
            self._sync()
        if self._pinned:
            unpin(self.store.raw)


class _Sinked:
    """Reads a CodeStore's slots with the exact sinks in place of their decoded codes (the
    multi-row paths that decode slots into buffers: ``src.read``)."""

    def __init__(self, inner: CodeStore, sink_k: torch.Tensor, sink_v: torch.Tensor) -> None:
        self.inner, self.sink_k, self.sink_v = inner, sink_k, sink_v

    def read(self, a: int, b: int, k_out: torch.Tensor, v_out: torch.Tensor) -> None:
        self.inner.read(a, b, k_out, v_out)
        n = min(b, self.sink_k.shape[2]) - a
        if n > 0:
            k_out[:, :, :n].copy_(self.sink_k[:, :, a : a + n])
            v_out[:, :, :n].copy_(self.sink_v[:, :, a : a + n])


class CompressedCaches:
    """Builds the compressed caches of one request: for each full-attention layer the codec of
    its KV tier (``codec_for_tier``: ``auto`` leaves device-tier KV exact), homed where the plan
    puts that layer's KV (the KV device, pinned RAM or a file of the request's KVDirectory).
    Layers with a window keep their exact caches (bounded by the window, not the context)."""

    def __init__(
        self,
        spec,
        dtype: torch.dtype,
        kv_codec: str,
        recent: int,
        batch: int,
        capacity: int,
        stats=None,
        evict: tuple[str, str] = ("none", "50%"),
        forward: int | None = None,
    ) -> None:
        from ollm.kv.evict import parse_eviction

        self.spec, self.dtype, self.kv_codec, self.recent = spec, dtype, kv_codec, recent
        self.batch, self.capacity, self.stats = batch, capacity, stats
        self.evict = parse_eviction(*evict)  # kv_evict / kv_keep (kv/evict.py)
        self.forward = forward or capacity  # tokens of the largest forward (a prefill chunk)
        self.workspace = CodecWorkspace()

    def _evicting(self, index: int, placement):
        """An evicting cache (``kv/evict.py``); with a codec its older kept slots encoded
        (``kv/evict_codec.py``; the config refuses codecs that are not one per slot)."""
        from ollm.kv.codecs import parse_kv_codec
        from ollm.kv.evict import EvictingKVCache

        s = self.spec
        args = (self.batch, s.num_kv_heads, s.head_dim, self.capacity, self.dtype)
        full = [i for i, layer in enumerate(s.layers) if layer.window is None]
        policy = self.evict.for_layer(full.index(index), len(full))
        codec = parse_kv_codec(self.kv_codec, self.recent)
        if codec is None:
            return EvictingKVCache(*args, placement.kv_device, policy, self.forward)
        from ollm.kv.evict_codec import EncodedEvictingKVCache

        return EncodedEvictingKVCache(
            *args, placement.kv_device, policy, self.forward, codec, self.workspace
        )

    def make(self, index: int, placement, tier: KvTier, disk=None):
        """The compressed cache of layer ``index`` (its ``LayerPlacement`` and KV ``tier``), or
        None where it stays exact."""
        from ollm.kv.codecs import codec_for_tier
        from ollm.runtime.pinned import pinned_empty

        if self.spec.layers[index].window is not None:
            return None
        s = self.spec
        if self.evict is not None:  # bounded by its budget: kept where the layer's KV is used
            return self._evicting(index, placement)
        home_tier = KvTier(tier)
        codec = codec_for_tier(self.kv_codec, home_tier, self.recent)
        if codec is None:
            return None
        kind = CompressedKVCache
        extra = {}
        if not isinstance(codec, KVCodec):  # a temporal schedule (kv/temporal.py)
            from ollm.kv.temporal import TemporalKVCache

            kind, extra = TemporalKVCache, {"forward": self.forward}
        exec_device = torch.device(placement.exec_device)
        on_gpu = exec_device.type != "cpu"  # where prefill forwards of ``forward`` rows run
        self.workspace.planned.setdefault(
            exec_device.type,
            codec_decoded_slots(self.forward, self.capacity, codec.block, codec.recent, on_gpu),
        )
        if home_tier == KvTier.DEVICE:
            home, storage = placement.kv_device, None
        elif home_tier == KvTier.DISK:
            home, storage = "cpu", disk.storage
        else:
            home = "cpu"
            storage = (
                (lambda n: pinned_empty(n, exec_device)) if exec_device.type == "cuda" else None
            )
        return kind(
            self.batch,
            s.num_kv_heads,
            s.head_dim,
            self.capacity,
            self.dtype,
            codec,
            home,
            self.workspace,
            storage,
            fetch=True,
            stats=self.stats,
            tail_device=placement.kv_device,
            **extra,
        )
