"""Whether a batch step runs the plan's CPU-computed (hybrid) layers or streams every layer.

The planner picks hybrid layers for one sequence; a batched step's rows and KV change what they
cost, and the cost model's answer for a batch (`costmodel.hybrid_step_pays`) can be wrong (on
the H200 at batch 16 it kept the hybrid layers, 40.7 tok/s, where streaming every layer ran
64.5). So `StepMode` measures: decode steps fall in buckets of their shape (query rows and held
KV tokens, each by powers of two); a bucket starts with a prior (what its measured neighbours
imply, else the cost model), runs it for ``warm`` steps, probes the other mode for
``probe_steps`` steps, keeps the faster by measured seconds per step, and probes the loser again
after ``reprobe`` steps of the bucket or when the kept mode's time drifts by more than ``drift``
from what it measured when chosen (the batch's composition changed). The comparison needs no
normalisation: the samples compared are adjacent steps of one bucket, whose rows and KV differ
by a few tokens. The first step after the runner changes phase is slower (the prefetcher drops
its in-flight loads, `Prefetcher.set_phase`), so such steps are left out of comparisons when
both modes have other samples.

Steps with prefill rows are not probed: they are rare in a bucket (one per prompt chunk
admitted), their time depends on the prompts' lengths more than on the bucket's shape (so a
comparison would mostly measure the prompts), and they are the longest steps, where a probe of
the slower mode costs most. They take what the measured decode buckets imply by monotony (the
CPU layers' cost grows with rows and KV, streaming's hardly: streaming that won with fewer rows
and less KV wins here, hybrid layers that won with more of both win here), else the cost model.
Steps of more rows than the plan runs with decode devices (``max_rows``, the plan's
``cpu_max_tokens``) have no choice: both modes stream every layer. Both modes are exact (no
approximation; the same weights and KV), so probing changes which device computes a layer, not
what is computed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ollm.planning.costmodel import hybrid_step_pays
from ollm.planning.mlp_cpu import mlp_cpu_layers
from ollm.tiers import Phase

Key = tuple[int, int]  # (rows, KV tokens) as bit lengths: [2^(k-1), 2^k)
MODES = {False: "hybrid", True: "stream"}


@dataclass
class _Bucket:
    """One decode-step shape's measured choice."""

    choice: bool  # stream every layer
    steps: int = 0  # steps since the last decision (warm-up, or since the probe ended)
    probing: int = 0  # steps of the other mode left in the probe running now
    probes: int = 0  # probes run
    decided: bool = False  # a probe compared both modes
    ref: float | None = None  # the kept mode's seconds when chosen (drift reference)
    ewma: float | None = None  # the kept mode's recent seconds
    # per mode: recent seconds, as (seconds, after a phase change)
    seen: dict[bool, deque] = field(
        default_factory=lambda: {False: deque(maxlen=4), True: deque(maxlen=4)}
    )

    @property
    def mode(self) -> bool:
        """The mode this bucket's next step runs."""
        return (not self.choice) if self.probing else self.choice


