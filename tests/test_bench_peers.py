"""Peers of ``ollm bench``: the dry run, the worker's events and ratios, the same warm-up for
every engine, and llama.cpp (``-ngl`` for the budget, llama-bench's JSON, a whole run against a
stand-in ``llama-bench`` so it needs no GPU)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ollm.bench import llamacpp

ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30


def test_peers_dry_run(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "peers.py"), "--dry-run", "--json"]
    cmd += ["--synthetic", "llama3-8b", "--context", "8k,32k", "--wheels", str(tmp_path)]
    cmd += ["--llamacpp", str(tmp_path / "none")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["workload"]["contexts"] == [8192, 32768]
    rows = {r["peer"]: r for r in result["peers"]}
    assert set(rows) == {
        "llama.cpp",
        "accelerate-cpu",
        "accelerate-disk",
        "ollm-upstream",
        "airllm",
    }
    for r in rows.values():
        assert r["status"] in ("would run", "cannot run")
        assert r["status"] == "would run" or r["reason"]
    assert "wheels" in rows["ollm-upstream"]["reason"]  # the wheel folder given is empty
    assert "no llama.cpp tools" in rows["llama.cpp"]["reason"]  # the tools folder given is empty


def test_peer_events_and_ratios():
    from ollm.bench.peers import LLAMA_CPP, add_ratios, parse_events, print_table

    log = "\n".join(
        [
            "noise from the peer",
            '@@ {"event": "loaded", "load_s": 3.0, "info": {}, "versions": {}}',
            '@@ {"event": "warmup", "context": 64, "warmup_s": 2.5}',
            '@@ {"event": "case", "context": 64, "prefill_s": 2.0, "generated_tokens": 4, '
            '"decode_step_median_s": 0.5, "stopped_at_deadline": false, "warmup_s": 2.5}',
            '@@ {"event": "warmup", "context": 128, "warmup_s": 9.0, "warmup_prefill_s": 5.0, '
            '"warmup_step_s": 4.0}',
            '@@ {"event": "start", "context": 128, "t": 10.0}',
            '@@ {"event": "token", "context": 128, "i": 1, "t": 14.0}',
            '@@ {"event": "token", "context": 128, "i": 2, "t": 15.0}',
            '@@ {"event": "token", "context": 128, "i": 3, "t": 17.0}',
        ]
    )
    res = parse_events(log, [64, 128], killed=True)
    assert res["status"] == "partial" and "time limit" in res["reason"]
    full, part = res["cases"]
    assert full["status"] == "ok" and full["warmup_s"] == 2.5
    assert part["status"] == "partial" and part["warmup_prefill_s"] == 5.0
    assert part["prefill_s"] == 4.0 and part["decode_step_median_s"] == 1.5
    ollm = {
        "cases": [{"context": 64, "status": "ok", "prefill_s": 1.0, "decode_step_median_s": 0.25}]
    }
    peer = {"peer": "x", **res}
    add_ratios([peer], ollm)
    assert full["prefill_x_ollm"] == 2.0 and full["decode_x_ollm"] == 2.0
    assert "prefill_x_ollm" not in part  # ollm has no 128 case
    # killed during the warm-up: the warm-up's (cold) figures are still a partial case
    only_warm = parse_events(log.split('\n@@ {"event": "start"')[0], [128], killed=True)
    assert only_warm["cases"][0]["warmup_s"] == 9.0
    assert only_warm["cases"][0]["prefill_s"] is None
    buf = io.StringIO()
    print_table({"ollm": ollm, "peers": [{"peer": "y", **only_warm}]}, file=buf)
    assert "cold step in the warm-up 4.00 s" in buf.getvalue()
    failed = parse_events(
        '@@ {"event": "error", "stage": "load", "message": "boom\\nmore"}', [64], False
    )
    assert failed["status"] == "failed" and failed["reason"] == "load: boom more"
    buf = io.StringIO()
    print_table({"ollm": ollm, "peers": [peer], "reference": LLAMA_CPP}, file=buf)
    text = buf.getvalue()
    assert LLAMA_CPP["status"] in text and "same warm-up" in text
    for row in LLAMA_CPP["rows"]:  # a figure from another machine gets no ratio
        assert "prefill_x_ollm" not in row and "decode_x_ollm" not in row


def test_every_engine_gets_the_same_warm_up():
    """peer_worker.py imports nothing from ollm, so it keeps its own copy of the constant."""
    from ollm.bench.run import WARMUP_NEW_TOKENS

    spec = importlib.util.spec_from_file_location(
        "peer_worker", ROOT / "src" / "ollm" / "bench" / "peer_worker.py"
    )
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)  # type: ignore[union-attr]
    assert worker.WARMUP_NEW_TOKENS == WARMUP_NEW_TOKENS == 2
    # llama.cpp: llama-bench's own warm-up (full prompt, one token) stays on: no --no-warmup
    cmds = llamacpp.bench_commands("llama-bench", "m.gguf", 14, 8192, 16)
    assert all("--no-warmup" not in c for c in cmds.values())


def test_choose_ngl_fits_the_budget():
    layer, kv, head = 436_207_616, 33_619_968, 1_050_673_152  # Llama-3.1-8B F16, 8208 tokens
    ngl = llamacpp.choose_ngl(layer, kv, 32, head, 8 * GiB)
    assert ngl == 14  # the -ngl measured at 7.8 GiB peak on the H200
    assert 14 * (layer + kv) + llamacpp.GPU_RESERVE_BYTES <= 8 * GiB
    assert 15 * (layer + kv) + llamacpp.GPU_RESERVE_BYTES > 8 * GiB
    assert llamacpp.choose_ngl(layer, kv, 32, head, 1 * GiB) == 0
    assert llamacpp.choose_ngl(layer, kv, 32, head, 40 * GiB) == 33  # head on the GPU too
    assert llamacpp.choose_ngl(layer, kv, 32, 30 * GiB, 20 * GiB) == 32  # head does not fit


def test_llama_bench_records_to_case():
    text = "\n".join(
        [
            "ggml_cuda_init: found 1 CUDA devices",
            json.dumps({"n_prompt": 8192, "n_gen": 0, "n_depth": 0, "avg_ns": 18_000_000_000,
                        "n_gpu_layers": 14, "model_size": 16, "build_commit": "abc"}),
            json.dumps({"n_prompt": 0, "n_gen": 16, "n_depth": 8192, "avg_ns": 2_400_000_000,
                        "n_gpu_layers": 14}),
        ]
    )  # fmt: skip
    records = llamacpp.parse_jsonl(text)
    assert len(records) == 2
    case = llamacpp.case_from_records(records, 8192, 16)
    assert case["status"] == "ok" and case["prefill_s"] == 18.0
    assert case["decode_step_median_s"] == pytest.approx(0.15)
    assert case["decode_tok_s"] == pytest.approx(1 / 0.15) and case["generated_tokens"] == 16
    assert case["ngl"] == 14 and case["build"] == "abc"
    assert llamacpp.case_from_records(records[:1], 8192, 16)["status"] == "partial"


FAKE_BENCH = """#!/bin/sh
# stand-in llama-bench: one JSON line per run; 1 ms per prompt token, 100 ms per generated one
p=0; n=0; d=0; g=0
while [ $# -gt 0 ]; do
  case $1 in -p) p=$2;; -n) n=$2;; -d) d=$2;; -ngl) g=$2;; esac; shift
