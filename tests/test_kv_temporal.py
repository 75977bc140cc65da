"""Temporal KV tiers (issue 17 part 2): schedules parsed or refused in one line, blocks
re-encoded at the ages set, attention over exact, middle-tier and deep blocks against
decode-then-attend, the middle tier's ring wrapping, trim, the planner's bytes and the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from ollm.cli import app
from ollm.config import EngineConfig
from ollm.errors import OllmError
from ollm.kv.codecs import CodeStore, KVCodec, kv_format, parse_kv_codec
from ollm.kv.compressed import CodecWorkspace
from ollm.kv.temporal import TemporalCodec, TemporalKVCache
from ollm.layers.attention import AttentionMask

SPEC = "40:bf16,150:int8,rest:int4"  # small ages: several blocks in each tier


def test_schedules_parse_and_refuse():
    c = parse_kv_codec("4k:bf16,32k:int8,rest:int4")
    assert isinstance(c, TemporalCodec)
    assert (c.recent, c.mid.key.kind, c.deep.recent, c.deep.value.kind) == (
        4096,
        "int8",
        32768,
        "int4",
    )
    two = parse_kv_codec("4k:bf16,rest:int4")  # one codec with a 4k exact window
    assert isinstance(two, KVCodec) and two.recent == 4096 and two.key.kind == "int4"
    for bad in (
        "4k:int8,rest:int4",  # the newest tier is not exact
        "4k:bf16,32k:int4,rest:int8",  # older tiers would grow
        "4k:bf16,32k:int8",  # no rest
        "4k:bf16,16k:int8,32k:fp8,rest:int4",  # four tiers
        "4k:bf16,rest:int3",
        "x:bf16,rest:int4",
        "32k:bf16,4k:int8,rest:int4",  # ages must grow by a block at least
    ):
        with pytest.raises(ValueError, match="bad KV schedule"):
            parse_kv_codec(bad)
    assert EngineConfig(kv_codec="4k:bf16,32k:int8,rest:int4").kv_codec.startswith("4k")
    with pytest.raises(OllmError, match="kv_evict combines with one codec for every slot"):
        EngineConfig(kv_codec="4k:bf16,32k:int8,rest:int4", kv_evict="h2o")


def _coded(codec: KVCodec, k: torch.Tensor, v: torch.Tensor):
    """k/v with their whole blocks encoded by ``codec`` and decoded again."""
    b, h, n, d = k.shape
    full = n // codec.block * codec.block
    if not full:
        return k.clone(), v.clone()
    store = CodeStore(codec, b, h, n, d, k.dtype)
    store.write(0, k[:, :, :full], v[:, :, :full])
    kd, vd = k.clone(), v.clone()
    store.read(0, full, kd[:, :, :full], vd[:, :, :full])
    return kd, vd


def _reference(codec: TemporalCodec, q, k, v, start):
    """Row q: keys before D (the forward's first row's deep boundary) int4 of their int8 codes,
    [D, E) int8, the rest exact, E = the middle boundary of q + 1."""
    km, vm = _coded(codec.mid, k, v)
    kdp, vdp = _coded(codec.deep, km, vm)
    d = codec.deep.boundary(start + 1)
    rep = q.shape[1] // k.shape[1]
    rows = []
    for i in range(q.shape[2]):
        pos = start + i
        e = codec.mid.boundary(pos + 1)
        parts = [(kdp, vdp, 0, d), (km, vm, d, e), (k, v, e, pos + 1)]
        kk = torch.cat([x[:, :, a:b] for x, _, a, b in parts], 2).double()
        vv = torch.cat([y[:, :, a:b] for _, y, a, b in parts], 2).double()
        s = q[:, :, i : i + 1].double() @ kk.repeat_interleave(rep, 1).transpose(-1, -2)
        rows.append(torch.softmax(s / math.sqrt(k.shape[3]), -1) @ vv.repeat_interleave(rep, 1))
    return torch.cat(rows, 2)


def _feed(cache, q, k, v, chunks, codec, check=True):
    pos = 0
    for t in chunks:
        sl = slice(pos, pos + t)
        m = AttentionMask(pos, t, pos + t)
        out = cache.attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], m, 1 / math.sqrt(16), None)
        if check:
            ref = _reference(codec, q[:, :, sl], k[:, :, : pos + t], v[:, :, : pos + t], pos)
            assert float((out.double() - ref).abs().max()) < 1e-5, (pos, t)
        assert cache.deep_len == codec.deep.boundary(pos + 1)  # aged at its first row
        pos += t
        assert cache.encoded == codec.mid.boundary(pos) and len(cache) == pos
    return pos


def _data(n, seed=7):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, x, n, 16, generator=g) for x in (4, 2, 2))
    k[..., 3] *= 10  # an outlier channel
    return q, k, v


@pytest.mark.parametrize("chunks", [[70, 70, 1, 1, 70, 3, 1, 70, 70, 70, 1, 1, 2], [1] * 300])
def test_attention_over_mixed_tiers_equals_decode_then_attend(chunks):
    """Chunks and decode steps; the middle tier's ring (sized for forwards of 70) wraps."""
    codec = parse_kv_codec(SPEC)
    n = sum(chunks)
    q, k, v = _data(n)
    fwd = max(chunks)
    cache = TemporalKVCache(2, 2, 16, n, torch.float32, codec, "cpu", CodecWorkspace(), forward=fwd)
    assert cache.store.slots < n - codec.recent  # a ring, not the whole context
    _feed(cache, q, k, v, chunks, codec)
    assert cache.deep_len > 0 and cache.encoded > cache.deep_len
    # the deep store holds int4 codes of the int8-decoded blocks
    km, vm = _coded(codec.mid, k, v)
    kdp, _ = _coded(codec.deep, km, vm)
    kd, vd = torch.empty(2, 2, 32, 16), torch.empty(2, 2, 32, 16)
    cache.deep.read(0, 32, kd, vd)
    assert torch.equal(kd, kdp[:, :, :32])
    int8_only = CodeStore(codec.mid, 2, 2, n, 16, torch.float32).range_nbytes(0, cache.encoded)
    tail = 2 * 2 * 2 * (n - cache.encoded) * 16 * 4
    assert cache.bytes_read() < int8_only + tail  # the oldest blocks read as int4