class StepMode:
    """The per-step choice of streaming every layer (True) or running the hybrid layers."""

    def __init__(
        self,
        predict: Callable[[int, int], bool] | None,
        max_rows: int | None = None,
        *,
        warm: int = 2,
        probe_steps: int = 2,
        reprobe: int = 64,
        drift: float = 0.25,
    ) -> None:
        """``predict(rows, kv_tokens)``: the cost model's answer, whether the hybrid layers pay
        for a step of ``rows`` query rows over ``kv_tokens`` held tokens (None: no CPU layers,
        never stream). ``max_rows``: the largest step that runs the CPU layers at all (None: no
        limit). A probe is ``probe_steps`` steps (the first after a phase change is left out
        of comparisons when the other samples allow)."""
        self.predict, self.max_rows = predict, max_rows
        self.warm, self.probe_steps = max(1, warm), max(1, probe_steps)
        self.reprobe, self.drift = reprobe, drift
        self.buckets: dict[Key, _Bucket] = {}
        self._pending: tuple[Key | None, bool, bool] | None = None  # bucket, mode, switched
        self._phase: bool | None = None  # the last step's runner phase (True: PREFILL)
        self._totals = {False: [0, 0.0], True: [0, 0.0]}  # decode buckets' steps, seconds
        self.probe_count = self.switches = self.unprobed = 0

    @classmethod
    def for_runner(cls, runner, rates, pools=None, **kw) -> StepMode:
        """The measured choice for ``runner``'s plan (the cost model's answer from ``rates``
        as the prior, with the CPU layers' KV attended in place when ``pools``, the engine's
        `EnginePools`, say so: `attends_in_place`; a plan with MLPs on the CPU, ``mlp_cpu``,
        starts from the planner's choice; no choice without either)."""
        plan = runner.plan
        if not plan.cpu_layers:
            if mlp_cpu_layers(plan):  # MLPs on the CPU: the planner's choice, probed by measure
                return cls(lambda rows, kv_tokens: True, plan.cpu_max_tokens, **kw)
            return cls(None, **kw)
        in_place = pools is None or attends_in_place(pools, plan.cpu_layers)
        return cls(hybrid_predictor(runner, rates, in_place), plan.cpu_max_tokens, **kw)

    # -- the engine's two calls ---------------------------------------------------------------

    def stream(self, rows: int, kv_tokens: int, prefill: bool = False) -> bool:
        """Whether this step streams every layer (skipping the plan's CPU layers);
        ``prefill``: some sequence computes more than its next token (and drafts)."""
        key, mode = None, False
        if self.predict is None:
            pass
        elif self.max_rows is not None and rows > self.max_rows:
            mode = not self.predict(rows, kv_tokens)  # no choice: both stream every layer
        elif prefill:
            mode = self._implied(rows, kv_tokens)
            self.unprobed += 1
        else:
            key = (rows.bit_length(), kv_tokens.bit_length())
            b = self.buckets.get(key)
            if b is None:
                b = self.buckets[key] = _Bucket(self._implied(rows, kv_tokens))
            mode = b.mode
        phase = mode or (self.max_rows is not None and rows > self.max_rows)
        switched = self._phase is not None and phase != self._phase
        self._phase, self._pending = phase, (key, mode, switched)
        return mode

    def record(self, seconds: float) -> None:
        """The measured wall time of the step `stream` was last asked about."""
        if self._pending is None:
            return
        key, mode, switched = self._pending
        self._pending = None
        b = self.buckets.get(key) if key is not None else None
        if b is None:
            return
        b.seen[mode].append((seconds, switched))
        tot = self._totals[mode]
        tot[0], tot[1] = tot[0] + 1, tot[1] + seconds
        if b.probing:
            b.probing -= 1
            if not b.probing:
                self._decide(b)
            return
        b.steps += 1
        if not switched and b.decided:
            b.ewma = seconds if b.ewma is None else 0.7 * b.ewma + 0.3 * seconds
        if self._due(b):
            b.probing, b.steps = self.probe_steps, 0
            b.seen[not b.choice].clear()  # compare with this probe only
            b.probes += 1
            self.probe_count += 1

    # -- policy -------------------------------------------------------------------------------

    def _due(self, b: _Bucket) -> bool:
        """Whether the bucket probes the other mode now."""
        if not b.decided:
            return b.steps >= self.warm
        if b.steps >= self.reprobe:
            return True
        return bool(b.ref and b.ewma and abs(b.ewma / b.ref - 1) > self.drift and b.steps >= 4)

    def _decide(self, b: _Bucket) -> None:
        """Keep the faster mode by the bucket's recent samples (the probe's and those before)."""
        kept, other = _mean(b.seen[b.choice], b.seen[not b.choice])
        if other < kept:
            b.choice = not b.choice
            kept = other
            self.switches += 1
        b.decided, b.steps, b.ref, b.ewma = True, 0, kept, None

    def _implied(self, rows: int, kv_tokens: int) -> bool:
        """Stream when a decided bucket of no more rows and KV streams; the hybrid layers when
        one of no fewer rows and KV keeps them (monotony: the CPU layers' cost grows with both,
        streaming's hardly); else the cost model."""
        r, k = rows.bit_length(), kv_tokens.bit_length()
        decided = [(key, b.choice) for key, b in self.buckets.items() if b.decided]
        if any(c and kr <= r and kk <= k for (kr, kk), c in decided):
            return True
        if any(not c and kr >= r and kk >= k for (kr, kk), c in decided):
            return False
        return not self.predict(rows, kv_tokens)  # type: ignore[misc]

    def summary(self) -> dict:
        """What was measured and chosen (JSON-ready): per mode the decode steps measured and
        their mean seconds, probes, switches, steps that were not probed, and per bucket its
        rows and KV tokens (lower bounds), choice and mean seconds per mode."""

        def mean(xs) -> float | None:
            return sum(s for s, _ in xs) / len(xs) if xs else None

        out: dict = {"measured": self.predict is not None, "probes": self.probe_count}
        out.update(switches=self.switches, unprobed_steps=self.unprobed)
        for mode, name in MODES.items():
            n, s = self._totals[mode]
            out[name] = {"steps": n, "mean_step_s": s / n if n else None}
        out["buckets"] = [
            {"rows": 1 << (r - 1) if r else 0, "kv_tokens": 1 << (k - 1) if k else 0,
             "chosen": MODES[b.choice], "probes": b.probes,
             **{f"{name}_s": mean(b.seen[m]) for m, name in MODES.items()}}
            for (r, k), b in sorted(self.buckets.items())
        ]  # fmt: skip
        return out


