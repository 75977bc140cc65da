"""The GPU budget with KV codecs (issue 17, issue 11's promise): the codec workspace the planner
counts (``KVFormat.workspace_bytes`` / ``staging_bytes``) covers what ``CodecWorkspace`` really
allocates for prefill chunks, decode steps and padded forwards, and a plan whose every layer
keeps its compressed KV on the device still counts the workspace."""

from __future__ import annotations

import math

import pytest
import torch

from ollm.kv.codecs import CodeStore, kv_format, parse_kv_codec
from ollm.kv.compressed import CodecWorkspace, CompressedKVCache
from ollm.layers.attention import AttentionMask
from ollm.planning import footprint
from ollm.planning.footprint import codec_decoded_slots


class Recording(CodecWorkspace):
    """A workspace that records the largest decoded request and every buffer it allocates."""

    def __init__(self, planned) -> None:
        super().__init__(planned)
        self.largest = 0
        self.allocated: list[int] = []

    def decoded(self, shape, dtype, device):
        self.largest = max(self.largest, shape[2])
        before = {id(t) for pair in self._decoded.values() for t in pair}
        out = super().decoded(shape, dtype, device)
        for pair in self._decoded.values():
            self.allocated += [t.nbytes for t in pair if id(t) not in before]
        return out


def _run(codec, ctx: int, chunk: int, batch: int, workspace, pad: bool) -> CompressedKVCache:
    """Prefill ``ctx - 4`` tokens in chunks of ``chunk`` rows, then 4 decode steps."""
    kvh, h, d = 2, 4, 16
    g = torch.Generator().manual_seed(ctx + chunk)
    q, k, v = (torch.randn(batch, x, ctx, d, generator=g) for x in (h, kvh, kvh))
    keep = None
    if pad:
        keep = torch.ones(batch, ctx, dtype=torch.bool)
        keep[0, :7] = False  # a left-padded sequence: the masked row-block path
    cache = CompressedKVCache(batch, kvh, d, ctx, torch.float32, codec, "cpu", workspace)
    steps = [min(chunk, ctx - 4 - p) for p in range(0, ctx - 4, chunk)] + [1] * 4
    pos = 0
    for t in steps:
        sl = slice(pos, pos + t)
        m = AttentionMask(pos, t, pos + t, keep)
        out = cache.attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], m, 1 / math.sqrt(d), None)
        assert not bool(out.isnan().any())
        pos += t
    return cache


@pytest.mark.parametrize(
    "spec,recent,ctx,chunk,pad",
    [
        ("int8", 128, 1200, 256, False),  # the 8B's window; chunks the size of a GPU chunk
        ("int8", 128, 700, 700, False),  # the whole prompt in one forward (chunk 0)
        ("int4", 0, 1500, 333, False),  # chunks not a multiple of the band tile
        ("k:int4,v:int8", 40, 1100, 512, False),  # a forward larger than the decode chunk
        ("int8", 16, 600, 200, True),  # padding: partly encoded keys decoded whole
    ],
)
def test_prefill_workspace_within_the_plan(monkeypatch, spec, recent, ctx, chunk, pad):
    """The decoded buffers are allocated once, at the planned size, and no request of a prefill
    chunk, a decode step or a padded forward asks for more; the planner's bytes equal them."""
    small = 256  # GPU_CHUNK scaled down, so that contexts exceed it (as 32k exceeds 16384)
    monkeypatch.setattr(footprint, "CODEC_GPU_CHUNK", small)
    monkeypatch.setattr("ollm.kv.compressed.CPU_CHUNK", small)  # the CPU run chunks like a GPU
    codec = parse_kv_codec(spec, recent)
    batch, kvh, d = (2 if pad else 1), 2, 16
    slots = codec_decoded_slots(chunk, ctx, codec.block, codec.recent, on_gpu=True)
    ws = Recording({"cpu": slots})
    _run(codec, ctx, chunk, batch, ws, pad)
    fmt = kv_format(spec, recent, d, 4)
    planned = fmt.workspace_bytes(batch, kvh, d, 4, ctx, chunk, on_gpu=True)
    assert ws.largest <= slots  # every request fits the planned buffers
    assert ws.allocated == [planned // 2] * 2  # one K and one V buffer, never regrown
    # the band of a forward of ``chunk`` rows needs more than the decode chunk: counted
    assert slots > min(small, ctx) or chunk < small


def test_old_fixed_chunk_was_under_the_band():
    """The bug this fixes: a prefill chunk of 16384 rows (8B, 8 GiB, 32k) decodes its band into
    16384 + recent + block - 1 slots, which a plan of GPU_CHUNK slots did not count."""
    codec = parse_kv_codec("int8", 128)
    assert codec_decoded_slots(16384, 32768, codec.block, 128, on_gpu=True) == 16384 + 159
    assert codec_decoded_slots(1, 32768, codec.block, 128, on_gpu=True) == 16384
    assert codec_decoded_slots(2048, 4096, codec.block, 128, on_gpu=True) == 4096
    assert codec_decoded_slots(2048, 4096, codec.block, 128, on_gpu=False) == 2048 + 159


@pytest.mark.parametrize("spec", ["int8", "int4", "k:int4,v:int8", "fp8"])
@pytest.mark.parametrize("ctx", [100, 4096, 32768 + 17])
def test_staging_bytes_cover_the_store(spec, ctx):
    """The staging copy of one layer's encoded KV (a RAM-homed layer prefilled on the GPU) is a
    CodeStore of the layer's slots: planned to within its alignment padding."""
    fmt = kv_format(spec, 128, 128, 2)
    store = CodeStore(parse_kv_codec(spec, 128), 1, 8, ctx, 128, torch.bfloat16)
    planned = fmt.staging_bytes(1, 8, ctx)
    assert planned - 64 <= store.nbytes <= planned


def llama8b():
    """(spec, store stand-in) with Llama-3.1-8B's shapes: what the planner reads of a store."""
    from types import SimpleNamespace

    import transformers as tf

    from ollm.models.registry import build_spec
    from ollm.storage.synthetic import PRESETS

    cls, kw = PRESETS["llama3-8b"]
    spec = build_spec(getattr(tf, cls)(**kw))
    layer = 2 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096 + 2 * 4096)
    table = SimpleNamespace(nbytes=2 * 128256 * 4096)
    tensors = {"embed_tokens.weight": table, "lm_head.weight": table,
               "norm.weight": SimpleNamespace(nbytes=8192)}  # fmt: skip
    store = SimpleNamespace(
        files={"globals.bin": SimpleNamespace(tensors=tensors)},
        max_layer_nbytes=layer,
        layer_nbytes=lambda i: layer,
    )
    return spec, store


