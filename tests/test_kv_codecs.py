"""KV codecs (issue 17): error bounds of the codecs, attention over encoded blocks against
decode-then-attend, the compressed cache through a tiny model, the CLI's refusals."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import char_tokenizer, make_hf_model
from ollm.cli import app
from ollm.kv.codecs import (
    CodeStore,
    SideCodec,
    codec_for_tier,
    decode,
    encode,
    parse_kv_codec,
)
from ollm.kv.compressed import CodecWorkspace, CompressedKVCache
from ollm.layers.attention import AttentionMask


def _values(shape, seed=0) -> torch.Tensor:
    """Values with per-channel offsets and outlier channels (what keys look like)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., 3] *= 20
    return x + torch.randn(shape[-1], generator=g) * 4


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("axis", ["channel", "token"])
def test_integer_codecs_error_at_most_half_a_step(kind, axis):
    side = SideCodec(kind, axis, 32)
    x = _values((2, 3, 32, 64))
    codes, params = encode(x, side)
    assert codes.dtype == torch.uint8
    assert codes.shape[-1] == (32 if kind == "int4" else 64)  # int4: two codes per byte
    out = decode(codes, params, side, torch.empty_like(x))
    scale = side.lo_scale(params)[1]  # [B, H, 1, D] per channel; [B, H, T, G] per token
    if axis == "token":
        scale = scale.repeat_interleave(32, dim=-1)
    err = (out - x).abs()
    assert bool((err <= scale / 2 * (1 + 1e-4) + 1e-6).all()), float((err - scale / 2).max())
    # the step is the group's range over the code range (float16 rounding aside): no more
    rng = x.amax(2, keepdim=True) - x.amin(2, keepdim=True) if axis == "channel" else None
    if rng is not None and kind == "int8":
        lo = x.amin(2, keepdim=True).abs()  # lo is rounded down to float16: one ulp more
        assert bool((scale <= (rng + lo * 2**-10) / 255 * (1 + 2**-10) + 1e-6).all())
    elif rng is not None:  # int4's 3-byte parameters: the scale rounded up to 7 mantissa bits
        assert bool((scale <= rng / 15 * (1 + 2**-7) * (1 + 2**-10) + 1e-6).all())


def test_fp8_codec_relative_error():
    for axis in ("channel", "token"):
        side = SideCodec("fp8", axis, 32)
        x = _values((1, 2, 32, 64), seed=1)
        codes, params = encode(x, side)
        out = decode(codes, params, side, torch.empty_like(x))
        # e4m3: 3 mantissa bits, relative rounding <= 2^-4; subnormals an absolute 2^-10 scale
        scale = params.float().amax()
        assert bool(((out - x).abs() <= x.abs() / 16 + scale * 2**-9 + 1e-6).all())


def test_code_store_blocks_and_bytes():
    codec = parse_kv_codec("k:int4,v:int8", recent=0, group=32)
    store = CodeStore(codec, 2, 2, 100, 64, torch.float32)
    assert store.slots == 128  # whole blocks of 32
    k, v = _values((2, 2, 64, 64)), _values((2, 2, 64, 64), seed=2)
    store.write(32, k, v)
    kd, vd = torch.empty_like(k), torch.empty_like(v)
    store.read(32, 96, kd, vd)
    assert float((kd - k).abs().max()) < float(k.abs().max()) / 10
    assert float((vd - v).abs().max()) < float(v.abs().max()) / 100
    # int4 keys 32 B + 3 B of (lo, scale) per channel per 32 tokens (6 B); int8 values
    # 64 B + float16 (lo, scale) per 32 channels (8 B)
    assert codec.bytes_per_token(64, 2) == 32 + 6 + 64 + 8
    assert store.range_nbytes(0, 32) == 2 * 2 * 32 * (32 + 6 + 64 + 8)


def test_parse_kv_codec():
    assert parse_kv_codec("none") is None and parse_kv_codec(None) is None
    c = parse_kv_codec("k:int4,v:fp8", recent=64)
    assert (c.key.kind, c.key.axis, c.value.kind, c.value.axis, c.recent) == (
        "int4",
        "channel",
        "fp8",
        "token",
        64,
    )
    assert parse_kv_codec("int8").key.kind == "int8"
    assert codec_for_tier("auto", "device") is None
    assert codec_for_tier("auto", "cpu").key.kind == "int4"
    for bad in ("int3", "k:int4,x:int8", "k:int4,k:int8", "k=int4"):
        with pytest.raises(ValueError):
            parse_kv_codec(bad)


