"""The runner: one forward pass over all layers, weights handed in by the prefetcher.

for each layer i:
    w = prefetcher.get(i)            # resident, or already arriving in a ring slot
    h = decoder_block(h, w, kv[i])   # on the layer's execution device
    prefetcher.release(i)            # its slot may be refilled once this work is done
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from ollm.kv.cache import LayerKVCache, SlidingKVCache, window_capacity
from ollm.kv.recurrent import RecurrentState
from ollm.layers.attention import AttentionMask
from ollm.layers.norms import rms_norm
from ollm.layers.rope import rope_cos_sin
from ollm.models.decoder import decoder_block
from ollm.models.spec import ModelSpec
from ollm.planning.mlp_cpu import mlp_cpu_layers
from ollm.planning.placement import PlacementPlan
from ollm.runtime.prefetch import Prefetcher
from ollm.runtime.uva import to_device
from ollm.telemetry.timeline import phase as span
from ollm.tiers import KvTier, Phase


def _few_to(t: torch.Tensor, dev: str | torch.device) -> torch.Tensor:
    """``t`` (token ids or positions) on ``dev``: a decode step's few host values through a
    kernel's read of pinned memory (``runtime/uva.to_device``), not a blocking copy (a host
    sync on a GPU); a prompt's copied as they are."""
    if t.device.type == "cpu" and t.numel() <= 4096:
        return to_device(t, dev, non_blocking=True)
    return t.to(dev)


