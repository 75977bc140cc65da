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
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ollm.layers.moe import ExpertBatch
    from ollm.runtime.experts import ExpertCache


class Lookahead:
    """The predictions of one ``ExpertCache`` (its plan's sparse layers, in order)."""

    def __init__(self, cache: ExpertCache) -> None:
        self.cache = cache
        layers = cache.plan.layers
        self._next = dict(zip(layers, layers[1:], strict=False))
        self._predicted: dict[int, tuple[set[int], set[int]]] = {}  # layer -> (predicted, fetched)
        self.counts = {"predicted": 0, "correct": 0, "routed": 0, "fetched": 0, "fetched_used": 0}

    def next_weights(self, i: int) -> Mapping | None:
        """The weights (router included) of the sparse layer after i, as last bound (resident:
        the planner enables lookahead only when no dense part streams); None for the last
        layer or before that layer first ran."""
        j = self._next.get(i)
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
        try:
            c._issue(j, fetch, inflight)
        finally:
            c._done(list(inflight))
            c.pinned.clear()
        self._predicted[j] = (pred, {e for e, _ in inflight})
        self.counts["predicted"] += len(pred)
        self.counts["fetched"] += len(inflight)

    @property
    def precision(self) -> float:
        n = self.counts["predicted"]
        return self.counts["correct"] / n if n else 0.0


class LayerExperts:
    """``ExpertSource`` of one layer: the cache's ``run`` for layer i."""

    def __init__(self, cache: ExpertCache, i: int) -> None:
        self.cache, self.i = cache, i
        self.batched = cache.batched
        self.host_rows = cache.host_rows
        self.ahead = cache.ahead

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

    def prefetch(self, experts: list[int]) -> None:
        """Copy the next sparse layer's predicted ``experts`` in early (lookahead)."""
        if self.ahead is not None:
            self.ahead.prefetch(self.i, experts)

    def run(self, used: list[int], counts: list[int]) -> Iterator[ExpertBatch]:
        return self.cache.run(self.i, used, counts)
