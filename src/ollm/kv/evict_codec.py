"""KV eviction over encoded slots (issue 17): ``--kv-codec int4 --kv-evict streaming``.

Layout: the plain codec's (KIVI): values per token (groups of ``group`` channels), keys per
channel over blocks of ``block`` consecutive positions. A key block is encoded once, when all
its positions have left the recent window (the tail is kept in every head, so its slots are
still all there); its parameters go to a table indexed by position // block, and every slot
keeps its own codes. Eviction then removes single slots freely: the parameters of a block
stay valid for whatever slots of it remain (decoded values never change), and no block is
ever re-encoded. The table costs the plain codec's parameter bytes per context token
(``param_bytes * head_dim / block`` per token and head), whatever is evicted. Per-token
keys (one group of channels per slot) were measured first: int4 keys per token cost +2.1% to
+5.2% perplexity on Gemma 3 270M at 2k where per-channel blocks cost +0.6%
(``docs/benchmarks.md``).

Storage: slots [0, enc) encoded, slots [enc, kept) exact in a tail holding the positions from
the codec's boundary on (the ``recent`` newest, rounded down to whole blocks) plus a
forward's. The policy's recent window is at least ``recent + block``, so eviction chooses
among encoded slots only and every head has the same count of them.

Decode-faithful, as ``compressed.py``: a query at q reads key p decoded iff
p < ``codec.boundary(q + 1)``. After each forward the blocks the next query reads decoded are
encoded (settled); within a forward of several rows, tail blocks that later rows read decoded
are encoded for those rows (the same codes they are stored as). Attention decodes the encoded
slots into a workspace buffer shared by the request's layers (``CodecWorkspace``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ollm.kv.codecs import KVCodec, decode, encode, unpack_int4
from ollm.kv.evict import EvictingKVCache, EvictionPolicy


class EncodedEvictingKVCache(EvictingKVCache):
    """An ``EvictingKVCache`` whose slots older than the codec's boundary are stored encoded
    (``codec``: kinds, group, ``recent`` exact window)."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype,
                 device, policy: EvictionPolicy, forward: int, codec: KVCodec,
                 workspace=None) -> None:  # fmt: skip
        self.codec, self.dtype, self.recent = codec, dtype, codec.recent
        self.block = codec.block
        self.sides = (codec.key, codec.value)
        self.workspace = workspace
        self.enc = 0  # slots [0, enc) encoded; [enc, kept) in the exact tail
        super().__init__(batch, kv_heads, head_dim, capacity, dtype, device, policy, forward,
                         min_window=codec.recent + codec.block)  # fmt: skip

    def _alloc(self, shape, dtype, device, forward: int) -> None:
        b, h, slots, d = shape
        g = self.block
        kc, kp = encode(torch.zeros(b, h, g, d, dtype=dtype, device=device), self.sides[0])
        vc, vp = encode(torch.zeros(b, h, 1, d, dtype=dtype, device=device), self.sides[1])
        blocks = -(-self.capacity // g)
        # k codes per slot, k params per block of positions, v codes and params per slot
        self.store: list[torch.Tensor | None] = [
            kc.new_empty((b, h, slots, *kc.shape[3:])),
            None if kp is None else kp.new_empty((b, h, blocks, *kp.shape[3:])),
            vc.new_empty((b, h, slots, *vc.shape[3:])),
            None if vp is None else vp.new_empty((b, h, slots, *vp.shape[3:])),
        ]
        tail = (b, h, min(self.capacity, self.recent + g + forward), d)
        self.tail_k = torch.empty(tail, dtype=dtype, device=device)
        self.tail_v = torch.empty(tail, dtype=dtype, device=device)

    def _grow(self, n: int) -> None:
        """A forward larger than planned: more slots for codes and the tail."""
        extra = n - self.pos.shape[2]
        self.pos, self.score = (F.pad(x, (0, extra)) for x in (self.pos, self.score))
        self.store = [
            x if x is None or i == 1 else _pad_slots(x, extra) for i, x in enumerate(self.store)
        ]
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

    def _bound(self, qpos: torch.Tensor) -> torch.Tensor:
        """Per query position q: keys below ``codec.boundary(q + 1)`` are read decoded."""
        g = self.block
        return torch.div((qpos + 1 - self.recent).clamp_min(0), g, rounding_mode="floor") * g

    def _encode_tail(self, m: int):
        """Codes of the first ``m`` tail slots (whole key blocks): key codes [B, H, m, ...],
        key params [B, H, m // block, ...], value codes and params [B, H, m, ...]."""
        b, h, _, d = self.tail_k.shape
        nb = m // self.block
        x = self.tail_k[:, :, :m].reshape(b, h * nb, self.block, d)
        kc, kp = encode(x, self.sides[0])
        kc = kc.reshape(b, h, m, *kc.shape[3:])
        kp = None if kp is None else kp.reshape(b, h, nb, *kp.shape[3:])
        vc, vp = encode(self.tail_v[:, :, :m], self.sides[1])
        return kc, kp, vc, vp

    def _decode_keys(self, kc, kp, block_ids, out: torch.Tensor) -> torch.Tensor:
        """Keys of slots with codes ``kc`` [B, H, n, ...] whose blocks' params are ``kp``
        [B, H, blocks, P, D] at ``block_ids`` [B, H, n]."""
        side = self.sides[0]
        if side.kind == "none":
            return out.copy_(kc)
        if side.kind == "int4":
            c = unpack_int4(kc).float()
        elif side.kind == "fp8":
            c = kc.view(torch.float8_e4m3fn).float()
        else:
            c = kc.float()
        gi = block_ids[..., None, None].expand(-1, -1, -1, *kp.shape[3:])
        lo, scale = side.lo_scale(kp.gather(2, gi))  # [B, H, n, D] each
        if side.kind == "fp8":
            return out.copy_(c * scale)
        return out.copy_(torch.addcmul(lo, c, scale))

    def _keys(self, dtype):
        """(K, V) of the kept slots (encoded ones decoded into the workspace, then the exact
        tail) and, when rows of this forward read tail slots decoded, (enc, K, V, bound) of
        the tail's whole blocks decoded."""
        b, h, _, d = self.tail_k.shape
        n, e = self.kept, self.enc
        if self.workspace is not None:
            k, v = self.workspace.decoded((b, h, n, d), self.dtype, self.tail_k.device)
        else:
            k, v = (self.tail_k.new_empty((b, h, n, d)) for _ in "kv")
        kc, kp, vc, vp = self.store
        ids = torch.div(self.pos[:, :, :e], self.block, rounding_mode="floor")
        self._decode_keys(kc[:, :, :e], kp, ids, k[:, :, :e])
        decode(vc[:, :, :e], None if vp is None else vp[:, :, :e], self.sides[1], v[:, :, :e])
        k[:, :, e:] = self.tail_k[:, :, : n - e]
        v[:, :, e:] = self.tail_v[:, :, : n - e]
        first_tail = self.length - self.tail  # position of slot enc (a block boundary)
        m = int(self._bound(torch.tensor(self.length - 1))) - first_tail
        if m <= 0:  # no row of this forward reads a tail slot decoded
            return k, v, None
        kq, vq = k[:, :, e:].clone(), v[:, :, e:].clone()  # exact past the m slots
        ckc, ckp, cvc, cvp = self._encode_tail(m)
        ids = torch.arange(m, device=k.device) // self.block
        self._decode_keys(ckc, ckp, ids.expand(b, h, m), kq[:, :, :m])
        decode(cvc, cvp, self.sides[1], vq[:, :, :m])
        return k, v, (e, kq, vq, self._bound)

    def _settle(self) -> None:
        """Encode the tail's whole blocks the next query reads decoded (below
        ``codec.boundary(length + 1)``), moving them to the encoded slots."""
        first_tail = self.length - self.tail
        m = self.codec.boundary(self.length + 1) - first_tail
        if m <= 0:
            return
        e, rest = self.enc, self.tail - m
        kc, kp, vc, vp = self._encode_tail(m)
        self.store[0][:, :, e : e + m] = kc
        if kp is not None:
            j = first_tail // self.block
            self.store[1][:, :, j : j + m // self.block] = kp
        self.store[2][:, :, e : e + m] = vc
        if vp is not None:
            self.store[3][:, :, e : e + m] = vp
        for x in (self.tail_k, self.tail_v):
            x[:, :, :rest] = x[:, :, m : m + rest].clone()
        self.enc = e + m

    def _compact(self, idx: torch.Tensor) -> None:
        """Keep the slots ``idx`` (position order; its last ``tail`` entries are the tail,
        which the policy's window always keeps): gather the encoded slots' codes (key block
        parameters stay where they are)."""
        e = idx.shape[-1] - self.tail
        ie = idx[:, :, :e]
        if e and int(ie.max()) >= self.enc:
            raise RuntimeError("eviction chose among exact tail slots: window below recent")
        for i, x in enumerate(self.store):
            if x is None or i == 1:
                continue
            gi = ie.reshape(*ie.shape, *([1] * (x.dim() - 3))).expand(-1, -1, -1, *x.shape[3:])
            self.store[i][:, :, :e] = x[:, :, : self.enc].gather(2, gi)
        self.enc = e

    def trim(self, length: int) -> None:
        """Forget tokens from ``length`` on. Below the tail, the encoded slots of the block
        holding ``length`` come back to the tail decoded (their exact values are gone), so the
        tail starts at a block boundary again; RuntimeError if a head evicted any of them."""
        length = min(self.length, max(0, length))
        first_tail = self.length - self.tail
        if length >= first_tail:
            self.kept = self.enc + (length - first_tail)
            self.length = length
            return
        a = length // self.block * self.block
        pos = self.pos[:, :, : self.enc]
        alive = int((pos < length).sum(-1).min())
        back = ((pos >= a) & (pos < length)).sum(-1)
        if not bool((back == length - a).all()) or alive != int((pos < length).sum(-1).max()):
            raise RuntimeError("cannot trim an evicting cache into evicted positions")
        e = alive - (length - a)
        b, h, _, d = self.tail_k.shape
        kc, kp, vc, vp = self.store
        ids = torch.div(pos[:, :, e:alive], self.block, rounding_mode="floor")
        self._decode_keys(kc[:, :, e:alive], kp, ids, self.tail_k[:, :, : alive - e])
        vps = None if vp is None else vp[:, :, e:alive]
        decode(vc[:, :, e:alive], vps, self.sides[1], self.tail_v[:, :, : alive - e])
        self.enc, self.kept, self.length = e, alive, length

    @property
    def nbytes(self) -> int:
        """Bytes held: codes of every slot, key parameters of every block, exact tail."""
        held = sum(x.numel() * x.element_size() for x in self.store if x is not None)
        return held + 2 * self.tail_k.numel() * self.tail_k.element_size()

    def kept_bytes(self) -> int:
        """Bytes of what is kept now: encoded slots' codes (and value parameters), the key
        parameters of the blocks encoded so far, the exact tail."""
        kc, kp, vc, vp = self.store
        per_slot = sum(
            x[:, :, :1].numel() * x.element_size() for x in (kc, vc, vp) if x is not None
        )
        blocks = (self.length - self.tail) // self.block
        params = 0 if kp is None else blocks * kp[:, :, :1].numel() * kp.element_size()
        exact = 2 * self.tail * self.tail_k[:, :, :1].numel() * self.tail_k.element_size()
        return self.enc * per_slot + params + exact


def _pad_slots(x: torch.Tensor, extra: int) -> torch.Tensor:
    """``x`` [B, H, slots, ...] with ``extra`` more slots."""
    return F.pad(x, [0, 0] * (x.dim() - 3) + [0, extra])
