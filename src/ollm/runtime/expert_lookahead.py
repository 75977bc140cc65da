"""Lookahead for the expert cache (issue 19, ``expert_lookahead``): while sparse layer i runs,
the next sparse layer's router is applied to layer i's MoE input (``layers/moe.py``: read to
the host in the layer's one sync), and the predicted experts missing from the cache are copied
in right after layer i's compute is queued, so their copies overlap layer i's experts and the
next layer's attention instead of waiting for its router. A prediction never changes a result:
it only decides what is copied early; a wrong one costs the bytes and may evict a useful slot.

Judged by its counts (``counts``): ``predicted`` experts, ``correct`` (routed by the next call
of that layer: precision = correct / predicted), ``fetched`` (copies the prediction issued) and
``fetched_used`` (those the layer then used: misses turned into hits). A random-weight router
routes uniformly, so there the prediction is near chance (top_k / experts); ``--zipf`` in
scripts/moe_overhead.py skews the router as scripts/gpu/moe.py does.

A prefetch takes slots as a miss does, so it evicts the least recently used experts, which on
a cyclic pass over the layers are those of the layers about to run: on the H200 (70 slots for 8
layers of 128 experts, top-8) every prediction was fetched, 43% of them used, and the hit rate
fell from 0.76 to 0.24 (904 vs 128 MB copied per token). So a prefetch never evicts the next
layer's predicted experts that are cached, and after ``JUDGE`` fetches lookahead is kept only
while a fetched expert is used more often than a cached one is hit (``fetched_used / fetched``
against the hit rate without the prefetched hits): else it stops predicting (``active``).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ollm.layers.moe import ExpertBatch
    from ollm.runtime.experts import ExpertCache

log = logging.getLogger(__name__)
JUDGE = 128  # prefetched experts before lookahead is judged by their use


class Lookahead:
    """The predictions of one ``ExpertCache`` (its plan's sparse layers, in order)."""

    def __init__(self, cache: ExpertCache) -> None:
        self.cache = cache
        layers = cache.plan.layers
        self._next = dict(zip(layers, layers[1:], strict=False))
        self._predicted: dict[int, tuple[set[int], set[int]]] = {}  # layer -> (predicted, fetched)
        self.counts = {"predicted": 0, "correct": 0, "routed": 0, "fetched": 0, "fetched_used": 0}
        self.active, self.judge = True, JUDGE  # predicting; fetches before it is judged

    def next_weights(self, i: int) -> Mapping | None:
        """The weights (router included) of the sparse layer after i, as last bound (resident:
        the planner enables lookahead only when no dense part streams); None for the last
        layer or before that layer first ran."""
        j = self._next.get(i) if self.active else None
        bound = None if j is None else self.cache._bound.get(j)
        return None if bound is None else bound[1]

    def check(self, i: int, used: list[int]) -> None:
        """Count layer i's prediction (if one was made) against the experts it routed to."""
        pred = self._predicted.pop(i, None)
        if pred is None:
            return
        got = set(used)
        c = self.counts
        c["routed"] += len(got)
        c["correct"] += len(got & pred[0])
        c["fetched_used"] += len(got & pred[1])

    def prefetch(self, i: int, experts: list[int]) -> None:
        """Layer i predicted ``experts`` for the next sparse layer: copy those of them in RAM
        and not cached into free or evicted slots (never one pinned by a call: none is, between
        calls), behind the slots' last use, as a miss is copied; disk experts are left to the
        call (a read would stall the host here)."""
        j = self._next.get(i)
        if j is None:
            return
        c = self.cache
        pred = set(experts)
        ram = 0 if c.in_place else c.plan.ram[c._index[j]]
        fetch = deque(e for e in sorted(pred) if e < ram and (j, e) not in c.where)
        inflight: deque = deque()
        c.pinned.update((j, e) for e in pred if (j, e) in c.where)  # not evicted by the others
        try:
            c._issue(j, fetch, inflight)
        finally:
            c._done(list(inflight))
            c.pinned.clear()
        self._predicted[j] = (pred, {e for e, _ in inflight})
        self.counts["predicted"] += len(pred)
        self.counts["fetched"] += len(inflight)
        if self.counts["fetched"] >= self.judge:
            self._judge()

    def _judge(self) -> None:
        """Stop predicting when a prefetched expert is used less often than a cached one is
        hit (the cache's hit rate less the hits prefetches made)."""
        n, h = self.counts, self.cache.counts
        used = n["fetched_used"] / n["fetched"]
        calls = h["hits"] + h["misses"] - n["fetched_used"]
        base = (h["hits"] - n["fetched_used"]) / calls if calls > 0 else 0.0
        if used < base:
            self.active = False
            log.info("expert lookahead off: %.2f of its %d prefetched experts used, below the "
                     "cache's hit rate of %.2f without them", used, n["fetched"], base)  # fmt: skip

    @property
    def precision(self) -> float:
        n = self.counts["predicted"]
        return self.counts["correct"] / n if n else 0.0


class LayerExperts:
    """``ExpertSource`` of one layer: the cache's ``run`` for layer i."""

    def __init__(self, cache: ExpertCache, i: int) -> None:
        self.cache, self.i = cache, i
        self.batched = cache.batched
        self.ahead = cache.ahead

    @property
    def host_rows(self) -> bool:
        """Whether CPU batches may come (the rows read to the host with the expert ids): not
        once the trial of ``expert_cpu="auto"`` has found the CPU slower, nor in its copy arm."""
        c = self.cache
        return c.host_rows and (c.trial is None or c.trial.allow)

    @property
    def next_weights(self) -> Mapping | None:
        """The next sparse layer's weights when lookahead predicts its experts, else None."""
        return None if self.ahead is None else self.ahead.next_weights(self.i)

    @property
    def id_stacks(self) -> Mapping | None:
        """All experts resident as [E, ...] stacks, expert e at row e: a decode row's experts
        are gathered by their ids on the device, without reading them to the host (resident
        calls keep no counts); else None."""
        c = self.cache
        return c._layer_stacks.get(self.i) if c.plan.resident else None

    @property
    def direct(self):
        """The cache's direct decode (``runtime/expert_direct.py``: a row's experts planned and
        read on the device) or None."""
        return self.cache.direct

    def prefetch(self, experts: list[int]) -> None:
        """Copy the next sparse layer's predicted ``experts`` in early (lookahead)."""
        if self.ahead is not None:
            self.ahead.prefetch(self.i, experts)

    def run(self, used: list[int], counts: list[int]) -> Iterator[ExpertBatch]:
        return self.cache.run(self.i, used, counts)