def test_trim_within_the_ring_and_overflow_refused():
    """A rollback below the middle boundary: its blocks come back to the tail decoded (their
    exact values are gone), later steps attend over them as such; a forward larger than the
    ring was sized for is refused."""
    codec = parse_kv_codec(SPEC)
    q, k, v = _data(400, seed=9)
    cache = TemporalKVCache(
        2, 2, 16, 400, torch.float32, codec, "cpu", CodecWorkspace(), forward=70
    )
    pos = _feed(cache, q, k, v, [70, 70, 70, 1], codec, check=False)
    at = pos - 40
    old, e = cache.encoded, codec.mid.boundary(at)
    cache.trim(at)
    assert (cache.encoded, len(cache)) == (e, at) and e < old
    km, vm = _coded(codec.mid, k, v)
    k2, v2 = k.clone(), v.clone()  # the tail now holds [e, old) as decoded
    k2[:, :, e:old], v2[:, :, e:old] = km[:, :, e:old], vm[:, :, e:old]
    sl = slice(at, at + 1)
    out = cache.attend(
        q[:, :, sl], k[:, :, sl], v[:, :, sl], AttentionMask(at, 1, at + 1), 0.25, None
    )
    ref = _reference(codec, q[:, :, sl], k2[:, :, : at + 1], v2[:, :, : at + 1], at)
    assert codec.mid.boundary(at + 1) == e  # nothing re-encoded by this step
    assert float((out.double() - ref).abs().max()) < 1e-5  # scale 0.25 = 1 / sqrt(16)
    s = slice(at + 1, at + 200)
    with pytest.raises(RuntimeError, match="overflows the KV schedule's middle tier"):
        cache.attend(
            q[:, :, s], k[:, :, s], v[:, :, s], AttentionMask(at + 1, 199, at + 200), 0.25, None
        )


def test_planner_counts_the_schedule():
    """Stored bytes of a layer as the cache allocates them, between int4's and int8's at 100k."""
    spec = "4k:bf16,32k:int8,rest:int4"
    fmt = kv_format(spec, 128, 128, 2)
    ctx, fwd = 100_000, 16384
    per = {c: kv_format(c, 4096, 128, 2).layer_bytes(1, 8, 128, 2, ctx) for c in ("int8", "int4")}
    assert per["int4"] < fmt.layer_bytes(1, 8, 128, 2, ctx, fwd) < per["int8"]
    small = 3000
    cache = TemporalKVCache(1, 2, 128, small, torch.bfloat16, parse_kv_codec(spec), "cpu",
                            CodecWorkspace(), forward=512)  # fmt: skip
    planned = fmt.layer_bytes(1, 2, 128, 2, small, 512)
    assert planned - 256 <= cache.nbytes <= planned


def test_cli_flag():
    bad = (
        ["--kv-temporal", "4k:int8,rest:int4"],
        ["--kv-temporal", "int8"],
        ["--kv-temporal", "4k:bf16,rest:int4", "--kv-codec", "int8"],
    )
    for args in bad:
        res = CliRunner().invoke(app, ["run", "hi", "--device", "cpu", *args])
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("ollm: ")]
        assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr


