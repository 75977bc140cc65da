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


def test_layout_is_the_h200_benchs(rep):
    """The sizes-only plan puts layers and KV where the H200 bench's plans did (its JSON), and
    reserves what they reserved by part (the meta store's layers lack the norms: 416.00 MiB,
    not 416.02, so a split layer's device blocks may differ by a block or two)."""
    runs = ROOT / "docs" / "runs" / "2026-12-02"
    recorded = {
        64: json.loads((runs / "bench_batch_8b_b18d9d5.json").read_text())["plan"],
        16: json.loads((runs / "bench_batch_8b_b16_streamall_ab_b18d9d5.json").read_text())["plan"],
    }
    for case in rep["cases"]:
        plan, old = dict(case["plan"]), recorded[case["batch"]]
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
        assert sum(case["reserved"].values()) == case["reserved_total"]


def test_parts_that_differ(rep):
    """What the plan counts for the padded single-request batch and the batch engine does not
    allocate: b x chunk rows of chunk temporaries where a packed step runs chunk rows, and the
    KV scratch, fetch buffers and split blocks that the paged pools never make."""
    for case in rep["cases"]:
        want, have, b = case["reserved"], case["engine_estimate"], case["batch"]
        assert want["act: chunk temporaries"] == b * have["act: chunk temporaries"]
        for key in ("weights: resident layers", "weights: ring slots", "globals (head + norm)"):
            assert want[key] == have[key]
        # the paged device pools hold batch x context (rounded to blocks): the planner's KV
        assert have["KV: device-tier layers"] == want["KV: device-tier layers"]
        assert want["KV: fetch buffers"] > 0 and want["KV: prefill scratch (KVScratch)"] > 0
        assert case["unused"] == case["reserved_total"] - case["engine_peak_estimate"]
        assert case["more_resident_layers_if_counted"] == case["unused"] // case["layer_bytes"]
