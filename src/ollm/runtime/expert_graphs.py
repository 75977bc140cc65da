"""CUDA graphs of a decode row's sparse decoder block around its attention (issue 19; on with the
direct decode, ``OLLM_MOE_GRAPHS=0`` turns them off).

A batch-1 decode layer of an MoE model whose dense parts are resident is bound by the host: ~55
kernel launches per layer (norms, projections, rope, router, the direct decode's plan and gather,
the expert matmuls, residuals) at 25-40 us of host time each on the H200's host, for ~0.5 ms of
GPU work. With the direct decode (``runtime/expert_direct.py``) nothing in the block reads back
to the host, so everything but the attention over the growing KV has fixed shapes: the block's
first part (input norm, q/k/v projections, q/k norms, rope) and its last part (output projection,
residual, norm, the MoE, residual) are each captured once per layer as a CUDA graph, and a decode
row replays them around the eager ``kv.attend`` (KV append and attention): ~8 launches a layer.

The first decode row of each layer runs eagerly (the real call; kernels compile) and is then
captured over static copies of its inputs: the residual stream row, the rope tables (one pair of
buffers for all layers, refilled when the runner hands a new table: once per step) and the
attention's output. Every graph shares one memory pool (they never run at once; what outlives a
replay is only its static inputs and outputs). The expert cache's state must be on the device
before a replay (a prefill in between moves it to the host): ``ready`` pushes it outside any
graph. Weights that change under a layer (a streamed dense part) or a capture that fails turn
the graphs off for the run, with a log line. The pool's memory is held for the run: measured
against the budget on the device (``scripts/gpu/moe.py``: peak reserved per run).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


def wanted() -> bool:
    """Whether the graphs are on (``OLLM_MOE_GRAPHS``, default on; "0" turns them off)."""
    return os.environ.get("OLLM_MOE_GRAPHS", "1") not in ("0", "off", "false", "")


@dataclass
class _Layer:
    pre: torch.cuda.CUDAGraph
    post: torch.cuda.CUDAGraph
    h: torch.Tensor  # static input row (the residual stream)
    qkvg: tuple  # pre's outputs: q, k, v, gate (or None)
    attn: torch.Tensor  # static input of post: the attention's output
    out: torch.Tensor  # post's output: the next residual row
    w: object  # kept alive: its id keys the entry


class LayerGraphs:
    """Two graphs per sparse layer (weights, row shape and dtype), replayed for decode rows."""

    def __init__(self, ready: Callable[[], None], layers: int) -> None:
        self.ready = ready  # puts the expert cache's state on the device (outside any graph)
        self.max_layers = layers  # sparse layers: more weights than that means they change
        self.pool = None
        self.layers: dict[tuple, _Layer] = {}
        self.seen: dict[int, int] = {}  # a layer's router's address -> id of its weights
        self.rope: dict[tuple, list] = {}  # (shapes, dtype, device) -> static cos, sin, sources
        self.off = False
        self.replays = 0

    def block(self, parts, spec, h, w, kv, cos, sin, mask, chunk) -> torch.Tensor | None:
        """``decoder_block`` of one decode row: eager then captured, or replayed; None when the
        graphs are off (the caller runs the block eagerly). ``parts``: the block's pieces
        (``models.decoder.BLOCK_PARTS``: block_in, attention_mask, attention_out, block_out,
        reset_rope_memo),
        handed in since models sit above runtime."""
        block_in, attention_mask, attention_out, block_out, _ = parts
        if self.off or torch.cuda.is_current_stream_capturing():
            return None
        key = (id(w), tuple(h.shape), h.dtype)
        e = self.layers.get(key)
        if e is None:
            if not self._new_weights(w, spec):
                return None
            q, k, v, gate = block_in(spec, h, w, cos, sin)
            attn = kv.attend(q, k, v, attention_mask(spec, w, mask), spec.scale, None)
            h0 = h.clone()
            out = block_out(spec, h, attention_out(spec, attn, gate, w), w, chunk)
            self._capture(parts, key, spec, h0, w, cos, sin, attn, chunk)
            return out
        self.ready()
        self._rope(cos, sin)  # the static tables refilled once per step
        e.h.copy_(h)
        e.pre.replay()
        q, k, v, _ = e.qkvg
        e.attn.copy_(kv.attend(q, k, v, attention_mask(spec, w, mask), spec.scale, None))
        e.post.replay()
        self.replays += 1
        return e.out

    def _new_weights(self, w, spec) -> bool:
        """A layer's first weights, or graphs off: its weights change (a streamed dense part)."""
        router = w.get(spec.moe.router_key) if spec.moe is not None else None
        if router is None:
            return False
        seen = self.seen.setdefault(router.data_ptr(), id(w))
        if seen != id(w) or len(self.seen) > self.max_layers:
            self._stop("a layer's weights changed between decode rows")
            return False
        return True

    def _rope(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
        """The static rope buffers of ``cos``' shape, refilled when the runner hands new tables."""
        key = (tuple(cos.shape), cos.dtype, cos.device, tuple(sin.shape))
        got = self.rope.get(key)
        if got is None:
            got = self.rope[key] = [cos.clone(), sin.clone(), cos, sin]
        elif got[2] is not cos or got[3] is not sin:
            got[0].copy_(cos)
            got[1].copy_(sin)
            got[2], got[3] = cos, sin
        return got[0], got[1]

    def _capture(self, parts, key, spec, h, w, cos, sin, attn, chunk) -> None:
        block_in, _, attention_out, block_out, reset_rope_memo = parts
        self.ready()
        scos, ssin = self._rope(cos, sin)
        static_attn = attn.clone()
        pre, post = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            reset_rope_memo()  # each graph computes its own signed sin (no tensor of another)
            with torch.cuda.graph(pre, pool=self.pool, capture_error_mode="thread_local"):
                qkvg = block_in(spec, h, w, scos, ssin)
            reset_rope_memo()
            with torch.cuda.graph(post, pool=self.pool, capture_error_mode="thread_local"):
                out = block_out(spec, h, attention_out(spec, static_attn, qkvg[3], w), w, chunk)
        except Exception as exc:  # noqa: BLE001 - a path with a host sync: eager from now on
            reset_rope_memo()
            self._stop(f"capture failed ({exc})")
            return
        self.layers[key] = _Layer(pre, post, h, qkvg, static_attn, out, w)

    def _stop(self, why: str) -> None:
        log.warning("MoE decode graphs off: %s", why)
        self.off = True
        self.layers.clear()  # their weights and pool memory go with them
        self.seen.clear()
        self.rope.clear()
