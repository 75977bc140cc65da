"""MXFP4 checkpoints (gpt-oss): expert weights stored as 4-bit floats in blocks of 32 with one
shared power-of-two scale (~4.25 bits per weight, 3.8x fewer bytes than bf16).

A checkpoint marks them with ``quantization_config.quant_method == "mxfp4"`` and stores, for a
weight ``W`` of shape [E, cols, rows] (the gpt-oss module layout), ``W_blocks`` [E, rows, G, 16]
(uint8, two FP4 codes per byte, low nibble first) and ``W_scales`` [E, rows, G] (uint8, the
exponent + 127), with G * 32 == cols. Value = FP4_VALUES[code] * 2 ** (scale - 127).

The layer store keeps them as they are (split per expert: ``experts.{e}.W_blocks`` /
``W_scales``), so RAM holds and the link copies MXFP4 bytes; they are dequantized where they
are computed (``storage/expert_codec.py``). ``Mxfp4Source(keep=False)`` presents each pair as
one dequantized ``W`` instead (a bf16 store, as converter versions before 4 wrote).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# The 16 E2M1 values, indexed by the 4-bit code (sign bit first).
FP4_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)
BLOCKS, SCALES = "_blocks", "_scales"


_LUTS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _pair_lut(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256, 2]: a byte's two E2M1 values, low nibble first (the order they are packed in);
    made once per dtype and device (no copy, so no host sync, per decode)."""
    lut = _LUTS.get((dtype, device))
    if lut is None:
        vals = torch.tensor(FP4_VALUES, dtype=torch.float32)
        codes = torch.arange(256)
        pairs = torch.stack([vals[codes & 0x0F], vals[codes >> 4]], dim=1)
        lut = _LUTS[(dtype, device)] = pairs.to(device, dtype)
    return lut


def dequantize_rows(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Codes [..., rows, G, 16] (uint8) and scales [..., rows, G] -> values [..., G * 32, rows]
    in ``dtype`` (a transposed view; every value exact in bf16: a 2-bit mantissa times a power
    of two). Vectorised on the tensors' device: one byte-pair table lookup and one multiply by
    the block's power of two (the values of transformers' ``ldexp``), temporaries ~2x the
    output's bytes."""
    if blocks.shape[:-1] != scales.shape or blocks.dim() < 3 or blocks.shape[-1] != 16:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}"
        )
    *lead, rows, groups, width = blocks.shape
    lut = _pair_lut(dtype, blocks.device)
    idx = blocks.reshape(-1).to(torch.int32)
    vals = lut.index_select(0, idx).view(*lead, rows, groups, 2 * width)
    del idx
    # x 2 ** (scale - 127) as one multiply by the power of two in ``dtype`` (exact: bf16 and
    # float32 hold 2^-127 .. 2^127; 3x faster than ldexp's float32 pow per element on a CPU)
    factor = torch.exp2(scales.to(torch.float32) - 127).to(dtype)
    vals.mul_(factor[..., None])
    return vals.view(*lead, rows, groups * 2 * width).transpose(-1, -2)


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """[E, rows, G, 16] codes and [E, rows, G] scales -> [E, G * 32, rows] values in ``dtype``
    (contiguous). One expert at a time, so the temporaries stay at one expert's size
    (gpt-oss-120B: 128 experts per tensor)."""
    if blocks.shape[:-1] != scales.shape or blocks.dim() != 4:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}"
        )
    e, rows, groups, width = blocks.shape
    out = torch.empty(e, groups * width * 2, rows, dtype=dtype, device=blocks.device)
    for i in range(e):
        out[i] = dequantize_rows(blocks[i], scales[i], dtype)
    return out


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``dequantize_mxfp4``'s inverse: values [..., cols, rows] (cols a multiple of 32) ->
    (codes [..., rows, cols / 32, 16], scales [..., rows, cols / 32]), the OCP MX way: each
    block's scale 2 ** (floor(log2(max |x|)) - 2), each value rounded to the nearest E2M1
    (saturating at 6). Values MXFP4 can hold (a dequantized checkpoint) come back exactly."""
    *lead, cols, rows = w.shape
    if cols % 32:
        raise ValueError(f"MXFP4 needs blocks of 32 values; got {cols}")
    x = w.transpose(-1, -2).float().reshape(*lead, rows, cols // 32, 32)
    amax = x.abs().amax(dim=-1)
    exp = torch.floor(torch.log2(amax.clamp(min=2.0**-126))) - 2
    exp = torch.where(amax > 0, exp, torch.full_like(exp, -127)).clamp(-127, 127)
    y = (x / torch.exp2(exp)[..., None]).abs()
    mags = torch.tensor(FP4_VALUES[:8])
    mids = (mags[1:] + mags[:-1]) / 2
    codes = torch.bucketize(y, mids).to(torch.uint8) | ((x < 0).to(torch.uint8) << 3)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exp + 127).to(torch.uint8)


def is_mxfp4(path: Path) -> bool:
    """Whether the HF directory ``path`` declares MXFP4 weights in its config.json."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    quant = raw.get("quantization_config") or {}
    return isinstance(quant, dict) and quant.get("quant_method") == "mxfp4"


class Mxfp4Source:
    """A TensorSource over another one whose ``W_blocks`` / ``W_scales`` pairs it keeps as they
    are (``keep``, the default) or presents as one dequantized ``W``; the config it gives has no
    ``quantization_config`` (the store's tensor names say which experts are MXFP4)."""

    def __init__(self, inner, dtype: torch.dtype = torch.bfloat16, keep: bool = True) -> None:
        self.inner, self.dtype = inner, dtype
        self.path, self.model_type = inner.path, inner.model_type
        names = inner.names()
        have = set(names)
        self._pairs = {
            n[: -len(BLOCKS)]: n
            for n in names
            if not keep and n.endswith(BLOCKS) and n[: -len(BLOCKS)] + SCALES in have
        }
        paired = set(self._pairs.values()) | {w + SCALES for w in self._pairs}
        self._names = [n for n in names if n not in paired] + list(self._pairs)
        self._config = None

    def hf_config(self) -> object:
        if self._config is None:
            self._config = self.inner.hf_config()
            if hasattr(self._config, "quantization_config"):
                delattr(self._config, "quantization_config")
        return self._config

    def save_tokenizer(self, out_dir: str | Path) -> None:
        self.inner.save_tokenizer(out_dir)

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._pairs:
            return self.inner.shape(name)
        e, rows, groups, width = self.inner.shape(self._pairs[name])
        return (e, groups * width * 2, rows)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._pairs:
            return self.inner.get(name)
        blocks = self.inner.get(self._pairs[name])
        return dequantize_mxfp4(blocks, self.inner.get(name + SCALES), self.dtype)

    def close(self) -> None:
        self.inner.close()
