"""Host work of a batch-engine decode step does not grow with the batch (issue 13): the same aten
ops and one host read per step for 2 and 6 sequences (``scripts/batch_overhead.py``), and the
device script's per-step profile (``scripts/gpu/batch_engine.py --profile-steps``) runs on the
CPU as a dry run and stays small."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_decode_step_ops_flat_in_batch(tmp_path):
    """Pure decode steps of 2 and 6 sequences over 2 layers: equal op counts per step (no
    per-sequence op in the layers, the step's layout or sampling) and one ``tolist`` per step
    (the batched greedy pick), no other host read."""
    out = tmp_path / "o.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "scripts/batch_overhead.py"), "--layers", "2",
           "--batches", "2,6", "--steps", "3", "--warmup", "1", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)
    cases = json.loads(out.read_text())["cases"]
    assert [c["batch"] for c in cases] == [2, 6]
    assert cases[0]["ops_per_step"] == cases[1]["ops_per_step"] > 0
    assert cases[0]["ops"] == cases[1]["ops"]
    for c in cases:
        assert c["host_reads_per_step"] == {"tolist": 1.0}
        assert c["step_ms"]["median"] > 0 and c["torch_profile"]["top_cpu"]


def test_step_profile_dry_run(tmp_path):
    """``step_profile`` on the CPU with the tiny llama: a decode profile of the asked batch, a
    compact table (a few KB of JSON)."""
    spec = importlib.util.spec_from_file_location("gpu_batch", ROOT / "scripts/gpu/batch_engine.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    prof = mod.step_profile(tmp_path, "tiny", batch=3, plan_batch=4, prompt_tokens=16, steps=2,
                            device="cpu")  # fmt: skip
    assert prof["batch"] == 3 and prof["steps"] == 2 and len(prof["step_ms"]) == 2
    assert prof["prefill_steps"] >= 1 and prof["ops_per_step"] > 0
    assert 0 < len(prof["top_cpu"]) <= 12 and all(r["calls"] > 0 for r in prof["top_cpu"])
    tl = prof.pop("timeline")  # two steps' layer spans: every layer computed in each step
    layers = [sp[1] for sp in tl["spans"] if sp[0] == "compute"]
    assert tl["steps"] == 2 and sorted(set(layers)) == list(range(max(layers) + 1))
    assert all(0 <= sp[2] <= sp[3] for sp in tl["spans"])
    assert 0 < tl["busy_ms"]["compute"] <= tl["wall_ms"] + 0.01
    synced = prof.pop("timeline_synced")  # two more steps, each phase synchronized
    assert synced["steps"] == 2 and "sample" in synced["synced"] and synced["phase_ms"]
    assert len(json.dumps(prof)) < 4096
