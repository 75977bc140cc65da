"""CUDA graphs of a sparse layer's MLP for one decode row (issue 19; opt-in: ``OLLM_MOE_GRAPHS=1``).

With the direct decode (``runtime/expert_direct.py``) a decode row's MoE has no host sync and
fixed shapes: router, top-k, the plan and gather kernels, the batched expert matmuls, the
weighting and the sum, ~15 launches that cost the host more than the GPU. The first decode call
of each sparse layer runs eagerly (the real call; it also compiles the kernels) and is then
captured into a CUDA graph over a static copy of its input; later calls copy their row into it
and replay the graph: one launch. All graphs share one memory pool (they never run at once, and
only their outputs outlive a replay). The cache's state must be on the device before a replay
(a prefill in between moved it to the host): ``ready`` pushes it outside the graph. A capture
that fails (the layer took a path with a host sync) turns graphs off for the run, with a log
line. The pool's memory is held for the run: measured against the budget on the device
(``scripts/gpu/moe.py``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def wanted() -> bool:
    """Whether ``OLLM_MOE_GRAPHS`` asks for the graphs (off by default)."""
    return os.environ.get("OLLM_MOE_GRAPHS", "0") not in ("0", "off", "false", "")


class MlpGraphs:
    """One graph per (layer weights, row shape, dtype), replayed for later decode rows."""

    def __init__(self, ready: Callable[[], None]) -> None:
        self.ready = ready  # puts the expert cache's state on the device (outside any graph)
        self.pool = None
        self.graphs: dict[tuple, tuple] = {}
        self.off = False
        self.replays = 0

    def __call__(self, x: torch.Tensor, w: object, fn: Callable[[torch.Tensor], torch.Tensor]):
        """``fn(x)`` for layer weights ``w``: eagerly (then captured), or by a replay."""
        if self.off:
            return fn(x)
        key = (id(w), tuple(x.shape), x.dtype)
        entry = self.graphs.get(key)
        if entry is None:
            out = fn(x)
            self._capture(key, x, w, fn)
            return out
        graph, static_x, static_out, _ = entry
        self.ready()
        static_x.copy_(x)
        graph.replay()
        self.replays += 1
        return static_out

    def _capture(self, key: tuple, x: torch.Tensor, w: object, fn) -> None:
        self.ready()
        static_x = x.clone()
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                static_out = fn(static_x)
        except Exception as exc:  # noqa: BLE001 - a path with a sync: eager from now on
            log.warning("MoE decode graphs off: capture failed (%s)", exc)
            self.off = True
            self.graphs.clear()
            return
        self.graphs[key] = (graph, static_x, static_out, w)  # w kept: its id stays unique