@pytest.mark.parametrize("spec", ["int8", "int4"])
def test_plan_counts_the_workspace_with_every_layer_on_the_device(spec):
    """8B shapes, 8 GiB, 32k, no cost model: every layer's compressed KV stays on the device
    (no prefill scratch), and the plan still reserves the decoded buffers every prefill chunk
    uses (2 x (16384 + 159) slots x 8 heads x 128 x 2 bytes) and the attention's transients
    beyond an exact layer's."""
    from ollm.planning.footprint import codec_attention_bytes
    from ollm.planning.placement import Workload, plan_placement

    model, store = llama8b()
    fmt = kv_format(spec, 128, 128, 2)
    work = Workload(1, 32768, 32768)
    plan = plan_placement(model, store, "cuda:0", 8 << 30, None, work=work, kv_format=fmt)
    assert all(p.kv_tier == "device" for p in plan.layers)
    assert plan.prefill_chunk_tokens == 16384
    decoded = 2 * (16384 + 128 + fmt.block - 1) * 8 * 128 * 2  # int4: 16-token key groups
    transients = codec_attention_bytes(1, 32, 8, 128, 2, 16384, 128, fmt.block)
    exact_attn = 16384 * (32 * 128 * 2 + 12 * 32)  # activation_parts' flash attention
    assert plan.reserved["codec workspace"] == decoded + transients - exact_attn
    assert plan.reserved["kv cache"] == 32 * fmt.layer_bytes(1, 8, 128, 2, 32768)
    assert plan.peak_device_bytes <= 8 << 30


@pytest.mark.parametrize(
    "spec,recent,rows,score_block",
    [
        ("int8", 128, 512, 64 << 20),  # 8B heads, one group of band tiles
        ("int4", 128, 1024, 4 << 20),  # several groups
        ("k:int4,v:int8", 16, 700, 1 << 20),  # rows not a multiple of the tile
        ("int8", 0, 300, 256 << 10),
    ],
)
def test_codec_attention_transients_within_the_plan(monkeypatch, spec, recent, rows, score_block):
    """The live bytes a compressed layer's prefill chunk allocates (after the first chunk, so
    every part runs: encoded prefix, band, causal) stay within ``codec_attention_bytes``, which
    is no blanket either (at most twice the measured peak)."""
    from ollm.planning.footprint import codec_attention_bytes
    from test_budget import LiveBytes

    monkeypatch.setattr("ollm.kv.codec_attend.SCORE_BLOCK_BYTES", score_block)
    monkeypatch.setattr(footprint, "SCORE_BLOCK_BYTES", score_block)
    b, h, kvh, d = 1, 32, 8, 128
    codec = parse_kv_codec(spec, recent)
    ctx = 2 * rows
    ws = CodecWorkspace({"cpu": codec_decoded_slots(rows, ctx, codec.block, recent, True)})
    cache = CompressedKVCache(b, kvh, d, ctx, torch.bfloat16, codec, "cpu", ws)
    g = torch.Generator().manual_seed(rows)
    q = torch.randn(b, h, ctx, d, generator=g).bfloat16()
    k, v = (torch.randn(b, kvh, ctx, d, generator=g).bfloat16() for _ in "kv")
    scale = 1 / math.sqrt(d)
    first = AttentionMask(0, rows, rows)
    cache.attend(q[:, :, :rows], k[:, :, :rows], v[:, :, :rows], first, scale, None)
    with LiveBytes() as live:
        sl = slice(rows, ctx)
        cache.attend(
            q[:, :, sl], k[:, :, sl], v[:, :, sl], AttentionMask(rows, rows, ctx), scale, None
        )
    planned = codec_attention_bytes(b, h, kvh, d, 2, rows, recent, codec.block)
    assert live.peak <= planned, (live.peak, planned)
    assert planned <= 2 * live.peak
