"""scripts/gpu/serve.py (the device load benchmark of `ollm serve`) dry-run on the CPU: a tiny
synthetic Llama with its word tokenizer, `ollm serve` in a subprocess, the load generator at two
concurrency levels, /metrics consistent with the client, the server stopped cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, vocab_size=256,
)  # fmt: skip


def test_device_serve_script_dry_run(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu" / "serve.py"), "--device", "cpu",
           "--out", str(out), "--workdir", str(tmp_path / "work"), "--concurrency", "1,4",
           "--requests", "4", "--max-tokens", "4", "--max-context", "128"]  # fmt: skip
    for k, v in TINY.items():
        cmd += ["--set", f"{k}={v}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src"))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rep = json.loads((out / "serve_load.json").read_text())
    assert rep["ok"] and rep["server_clean_exit"] and rep["stack"] == {"installed": False}
    assert [lv["concurrency"] for lv in rep["levels"]] == [1, 4]
    for lv in rep["levels"]:
        assert lv["ok"] and lv["failed"] == [] and lv["metrics_mismatch"] == {}
        assert 0 < lv["completion_tokens"] <= 4 * 4 and lv["prompt_tokens"] > 4 * 16
    # Every request the server counted: the warm-up and the levels'; no KV left behind.
    final = rep["metrics_final"]
    assert final["vllm:request_success_total"] == 1 + 4 + 4
    assert final["ollm:kv_blocks_used"] == 0 and final["vllm:num_requests_running"] == 0
    # The word tokenizer: the prompts' words are their own tokens (no <unk>).
    store = Path(rep["model"])
    vocab = json.loads((store / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == 256 and vocab["quick"] > 3 and vocab["Request"] > 3
    assert any(
        line.startswith("ollm serve: llama3-8b on http://127.0.0.1:")
        for line in rep["server_banner"]
    )
