"""Whether RAM misses run on the CPU, decided by measurement (issue 19, ``expert_cpu="auto"``).

The cost model (``planning.experts.cpu_share``) prices a CPU expert against the copy it saves as
if the two ran side by side: max(copy time, CPU time). But the thread that computes a CPU expert
is the one that queues the GPU's kernels. On a host-bound decode (H200, Qwen3-30B-A3B shapes:
~67 launches per layer, the GPU busy 36% of the wall time) the copies hide behind the host's
launches, and a CPU expert's host time delays every launch after it: 11.5 tok/s with the cost
model's choice, 12.5 with the CPU off. So under ``"auto"`` an online trial, as hybrid decode has
for layers (``Engine.review_hybrid``), keeps the CPU only while it measures faster:

* single-row decode steps alternate between the cost model's choice (the CPU arm) and every
  RAM miss copied (the copy arm; the layers then skip reading their rows to the host);
* a step's time is the wall time from its first sparse layer's call to the next step's (the
  whole token: attention, the MoE, the head), recorded only for steps whose every sparse
  layer was a decode call (a prefill or a request boundary in between drops it);
* after ``STEPS`` steps of each arm in which the CPU arm computed some expert, the CPU is kept
  when the CPU arm's median step is below the copy arm's by ``MARGIN``; else RAM misses are
  copied for the rest of the run (one decision per cache, as hybrid decode's).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ollm.runtime.experts import ExpertCache

log = logging.getLogger(__name__)

STEPS = 6  # timed decode steps per arm before deciding
MARGIN = 0.02  # the CPU arm is kept only this much faster (the copy arm is the simpler path)


class CpuTrial:
    """The trial of one expert cache over its sparse ``layers`` (in decode order)."""

    def __init__(
        self,
        layers: tuple[int, ...],
        steps: int = STEPS,
        clock: Callable[[], float] = time.perf_counter,
        what: str = "experts computed on the CPU",
        first: bool = True,
    ) -> None:
        self._pos = {i: j for j, i in enumerate(layers)}
        self.n, self.steps, self.clock = len(layers), steps, clock
        self.times: dict[bool, list[float]] = {True: [], False: []}  # arm -> step seconds
        self.cpu_experts = 0  # uses (experts the CPU computed) in the trying arm's timed steps
        self.decided: bool | None = None  # None while trialling; then: the CPU kept or not
        self.what = what  # what the trial decides (for the log)
        self.arm = first  # the current step's arm: True tries it (e.g. the cost model's CPU share)
        self._t0: float | None = None  # the open step's start (its first sparse layer's call)
        self._open = first  # the open step's arm
        self._calls = 0  # decode calls of the open step so far
        self._cpu = 0  # experts the CPU computed in the open step

    @property
    def allow(self) -> bool:
        """Whether the cost model may send RAM misses to the CPU now."""
        return self.arm if self.decided is None else self.decided

    def start(self, i: int, decode: bool) -> None:
        """Sparse layer i's call begins (``decode``: a decode row's, every expert once)."""
        if self.decided is not None:
            return
        if not decode:
            self._t0 = None  # a prefill (or a batch) in between: the open step is not timed
            return
        pos = self._pos[i]
        if pos == 0:
            now = self.clock()
            if self._t0 is not None and self._calls == self.n:
                self._record(self._open, now - self._t0)
            self._t0, self._calls, self._cpu, self._open = now, 0, 0, self.arm
        if self._t0 is not None:
            self._calls += 1

    def ran(self, n: int) -> None:
        """The current call's split sent ``n`` experts to the CPU."""
        self._cpu += n

    def end(self, i: int) -> None:
        """Sparse layer i's call ended: after a step's last layer the other arm runs next (set
        before the next step's first layer reads its rows)."""
        if self.decided is None and self._pos[i] == self.n - 1:
            self.arm = not self.arm

    def _record(self, arm: bool, seconds: float) -> None:
        self.times[arm].append(seconds)
        if arm:
            self.cpu_experts += self._cpu
        if min(len(t) for t in self.times.values()) < self.steps:
            return
        if self.cpu_experts == 0:  # the cost model sent nothing to the CPU: no evidence yet
            self.times = {True: [], False: []}
            return
        cpu, copy = (statistics.median(self.times[a]) for a in (True, False))
        self.decided = cpu < (1 - MARGIN) * copy
        log.info("%s: decode step %.2f ms with (%d uses in %d steps), %.2f ms without: %s",
                 self.what, 1e3 * cpu, self.cpu_experts, len(self.times[True]), 1e3 * copy,
                 "kept" if self.decided else "dropped")  # fmt: skip

    def report(self) -> dict:
        """The trial's state for reports: decided (None while trialling) and each arm's
        median step in ms."""
        med = {a: statistics.median(t) * 1e3 if t else None for a, t in self.times.items()}
        return {"decided": self.decided, "cpu_ms": med[True], "copy_ms": med[False],
                "cpu_experts": self.cpu_experts}  # fmt: skip


