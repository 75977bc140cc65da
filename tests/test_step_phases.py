"""The step timeline's phases outside the layers (issue 13: where the time between two decode
steps' layers goes): each phase of a batch-engine step is a host span in order, spans of one
kind never overlap, nothing is recorded (or timed) with the timeline off, and the device
script's shared-prefix profile (``scripts/gpu/batch_engine.py --profile-prefix``) runs on the
CPU as a dry run."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import load_script
from ollm import LLM, SamplingParams
from ollm.bench.stepprof import PHASES, decode_ready, step_timeline
from ollm.telemetry import timeline as tlmod
from test_batch_engine import engine, make_prompts

# One step's host-side spans in the order the step runs them (the CPU computes every layer).
STEP_ORDER = ["schedule", "moves", "layout", "start", "embed"]
TAIL_ORDER = ["head", "writes", "sample", "update"]


@pytest.fixture(scope="module")
def llm(hf_models, tmp_path_factory):
    """The tiny llama on the CPU (`test_batch_engine`'s settings)."""
    _, path = hf_models("llama")
    cache = tmp_path_factory.mktemp("phases-cache")
    with LLM(path, device="cpu", max_batch=1, max_context=256, prefill_chunk=32,
             cache_dir=cache, progress=False) as made:  # fmt: skip
        yield made


def _decoding(llm, n: int = 3):
    eng = engine(llm)
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    for p in make_prompts(n):
        eng.add(p, params)
    decode_ready(eng)
    return eng


def _steps(spans: list) -> list[list]:
    """The spans cut at each "schedule" (a step's first phase)."""
    out: list[list] = []
    for sp in spans:
        if sp[0] == "schedule":
            out.append([])
        out[-1].append(sp)
    return out


def test_phases_recorded_in_order(llm):
    """Two decode steps: every phase once per step (``prep`` and ``compute`` once per layer),
    in the step's order, back to back without overlap on the host; only ``sample`` ends on a
    device sync (none added on the CPU); the summaries agree with the spans."""
    layers = len(llm.spec.layers)
    eng = _decoding(llm)
    try:
        tl = step_timeline(eng, 2)
    finally:
        eng.close()
    assert llm.runner.timeline is None and llm.runner.prefetcher.timeline is None
    spans = [sp for sp in tl["spans"] if sp[0] != "read"]
    steps = _steps(spans)
    assert len(steps) == 2
    layer_order = [(k, i) for i in range(layers) for k in ("prep", "compute")]
    want = [(k, -1) for k in STEP_ORDER] + layer_order + [(k, -1) for k in TAIL_ORDER]
    for step in steps:
        assert [(sp[0], sp[1]) for sp in step] == want
        for a, b in zip(step, step[1:], strict=False):  # one thread: one span at a time
            assert 0 <= a[2] <= a[3] <= b[2] <= b[3]
    for kind in PHASES:  # per kind, in time order and disjoint across the steps too
        mine = [sp for sp in spans if sp[0] == kind]
        assert all(a[3] <= b[2] for a, b in zip(mine, mine[1:], strict=False))
        total = sum(sp[3] - sp[2] for sp in mine) / 2
        assert tl["phase_ms"][kind] == pytest.approx(total, abs=5e-3)
    assert tl["synced"] == ["sample"] and tl["sync_phases"] is False  # no device to sync
    assert 0 <= tl["unspanned_ms"] < tl["wall_ms"] / 2


def test_timeline_off_records_nothing(llm, monkeypatch):
    """With no timeline (the default) a step opens no phase span: `phase` hands back one shared
    no-op context, made once for all calls."""
    eng = _decoding(llm)
    made = []
    real_phase = tlmod._Phase

    def counting_phase(*a, **k):
        made.append(a)
        return real_phase(*a, **k)

    monkeypatch.setattr(tlmod, "_Phase", counting_phase)
    try:
        assert llm.runner.timeline is None
        before = eng.steps
        eng.step()
        eng.step()
        assert eng.steps == before + 2
    finally:
        eng.close()
    assert made == []
    assert tlmod.phase(None, "x") is tlmod.phase(None, "y") is tlmod._OFF


def test_phase_sync_marks(monkeypatch):
    """A phase marked ``sync`` is named in ``synced``; ``sync_phases`` on a CPU timeline adds
    no sync (there is no device to wait for) and marks nothing else."""
    tl = tlmod.Timeline("cpu", sync_phases=True)
    assert tl.sync_phases is False
    with tlmod.phase(tl, "a"):
        pass
    with tlmod.phase(tl, "b", layer=3, sync=True):
        pass
    kinds = [(sp.kind, sp.layer) for sp in tl.spans()]
    assert kinds == [("a", -1), ("b", 3)] and tl.synced == {"b"}


def test_profile_prefix_dry_run(tmp_path, monkeypatch):
    """``--profile-prefix 2 --device cpu --profile-synthetic tiny``: the bench's shared-prefix
    case on its shared_prefix plan (15 prefix hits, 16 sequences at once), the admission and decode
    step walls, and two timelines (one with each phase synchronized) with every phase."""
    mod = load_script("gpu/batch_engine.py")
    argv = ["batch_engine.py", "--out", str(tmp_path), "--skip-equiv", "--skip-tiers",
            "--skip-throughput", "--skip-bench", "--device", "cpu", "--profile-synthetic",
            "tiny", "--profile-prompt", "64", "--profile-prefix", "2"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    assert mod.main() == 0
    rep = json.loads((tmp_path / "batch_engine.json").read_text())
    assert "step_profile" not in rep
    prof = rep["prefix_profile"]
    assert "error" not in prof, prof.get("error")
    assert prof["batch"] == 16 and prof["prefix_hits"] == 15 and prof["shared_prefix_tokens"] == 32
    assert "shared prefix (KV held once)" in prof["plan"]
    # all 16 submitted at once: one admission step, the later 15 adopting in step
    assert len(prof["step_ms"]) == 2 and len(prof["admission_ms"]) == 1
    assert prof["inflight_hits"] == 15
    first = prof["admission_timeline"]  # the admission step: the prefix's and tails' prefill
    assert first["steps"] == 1 and first["wall_ms"] == pytest.approx(prof["admission_ms"][0])
    assert sum(sp[0] == "compute" for sp in first["spans"]) == mod.TINY["num_hidden_layers"]
    assert prof["admission_profile"]["steps"] == 1 and prof["admission_profile"]["top_cpu"]
    for key in ("timeline", "timeline_synced"):
        tl = prof[key]
        assert tl["steps"] == 2 and tl["sync_phases"] is False  # the CPU: nothing to sync
        assert set(tl["phase_ms"]) == set(PHASES)
        assert sum(sp[0] == "schedule" for sp in tl["spans"]) == 2
        assert sum(sp[0] == "compute" for sp in tl["spans"]) == 2 * mod.TINY["num_hidden_layers"]
