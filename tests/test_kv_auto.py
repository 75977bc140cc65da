"""``--kv-codec auto`` (issue 17 part 5): the pure chooser of a codec per KV tier from measured
rates (``planning.kv_choice``) on synthetic machines, the planner's view of its choice, and a
tiny model run with ``auto`` that reports what it chose."""

from __future__ import annotations

import pytest

from conftest import char_tokenizer, make_hf_model
from ollm.kv.codec_auto import choose, codec_costs, default_choice
from ollm.kv.codecs import codec_for_tier, kv_format
from ollm.planning.kv_choice import MIN_GAIN, KvRates, layer_weight_seconds
from ollm.tiers import KvTier

# Llama-3.1-8B shapes: 8 KV heads of 128, bf16, 436 MB layers
HEADS, DIM, ELEM, LAYER = 8, 128, 2, 436_207_616
H200 = KvRates(device=5.2e12, link=54e9, cpu_attn=21e9, disk=2e9, measured=True)


def pick(rates: KvRates, context: int = 32768, recent: int = 128, streamed: int = 1):
    weight_s = layer_weight_seconds(rates, LAYER, streamed, 1)
    return choose(rates, HEADS, DIM, ELEM, context, recent, weight_s)


def bytes_of(spec: str) -> float:
    return next(c.bytes_per_token for c in codec_costs(DIM, ELEM) if c.spec == spec)


def test_slow_disk_gets_int4_and_the_fast_gpu_tier_stays_exact():
    slow = pick(KvRates(device=5.2e12, link=54e9, cpu_attn=21e9, disk=0.5e9))
    assert slow.spec(KvTier.DISK) == "int4"  # the most compressed codec the quality rule allows
    assert slow.spec(KvTier.DEVICE) == "none"  # a GPU memory read: negligible next to weights
    dev = slow.tiers["device"]
    assert dev.seconds < MIN_GAIN * layer_weight_seconds(H200, LAYER, 1, 1)
    assert "ms/layer" in dev.why and "GPU memory read" in dev.why
    # the estimate is stored bytes over the rates the KV crosses: disk, then the link
    disk = slow.tiers["disk"]
    smallest = min(c.bytes_per_token for c in codec_costs(DIM, ELEM))
    # int4: 16-token key groups (24 B of parameters per token at head_dim 128), 158 of 512 B
    assert disk.bytes_per_token == bytes_of("int4") == smallest < 0.35 * bytes_of("none")
    assert "disk read + host->GPU copy" in disk.why


def test_ram_kv_copied_over_the_link_is_compressed_when_it_pays():
    ch = pick(H200)
    assert ch.spec(KvTier.CPU) == "int4" and ch.spec(KvTier.DISK) == "int4"
    # at a short context the RAM KV copy is a small share of the layer step: exact; a disk
    # read at 2 GB/s still is not
    short = pick(H200, context=2048)
    assert short.spec(KvTier.CPU) == short.spec(KvTier.DEVICE) == "none"
    assert "(< 10%)" in short.tiers["cpu"].why and short.spec(KvTier.DISK) == "int4"


def test_cpu_decode_bottleneck_keeps_exact_or_a_lighter_codec():
    """Codes cost more than bf16 to attend on the CPU (CPU_ATTN_COST): where CPU attention is
    the bottleneck (a CPU machine, KV files in the page cache) compression does not pay."""
    cpu = pick(KvRates(device=0.0, link=0.0, cpu_attn=1e9, disk=20e9))
    assert cpu.spec(KvTier.DEVICE) == "none" and cpu.spec(KvTier.DISK) == "none"
    assert "cpu" not in cpu.tiers  # a CPU machine has no pinned-RAM tier
    # the same disk behind a slow CPU but a fast one: between exact and int4, never int4
    mid = pick(KvRates(device=0.0, link=0.0, cpu_attn=8e9, disk=6e9))
    assert bytes_of("int4") < mid.tiers["disk"].bytes_per_token
    # a slow disk makes the read dominate again: the most compressed codec
    slow = pick(KvRates(device=0.0, link=0.0, cpu_attn=8e9, disk=0.3e9))
    assert slow.spec(KvTier.DISK) == "int4"


def test_pinned_ram_attended_on_the_cpu_when_the_link_is_slow():
    """RAM KV takes the faster of the link and CPU attention; with a slow link and a fast CPU
    the CPU path wins and codes only slow it down: exact."""
    ch = pick(KvRates(device=5e12, link=2e9, cpu_attn=60e9, disk=2e9))
    assert ch.spec(KvTier.CPU) == "none" and "CPU attention" in ch.tiers["cpu"].why
    assert ch.spec(KvTier.DISK) != "none"  # disk still pays (its read comes first)


