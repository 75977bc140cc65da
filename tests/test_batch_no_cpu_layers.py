"""A batch engine's plan from BATCH_NO_CPU_LAYERS sequences computes no layer on the CPU (the
H200 measured them slower than predicted at batch 16), unless ``cpu_layers`` asks for some; a
single sequence's plan still may. Llama-3.1-8B shapes, 8 GiB, the rates of the H200 call whose
plan chose 12 CPU layers at batch 16 (seventh session, call 5)."""

from __future__ import annotations

import pytest

from conftest import llama8b_with_rates
from ollm.planning.placement import BATCH_NO_CPU_LAYERS, Workload, plan_placement


@pytest.fixture(scope="module")
def setup():
    return llama8b_with_rates("2026-12-02/s7/call5_b16_auto.json")


def _plan(setup, batch: int, **kw):
    spec, store, rates = setup
    work = Workload(batch, 2080, 2080)
    return plan_placement(spec, store, "cuda:0", 8 << 30, None, "auto", work, 2, rates,
                          batch_engine=True, **kw)  # fmt: skip


def test_batch_plan_has_no_cpu_layers_and_keeps_layers_resident(setup) -> None:
    assert BATCH_NO_CPU_LAYERS <= 16
    forced = _plan(setup, 16, cpu_layers=12)  # what the cost model chose there before
    plan = _plan(setup, 16)
    assert len(forced.cpu_layers) == 12
    assert len(plan.cpu_layers) == 0
    gpu = [p.tier.name for p in plan.layers].count("GPU")
    assert gpu > [p.tier.name for p in forced.layers].count("GPU")  # the room goes to layers
    assert plan.peak_device_bytes <= 8 << 30


def test_hybrid_off_and_smaller_batches_unchanged(setup) -> None:
    """Below the rule the cost model still chooses CPU layers with these rates (one sequence:
    weight-read-bound, as the single-request decode measured), and hybrid off stays off."""
    assert len(_plan(setup, 16, hybrid="off").cpu_layers) == 0
    assert len(_plan(setup, 1).cpu_layers) > 0
    assert len(_plan(setup, BATCH_NO_CPU_LAYERS - 1).cpu_layers) > 0
    assert len(_plan(setup, BATCH_NO_CPU_LAYERS).cpu_layers) == 0