done
echo "{\\"n_prompt\\": $p, \\"n_gen\\": $n, \\"n_depth\\": $d, \\"n_gpu_layers\\": $g, \\
\\"avg_ns\\": $(( p * 1000000 + n * 100000000 ))}"
"""


def _fake_tools(root: Path) -> Path:
    """A tools folder laid out like the prebuilt one, with the stand-in binary and writer."""
    lc = root / "src" / "lcbin"
    for sub in ("cpu-avx2", "cpu-avx512"):
        (lc / sub).mkdir(parents=True)
    (lc / "llama-bench").write_text(FAKE_BENCH)
    (lc / "llama-bench").chmod(0o755)
    tools = root / "tools"
    (tools / "bin").mkdir(parents=True)
    with tarfile.open(tools / "bin" / "lcbin.tar.xz", "w:xz") as tar:
        tar.add(lc, arcname="lcbin")
    (tools / "make_gguf.py").write_text("import sys\nopen(sys.argv[1], 'wb').write(b'GGUF')\n")
    return tools


def test_run_llamacpp_with_a_stand_in_binary(tmp_path):
    tools = _fake_tools(tmp_path)
    work = tmp_path / "work"
    res = llamacpp.run_llamacpp(
        tools, "llama3-8b", [64, 128], 4, 8 * GiB, work, 60, tmp_path / "lc.log"
    )
    assert res["status"] == "ran", res
    assert [c["context"] for c in res["cases"]] == [64, 128]
    first = res["cases"][0]
    assert first["prefill_s"] == pytest.approx(0.064)
    assert first["ngl"] == 15  # 68 positions of KV instead of 8k leave room for a 15th layer
    assert first["decode_step_median_s"] == pytest.approx(0.1)
    assert not (work / "llama3-8b-f16.gguf").exists()  # deleted to free the disk
    log = (tmp_path / "lc.log").read_text()
    assert "-p 64 -n 0" in log and "-p 0 -n 4 -d 128" in log
    assert llamacpp.precheck(tools, "qwen3-8b").startswith("the GGUF writer has only")
