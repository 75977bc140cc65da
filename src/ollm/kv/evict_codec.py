"""KV eviction over encoded slots (issue 17): ``--kv-codec int4 --kv-evict h2o --kv-keep 50%``.

Layout. Eviction removes single slots, each head its own, so every stored slot carries its own
codes: keys and values are both quantized per token, in groups of ``group`` channels, with the
codec's kinds (int8, int4, fp8). The plain codec's keys per channel (KIVI) share one (lo, scale)
per channel over a block of 32 tokens; eviction would leave holes in such blocks, and closing
them means decoding and re-encoding (errors that compound, and a slot that changes under the
queries that already read it). KIVI's per-channel keys matter at 2 bits; at 4 and 8 bits
per-token keys are close to exact (KIVI, table 1), and groups of 32 channels bound an outlier
channel's reach to its group. ``docs/benchmarks.md`` has the measured cost.

Storage: slots [0, enc) encoded (codes and float16 parameters), slots [enc, kept) exact in a
tail holding the ``recent`` newest positions (the codec's window) plus a forward's. The policy's
recent window is at least the codec's, so the tail is kept in every head: all heads have the
same count of encoded slots, and eviction chooses among encoded slots only.

Decode-faithful: a query at position q reads the key at position p decoded iff
p < q + 1 - recent, as a decode step at q would. After each forward, tail slots that the next
query reads decoded are encoded (settled). Within a forward of several rows, tail slots that
later rows read decoded are encoded for those rows (per-token codes depend on the slot alone:
the same values they are stored as when settled). Attention decodes the encoded slots into a
workspace buffer shared by the request's layers (``CodecWorkspace``), not into the cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ollm.kv.codecs import KVCodec, SideCodec, decode, encode
from ollm.kv.evict import EvictingKVCache, EvictionPolicy


class EncodedEvictingKVCache(EvictingKVCache):
    """An ``EvictingKVCache`` whose slots older than the codec's recent window are stored
    encoded per token (``codec``: its kinds and group; its ``recent`` exact window)."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype,
                 device, policy: EvictionPolicy, forward: int, codec: KVCodec,
                 workspace=None) -> None:  # fmt: skip
        self.codec, self.dtype, self.recent = codec, dtype, codec.recent
        self.sides = (SideCodec(codec.key.kind, "token", codec.key.group), codec.value)
        self.workspace = workspace
        self.enc = 0  # slots [0, enc) encoded; [enc, kept) in the exact tail
        super().__init__(batch, kv_heads, head_dim, capacity, dtype, device, policy, forward,
                         min_window=codec.recent)  # fmt: skip

    def _alloc(self, shape, dtype, device, forward: int) -> None:
        b, h, slots, d = shape
        probe = torch.zeros(b, h, 1, d, dtype=dtype, device=device)
        self.store: list[torch.Tensor | None] = []  # k codes, k params, v codes, v params
        for side in self.sides:
            codes, params = encode(probe, side)
            for x in (codes, params):
                self.store.append(None if x is None else x.new_empty((b, h, slots, *x.shape[3:])))
        tail = (b, h, min(slots, self.recent + forward), d)
        self.tail_k = torch.empty(tail, dtype=dtype, device=device)
        self.tail_v = torch.empty(tail, dtype=dtype, device=device)

    def _grow(self, n: int) -> None:
        """A forward larger than planned: more slots for codes and the tail."""
        extra = n - self.pos.shape[2]
        self.pos, self.score = (F.pad(x, (0, extra)) for x in (self.pos, self.score))
        self.store = [None if x is None else _pad_slots(x, extra) for x in self.store]
        self.tail_k, self.tail_v = (_pad_slots(x, extra) for x in (self.tail_k, self.tail_v))

    @property
    def tail(self) -> int:
        """Exact slots: the newest positions, the same in every head."""
        return self.kept - self.enc

    def _append(self, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        a, b = self.tail, self.tail + (n - self.kept)
        if b > self.tail_k.shape[2]:
            grow = b - self.tail_k.shape[2]
            self.tail_k, self.tail_v = (_pad_slots(x, grow) for x in (self.tail_k, self.tail_v))
        self.tail_k[:, :, a:b] = k
        self.tail_v[:, :, a:b] = v

    def _roundtrip(self, x: torch.Tensor, side: SideCodec) -> torch.Tensor:
        """``x`` as its stored codes decode."""
        codes, params = encode(x, side)
        return decode(codes, params, side, torch.empty_like(x))

    def _keys(self, dtype):
        """(K, V) of the kept slots (encoded ones decoded into the workspace, then the exact
        tail) and, when rows of this forward read tail slots decoded, (enc, K, V, recent) of
        the tail decoded."""
        b, h, _, d = self.tail_k.shape
        n, e = self.kept, self.enc
        if self.workspace is not None:
            k, v = self.workspace.decoded((b, h, n, d), self.dtype, self.tail_k.device)
        else:
            k, v = (self.tail_k.new_empty((b, h, n, d)) for _ in "kv")
        kc, kp, vc, vp = self.store
        decode(kc[:, :, :e], None if kp is None else kp[:, :, :e], self.sides[0], k[:, :, :e])
        decode(vc[:, :, :e], None if vp is None else vp[:, :, :e], self.sides[1], v[:, :, :e])
        k[:, :, e:] = self.tail_k[:, :, : n - e]
        v[:, :, e:] = self.tail_v[:, :, : n - e]
        first_tail = self.length - self.tail  # position of slot enc
        if self.length - self.recent <= first_tail:  # no row reads a tail slot decoded
            return k, v, None
        kq = self._roundtrip(self.tail_k[:, :, : n - e], self.sides[0])
        vq = self._roundtrip(self.tail_v[:, :, : n - e], self.sides[1])
        return k, v, (e, kq, vq, self.recent)

    def _settle(self) -> None:
        """Encode the tail slots the next query reads decoded (positions < length + 1 -
        recent), moving them to the encoded slots."""
        first_tail = self.length - self.tail
        m = min(self.tail, max(0, self.length + 1 - self.recent - first_tail))
        if m == 0:
            return
        e, rest = self.enc, self.tail - m
        for i, (x, side) in enumerate(((self.tail_k, self.sides[0]), (self.tail_v, self.sides[1]))):
            codes, params = encode(x[:, :, :m], side)
            self.store[2 * i][:, :, e : e + m] = codes
            if params is not None:
                self.store[2 * i + 1][:, :, e : e + m] = params
            x[:, :, :rest] = x[:, :, m : m + rest].clone()
        self.enc = e + m

    def _compact(self, idx: torch.Tensor) -> None:
        """Keep the slots ``idx`` (position order; its last ``tail`` entries are the tail,
        which the policy's window always keeps): gather the encoded ones."""
        e = idx.shape[-1] - self.tail
        ie = idx[:, :, :e]
        if e and int(ie.max()) >= self.enc:
            raise RuntimeError("eviction chose among exact tail slots: window below recent")
        for i, x in enumerate(self.store):
            if x is None:
                continue
            gi = ie.reshape(*ie.shape, *([1] * (x.dim() - 3))).expand(-1, -1, -1, *x.shape[3:])
            self.store[i][:, :, :e] = x[:, :, : self.enc].gather(2, gi)
        self.enc = e

    def trim(self, length: int) -> None:
        """Forget tokens from ``length`` on. Trimmed below the tail, the newest kept slots stay
        encoded (their exact values are gone): the next queries read them decoded."""
        length = min(self.length, max(0, length))
        first_tail = self.length - self.tail
        if length >= first_tail:
            self.kept = self.enc + (length - first_tail)
        else:
            alive = self.pos[:, :, : self.enc] < length
            self.enc = self.kept = int(alive.sum(-1).min())
        self.length = length

    @property
    def nbytes(self) -> int:
        """Bytes held: codes and parameters of every slot plus the exact tail."""
        held = sum(x.numel() * x.element_size() for x in self.store if x is not None)
        return held + 2 * self.tail_k.numel() * self.tail_k.element_size()

    def kept_bytes(self) -> int:
        """Bytes of the kept slots now: encoded slots' codes and parameters, exact tail."""
        per_slot = sum(x[:, :, :1].numel() * x.element_size() for x in self.store if x is not None)
        return self.enc * per_slot + 2 * self.tail * self.tail_k[:, :, :1].numel() * (
            self.tail_k.element_size()
        )


def _pad_slots(x: torch.Tensor, extra: int) -> torch.Tensor:
    """``x`` [B, H, slots, ...] with ``extra`` more slots."""
    return F.pad(x, [0, 0] * (x.dim() - 3) + [0, extra])
