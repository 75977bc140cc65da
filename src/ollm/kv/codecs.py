"""KV codecs: group-wise int8 / int4 / fp8 encodings of key and value blocks (pure torch, any
device).

Keys are quantized per channel over a block of ``group`` tokens and values per token over groups
of ``group`` channels (KIVI: key channels carry outliers, values do not), each side with its own
codec. A block is encoded once its tokens are older than the cache's full-precision window of the
``recent`` newest tokens, block by block as the cache grows (never the whole prompt at once).

Integer codes are asymmetric (``x ~ lo + code * scale``), the range ``[lo, lo + qmax * scale]``
covering the group: the error of every element is at most ``scale / 2``. int8 stores ``lo`` and
``scale`` as float16; int4 packs them in 3 B a group (a 12-bit scale and a 12-bit offset in
quarter steps; ``kv/codec_params.py``). int4 codes are packed two per byte (even channel in the low
nibble). fp8 is ``float8_e4m3fn`` of ``x / scale`` with ``scale = absmax / 448`` per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ollm.kv.codec_params import (
    copy_rows,
    f16_round,
    lo_scale,
    pack_int4_params,
    unpack_int4,
)
from ollm.planning.kv_choice import KvCodecChoice
from ollm.tiers import KvTier

KINDS = ("none", "int8", "int4", "fp8")
_QMAX = {"int8": 255, "int4": 15}
# CPU decode attention over one side's KV relative to exact bf16 KV (``kv/codec_cpu.py``),
# measured at 32k x 8 KV heads, one thread (commit 0e24e3d): bf16 24 ms, int8 34 ms, int4 50 ms.
# fp8 is not measured: taken as int8 (one conversion pass per code, as int8's promotion).
CPU_ATTN_COST = {"none": 1.0, "int8": 34 / 24, "int4": 50 / 24, "fp8": 34 / 24}
_FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Defaults of ``parse_kv_codec`` (docs/benchmarks.md, "int4 KV: exact sinks, 16-token key
# groups" and "int4 KV: 3-byte group parameters"): with an int4 or fp8 side the first 32 tokens
# exact (``KVCodec.sinks``); int4 keys in per-channel groups of 16 tokens, int4 values per 64
# channels (each group's parameters in 3 B: 158 B per token at head_dim 128).
SINKS = 32
SINK_KINDS = ("int4", "fp8")
GROUP = 32
KEY_GROUP = {"int4": 16}
VALUE_GROUP = {"int4": 64}


def fp8_supported() -> bool:
    """Whether this torch has float8_e4m3fn (casts to it work on CPU and CUDA since 2.1)."""
    return hasattr(torch, "float8_e4m3fn")


@dataclass(frozen=True)
class SideCodec:
    """How one of K or V is stored: ``kind`` (none, int8, int4, fp8), quantized along ``axis``
    ("channel": one (lo, scale) per channel of a block of ``group`` tokens; "token": one per
    ``group`` channels of each token)."""

    kind: str
    axis: str
    group: int = 32

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"KV codec must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.axis not in ("channel", "token"):
            raise ValueError(f"codec axis must be 'channel' or 'token', not {self.axis!r}")
        if self.group < 1:
            raise ValueError("codec group must be >= 1")
        if self.kind == "fp8" and not fp8_supported():
            raise ValueError("fp8 KV needs torch.float8_e4m3fn (torch >= 2.1)")

    @property
    def packed(self) -> bool:
        """Whether groups store (lo, scale) in 3 B (int4; ``kv/codec_params.py``)."""
        return self.kind == "int4"

    @property
    def nparams(self) -> int:
        """Parameter rows per group: float16 (lo, scale) for int8, scale for fp8; three uint8
        rows for int4 (``kv/codec_params.py``)."""
        return 3 if self.packed else {"none": 0, "fp8": 1}.get(self.kind, 2)

    @property
    def param_dtype(self) -> torch.dtype:
        """dtype of the stored parameter rows."""
        return torch.uint8 if self.packed else torch.float16

    @property
    def param_bytes(self) -> int:
        """Stored parameter bytes per group."""
        return self.nparams * (1 if self.packed else 2)

    def lo_scale(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, scale) float32 [..., W] of stored ``params`` [..., P, W]."""
        return lo_scale(params, self.packed, self.nparams - 1)

    def code_bytes(self, head_dim: int, elem_bytes: int) -> int:
        """Bytes of codes per token and head (``elem_bytes``: the raw dtype's, kind none)."""
        if self.kind == "none":
            return head_dim * elem_bytes
        return head_dim // 2 if self.kind == "int4" else head_dim

    def channel_groups(self, head_dim: int) -> int:
        """Groups per token along the channels (token axis); the group is clipped to the head."""
        return head_dim // self.token_group(head_dim)

    def token_group(self, head_dim: int) -> int:
        g = min(self.group, head_dim)
        return g if head_dim % g == 0 else head_dim

    def bytes_per_token(self, head_dim: int, elem_bytes: int) -> float:
        """Average stored bytes per token and KV head, parameters included."""
        params = self.param_bytes
        if self.axis == "channel":
            extra = params * head_dim / self.group
        else:
            extra = params * self.channel_groups(head_dim)
        return self.code_bytes(head_dim, elem_bytes) + extra