def _reference(codec, q, k, v, start):
    """Decode-then-attend: row q sees the keys before boundary(q + 1) encoded and decoded."""
    b, kvh, n, d = k.shape
    store = CodeStore(codec, b, kvh, n, d, k.dtype)
    full = n // codec.block * codec.block
    store.write(0, k[:, :, :full], v[:, :, :full])
    kd, vd = k.clone(), v.clone()
    store.read(0, full, kd[:, :, :full], vd[:, :, :full])
    sinks = codec.sink_slots  # kept exact beside their codes
    kd[:, :, :sinks], vd[:, :, :sinks] = k[:, :, :sinks], v[:, :, :sinks]
    rep = q.shape[1] // kvh
    rows = []
    for i in range(q.shape[2]):
        pos = start + i
        e = codec.boundary(pos + 1)
        kk = torch.cat([kd[:, :, :e], k[:, :, e : pos + 1]], 2).double().repeat_interleave(rep, 1)
        vv = torch.cat([vd[:, :, :e], v[:, :, e : pos + 1]], 2).double().repeat_interleave(rep, 1)
        s = q[:, :, i : i + 1].double() @ kk.transpose(-1, -2) / math.sqrt(d)
        rows.append(torch.softmax(s, -1) @ vv)
    return torch.cat(rows, 2)


@pytest.mark.parametrize(
    "spec,recent,chunks",
    [
        ("int4", 16, [120] + [1] * 8),
        ("k:int4,v:int8", 0, [70, 70, 60, 1, 1, 1, 25]),
        ("fp8", 40, [33, 1, 100, 1, 1]),
    ],
)
def test_attention_over_encoded_blocks_equals_decode_then_attend(spec, recent, chunks, monkeypatch):
    monkeypatch.setattr("ollm.kv.compressed.MASK_ROWS", 24)  # several row blocks per forward
    codec = parse_kv_codec(spec, recent)
    b, h, kvh, d, n = 2, 4, 2, 32, sum(chunks)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, x, n, d, generator=g) for x in (h, kvh, kvh))
    cache = CompressedKVCache(b, kvh, d, n, torch.float32, codec, "cpu", CodecWorkspace())
    pos = 0
    for t in chunks:
        sl = slice(pos, pos + t)
        out = cache.attend(
            q[:, :, sl],
            k[:, :, sl],
            v[:, :, sl],
            AttentionMask(pos, t, pos + t),
            1 / math.sqrt(d),
            None,
        )
        ref = _reference(codec, q[:, :, sl], k[:, :, : pos + t], v[:, :, : pos + t], pos)
        assert float((out.double() - ref).abs().max()) < 1e-5
        pos += t
    assert cache.encoded == codec.boundary(n) and len(cache) == n
    exact_bytes = 2 * b * kvh * n * d * 4
    assert cache.store.nbytes < exact_bytes / 2


def test_padding_mask_and_trim():
    codec = parse_kv_codec("int8", recent=8)
    b, h, d, n = 2, 2, 16, 96
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[1, :5] = False  # sequence 1 is left-padded
    cache = CompressedKVCache(b, h, d, n, torch.float32, codec, "cpu", CodecWorkspace())
    out = cache.attend(
        q[:, :, :80], k[:, :, :80], v[:, :, :80], AttentionMask(0, 80, 80, keep), 0.25, None
    )
    assert not bool(out.isnan().any())
    # sequence 0 has no padding: it matches the reference row by row
    ref = _reference(codec, q[:1, :, :80], k[:1, :, :80], v[:1, :, :80], 0)
    assert float((out[:1].double() - ref).abs().max()) < 1e-5
    cache.trim(40)  # below the encoded boundary: the tail comes back decoded
    assert len(cache) == 40 and cache.encoded == codec.boundary(40)
    nxt = cache.attend(
        q[:, :, 40:41], k[:, :, 40:41], v[:, :, 40:41], AttentionMask(40, 1, 41, keep), 0.25, None
    )
    assert nxt.shape == (b, h, 1, d) and not bool(nxt.isnan().any())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("kvc") / "llama"
    make_hf_model("llama", path)
    char_tokenizer().save_pretrained(str(path))
    return str(path)


def test_compressed_cache_through_a_tiny_model(tiny, tmp_path):
    """Tokens under int8 need not equal the exact ones on a random model: log-probs close,
    int4 further off than int8, and the exact path itself when the codec is none."""
    from ollm import LLM, SamplingParams

    ids = list(range(1, 150))
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    with LLM(tiny, device="cpu", max_context=256) as exact:
        ref = exact.score(ids)
    with LLM(tiny, device="cpu", max_context=256, kv_codec="none") as same:
        assert torch.equal(same.score(ids), ref)  # codec none: the exact path itself
    drift = {}
    disk = {"kv_cache": "disk", "kv_dir": str(tmp_path)}
    for name, options in (("int8", {}), ("int8-disk", disk), ("int4", {})):
        codec = name.split("-")[0]
        with LLM(
            tiny, device="cpu", max_context=256, kv_codec=codec, kv_recent=16, **options
        ) as llm:
            if not options:
                caches = llm.runner.new_kv(1, 8)
                assert all(hasattr(c, "codec") for c in caches)  # every full-attention layer
                for c in caches:
                    c.close()
            lp = llm.score(ids)
            assert torch.allclose(lp[:16], ref[:16], atol=1e-4)  # inside the exact window
            drift[name] = float((lp - ref).abs().mean())
            if name == "int8":
                assert len(llm.generate(ids, params).token_ids) == 6
    assert drift["int8"] == pytest.approx(drift["int8-disk"], abs=1e-6)  # same codes on disk
    assert 0 < drift["int8"] < 0.05 and drift["int8"] < drift["int4"] / 4