def test_quality_rule_int4_needs_a_128_token_window():
    assert pick(H200, recent=64).spec(KvTier.CPU) == "int8"
    assert pick(H200, recent=0).spec(KvTier.DISK) == "int8"
    assert pick(H200, recent=128).spec(KvTier.CPU) == "int4"
    # a cache no longer than the window encodes nothing: exact
    tiny = pick(KvRates(disk=1e6), context=100)
    assert {c.spec for c in tiny.tiers.values()} == {"none"}


def test_the_device_tier_compresses_only_at_very_long_context_and_as_ram_does():
    """A resident model (the least weight time) at 1M tokens: the GPU read pays; the device
    tier then takes the RAM tier's codec (the planner's single stored format)."""
    ch = pick(H200, context=1 << 20, streamed=0)
    assert ch.spec(KvTier.DEVICE) == ch.spec(KvTier.CPU) == "int4"
    assert pick(H200, context=32768, streamed=0).spec(KvTier.DEVICE) == "none"


def test_disk_never_stores_more_than_compressed_ram():
    for disk in (0.2e9, 2e9, 50e9, 500e9):
        for link in (5e9, 54e9):
            ch = pick(KvRates(device=5e12, link=link, cpu_attn=21e9, disk=disk))
            ram, dk = ch.tiers["cpu"], ch.tiers["disk"]
            if ram.spec != "none":
                assert dk.bytes_per_token <= ram.bytes_per_token


def test_choice_is_deterministic():
    a, b = pick(H200), pick(H200)
    assert a == b and a.summary() == b.summary() and a.describe() == b.describe()
    assert default_choice(128) == default_choice(128)
    s = a.summary()
    assert "device exact (512 B/token/head)" in s and "RAM int4 (158 B/token/head)" in s
    assert "measured rates" in s and "32768 tokens" in s


def test_codec_for_tier_and_kv_format_read_the_choice():
    ch = pick(KvRates(device=5e12, link=2e9, cpu_attn=60e9, disk=2e9))  # RAM exact, disk int4
    assert codec_for_tier(ch, KvTier.CPU) is None and codec_for_tier(ch, KvTier.DEVICE) is None
    assert codec_for_tier(ch, KvTier.DISK).key.kind == ch.spec(KvTier.DISK).split(",")[0][-4:]
    fmt = kv_format(ch, 128, DIM, ELEM)  # the offloaded KV's: disk's, RAM left exact
    assert fmt is not None and not fmt.ram and not fmt.on_device
    assert fmt.bytes_per_token == ch.tiers["disk"].bytes_per_token
    assert kv_format(ch, 128, DIM, ELEM, KvTier.CPU) is None
    both = pick(H200)
    fmt = kv_format(both, 128, DIM, ELEM)
    assert fmt.ram and not fmt.on_device and fmt.bytes_per_token == bytes_of("int4")
    # the text "auto" without an engine: the default rates at reference shapes
    assert codec_for_tier("auto", "device") is None
    assert codec_for_tier("auto", "cpu").key.kind == "int4"


def test_plan_counts_the_chosen_formats():
    """The planner gets the choice's stored bytes (8B shapes, 8 GiB, H200 rates at 100k):
    compressed RAM KV is copied encoded and keeps at least bf16's layers off the link within
    the budget; RAM left exact (disk only compressed) keeps the exact accounting."""
    from ollm.planning.placement import Workload, plan_placement
    from ollm.planning.sizing import PlanSizes
    from test_kv_codec_budget import llama8b
    from test_plan_codecs import h200, off_link

    model, store = llama8b()
    ctx, gib = 100000, 1 << 30
    work = Workload(1, ctx, ctx)
    ram_exact = kv_format(pick(KvRates(device=5e12, link=2e9, cpu_attn=60e9), ctx), 128, DIM, ELEM)
    both = kv_format(pick(H200, ctx), 128, DIM, ELEM)
    args = (model, store, work, ELEM, "cuda:0", 8 * gib, None, None)
    a, b = PlanSizes.of(*args, kv_format=ram_exact), PlanSizes.of(*args, kv_format=both)
    assert not a.compressed and a.kv_copy == () and a.cpu_kv_cost == 1.0
    assert b.compressed and max(b.kv_copy) == int(8 * ctx * bytes_of("int4"))
    assert b.cpu_kv_cost > 1.0
    rates = h200(ctx)
    plans = {
        name: plan_placement(
            model, store, "cuda:0", 8 * gib, 200 * gib, work=work, rates=rates, kv_format=fmt
        )  # fmt: skip
        for name, fmt in (("bf16", None), ("auto", both))
    }
    assert plans["auto"].peak_device_bytes <= 8 * gib
    assert off_link(plans["auto"]) >= off_link(plans["bf16"])
    assert not any(p.kv_fetch for p in plans["auto"].layers)  # compressed: no fetch buffers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("kvauto") / "llama"
    make_hf_model("llama", path)
    char_tokenizer().save_pretrained(str(path))
    return str(path)