class Runner:
    """Runs forward passes of a ModelSpec under a PlacementPlan."""

    def __init__(
        self, spec: ModelSpec, plan: PlacementPlan, prefetcher: Prefetcher, dtype: torch.dtype
    ) -> None:
        self.spec, self.plan, self.prefetcher, self.dtype = spec, plan, prefetcher, dtype
        self.timeline = None  # set to an ollm.telemetry.timeline.Timeline to record compute spans
        self._fetch_at: int | None = None  # a layer whose KV cache carries the KVFetcher
        # KV compression (issue 17; EngineConfig.kv_codec / kv_recent): "none" keeps KV exact;
        # ``auto`` is held as the plan's KvCodecChoice (``engine/kv_auto.runner_codec``).
        self.kv_codec, self.kv_recent = "none", 128
        self.kv_evict, self.kv_keep = "none", "50%"  # KV eviction (kv/evict.py)
        # Attention routing per layer (issue 18; None: every layer attends over all its KV).
        self.routing: list | None = None
        self._routing_warned = False

    def disk_kv_bytes(self, batch: int, capacity: int, all_layers: bool = False) -> int:
        """Bytes of KV the disk tier needs for a request (checked against free space first)."""
        if all_layers:
            return len(self.plan.layers) * self._kv_layer_bytes(batch, capacity)
        return self._offloaded_kv_bytes(KvTier.DISK, batch, capacity)

    def ram_kv_bytes(self, batch: int, capacity: int) -> int:
        """Bytes of pinned RAM the offloaded (kv_tier "cpu") layers need for a request."""
        return self._offloaded_kv_bytes(KvTier.CPU, batch, capacity)

    def _offloaded_kv_bytes(self, tier: KvTier, batch: int, capacity: int) -> int:
        # An offloaded layer's first ``kv_device_tokens`` slots stay on the device; a compressed
        # layer (kv_codec) keeps all of its KV there at its stored size.
        from ollm.kv.codecs import kv_format

        s, elem = self.spec, torch.finfo(self.dtype).bits // 8
        fmt = kv_format(self.kv_codec, self.kv_recent, s.head_dim, elem, tier)  # tier's codec
        total = 0
        for layer, p in zip(s.layers, self.plan.layers, strict=True):
            if p.kv_tier != tier:
                continue
            if layer.linear:  # a fixed-size recurrent state, in RAM for either tier
                total += s.linear_attn.state_bytes(batch, elem) if tier == KvTier.CPU else 0
            elif fmt is not None and layer.window is None:
                total += fmt.layer_bytes(batch, s.num_kv_heads, s.head_dim, elem, capacity)
            else:
                total += self._kv_layer_bytes(batch, max(0, capacity - p.kv_device_tokens))
        return total

    def _kv_layer_bytes(self, batch: int, capacity: int) -> int:
        s = self.spec
        elem = torch.finfo(self.dtype).bits // 8
        return 2 * batch * s.num_kv_heads * s.head_dim * capacity * elem

    def new_kv(self, batch: int, capacity: int, disk=None, all_disk: bool = False) -> list:
        """Fresh per-layer KV caches: on each layer's KV device, in pinned RAM, or in files of
        the ``disk`` KVDirectory for layers the plan offloads (sharing one prefill scratch)."""
        s = self.spec
        if s.linear_attn is not None and (
            self.kv_codec != "none" or self.kv_evict != "none" or self.routing is not None
        ):
            from ollm.errors import UnsupportedModelError

            raise UnsupportedModelError(
                f"{s.family}: KV codecs, KV eviction and attention routing do not apply to "
                "its linear-attention layers' recurrent state; run it without them"
            )
        scratch = None
        caches: list = []
        # Pinned RAM for offloaded layers is page-locked by a background thread, in layer order.
        pinned = not all_disk and any(p.kv_tier == KvTier.CPU for p in self.plan.layers)
        pin_pool = ThreadPoolExecutor(1, thread_name_prefix="ollm-kv-pin") if pinned else None
        try:
            codecs = None
            if self.kv_codec != "none" or self.kv_evict != "none":
                from ollm.kv.compressed import CompressedCaches

                stats, evict = self.prefetcher.stats, (self.kv_evict, self.kv_keep)
                forward = self.plan.prefill_chunk_tokens or self._forward_rows(capacity)
                codecs = CompressedCaches(
                    s, self.dtype, self.kv_codec, self.kv_recent, batch, capacity, stats, evict,
                    forward,
                )  # fmt: skip
            for i, p in enumerate(self.plan.layers):
                tier = KvTier.DISK if all_disk else p.kv_tier
                if s.layers[i].linear:
                    caches.append(self._state(p, tier, batch))
                    continue
                compressed = codecs.make(i, p, tier, disk) if codecs else None
                if compressed is not None:  # its own storage and attention (kv/compressed.py)
                    caches.append(compressed)
                elif tier in (KvTier.CPU, KvTier.DISK):
                    from ollm.kv.offload import KVScratch, OffloadedKVCache

                    if scratch is None:
                        scratch = KVScratch(
                            batch, s.num_kv_heads, s.head_dim, capacity, self.dtype, p.exec_device
                        )
                    caches.append(
                        OffloadedKVCache(
                            batch,
                            s.num_kv_heads,
                            s.head_dim,
                            capacity,
                            self.dtype,
                            scratch,
                            storage=disk.storage if tier == KvTier.DISK else None,
                            allocator=pin_pool if tier == KvTier.CPU else None,
                            device_tokens=0 if all_disk else p.kv_device_tokens,
                        )
                    )
                else:
                    caches.append(self._device_kv(i, p, batch, capacity))
        except BaseException:
            for cache in caches:
                cache.close()
            raise
        finally:
            if pin_pool is not None:
                pin_pool.shutdown(wait=False)  # queued allocations still run
        if self.routing is not None:
            from ollm.kv.routed import attach_routers

            attach_routers(caches, self.routing, batch, capacity, self.prefetcher.stats)
        self._attach_fetcher(caches, all_disk)
        return caches

    def _state(self, p, tier: KvTier, batch: int) -> RecurrentState:
        """A linear-attention layer's recurrent state: on its KV device, else (its KV offloaded
        to RAM or disk) in host memory, pinned when an accelerator copies it."""
        lin = self.spec.linear_attn
        if tier == KvTier.DEVICE:
            return RecurrentState(batch, lin, self.dtype, p.kv_device)
        return RecurrentState(batch, lin, self.dtype, "cpu", pin=self.prefetcher.cuda)

    def _device_kv(self, i: int, p, batch: int, capacity: int) -> LayerKVCache:
        """Layer ``i``'s KV on its device: the whole capacity, or for a sliding-window layer
        window + one forward when that is smaller (``SlidingKVCache``)."""
        s = self.spec
        window = s.layers[i].window
        bound = window_capacity(
            window, self.plan.prefill_chunk_tokens or self._forward_rows(capacity)
        )
        if window and bound < capacity:
            return SlidingKVCache(
                batch, s.num_kv_heads, s.head_dim, bound, self.dtype, p.kv_device, window
            )
        return LayerKVCache(batch, s.num_kv_heads, s.head_dim, capacity, self.dtype, p.kv_device)

    def _forward_rows(self, capacity: int) -> int:
        """Rows of the largest forward into a cache of ``capacity`` slots: one prefill segment
        (``plan.prefill_segment``), or the whole capacity."""
        return min(capacity, self.plan.prefill_segment or capacity)

    def _attach_fetcher(self, caches: list, all_disk: bool) -> None:
        """The KVFetcher of the layers whose RAM KV decode copies to the GPU (none with every
        layer's KV on disk), its copies queued behind their weights on the copy stream."""
        # A layer whose routing reads a fraction of its KV reads it where it sits: no fetch.
        idx = [
            i
            for i, p in enumerate(self.plan.layers)
            if p.kv_fetch and getattr(getattr(caches[i], "router", None), "partial", False) is False
        ]
        idx = [i for i in idx if not hasattr(caches[i], "codec")]  # compressed: fetch their own
        idx = [i for i in idx if not self.spec.layers[i].linear]  # a state: copied by its layer
        self.prefetcher.on_issue = None
        self._fetch_at = idx[0] if idx and not all_disk else None
        if self._fetch_at is not None:
            from ollm.kv.offload import KVFetcher

            # Decode attends these layers on the GPU over copies of their KV queued right behind
            # their weights (the copy engine serves both in the order the layers need them).
            fetcher = KVFetcher([caches[i] for i in idx], stats=self.prefetcher.stats)
            streamed = set(self.plan.streamed_for(Phase.DECODE))
            if self.prefetcher.cuda and streamed.issuperset(idx):
                fetcher.attach(idx, self.prefetcher.copy_stream)
                self.prefetcher.on_issue = fetcher.issue_layer

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv: list[LayerKVCache],
        key_keep: torch.Tensor | None = None,
        all_logits: bool = False,
        head: Callable[[torch.Tensor], torch.Tensor] | None = None,
        stream_all: bool = False,
    ) -> torch.Tensor:
        """Logits (float32) for the last position [B, V], or every position [B, T, V]; with
        ``head``, what ``head`` returns for the final hidden states [B, T, H] (see ``logits``).
        ``stream_all``: no CPU-computed layers in this pass, whatever its size (the batch
        engine's decode steps whose CPU attention would make hybrid layers slower).

        ``input_ids``/``positions`` are [B, T]; the new tokens occupy KV slots
        ``kv[0].length .. + T``; ``key_keep`` [B, >= slots] marks non-padding slots (None: none).
        """
        try:
            return self._forward(input_ids, positions, kv, key_keep, all_logits, head, stream_all)
        except BaseException:
            self.prefetcher.reset()  # the streamed-layer sequence is out of step; start over
            raise

    def _forward(self, input_ids, positions, kv, key_keep, all_logits, head=None, stream_all=False):
        spec, pf = self.spec, self.prefetcher
        b, t = input_ids.shape
        tl = self.timeline
        with span(tl, "start"):  # the KV fetcher's step start (copies of RAM KV issued)
            self._start_pass(kv, t)
        # Small forwards run in the decode phase: CPU-computed layers or MLPs (hybrid, unless
        # ``stream_all``) and the layers held on the GPU only while decode runs.
        hybrid = (self.plan.cpu_layers or mlp_cpu_layers(self.plan)) and not stream_all
        small = hybrid or self.plan.decode_rows
        phase = self.plan.phase(b * t) if small else Phase.PREFILL
        chunk = self.plan.prefill_chunk_tokens
        # A prompt's hidden states in (pinned) RAM between layers (plan.residual_ram).
        host = self.plan.residual_ram and phase == Phase.PREFILL and bool(chunk) and t > chunk
        with span(tl, "embed"):  # the ids' copy, the gather (and its copy from a host table)
            h = self._embed(input_ids, chunk if host else 0)
        pf.set_phase(phase)
        hybrid_cpu = phase == Phase.DECODE and bool(self.plan.cpu_layers)
        cpu_time = 0.0
        q_start = kv[0].length
        kv_len = q_start + t
        tables: dict[tuple, tuple] = {}
        masks: dict[tuple, tuple] = {}
        for i, layer in enumerate(spec.layers):
            tp = time.perf_counter() if tl is not None else None
            dev = self.plan.layers[i].device_for(phase)
            if not host and h.device != torch.device(dev):
                h = h.to(dev) if dev == "cpu" else to_device(h, dev, non_blocking=True)
            key = (layer.rope, dev)
            if key not in tables:
                tables[key] = rope_cos_sin(layer.rope, _few_to(positions, dev), self.dtype)
            mkey = (layer.window, dev)
            if mkey not in masks:
                m = AttentionMask(q_start, t, kv_len, key_keep, layer.window)
                small = not m.is_plain_causal() and t * kv_len <= 1 << 22
                masks[mkey] = (m, m.dense(torch.device(dev)) if small else None)
            if tp is not None:  # the hidden states' move, rope tables and masks it built
                tl.host("prep", i, tp, time.perf_counter())
            cos, sin = tables[key]
            mask, dense = masks[mkey]
            th = time.perf_counter() if tl is not None else None
            w = pf.get(i)
            if pf.experts is not None:  # a sparse layer's experts come from the expert cache
                w = pf.experts.bind(i, w)
            on_cpu = dev == "cpu"
            t0 = time.perf_counter() if (hybrid_cpu and on_cpu) or tl else None
            ev = None
            if tl is not None and not on_cpu:
                ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                ev[0].record(torch.cuda.current_stream(dev))
            if host:
                h = self._host_residual_block(h, w, kv[i], cos, sin, mask, chunk, dev)
            elif not chunk or t <= chunk:
                h = decoder_block(
                    spec, h, w, kv[i], cos, sin, mask, dense, self.plan.mlp_chunk_tokens
                )
            else:
                h = self._chunked_block(i, h, w, kv[i], cos, sin, mask, chunk)
            if ev is not None:
                ev[1].record(torch.cuda.current_stream(dev))
                tl.cuda("compute", i, *ev)
            elif t0 is not None:
                t1 = time.perf_counter()
                if hybrid_cpu and on_cpu:
                    cpu_time += t1 - t0
                if tl is not None:
                    tl.host("cpu" if self.plan.device != "cpu" else "compute", i, t0, t1)
            pf.release(i)
            if th is not None and not on_cpu:  # the host's time on the layer: syncs, CPU attention
                tl.host("host", i, th, time.perf_counter())
        if cpu_time:
            pf.stats.add(cpu_seconds=cpu_time)
        if host and torch.device(dev).type == "cuda":  # the last copies back have landed
            torch.cuda.current_stream(dev).synchronize()
        with span(tl, "head"):  # final norm, LM head (and the rows it needs)
            return self._head(h, all_logits) if head is None else head(h)

    def _start_pass(self, kv: list, t: int) -> None:
        """Before a pass of ``t`` query rows: routing's one warning where ``kv`` cannot route,
        and the KV fetcher started (a decode step) or stopped."""
        if self.routing is not None and not self._routing_warned:
            if not any(getattr(c, "router", None) is not None for c in kv):
                # KV objects without routing (the paged batch engine's, compressed KV): once.
                self._routing_warned = True
                logging.getLogger("ollm").warning(
                    "attention routing is not applied to these KV caches (batched requests or "
                    "compressed KV): decode attends over all of the KV"
                )
        fetcher = None if self._fetch_at is None else getattr(kv[self._fetch_at], "fetcher", None)
        if fetcher is not None:
            if t <= fetcher.decode_tokens:
                fetcher.start_step()  # a decode step: fetch the KV of the layers that use it
            else:
                fetcher.active = False

    def _embed(self, input_ids: torch.Tensor, chunk: int) -> torch.Tensor:
        """Token embeddings [B, T, H] where the table is; with ``chunk``, gathered ``chunk``
        rows at a time into a host tensor (pinned when a GPU copies from it), so the whole
        prompt's hidden states never sit on the device (a RAM residual stream)."""
        spec, embed = self.spec, self.prefetcher.globals["embed_tokens.weight"]

        def rows(ids: torch.Tensor) -> torch.Tensor:
            e = F.embedding(_few_to(ids, embed.device), embed)
            if spec.embed_scale is not None:
                e = e * torch.tensor(spec.embed_scale, dtype=e.dtype)
            return e

        if not chunk:
            return rows(input_ids)
        b, t = input_ids.shape
        pin = self.prefetcher.cuda
        out = torch.empty(b, t, embed.shape[-1], dtype=embed.dtype, pin_memory=pin)
        for c0 in range(0, t, chunk):
            out[:, c0 : c0 + chunk].copy_(rows(input_ids[:, c0 : c0 + chunk]))
        return out

    def _host_residual_block(self, h, w, kv, cos, sin, mask, chunk, dev):
        """``_chunked_block`` with the hidden states ``h`` in (pinned) RAM: each chunk is copied
        into a chunk buffer on ``dev``, computed, and its output copied back in place. Every
        copy is queued on the compute stream, behind the work it depends on and before the work
        that reuses its memory; the values are those of ``_chunked_block`` (only where the
        bytes wait between layers changes)."""
        b, t = h.shape[:2]
        buf = torch.empty(b, min(chunk, t), h.shape[-1], dtype=h.dtype, device=dev)
        # Asynchronous only between contiguous pinned rows and the GPU (one sequence).
        nb = buf.device.type == "cuda" and h.shape[0] == 1 and h.is_pinned()
        for c0, c1 in _chunk_edges(kv, t, chunk):
            x = buf[:, : c1 - c0]
            x.copy_(h[:, c0:c1], non_blocking=nb)
            m = AttentionMask(
                mask.q_start + c0, c1 - c0, mask.q_start + c1, mask.key_keep, mask.window
            )
            y = decoder_block(
                self.spec, x, w, kv, cos[:, c0:c1], sin[:, c0:c1], m, None,
                self.plan.mlp_chunk_tokens,
            )  # fmt: skip
            h[:, c0:c1].copy_(y, non_blocking=nb)
        if buf.device.type == "cuda":  # the stream came in once (and went back once)
            self.prefetcher.stats.add(bytes_h2d=h.numel() * h.element_size())
        return h

    def _chunked_block(self, i, h, w, kv, cos, sin, mask, chunk):
        """One layer over the prompt in row chunks: weights arrive once for the whole prompt, the
        activations of one chunk at a time exist, and chunk c attends to the KV of chunks <= c.
        A packed batch step's KV gives its own edges (`PackedStep.row_chunks`: at most
        ``chunk`` rows, cut at sequence starts where it can)."""
        for c0, c1 in _chunk_edges(kv, h.shape[1], chunk):
            m = AttentionMask(
                mask.q_start + c0, c1 - c0, mask.q_start + c1, mask.key_keep, mask.window
            )
            h[:, c0:c1] = decoder_block(
                self.spec,
                h[:, c0:c1],
                w,
                kv,
                cos[:, c0:c1],
                sin[:, c0:c1],
                m,
                None,
                self.plan.mlp_chunk_tokens,
            )
        return h

    def _head(self, h, all_logits):
        logits = self.logits(h if all_logits else h[:, -1:])
        return logits if all_logits else logits[:, -1]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits [B, T, V] of final hidden states ``h`` [B, T, H] (norm, head, softcap)."""
        spec, g = self.spec, self.prefetcher.globals
        h = h.to(self.plan.head_device)
        h = rms_norm(
            h, g["norm.weight"], spec.norm_eps, spec.norm_unit_offset, spec.norm_float_weight
        )
        logits = F.linear(h, g["lm_head.weight"])
        if spec.final_logit_softcap:
            cap = spec.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits.float()


def _chunk_edges(kv, t: int, chunk: int) -> list[tuple[int, int]]:
    """Row ranges of ``t`` rows in chunks of at most ``chunk``: a packed batch step's KV gives
    its own (`PackedStep.row_chunks`: cut at sequence starts where it can), else every
    ``chunk`` rows."""
    edges = getattr(kv, "row_chunks", None)
    if edges is not None:
        return edges(chunk)
    return [(c0, min(t, c0 + chunk)) for c0 in range(0, t, chunk)]