def test_cli_refuses_bad_codec_specs():
    for args in (["--kv-codec", "int3"], ["--kv-codec", "k:int4,q:int8"], ["--kv-recent", "-1"]):
        res = CliRunner().invoke(app, ["run", "hi", "--device", "cpu", *args])
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("ollm: ")]
        assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr


def test_device_script_runs_on_the_cpu(tmp_path):
    """scripts/gpu/kv_codec.py's measurement on a tiny synthetic Llama (bf16 vs int4 KV), and
    its planner-only capacity figures: int4 fits a longer context in the same GPU and RAM."""
    import importlib.util
    from pathlib import Path

    from ollm.models.registry import STORE_FAMILIES
    from ollm.storage.synthetic import make_synthetic_store

    path = Path(__file__).parents[1] / "scripts" / "gpu" / "kv_codec.py"
    spec = importlib.util.spec_from_file_location("gpu_kv_codec", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    store = make_synthetic_store(
        "llama3-1b", tmp_path / "store", progress=False, families=STORE_FAMILIES,
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, vocab_size=256,
    )  # fmt: skip
    mod.RECENT = 16  # 600 tokens: the 32 exact sink tokens are a small part of them
    (row,) = mod.bench(
        store, contexts=(600,), new=3, codecs=("none", "int4"), device="cpu",
        cache_dir=tmp_path / "c",
    )  # fmt: skip
    none, int4 = row["runs"]["none"], row["runs"]["int4"]
    assert none["decode_tok_s"] > 0 and int4["decode_tok_s"] > 0 and len(int4["tokens"]) == 3
    assert int4["kv_bytes_read_per_step"] < none["kv_bytes_read_per_step"] / 2
    cap = mod.capacity(store, 160 << 20, 65536, "cuda:0")  # planning only: no GPU needed
    longest = cap["longest_context"]
    assert cap["ram_GiB"] > 0 and 0 < longest["none"] < longest["int8"] < longest["int4"]


def test_bench_floors_count_compressed_kv(tiny, tmp_path):
    """A RAM-homed compressed layer decoded on the GPU crosses the link encoded each step."""
    from ollm.bench.floors import compute_floors
    from ollm.kv.codecs import kv_format
    from ollm.models.registry import STORE_FAMILIES, build_spec
    from ollm.planning.placement import LayerPlacement, PlacementPlan
    from ollm.storage.convert import resolve_store
    from ollm.storage.store import LayerStore

    path = resolve_store(tiny, str(tmp_path), progress=False, families=STORE_FAMILIES)
    store = LayerStore(path)
    spec = build_spec(store.hf_config())
    layers = tuple(
        LayerPlacement("gpu", "cuda:0", kv_tier="cpu" if i == spec.num_layers - 1 else "device")
        for i in range(spec.num_layers)
    )
    plan = PlacementPlan(
        device="cuda:0", layers=layers, embed_device="cpu", head_device="cuda:0", ring_slots=2,
        staging_slots=1, layer_bytes=store.max_layer_nbytes, mlp_chunk_tokens=64, budget=1 << 30,
    )  # fmt: skip
    probes = {"h2d_pinned_GBps": 10.0, "ram_GBps": 20.0, "gpu_mem_GBps": 1000.0}
    elem = store.dtype.itemsize
    fmt = kv_format("int4", 16, spec.head_dim, elem)
    # 1000 tokens: the exact tail (recent + block + 32 sink tokens) is a small part of them
    exact = compute_floors(spec, store, plan, probes, prompt_tokens=1000)
    packed = compute_floors(spec, store, plan, probes, prompt_tokens=1000, kv_format=fmt)
    assert exact["kv_fetched_layers"] == 0 and "kv_s" in exact["decode"]  # CPU reads RAM KV
    assert packed["kv_fetched_layers"] == 1 and "kv_s" not in packed["decode"]
    stored = fmt.layer_bytes(1, spec.num_kv_heads, spec.head_dim, elem, 1001)
    assert packed["kv_fetched_bytes_decode"] == stored
    assert stored < 2 * spec.num_kv_heads * spec.head_dim * elem * 1001 / 2
    store.close()