def _mean(kept: deque, other: deque) -> tuple[float, float]:
    """Mean seconds of each mode's samples: without the steps after a phase change when both
    have others, else all of them (the kept mode's last two: the probe's neighbours, after a
    drift too)."""
    a = [s for s, sw in kept if not sw]
    b = [s for s, sw in other if not sw]
    if not (a and b):
        a, b = [s for s, _ in kept], [s for s, _ in other]
    a = a[-2:]
    inf = float("inf")
    return (sum(a) / len(a) if a else inf), (sum(b) / len(b) if b else inf)


def step_shape(plan) -> tuple[int, int, bool]:
    """A `StepPlan`'s query rows, the KV tokens its sequences hold after it, and whether some
    sequence computes more than its next token and drafts (prefill rows)."""
    rows = sum(len(st.token_ids) for st in plan.seqs)
    kv_tokens = sum(st.start + len(st.token_ids) for st in plan.seqs)
    prefill = any(len(st.token_ids) > st.num_draft + 1 for st in plan.seqs)
    return rows, kv_tokens, prefill


def attends_in_place(pools, layers) -> bool:
    """Whether the engine's CPU attends the KV of ``layers`` (model layer indices) where it
    sits: each one's store head-major and its group's blocks on slabs (`kv.slabs.SlabPool`),
    so a decode batch is a strided view of the pool (`kv/strided.py`) unless its sequences
    share blocks (a prefix hit), which gathers."""
    from ollm.engine.kvpools import DEVICE_TIER
    from ollm.kv.slabs import SlabPool

    for i in layers:
        group, store, _ = pools.layers[i]
        pool = pools.managers[group].pools.get(DEVICE_TIER)
        if not (store.HEAD_MAJOR and isinstance(pool, SlabPool)):
            return False
    return True


def hybrid_predictor(runner, rates, in_place: bool = True) -> Callable[[int, int], bool]:
    """The cost model's answer for ``runner``'s plan (`costmodel.hybrid_step_pays`; True, the
    hybrid layers pay, when the rates are unknown): a decode step's rows are its sequences,
    whose KV the CPU layers attend at the batched rate when ``in_place`` (no gather)."""
    plan = runner.plan
    spec, elem = runner.spec, torch.finfo(runner.dtype).bits // 8
    per_token = 2 * spec.num_kv_heads * spec.head_dim * elem  # one layer's KV bytes per token
    n_str = len(plan.streamed_for(Phase.PREFILL))

    def pays(rows: int, kv_tokens: int) -> bool:
        return hybrid_step_pays(
            rates, len(plan.cpu_layers), n_str, plan.layer_bytes, elem, rows, per_token * kv_tokens,
            in_place=in_place,
        )  # fmt: skip

    return pays