def _grouped(x: torch.Tensor, side: SideCodec) -> tuple[torch.Tensor, int]:
    """A view of ``x`` [B, H, T, D] whose dim ``red`` is one group: tokens of a block (channel
    axis; T is the block) or ``group`` channels of a token (token axis)."""
    if side.axis == "channel":
        return x, 2
    b, h, t, d = x.shape
    g = side.token_group(d)
    return x.reshape(b, h, t, d // g, g), -1


def encode(x: torch.Tensor, side: SideCodec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes (uint8 [B, H, T, code bytes], or ``x`` itself for kind none) and params
    (``side.param_dtype`` [B, H, 1, P, D] per channel over the T tokens; [B, H, T, P, D //
    group] per token)."""
    if side.kind == "none":
        return x, None
    xv, red = _grouped(x.float(), side)
    if side.kind == "fp8":
        scale = f16_round(xv.abs().amax(red, keepdim=True) / _FP8_MAX, down=False)
        scale = scale.clamp_min(torch.finfo(torch.float16).tiny)
        q = (xv / scale.float()).clamp_(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
        codes = q.view(torch.uint8).reshape(x.shape)
        return codes, _pack_params(side, [scale])
    qmax = _QMAX[side.kind]
    mn, mx = xv.amin(red, keepdim=True), xv.amax(red, keepdim=True)
    if side.packed:
        lo, scale, params = pack_int4_params(mn, mx, qmax)
        q = ((xv - lo) / scale).round_().clamp_(0, qmax).to(torch.uint8)
    else:
        lo = f16_round(mn, down=True)
        scale = f16_round((mx - lo.float()) / qmax, down=False)
        scale = scale.clamp_min(torch.finfo(torch.float16).tiny)  # a constant group: any scale
        q = ((xv - lo.float()) / scale.float()).round_().clamp_(0, qmax).to(torch.uint8)
        params = [lo, scale]
    codes = q.reshape(x.shape)
    if side.kind == "int4":
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, _pack_params(side, params)


def _pack_params(side: SideCodec, params: list[torch.Tensor]) -> torch.Tensor:
    """Stack parameters into the stored layout: [B, H, 1, P, D] (channel) or [B, H, T, P, G]."""
    if side.axis == "channel":
        return torch.stack(params, dim=3)  # each [B, H, 1, D]
    return torch.cat(params, dim=-1).transpose(-1, -2)  # each [B, H, T, G, 1] -> [B,H,T,P,G]


def decode(
    codes: torch.Tensor, params: torch.Tensor | None, side: SideCodec, out: torch.Tensor
) -> torch.Tensor:
    """Write the values of ``codes`` [B, H, T, code bytes] into ``out`` [B, H, T, D] (any float
    dtype, on the codes' device). ``params`` as ``encode`` made them, per channel with one
    block row per ``side.group`` tokens (T a multiple of it, or the one block of ``encode``)."""
    if side.kind == "none":
        return out.copy_(codes)
    b, h, t, d = out.shape
    if side.kind == "int4":
        c = unpack_int4(codes).reshape(b, h, t, d)
    elif side.kind == "fp8":
        c = codes.view(torch.float8_e4m3fn).float()
    else:
        c = codes
    lo, scale = side.lo_scale(params)
    if side.axis == "channel":
        blocks = params.shape[2]
        c = c.reshape(b, h, blocks, t // blocks, d)
        lo, scale = lo[:, :, :, None], scale[:, :, :, None]  # [B, H, blocks, 1, D]
    else:
        # Per-token groups widened to channels (two contiguous [B, H, T, D]): a broadcast
        # along the innermost dim runs ~50x slower on the CPU than this.
        g = side.token_group(d)
        lo, scale = (x.repeat_interleave(g, -1) for x in (lo, scale))
    # lo + code * scale in float32 in one kernel (integer codes promoted inside it), straight
    # into a float32 ``out``
    if side.kind == "fp8":
        out.copy_(c.mul_(scale).reshape(b, h, t, d))
    elif out.dtype == torch.float32:
        torch.addcmul(lo, c, scale, out=out.view(c.shape))
    else:
        out.copy_(torch.addcmul(lo, c, scale).reshape(b, h, t, d))
    return out


@dataclass(frozen=True)
class KVCodec:
    """Codecs of keys and values and the full-precision window: slots older than the ``recent``
    newest tokens are encoded in blocks of ``key.group`` tokens (the key's channel groups).
    ``sinks``: the first tokens of the sequence (attention sinks, rounded up to whole blocks:
    ``sink_slots``) stay exact too, beside their codes, in caches that keep them
    (``kv/compressed.py``; the paged pools and evicting caches encode them as any block)."""

    key: SideCodec
    value: SideCodec
    recent: int = 128
    sinks: int = 0

    def __post_init__(self) -> None:
        if self.key.axis != "channel" or self.value.axis != "token":
            raise ValueError("keys are quantized per channel and values per token")
        if self.recent < 0:
            raise ValueError("the recent window must be >= 0 tokens")
        if self.sinks < 0:
            raise ValueError("the exact sink tokens must be >= 0")

    @property
    def sink_slots(self) -> int:
        """Slots [0, sink_slots) kept exact: ``sinks`` rounded up to whole blocks."""
        return -(-self.sinks // self.block) * self.block

    @property
    def block(self) -> int:
        """Tokens encoded together (the unit of the key's per-channel groups)."""
        return self.key.group

    def boundary(self, n: int) -> int:
        """Slots [0, boundary) are encoded when ``n`` tokens are cached (a query at slot q sees
        the keys before ``boundary(q + 1)`` encoded, the rest exact)."""
        return max(0, (n - self.recent) // self.block * self.block)

    def bytes_per_token(self, head_dim: int, elem_bytes: int) -> float:
        """Stored bytes of K plus V per token and KV head (the exact window not counted)."""
        return self.key.bytes_per_token(head_dim, elem_bytes) + self.value.bytes_per_token(
            head_dim, elem_bytes
        )

    def ratio(self, head_dim: int, elem_bytes: int) -> float:
        """Stored bytes over the exact cache's (< 1 compresses)."""
        return self.bytes_per_token(head_dim, elem_bytes) / (2 * head_dim * elem_bytes)

    def describe(self) -> str:
        sinks = f" sinks {self.sink_slots}" if self.sinks else ""
        return f"k:{self.key.kind},v:{self.value.kind} recent {self.recent}{sinks}"

    @property
    def cpu_attn_cost(self) -> float:
        """A CPU decode step's attention time over this KV relative to exact KV of the same
        tokens (``CPU_ATTN_COST``, keys and values half each)."""
        return (CPU_ATTN_COST[self.key.kind] + CPU_ATTN_COST[self.value.kind]) / 2


def parse_kv_codec(
    spec: str | None, recent: int = 128, group: int | None = None, sinks: int | None = None
) -> KVCodec | None:
    """``"int8"``, ``"int4"``, ``"fp8"``, ``"k:int4,v:int8"`` (``",sinks:N"`` after any: N exact
    tokens at the start) -> a KVCodec; ``"none"`` / ``None`` -> None (exact KV). ``"auto"`` is
    resolved per tier by ``codec_for_tier``. ValueError with one line on anything else. ``group``: tokens per key group and channels per value group
    (None: ``KEY_GROUP`` / ``VALUE_GROUP`` by each side's kind, else 32); ``sinks``: exact tokens at the start
    (``KVCodec.sinks``; None: ``SINKS`` with an int4 or fp8 side, else 0)."""
    if spec is None:
        return None
    text = str(spec).strip().lower()
    if text in ("none", "off", "exact", "bf16", ""):
        return None
    if text == "auto":  # resolved per tier (``codec_for_tier``); this: the RAM tier's default
        from ollm.kv.codec_auto import default_choice

        text = default_choice(recent).spec(KvTier.CPU)
    if "rest" in text or text[:1].isdigit():  # a schedule: 4k:bf16,32k:int8,rest:int4
        from ollm.kv.temporal import parse_kv_temporal

        return parse_kv_temporal(text, group or GROUP)
    text, sinks = _sinks_part(text, spec, sinks)
    kinds: dict[str, str] = {}
    if ":" not in text:
        kinds = {"k": text, "v": text}
    else:
        for part in text.split(","):
            side, sep, kind = part.strip().partition(":")
            if not sep or side not in ("k", "v") or side in kinds:
                raise ValueError(f"bad KV codec {spec!r}: use int8, int4, fp8 or k:KIND,v:KIND")
            kinds[side] = kind.strip()
        kinds.setdefault("k", "none")
        kinds.setdefault("v", "none")
    for kind in kinds.values():
        if kind not in KINDS:
            raise ValueError(f"bad KV codec {spec!r}: kinds are {', '.join(KINDS)}")
    if kinds["k"] == kinds["v"] == "none":
        return None
    return KVCodec(
        SideCodec(kinds["k"], "channel", group or KEY_GROUP.get(kinds["k"], GROUP)),
        SideCodec(kinds["v"], "token", group or VALUE_GROUP.get(kinds["v"], GROUP)),
        recent,
        (SINKS if set(kinds.values()) & set(SINK_KINDS) else 0) if sinks is None else sinks,
    )


def _sinks_part(text: str, spec, sinks: int | None) -> tuple[str, int | None]:
    """``text`` without its ``sinks:N`` part (``int4,sinks:0``: exact tokens at the start) and
    N, else ``sinks``."""
    rest = []
    for part in text.split(","):
        name, _, n = part.strip().partition(":")
        if name != "sinks":
            rest.append(part)
        elif n.strip().isdigit():
            sinks = int(n)
        else:
            raise ValueError(f"bad KV codec {spec!r}: sinks:N takes a number of tokens")
    return ",".join(rest), sinks


def codec_for_tier(spec, tier: KvTier, recent: int = 128, choice=None) -> KVCodec | None:
    """The codec of one layer's KV in ``tier``. ``spec``: a codec text, or ``auto`` resolved by
    ``choice`` (``planning.kv_choice.KvCodecChoice``, what the engine chose from the measured
    rates; the engine's runner holds it in place of the text); without one, ``auto`` is
    ``codec_auto.default_choice`` (default rates, reference shapes)."""
    if isinstance(spec, KvCodecChoice):
        spec, choice = "auto", spec
    if spec is not None and str(spec).strip().lower() == "auto":
        if choice is None:
            from ollm.kv.codec_auto import default_choice

            choice = default_choice(recent)
        return parse_kv_codec(choice.spec(tier), recent)
    return parse_kv_codec(spec, recent)


class CodeStore:
    """Encoded K/V of ``slots`` token slots [B, H, slots, ...] on one device or in a buffer
    from ``storage(nbytes) -> uint8 tensor`` (pinned RAM, a memory-mapped file). Slots are
    written and read in whole blocks of ``codec.block`` tokens."""

    def __init__(
        self,
        codec: KVCodec,
        batch: int,
        heads: int,
        slots: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        storage=None,
    ) -> None:
        self.codec, self.dtype, self.head_dim = codec, dtype, head_dim
        g = codec.block
        self.slots = -(-slots // g) * g
        elem = torch.finfo(dtype).bits // 8
        shapes = []
        for side in (codec.key, codec.value):
            code_dtype = dtype if side.kind == "none" else torch.uint8
            cw = head_dim if side.kind == "none" else side.code_bytes(head_dim, elem)
            rows = self.slots // g if side.axis == "channel" else self.slots
            width = head_dim if side.axis == "channel" else side.channel_groups(head_dim)
            shapes.append(((batch, heads, self.slots, cw), code_dtype))
            shapes.append(((batch, heads, rows, side.nparams, width), side.param_dtype))
        sizes = [
            _aligned(
                math.prod(s) * torch.finfo(dt).bits // 8 if dt.is_floating_point else math.prod(s)
            )
            for s, dt in shapes
        ]
        raw = (
            storage(sum(sizes))
            if storage is not None
            else torch.empty(sum(sizes), dtype=torch.uint8, device=device)
        )
        self.raw = raw
        views, off = [], 0
        for (shape, dt), n in zip(shapes, sizes, strict=True):
            views.append(
                raw[off : off + n][
                    : math.prod(shape) * (torch.finfo(dt).bits // 8 if dt.is_floating_point else 1)
                ]
                .view(dt)
                .view(shape)
            )
            off += n
        self.kc, self.kp, self.vc, self.vp = views

    @property
    def device(self) -> torch.device:
        return self.raw.device

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def range_nbytes(self, a: int, b: int) -> int:
        """Bytes of codes and parameters holding slots [a, b) (what reading them moves)."""
        return sum(
            t[:, :, lo:hi].numel() * t.element_size()
            for t, (lo, hi) in zip(self.tensors(), self.rows(a, b), strict=True)
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(key codes, key params, value codes, value params), each [B, H, rows, ...]."""
        return self.kc, self.kp, self.vc, self.vp

    def rows(self, a: int, b: int) -> list[tuple[int, int]]:
        """Row ranges of ``tensors()`` holding slots [a, b) (key params: one row per block)."""
        g = self.codec.block
        return [(a, b), (a // g, -(-b // g)), (a, b), (a, b)]

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Encode whole blocks k/v [B, H, n * block, D] into slots [start, start + n * block)
        (encoded where k/v are, then copied here)."""
        g = self.codec.block
        t = k.shape[2]
        assert start % g == 0 and t % g == 0, "codec blocks are written whole"
        if t == 0:
            return
        b, h, _, d = k.shape
        kb = k.reshape(b, h * (t // g), g, d)  # one row of per-channel params per block
        kc, kp = encode(kb, self.codec.key)
        vc, vp = encode(v, self.codec.value)
        n = t // g
        parts = (
            kc.reshape(b, h, t, -1),
            None if kp is None else kp.reshape(b, h, n, *kp.shape[3:]),
            vc,
            vp,
        )
        for dst, src, (lo, hi) in zip(
            self.tensors(), parts, self.rows(start, start + t), strict=True
        ):
            if src is not None:
                copy_rows(dst, src, lo, hi)

    def read(self, a: int, b: int, k_out: torch.Tensor, v_out: torch.Tensor) -> None:
        """Decode slots [a, b) (block-aligned ``a``) into k_out/v_out [B, H, b - a, D]."""
        kc, kp, vc, vp = self.tensors()
        ka, kb = self.rows(a, b)[1]
        decode(kc[:, :, a:b], kp[:, :, ka:kb], self.codec.key, k_out)
        decode(vc[:, :, a:b], vp[:, :, a:b], self.codec.value, v_out)

    def shifted(self, start: int) -> CodeStore:
        """A view of this store's slots [start, slots) as a store of its own (``start``
        block-aligned; no copy): readers of slots [0, n) of the view read [start, start + n)."""
        assert start % self.codec.block == 0, "a shifted store starts at a whole block"
        view = object.__new__(CodeStore)
        view.__dict__.update(self.__dict__)
        view.slots = self.slots - start
        view.kc, view.kp, view.vc, view.vp = (
            t[:, :, lo:] for t, (lo, _) in zip(self.tensors(), self.rows(start, start), strict=True)
        )
        return view

    def copy_from(self, src: CodeStore, a: int, b: int) -> None:
        """This store's slots [a, b) = ``src``'s (another device: one DMA per sequence and head)."""
        for dst_t, src_t, (lo, hi) in zip(
            self.tensors(), src.tensors(), self.rows(a, b), strict=True
        ):
            copy_rows(dst_t, src_t[:, :, lo:hi], lo, hi, src_offset=True)


def _aligned(n: int) -> int:
    return -(-n // 16) * 16


def kv_format(spec, recent: int, head_dim: int, elem_bytes: int, tier: KvTier | None = None):
    """The planner's view of ``spec`` (``planning.accounting.KVFormat``: stored bytes per token
    and head, exact tail, whether device and RAM KV are compressed too), or None for exact KV.
    ``tier``: the format of that tier's codec; None: the offloaded KV's (pinned RAM, else disk:
    ``auto`` may keep RAM KV exact and encode only the disk tier's)."""
    from ollm.planning.accounting import KVFormat

    tiers = {t: codec_for_tier(spec, t, recent) for t in KvTier}
    codec = tiers[KvTier.CPU] or tiers[KvTier.DISK] if tier is None else tiers[KvTier(tier)]
    if codec is None:
        return None
    per_token = codec.bytes_per_token(head_dim, elem_bytes)
    ring = {}
    if not isinstance(codec, KVCodec):  # a temporal schedule: its middle tier is a ring
        mid, deep = codec.mid, codec.deep
        ring = {"mid_span": deep.recent - mid.recent,
                "mid_bytes_per_token": mid.bytes_per_token(head_dim, elem_bytes)}  # fmt: skip
    return KVFormat(
        per_token, codec.recent + codec.block, codec.block, tiers[KvTier.DEVICE] is not None,
        codec.cpu_attn_cost, ram=tiers[KvTier.CPU] is not None,
        sink_tokens=getattr(codec, "sink_slots", 0), **ring,
    )  # fmt: skip