def test_schedule_through_a_tiny_model(tmp_path):
    """The schedule reaches every full-attention layer through the engine; log-probs inside
    the exact window are the exact path's, later ones drift less than int4 alone."""
    from conftest import char_tokenizer, make_hf_model
    from ollm import LLM

    path = tmp_path / "llama"
    make_hf_model("llama", path)
    char_tokenizer().save_pretrained(str(path))
    ids = list(range(1, 200))
    with LLM(str(path), device="cpu", max_context=256) as exact:
        ref = exact.score(ids)
    drift = {}
    for codec in ("16:bf16,80:int8,rest:int4", "16:bf16,rest:int4"):
        with LLM(str(path), device="cpu", max_context=256, kv_codec=codec) as llm:
            caches = llm.runner.new_kv(1, 256)
            kinds = {type(c).__name__ for c in caches}
            for c in caches:
                c.close()
            lp = llm.score(ids)
        assert torch.allclose(lp[:16], ref[:16], atol=1e-4)
        drift[codec] = (kinds, float((lp - ref).abs().mean()))
    assert drift["16:bf16,80:int8,rest:int4"][0] == {"TemporalKVCache"}
    assert 0 < drift["16:bf16,80:int8,rest:int4"][1] < drift["16:bf16,rest:int4"][1]


def test_plain_codec_rollback_across_a_block_boundary():
    """A rollback that stays above the encoded slots but below the next block's boundary (a
    rejected draft): the block a query there sees exact comes back decoded, the exact slots
    after it stay; it used to leave the boundary ahead of the length (negative slices)."""
    from ollm.kv.compressed import CompressedKVCache

    codec = parse_kv_codec("int8", 40)
    q, k, v = _data(200, seed=11)
    cache = CompressedKVCache(2, 2, 16, 200, torch.float32, codec, "cpu", CodecWorkspace())
    for a, b in ((0, 150), (150, 160)):
        m = AttentionMask(a, b - a, b)
        cache.attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], m, 0.25, None)
    old = cache.encoded  # boundary(160) = 96
    at = 130  # >= encoded, boundary(130) = 64 < 96
    cache.trim(at)
    assert (cache.encoded, len(cache)) == (codec.boundary(at), at)
    km, vm = _coded(codec, k, v)
    k2, v2 = k.clone(), v.clone()
    e = codec.boundary(at)
    k2[:, :, e:old], v2[:, :, e:old] = km[:, :, e:old], vm[:, :, e:old]
    sl = slice(at, at + 1)
    out = cache.attend(
        q[:, :, sl], k[:, :, sl], v[:, :, sl], AttentionMask(at, 1, at + 1), 0.25, None
    )
    kk = torch.cat([km[:, :, :e], k2[:, :, e : at + 1]], 2).double().repeat_interleave(2, 1)
    vv = torch.cat([vm[:, :, :e], v2[:, :, e : at + 1]], 2).double().repeat_interleave(2, 1)
    ref = torch.softmax(q[:, :, sl].double() @ kk.transpose(-1, -2) / 4, -1) @ vv
    assert float((out.double() - ref).abs().max()) < 1e-5


def test_sources_for_queries_on_another_device():
    """A RAM-homed schedule read from the GPU copies the deep prefix and the ring's live slots
    into staging stores (the same ring positions): they decode to what home holds. The CPU
    stands in for the GPU under another device name."""
    codec = parse_kv_codec(SPEC)
    q, k, v = _data(400, seed=13)
    cache = TemporalKVCache(
        2, 2, 16, 400, torch.float32, codec, "cpu", CodecWorkspace(), forward=70
    )
    _feed(cache, q, k, v, [70, 70, 70, 70, 70, 1, 1], codec, check=False)
    other = torch.device("cpu", 0)  # != the home device "cpu"
    d, e = cache.deep_len, cache.encoded
    assert 0 < d < e and e - d < cache.store.slots < e  # the ring has wrapped
    want = [torch.empty(2, 2, e - d, 16) for _ in "kv"]
    got = [torch.empty(2, 2, e - d, 16) for _ in "kv"]
    cache.store.read(d, e, *want)
    cache._source(other, e).read(d, e, *got)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    deep_want = [torch.empty(2, 2, d, 16) for _ in "kv"]
    deep_got = [torch.empty(2, 2, d, 16) for _ in "kv"]
    cache.deep.read(0, d, *deep_want)
    cache._deep_source(other).read(0, d, *deep_got)
    assert all(torch.equal(a, b) for a, b in zip(deep_want, deep_got, strict=True))
