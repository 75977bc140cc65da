"""``ollm bench --batch``: the batching workloads run on the CPU through the CLI (tiny model,
made-up probe rates); outputs are consistent with what was asked and with the floors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import make_hf_model
from test_bench import PROBES


@pytest.fixture
def fake_probes(monkeypatch):
    from ollm.bench import probes

    monkeypatch.setattr(probes, "measure_bandwidth", lambda *a, **k: dict(PROBES))


def test_bench_batch_cli(tmp_path, fake_probes):
    from ollm.cli import app

    make_hf_model("llama", tmp_path / "m")
    args = ["bench", "--batch", "1,3", "--context", "64", "-n", "4", "--device", "cpu"]
    args += ["-m", str(tmp_path / "m"), "--cache-dir", str(tmp_path / "c"), "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["settings"]["prompt_tokens"] == 64 and report["settings"]["new_tokens"] == 4
    static = report["static"]
    assert [c["batch"] for c in static] == [1, 3]
    for c in static:
        # Every request's prompt in the first pass, then one pass per further token.
        assert c["steps"] == 4
        assert c["decode_tok_s"] > 0 and c["floor_tok_s"] > 0
        assert c["floor_tok_s"] == pytest.approx(c["batch"] / c["floor_step_s"])
        assert c["step_mode"]["measured"] is False  # no CPU layers on the CPU: no choice
    a = report["arrivals"]
    assert a["requests"] == 3 and a["total_tok_s"] > 0
    assert 0 < a["mean_ttft_s"] <= a["mean_latency_s"]
    assert a["decode_tok_s"] > 0  # the static case's definition: tokens after each one's first
    p = report["prefix"]
    assert p["shared_prefix_tokens"] == 64 - 32
    assert p["shared"]["prefix_hits"] > 0 and p["distinct"]["prefix_hits"] == 0
    saved = p["shared"]["prefix_saved_tokens"]
    assert saved == 15 * 32  # two blocks of 16 for each later request
    assert p["shared"]["query_tokens"] == p["distinct"]["query_tokens"] - saved
    # All 16 submitted at once: the later ones adopt the prefix the first computes in the same
    # step, so every prompt takes the first pass and each further token one more.
    assert p["shared"]["inflight_hits"] == 15 and p["distinct"]["inflight_hits"] == 0
    for case in ("shared", "distinct"):  # every step timed, its tokens counted once
        steps = p[case]["steps"]
        assert len(steps) == 4
        assert sum(n for _, n in steps) == p[case]["query_tokens"]
        assert all(s > 0 for s, _ in steps)
    assert not list((tmp_path / "c").rglob("ollm-kv-*"))  # no disk pools left


def test_bench_batch_rejects_bad_sizes(tmp_path):
    from ollm.cli import app

    for bad in ("0,4", "a,b"):
        res = CliRunner().invoke(app, ["bench", "--batch", bad, "--device", "cpu"])
        assert res.exit_code != 0 and "--batch" in res.output


def test_bench_batch_records_the_engines_rates():
    """The batch report keeps the rates the engine's cost model decided with (a wrong hybrid
    choice on the device is then checkable from the JSON), and None when it has none."""
    from types import SimpleNamespace

    from ollm.bench.batching import _rates
    from ollm.planning.costmodel import MachineRates

    rates = MachineRates(54e9, 53e9, 50.8e9, 50.9e9, 14, 3.9e12, 6.4e12, 7.4e14, cpu_attn=8.5e9)
    got = _rates(SimpleNamespace(rates=rates))
    assert got["pcie"] == 54e9 and got["cpu_attn"] == 8.5e9
    assert json.loads(json.dumps(got)) == got
    assert _rates(SimpleNamespace(rates=None)) is None


def test_saturated_arrivals_compare_decode_rates(tmp_path, fake_probes):
    """The "saturated" workload: the same Poisson arrivals at 4x the static batch's request
    rate, with the arrivals' and the static batch's decode tok/s side by side (the static batch
    measured for it when not asked for)."""
    from ollm.bench.batching import SATURATED, run_batch_bench

    make_hf_model("llama", tmp_path / "m")
    report = run_batch_bench(
        model=str(tmp_path / "m"), synthetic=None, batches=[3], prompt_tokens=64, new_tokens=4,
        llm_kwargs={"device": "cpu", "cache_dir": str(tmp_path / "c")}, workloads=("saturated",),
    )  # fmt: skip
    assert "arrivals" not in report and "prefix" not in report
    (ref,) = report["static"]
    a = report["arrivals_saturated"]
    assert a["requests"] == 3 and a["decode_tok_s"] > 0
    assert a["rate_per_s"] == pytest.approx(SATURATED * 3 / ref["wall_s"])
    assert a["static_decode_tok_s"] == ref["decode_tok_s"]
    assert a["total_ratio"] == pytest.approx(a["total_tok_s"] / ref["total_tok_s"])
    assert a["decode_ratio"] == pytest.approx(a["decode_tok_s"] / ref["decode_tok_s"])


def test_prefix_case_asks_for_decode_resident_layers(tmp_path, fake_probes):
    """``prefix_resident`` (and ``prefix_mlp_cpu``): the shared requests run again on a plan made
    with ``decode_resident=True`` (``shared_resident``, with its held layers and the case's peak
    reserved memory in the report), beside the plain shared case and the distinct one; on the
    CPU no layer is held (no copy engine), the same steps and tokens are computed."""
    from ollm.bench.batching import run_batch_bench

    make_hf_model("llama", tmp_path / "m")
    report = run_batch_bench(
        model=str(tmp_path / "m"), synthetic=None, batches=[2], prompt_tokens=64, new_tokens=4,
        llm_kwargs={"device": "cpu", "cache_dir": str(tmp_path / "c")}, workloads=("prefix",),
        prefix_resident=True, prefix_mlp_cpu=True,
    )  # fmt: skip
    p = report["prefix"]
    shared, held = p["shared"], p["shared_resident"]
    mlp = p["shared_mlp_cpu"]  # mlp_cpu=True: on the CPU no layer qualifies, same work
    assert mlp["query_tokens"] == shared["query_tokens"] and mlp["prefix_hits"] == 15
    assert p["speedup_mlp_cpu"] == pytest.approx(p["distinct"]["wall_s"] / mlp["wall_s"])
    assert held["decode_resident_layers"] == shared["decode_resident_layers"] == []
    assert held["query_tokens"] == shared["query_tokens"] and held["prefix_hits"] == 15
    assert [n for _, n in held["steps"]] == [n for _, n in shared["steps"]]
    assert p["speedup_resident"] == pytest.approx(p["distinct"]["wall_s"] / held["wall_s"])
    assert set(held["peak_reserved_gib"]) == {"process", "case", "case_allocated"}


def test_prefix_rounds_report_the_median_round(tmp_path, fake_probes):
    """``prefix_rounds=3``: each prefix case runs three times with prompts of their own (no
    round hits a prefix an earlier round cached: the distinct case never hits, the shared one
    adopts its own prefix 15 times per round); the round of the median wall is reported, with
    every round's wall."""
    from ollm.bench.batching import run_batch_bench

    make_hf_model("llama", tmp_path / "m")
    report = run_batch_bench(
        model=str(tmp_path / "m"), synthetic=None, batches=[2], prompt_tokens=64, new_tokens=4,
        llm_kwargs={"device": "cpu", "cache_dir": str(tmp_path / "c")}, workloads=("prefix",),
        prefix_rounds=3,
    )  # fmt: skip
    p = report["prefix"]
    for name, hits in (("distinct", 0), ("shared", 15)):
        case = p[name]
        assert len(case["walls_s"]) == 3 and case["wall_s"] == sorted(case["walls_s"])[1]
        assert case["prefix_hits"] == hits
    assert p["speedup"] == pytest.approx(p["distinct"]["wall_s"] / p["shared"]["wall_s"])
