"""int4 KV group parameters packed in 3 bytes (``kv/codec_params.py``): the layout, the
half-step error bound with the stored parameters (also for groups far from zero, where the
scale is widened), how tight the stored scale and offset are, and the stored bytes."""

from __future__ import annotations

import pytest
import torch

from ollm.kv.codec_params import Z_MAX, lo_scale, pack_int4_params
from ollm.kv.codecs import CodeStore, SideCodec, decode, encode, parse_kv_codec


def _groups(n: int = 4096, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups of 16 values: centred, offset, far from zero and narrow, constant, zero, huge."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g) * torch.rand(n, 1, generator=g) * 4
    x += torch.randn(n, 1, generator=g) * 6  # per-group offsets
    x[:64] = 300 + torch.rand(64, 16, generator=g) * 0.01  # |min| >> range: widened scale
    x[64:128] = -x[:64]
    x[128:160] = 1.25  # constant
    x[160:192] = 0.0
    x[192:224] *= 1e3
    x[224:256] *= 1e-5
    return x, x.amin(1, keepdim=True), x.amax(1, keepdim=True)


def test_layout_known_answer():
    """scale 1.0 (float16 0x3C00: code 0x780) and lo 1.0 (z = -4 quarter steps: 0xFFC) are the
    bytes the Triton kernels decode: scale's low byte, z's low byte, the high nibbles."""
    lo, scale, rows = pack_int4_params(torch.tensor([[1.0]]), torch.tensor([[16.0]]), 15)
    assert [int(r) for r in rows] == [0x80, 0xFC, 0x07 | (0xF << 4)]
    assert float(lo) == 1.0 and float(scale) == 1.0
    p = torch.stack(rows, dim=-2)  # [1, 3, 1]
    dl, ds = lo_scale(p, True, 2)
    assert float(dl) == 1.0 and float(ds) == 1.0


def test_stored_params_read_back_exactly():
    x, mn, mx = _groups()
    lo, scale, rows = pack_int4_params(mn, mx, 15)
    assert all(r.dtype == torch.uint8 and r.shape == mn.shape for r in rows)
    dl, ds = lo_scale(torch.stack(rows, dim=-2), True, 2)
    assert torch.equal(dl, lo) and torch.equal(ds, scale)


@pytest.mark.parametrize("qmax", [15, 255])
def test_error_at_most_half_a_step_with_stored_params(qmax):
    x, mn, mx = _groups(seed=qmax)
    lo, scale, _ = pack_int4_params(mn, mx, qmax)
    q = ((x - lo) / scale).round().clamp(0, qmax)
    err = (lo + q * scale - x).abs()
    tol = 4 * torch.finfo(torch.float32).eps * x.abs()  # float32 arithmetic on x
    assert bool((err <= scale / 2 + tol).all()), float((err / scale).max())
    assert bool((scale > 0).all())


def test_scale_and_offset_are_tight():
    """The scale at most 2^-7 above the group's need (unless widened for a far group), and lo
    within an eighth of a step of the minimum; widened groups keep |z| within 12 bits."""
    x, mn, mx = _groups(seed=3)
    lo, scale, rows = pack_int4_params(mn, mx, 15)
    need = (mx - mn) / 15
    far = mn.abs() > (Z_MAX / 4) * need
    assert 64 <= int(far.sum()) < 200  # the far, narrow groups and few others
    normal = ~far & (need > 1e-4)
    assert bool((scale[normal] <= need[normal] * (1 + 2**-7) * (1 + 2**-10)).all())
    assert bool(((lo - mn).abs()[~far] <= scale[~far] / 8 * (1 + 1e-6)).all())
    z = rows[1].int() | ((rows[2].int() >> 4) << 8)
    z = torch.where(z >= 2048, z - 4096, z)
    assert int(z.abs().max()) <= Z_MAX
    assert bool((scale[far] <= mn.abs()[far] / (Z_MAX / 4) * (1 + 2**-6)).all())


@pytest.mark.parametrize("axis", ["channel", "token"])
def test_int4_codec_stores_packed_params(axis):
    side = SideCodec("int4", axis, 16)
    x, _, _ = _groups(512, seed=5)
    # channel axis: each group one channel over the block's 16 tokens
    x = x.reshape(1, 2, 256, 16)
    x = x.transpose(2, 3).contiguous() if axis == "channel" else x
    codes, params = encode(x, side)
    assert params.dtype == torch.uint8 and params.shape[-2] == 3
    out = decode(codes, params, side, torch.empty_like(x))
    scale = side.lo_scale(params)[1]
    if axis == "token":
        scale = scale.repeat_interleave(16, -1)
    tol = 4 * torch.finfo(torch.float32).eps * x.abs()
    assert bool(((out - x).abs() <= scale / 2 + tol).all())
    assert SideCodec("int8", axis, 16).param_dtype == torch.float16  # int8 unchanged


def test_preset_bytes():
    """int4: keys per channel over 16 tokens, values per 64 channels, 3 B a group."""
    c = parse_kv_codec("int4")
    assert (c.key.group, c.value.group) == (16, 64)
    assert c.key.param_bytes == c.value.param_bytes == 3
    assert c.bytes_per_token(128, 2) == 64 + 128 * 3 / 16 + 64 + 2 * 3 == 158
    assert parse_kv_codec("int8").bytes_per_token(128, 2) == 128 + 16 + 128 + 16  # float16
    store = CodeStore(c, 1, 2, 64, 128, torch.bfloat16)
    assert store.range_nbytes(0, 64) == 2 * 64 * 158
