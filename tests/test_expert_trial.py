"""The measured choice of CPU-computed experts (issue 19, ``expert_cpu="auto"``,
``runtime/expert_trial.py``): decode steps alternate between the cost model's choice and every
miss copied, and the CPU is kept only when its steps measure faster. The step clock is played by
a counter that charges each CPU expert what the host pays for it, so the decision is the
measurement's, not the machine's load; the accelerator is the CPU under the name "cpu:1"."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import make_hf_model
from ollm import LLM
from ollm.layers.moe import moe_mlp
from ollm.runtime.expert_trial import STEPS, CpuTrial
from test_moe_experts import _cache

LAYERS = (1, 3, 5)


class Clock:
    """A step clock: ``base`` seconds per call of ``now()`` plus what ``charge`` added."""

    def __init__(self, base: float = 1e-3) -> None:
        self.t, self.base = 0.0, base

    def now(self) -> float:
        self.t += self.base
        return self.t

    def charge(self, seconds: float) -> None:
        self.t += seconds


def _steps(trial: CpuTrial, clock: Clock, n: int, cpu_s: float, cpu_per_layer: int = 1) -> None:
    """``n`` decode steps over ``LAYERS``: in the CPU arm each call computes ``cpu_per_layer``
    experts on the CPU, each costing ``cpu_s`` of step time."""
    for _ in range(n):
        for i in LAYERS:
            trial.start(i, True)
            if trial.allow:
                trial.ran(cpu_per_layer)
                clock.charge(cpu_per_layer * cpu_s)
            trial.end(i)


@pytest.mark.parametrize(("cpu_s", "kept"), [(1e-3, False), (-2e-4, True)])
def test_trial_keeps_the_cpu_only_when_its_steps_measure_faster(cpu_s, kept):
    """The arms alternate step by step; after ``STEPS`` timed steps of each the CPU is kept
    when its steps are faster (a negative charge: its experts saved time), else dropped for
    good (every later call copies)."""
    clock = Clock()
    trial = CpuTrial(LAYERS, clock=clock.now)
    arms = []
    for _ in range(2 * STEPS):
        arms.append(trial.allow)
        _steps(trial, clock, 1, cpu_s)
    assert arms == [True, False] * STEPS and trial.decided is None  # the last step is open
    _steps(trial, clock, 1, cpu_s)
    assert trial.decided is kept and trial.allow is kept
    assert len(trial.times[True]) == len(trial.times[False]) == STEPS
    assert trial.cpu_experts == STEPS * len(LAYERS)
    _steps(trial, clock, 4, cpu_s)  # decided: no more alternation, nothing more timed
    assert trial.allow is kept and len(trial.times[True]) == STEPS
    assert trial.report()["decided"] is kept


def test_trial_times_only_whole_decode_steps():
    """A prefill call (or a step cut short) drops the open step; steps in which the cost model
    sent nothing to the CPU are no evidence: the trial goes on."""
    clock = Clock()
    trial = CpuTrial(LAYERS, clock=clock.now)
    _steps(trial, clock, 2, 1e-3)
    trial.start(LAYERS[0], False)  # a prefill: the open step is dropped
    clock.charge(5.0)
    _steps(trial, clock, 1, 1e-3)
    timed = trial.times[True] + trial.times[False]
    assert len(timed) == 1 and timed[0] < 1.0  # the step cut by the prefill is not among them
    nothing = CpuTrial(LAYERS, clock=clock.now)
    _steps(nothing, clock, 4 * STEPS, 1e-3, cpu_per_layer=0)
    assert nothing.decided is None and min(map(len, nothing.times.values())) < STEPS  # anew


@pytest.fixture(scope="module")
def moe_cpu(tmp_path_factory):
    """A qwen3_moe of 16 experts, top-8, on the CPU (its sparse layers go through a cache)."""
    d = tmp_path_factory.mktemp("moe-trial")
    make_hf_model("qwen3_moe", d / "hf", num_experts=16, num_experts_per_tok=8)
    llm = LLM(d / "hf", device="cpu", cache_dir=d / "c", progress=False)
    yield llm
    llm.close()


def test_cache_stops_cpu_experts_the_trial_finds_slower(moe_cpu):
    """Through a cache of 6 slots with ``"auto"`` and a cost model that sends every RAM miss to
    the CPU, a CPU expert charged 2 ms of step time: the CPU computes only in the CPU arm's
    steps, the trial then drops it (no more CPU experts, the layers stop reading their rows to
    the host), and every output equals the resident path's throughout."""
    llm, moe, act = moe_cpu, moe_cpu.spec.moe, moe_cpu.spec.act
    st, cache = _cache(llm, slots=6, ram=16)
    cache.plan = replace(cache.plan, cpu_compute="auto")
    clock = Clock()
    cache.trial = CpuTrial(cache.plan.layers, clock=clock.now)
    cache.host_rows = True  # as on CUDA: a CPU batch's rows come with the ids

    def every_ram_miss(cand, n, counts, nbytes, params, measured):
        clock.charge(2e-3 * len(cand))
        return list(cand)

    cache.choose_cpu = every_ram_miss
    bound = {i: (llm.prefetcher.get(i), None) for i in cache.plan.layers}
    bound = {i: (w, cache.bind(i, w)) for i, (w, _) in bound.items()}
    src = next(iter(bound.values()))[1].experts
    g = torch.Generator().manual_seed(0)
    per_step = []
    for _ in range(2 * STEPS + 6):
        before, rows = cache.counts["cpu"], src.host_rows
        for i in cache.plan.layers:
            x = torch.randn(1, 1, llm.spec.hidden_size, generator=g) * 4
            y = moe_mlp(x, bound[i][1], moe, act)
            torch.testing.assert_close(y, moe_mlp(x, bound[i][0], moe, act), atol=1e-5, rtol=1e-5)
        per_step.append((cache.counts["cpu"] - before, rows))
    assert cache.trial.decided is False
    assert sum(n for n, _ in per_step[: 2 * STEPS : 2]) > 0  # the CPU arm ran CPU experts
    assert all(n == 0 for n, _ in per_step[1 : 2 * STEPS : 2])  # the copy arm: none
    assert all(n == 0 and not rows for n, rows in per_step[-4:])  # decided: copies only
    assert not src.host_rows and not cache.trial.allow
    cache.close()