def test_disk_rate_is_the_page_cache_while_kv_fits_in_ram():
    from ollm.engine.kv_auto import disk_rate
    from ollm.planning.kv_choice import DEFAULT_DISK, DEFAULT_PAGE_CACHE

    assert disk_rate(1 << 20) == DEFAULT_PAGE_CACHE and disk_rate(1 << 60) == DEFAULT_DISK


def test_auto_runs_and_reports_its_choice(tiny, tmp_path, monkeypatch):
    """A tiny model with ``kv_codec="auto"`` on the CPU behind a slow disk (1 MB/s): device KV
    exact (codes only cost the CPU more), disk KV compressed; the plan, ``info()`` and the
    run's metrics say so, and scores move as int8 KV's do."""
    from ollm import LLM, SamplingParams
    from ollm.engine import calibrate, kv_auto

    monkeypatch.setattr(kv_auto, "disk_rate", lambda kv_bytes: 1e6)
    # the CPU's decode attention rate as a sane fixed figure: the measured one (cached per
    # machine) moves with the load, and this test is about the plumbing, not the machine
    monkeypatch.setattr(calibrate, "cpu_attention_rate", lambda *a: 2e9)
    ids = list(range(1, 150))
    params = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    with LLM(tiny, device="cpu", max_context=256) as exact:
        ref = exact.score(ids)
    opts = {"kv_cache": "disk", "kv_dir": str(tmp_path), "kv_recent": 16}
    with LLM(tiny, device="cpu", max_context=256, kv_codec="auto", **opts) as llm:
        choice = llm.plan.kv_codecs
        assert choice is not None and choice.spec(KvTier.DEVICE) == "none"
        disk = choice.spec(KvTier.DISK)
        assert disk == "int8"  # recent 16 < 128: no int4
        rows = llm.info()["plan"]
        assert rows["KV codec (auto), device"].startswith("exact: ")
        assert rows["KV codec (auto), disk"].startswith("int8: ")
        held = llm.runner.kv_codec  # what CompressedCaches reads per tier
        assert codec_for_tier(held, KvTier.DISK).key.kind == "int8"
        assert codec_for_tier(held, KvTier.DEVICE) is None
        res = llm.generate(ids, params)
        assert len(res.token_ids) == 4
        m = res.metrics
        assert m.kv_codecs == choice.summary() and "disk int8" in m.kv_codecs
        assert ("KV codecs (auto)", m.kv_codecs) in m.rows()
        lp = llm.score(ids)
    assert 0 < float((lp - ref).abs().mean()) < 0.05  # int8 on disk: close to exact, not equal
    with LLM(tiny, device="cpu", max_context=256, kv_codec="auto") as llm:  # no disk KV
        assert llm.plan.kv_codecs.spec(KvTier.DEVICE) == "none"
        assert torch_equal(llm.score(ids), ref)  # every layer's KV on the device: exact


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_cli_run_reports_the_choice(tiny, tmp_path):
    """``ollm run --kv-codec auto`` with this machine's rates (its CPU attention measured):
    the JSON metrics carry each tier's codec."""
    import json

    from typer.testing import CliRunner

    from ollm.cli import app

    args = ["run", "x" * 150, "--model", tiny, "--cache-dir", str(tmp_path / "c"), "--device",
            "cpu", "--kv-codec", "auto", "--kv-cache", "disk", "--kv-dir", str(tmp_path / "kv"),
            "--max-context", "256", "--max-new-tokens", "2", "--raw", "--json"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    codecs = json.loads(res.stdout)["metrics"]["kv_codecs"]
    assert codecs.startswith("device exact (") and ", disk " in codecs
    assert codecs.endswith("at 256 tokens, measured rates")


def test_cli_info_shows_each_tier_and_why(tiny, tmp_path):
    import json

    from typer.testing import CliRunner

    from ollm.cli import app

    args = ["info", tiny, "--cache-dir", str(tmp_path / "c"), "--device", "cpu", "--kv-codec",
            "auto", "--max-context", "256", "--json"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)["plan"]
    assert plan["KV codec (auto), device"].startswith("exact: KV ")
    assert "ms/layer" in plan["KV codec (auto), disk"]
