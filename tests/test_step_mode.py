"""The batch engine's measured choice of hybrid layers vs streaming every layer (`StepMode`):
the policy against a fake clock, and the engine's use of it over a hybrid plan run with the
accelerator played by the CPU (both modes give the same greedy tokens)."""

from __future__ import annotations

import pytest

from conftest import plan_on_device
from ollm import LLM, SamplingParams
from ollm.engine.step_mode import StepMode, step_shape
from ollm.engine.stepplan import SeqStep, StepPlan

ROWS, KV = 16, 3000  # a batch-16 decode step's shape


def run(sm: StepMode, seconds, steps: int, rows: int = ROWS, kv: int = KV, grow: int = 0):
    """``steps`` decode steps through ``sm``: each step's time is ``seconds(stream, i,
    switched)``; returns the modes run."""
    modes, prev = [], None
    for i in range(steps):
        mode = sm.stream(rows, kv + grow * i)
        sm.record(seconds(mode, i, prev is not None and mode != prev))
        modes.append(mode)
        prev = mode
    return modes


def fixed(stream_s: float, hybrid_s: float):
    return lambda mode, i, switched: stream_s if mode else hybrid_s


def wrong_model(rows: int, kv: int) -> bool:  # the cost model: the hybrid layers always pay
    return True