def split_misses(cache: ExpertCache, i: int, misses: list[int], counts: list[int], ram: int):
    """(RAM misses the CPU computes, misses copied to the device) of layer i's call: all RAM
    misses with ``cpu_compute="on"``, those ``choose_cpu`` (the cost model, from above) picks
    with ``"auto"`` while the trial allows, none with ``"off"``, on the CPU device or without
    a cost model."""
    mode = cache.plan.cpu_compute
    cand = [e for e in misses if e < ram] if not cache.in_place and mode != "off" else []
    trial = cache.trial
    off = mode == "auto" and (cache.choose_cpu is None or (trial is not None and not trial.allow))
    if not cand or off:
        return [], misses
    if mode == "on":
        cpu = cand
    else:
        nbytes = cache.plan.expert_bytes  # stored bytes: what a copy moves
        elem = cache.experts.tensors[i][0][0].dtype.itemsize  # a float tensor, coded or not
        params = cache.plan.device_expert_bytes // max(1, elem)
        cpu = cache.choose_cpu(cand, len(misses), counts, nbytes, params, cache.cpu_expert_s)
    chosen = set(cpu)
    return cpu, [e for e in misses if e not in chosen]


def measured_cpu(cache: ExpertCache, n: int, seconds: float) -> None:
    """Fold a CPU batch's wall time (its experts computed, outputs handed back) into the
    cache's ``cpu_expert_s``, the measured seconds per expert the cost model's choice uses."""
    cache._cpu_batches += 1
    if cache._cpu_batches == 1:
        return  # the first pays one-time start-up (kernel selection, thread pool): dropped
    per = seconds / n
    old = cache.cpu_expert_s
    cache.cpu_expert_s = per if old is None else 0.5 * (old + per)


def begin_call(cache: ExpertCache, i: int, used: list[int], counts: list[int]) -> bool:
    """Layer i's call starts in the cache's trials, one at a time: the CPU's (``trial``), then
    one batch per decode call (``merge``: the hits wait for the misses' copies and run with
    them as one stacked batch, a decode row's ~13 launches instead of ~22, at the cost of the
    hits' compute overlapping the copies). Returns whether this call goes as one batch."""
    from ollm.runtime.experts import STREAM_PAIRS

    cpu, merge = cache.trial, cache.merge
    if cpu is not None and cpu.decided is None:
        cpu.start(i, all(counts[e] == 1 for e in used))
        return False  # the merge trial waits for the CPU's decision
    if merge is None:
        return False
    if merge.decided is None:
        merge.start(i, all(counts[e] == 1 for e in used))
    return merge.allow and sum(counts) <= STREAM_PAIRS


def end_call(cache: ExpertCache, i: int) -> None:
    """Layer i's call ended (see ``CpuTrial.end``)."""
    for t in (cache.trial, cache.merge):
        if t is not None and t.decided is None:
            t.end(i)
