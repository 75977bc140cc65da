"""scripts/batch_plan_report.py: the batch bench's 8 GiB plan for Llama-3.1-8B shapes, planned on
the CPU as the H200 bench planned it, split by part next to the batch engine's allocations."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
MIB = 1 << 20


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rep():
    return _load("batch_plan_report").report((64, 16), 2048, 32, 8.0)


def test_before_is_the_h200_benchs_plan(rep):
    """The padded-batch accounting (``batch_engine=False``, what the H200 bench ran under) puts
    layers and KV where the H200 bench's plans did (its JSON), and reserves what they reserved
    by part (the meta store's layers lack the norms: 416.00 MiB, not 416.02, so a split layer's
    device blocks may differ by a block or two)."""
    runs = ROOT / "docs" / "runs" / "2026-12-02"
    recorded = {
        64: json.loads((runs / "bench_batch_8b_b18d9d5.json").read_text())["plan"],
        16: json.loads((runs / "bench_batch_8b_b16_streamall_ab_b18d9d5.json").read_text())["plan"],
    }
    for case in rep["cases"]:
        plan, old = case["before"]["plan"], recorded[case["batch"]]
        for key in (
            "layers",
            "prefill chunk",
            "KV in pinned RAM / on disk",
            "ring slots / staging",
        ):
            assert plan[key] == old[key]
        for key in ("reserved: kv cache", "reserved: activations", "reserved: globals"):
            a, b = (float(x[key].split()[0]) for x in (plan, old))
            assert a == pytest.approx(b, abs=0.02)
        for name in ("before", "after"):
            assert sum(case[name]["reserved"].values()) == case[name]["reserved_total"]


def test_after_drops_what_the_engine_never_allocates(rep):
    """Sized for the batch engine: no KV scratch at batch size, fetch buffers or split blocks,
    chunk temporaries of chunk rows (not batch x chunk); the same globals and ring; the rest of
    the budget holds more KV pools on the GPU, within the budget."""
    for case in rep["cases"]:
        a, b = case["before"]["reserved"], case["after"]["reserved"]
        # per chunk row: the padded plan's row holds ``batch`` rows, the engine's packed one 1
        rows = [int(case[n]["plan"]["prefill chunk"].split()[0]) for n in ("before", "after")]
        per_row = b["act: chunk temporaries"] * case["batch"] * rows[0]
        assert a["act: chunk temporaries"] * rows[1] == per_row and rows[1] >= rows[0]
        for key in ("weights: ring slots", "globals (head + norm)"):
            assert a[key] == b[key]
        assert b["KV: fetch buffers"] == b["KV: split layer's device blocks"] == 0
        assert b["KV: prefill scratch (KVScratch)"] < a["KV: prefill scratch (KVScratch)"]
        assert b["KV: device-tier layers"] > a["KV: device-tier layers"]
        assert case["after"]["reserved_total"] <= rep["budget"]