def test_a_wrong_prediction_is_corrected_after_one_probe():
    sm = StepMode(wrong_model, 256)
    modes = run(sm, fixed(0.25, 0.39), 198)  # the H200's batch 16: 64.5 vs 40.7 tok/s
    assert modes[:2] == [False, False]  # the cost model's choice first (warm-up)
    assert modes[2:4] == [True, True]  # the probe
    hybrid = [i for i, m in enumerate(modes) if not m]
    # after the first probe hybrid runs only as re-probes: 2 steps every 64 of the bucket
    assert len(hybrid) == 2 + 2 * ((198 - 4) // 66)
    s = sm.summary()
    assert s["measured"] and s["switches"] == 1 and s["probes"] == 1 + (198 - 4) // 66
    assert s["stream"]["mean_step_s"] == pytest.approx(0.25)
    assert s["hybrid"]["mean_step_s"] == pytest.approx(0.39)
    assert s["buckets"] == [
        {"rows": 16, "kv_tokens": 2048, "chosen": "stream", "probes": s["probes"],
         "hybrid_s": pytest.approx(0.39), "stream_s": pytest.approx(0.25)}
    ]  # fmt: skip


def test_a_right_prediction_is_kept():
    sm = StepMode(wrong_model, 256)
    modes = run(sm, fixed(0.5, 0.3), 100)
    assert modes[:4] == [False, False, True, True] and not any(modes[4:66])
    assert sm.summary()["switches"] == 0


def test_the_first_step_after_a_phase_change_is_left_out():
    """The prefetcher drops its loads at a phase change: that step's extra time (here 0.5 s)
    must not decide. Streaming is truly faster (0.30 vs 0.33 s)."""
    sm = StepMode(wrong_model, 256, probe_steps=2)

    def seconds(mode, i, switched):
        return (0.30 if mode else 0.33) + (0.5 if switched else 0.0)

    modes = run(sm, seconds, 40)
    assert modes[4:40] == [True] * 36


def test_drift_reprobes_before_the_interval():
    """The batch changes at step 30 (streaming slows from 0.25 to 0.6 s, hybrid stays 0.39):
    the kept mode's drift brings a probe long before 64 steps."""
    sm = StepMode(wrong_model, 256)

    def seconds(mode, i, switched):
        return (0.25 if i < 30 else 0.6) if mode else 0.39

    modes = run(sm, seconds, 60)
    assert modes[4:30] == [True] * 26
    assert modes[-15:] == [False] * 15
    assert sm.summary()["switches"] == 2


def test_buckets_by_shape_and_the_prior_from_measured_neighbours():
    sm = StepMode(wrong_model, 256)
    run(sm, fixed(0.25, 0.39), 10)
    # more KV: a new bucket whose prior follows the measured one (streaming won with less KV)
    assert sm.stream(ROWS, 4 * KV) is True
    assert sm.buckets[(ROWS.bit_length(), (4 * KV).bit_length())].choice is True
    # fewer rows: not implied, the cost model's choice
    assert sm.stream(4, KV) is False


def test_prefill_steps_are_not_probed_and_big_steps_have_no_choice():
    sm = StepMode(wrong_model, 64)
    run(sm, fixed(0.25, 0.39), 10)
    n = len(sm.buckets)
    assert sm.stream(40, 2 * KV, prefill=True) is True  # implied by the decode bucket
    sm.record(5.0)
    assert sm.stream(8, KV, prefill=True) is False  # not implied: the cost model
    sm.record(5.0)
    assert sm.stream(100, 2 * KV) is False  # beyond max_rows: both stream, no bucket
    sm.record(5.0)
    assert len(sm.buckets) == n and sm.summary()["unprobed_steps"] == 2
    assert sm.summary()["stream"]["mean_step_s"] == pytest.approx(0.25)  # 5 s steps left out


def test_no_cpu_layers_never_streams():
    sm = StepMode(None)
    assert not any(run(sm, fixed(0.1, 1.0), 80))
    s = sm.summary()
    assert not s["measured"] and s["probes"] == 0 and s["buckets"] == []


def test_step_shape():
    def seq(n, start, drafts=0):
        return SeqStep("s", tuple(range(n)), start, drafts, {}, True)

    assert step_shape(StepPlan((seq(1, 10), seq(3, 20, drafts=2)), {})) == (4, 34, False)
    assert step_shape(StepPlan((seq(1, 10), seq(30, 0)), {})) == (31, 41, True)


# -- the engine ------------------------------------------------------------------------------


class Forced(StepMode):
    """A fixed pattern of modes (None: the measured policy); counts the engine's calls."""

    def __init__(self, base: StepMode, pattern) -> None:
        super().__init__(base.predict, base.max_rows, warm=1, probe_steps=1)
        self.pattern, self.asked, self.recorded = pattern, 0, 0

    def stream(self, rows: int, kv_tokens: int, prefill: bool = False) -> bool:
        mode = super().stream(rows, kv_tokens, prefill)
        self.asked += 1
        if self.pattern is not None and (self.max_rows is None or rows <= self.max_rows):
            mode = self.pattern(self.asked)
        return mode

    def record(self, seconds: float) -> None:
        self.recorded += 1
        super().record(seconds)


@pytest.fixture(scope="module")
def hybrid_runner(hf_models, tmp_path_factory):
    """A runner over the plan the cost model makes for a GPU (2 CPU-computed layers, the rest
    streamed) with the accelerator played by the CPU ("cpu:1", as tests/test_hybrid.py)."""
    from ollm.engine.runner import Runner
    from ollm.planning.placement import Workload, plan_placement
    from ollm.runtime.prefetch import Prefetcher
    from ollm.storage.store import LayerStore
    from test_hybrid import rates

    _, path = hf_models("llama")
    llm = LLM(path, device="cpu", cache_dir=tmp_path_factory.mktemp("sm"), progress=False)
    spec, store = llm.spec, llm.store
    work = Workload(1, 256, 256)
    fixed_plan = plan_placement(spec, store, "cuda:0", None, None, "cpu", work, 4, chunk_tokens=32)
    base = sum(
        v for k, v in fixed_plan.reserved.items() if k not in ("resident layers", "stream buffers")
    )
    budget = base + int(3.5 * store.max_layer_nbytes)
    r = rates(scale=1e-5)
    split = plan_placement(
        spec, store, "cuda:0", budget, None, "cpu", work, 4, cpu_layers=2, rates=r, chunk_tokens=32
    )
    fake = plan_on_device(split, "cpu:1")
    assert (
        len(fake.cpu_layers) == 2 and fake.cpu_max_tokens >= 64
    )  # every step below has the choice
    runner = Runner(spec, fake, Prefetcher(LayerStore(llm.store_path), fake, llm.stats), llm.dtype)
    yield llm, runner, r
    runner.prefetcher.close()
    llm.close()


def test_modes_give_the_same_tokens_and_the_hook_runs_once_per_step(hybrid_runner):
    from ollm.engine.batch import BatchEngine

    llm, runner, r = hybrid_runner
    prompts = [[(7 * i + 3 * j) % 256 for i in range(6 + 5 * j)] for j in range(4)]
    params = SamplingParams(temperature=0, max_new_tokens=14)
    patterns = {
        "hybrid": lambda n: False,
        "stream": lambda n: True,
        "alternate": lambda n: n % 2 == 0,
        "measured": None,
    }
    tokens, cpu_s, streamed = {}, {}, {}
    for name, pattern in patterns.items():
        eng = BatchEngine(
            runner, None, (), block_tokens=8, max_batch=4, max_context=256,
            max_step_tokens=64, rates=r,
        )  # fmt: skip
        eng.step_mode = forced = Forced(eng.step_mode, pattern)
        before = llm.stats.cpu_seconds
        outs, _ = eng.generate(prompts, params)
        cpu_s[name] = llm.stats.cpu_seconds - before
        tokens[name] = [o.token_ids for o in outs]
        streamed[name] = eng.streamed_steps
        assert forced.asked == forced.recorded == eng.steps > 10
        summary = forced.summary()
        eng.close()
    assert tokens["alternate"] == tokens["hybrid"] == tokens["stream"] == tokens["measured"]
    assert cpu_s["hybrid"] > 0 and cpu_s["alternate"] > 0 and cpu_s["stream"] == 0
    assert streamed["hybrid"] == 0 < streamed["alternate"] < streamed["stream"]
    assert summary["measured"] and summary["probes"] >= 1  # the measured run probed
    assert summary["hybrid"]["steps"] and summary["stream"]["steps"]


def test_the_prior_knows_the_cpu_layers_kv_is_attended_in_place(hybrid_runner):
    """The engine's exact pools put each sequence's blocks on slabs of a head-major store, so
    the CPU layers' KV is attended in place (the prior prices it at the batched rate); a store
    that keeps blocks first (encoded pools' exact slots) or blocks off slabs is gathered."""
    from types import SimpleNamespace

    from ollm.engine.batch import BatchEngine
    from ollm.engine.step_mode import attends_in_place
    from ollm.kv.blocks import BlockPool
    from ollm.kv.codec_paged import CodecPagedStore

    _, runner, r = hybrid_runner
    eng = BatchEngine(runner, None, (), block_tokens=8, max_batch=4, max_context=256, rates=r)
    try:
        cpu = runner.plan.cpu_layers
        assert cpu and attends_in_place(eng.pools, cpu)
        group, store, i = eng.pools.layers[cpu[0]]
        codec = SimpleNamespace(layers=[(group, CodecPagedStore, i)], managers=eng.pools.managers)
        assert not attends_in_place(codec, [0])
        plain = {group: SimpleNamespace(pools={"device": BlockPool("device", 8)})}
        assert not attends_in_place(
            SimpleNamespace(layers=[(group, store, i)], managers=plain), [0]
        )
    finally:
        eng.close()