def test_one_batch_per_call_equals_hits_then_misses_with_fewer_launches(moe_cpu):
    """A decode row's hits and copied misses as one stacked batch (the merge trial's trying
    arm, forced here) give the same outputs bit for bit as hits first and the misses' wave
    after, with fewer kernel launches (one row through one stacked batch: no slot buffer,
    no scatter, one gather per tensor)."""
    from test_moe_decode import Launches

    llm, moe, act = moe_cpu, moe_cpu.spec.moe, moe_cpu.spec.act
    caches = {}
    for merged in (True, False):
        _, cache = _cache(llm, slots=20, ram=16)  # hits and misses in most calls, no waves
        cache.merge.decided = merged
        caches[merged] = (cache, {i: cache.bind(i, llm.prefetcher.get(i)) for i in _layers(cache)})
    g = torch.Generator().manual_seed(0)
    ops = {True: 0, False: 0}
    for _ in range(8):
        for i in _layers(caches[True][0]):
            x = torch.randn(1, 1, llm.spec.hidden_size, generator=g) * 4
            ys = {}
            for merged, (_, bound) in caches.items():
                with Launches() as c:
                    ys[merged] = moe_mlp(x, bound[i], moe, act)
                ops[merged] += sum(n for op, n in c.ops.items() if op != "copy_")
            assert torch.equal(ys[True], ys[False])
    one = caches[True][0]
    assert one.counts["hits"] > 0 and one.counts["misses"] > 0  # calls with both happened
    assert ops[True] < ops[False], ops
    for cache, _ in caches.values():
        cache.close()


def _layers(cache) -> tuple[int, ...]:
    return cache.plan.layers


def test_merge_trial_runs_once_the_cpu_trial_has_decided(moe_cpu):
    """The two trials never run at once (each would time the other's arms): while the CPU's
    is open no call goes as one batch and the merge trial times nothing; once it has decided
    the merge trial alternates its arms."""
    from ollm.runtime.expert_trial import begin_call, end_call

    _, cache = _cache(moe_cpu, slots=6, ram=16)
    cache.trial = CpuTrial(cache.plan.layers)
    used, counts = [0, 1], [1, 1] + [0] * 14
    for _ in range(3):
        for i in cache.plan.layers:
            assert begin_call(cache, i, used, counts) is False
            end_call(cache, i)
    assert not any(cache.merge.times.values()) and cache.trial.times[True]
    cache.trial.decided = False
    arms = []
    for _ in range(4):
        for i in cache.plan.layers:
            arms.append(begin_call(cache, i, used, counts))
            end_call(cache, i)
    n = len(cache.plan.layers)
    assert arms[::n] == [arms[0], not arms[0]] * 2 and sum(map(len, cache.merge.times.values()))
    cache.close()
