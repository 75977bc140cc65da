"""The generation loop: batch of prompts (left padding, per-sequence positions), prefill, decode,
stop conditions, streaming text, metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ollm.engine.runner import Runner
from ollm.engine.sampling import Sampler, SamplingParams
from ollm.engine.textstream import IncrementalDetokenizer, StopMatcher
from ollm.errors import RequestError
from ollm.telemetry.energy import EnergyMeter
from ollm.telemetry.metrics import GenerationMetrics
from ollm.telemetry.stats import IOStats
from ollm.tiers import KvTier

# (sequence index, new text) -> None; called as text becomes final.
# score() makes float32 logits of at most this many bytes at once (a few positions' worth).
SCORE_LOGITS_BYTES = 16 << 20
TextCallback = Callable[[int, str], None]


@dataclass
class SequenceOutput:
    """One sequence's generated tokens and text."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stopped_by_string: bool = False


class Generator:
    """Runs requests through a Runner; tokenizer is optional (token ids in, token ids out)."""

    def __init__(
        self, runner: Runner, stats: IOStats, tokenizer=None, eos_ids=(), kv_dir: str | None = None
    ) -> None:
        self.runner, self.stats, self.tokenizer = runner, stats, tokenizer
        self.kv_dir = kv_dir
        self.eos_ids = set(eos_ids)
        self.device = torch.device(runner.plan.device)

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        on_text: TextCallback | None = None,
        on_token: Callable[[int, int], None] | None = None,
        kv_dir: str | None = None,
    ) -> tuple[list[SequenceOutput], GenerationMetrics]:
        """Run a batch; ``kv_dir`` puts every layer's KV on disk there for this request."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RequestError("every prompt needs at least one token (the prompt is empty)")
        b = len(prompts)
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        capacity = width + params.max_new_tokens
        ids = torch.zeros(b, width, dtype=torch.long)
        keep = torch.ones(b, capacity, dtype=torch.bool)
        positions = torch.ones(b, width, dtype=torch.long)
        for r, p in enumerate(prompts):
            pad = width - len(p)
            ids[r, pad:] = torch.tensor(p)
            keep[r, :pad] = False
            positions[r, pad:] = torch.arange(len(p))
        key_keep = None if all(n == width for n in lengths) else keep.to(self.device)
        spans = _slot_spans(params, prompts, width)  # routing by segment (a bad span: here)
        next_pos = torch.tensor(lengths, dtype=torch.long)[:, None]

        outs = [SequenceOutput(list(p)) for p in prompts]
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        detoks = matchers = None
        if self.tokenizer is not None:
            detoks = [IncrementalDetokenizer(self.tokenizer) for _ in prompts]
            matchers = [StopMatcher(params.stop) for _ in prompts]
        sampler = Sampler(params, self.runner.plan.head_device)

        metrics = GenerationMetrics(prompt_tokens=sum(lengths), device=str(self.device))
        energy = EnergyMeter(str(self.device)).start()
        before = self.stats.snapshot()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        kv: list = []
        disk = None
        try:
            kv, disk = self._new_kv(b, capacity, kv_dir, spans)
            logits = self._prefill(ids, positions, kv, key_keep)
            tokens = sampler.sample(logits).cpu()
            t_first = time.perf_counter()
            metrics.prefill_seconds = metrics.time_to_first_token = t_first - t0
            self.runner.prefetcher.collect_timings()
            mid = _delta(self.stats.snapshot(), before)
            metrics.prefill_io_wait_seconds = mid["host_wait_seconds"] + mid["gpu_stall_seconds"]
            metrics.prefill_io_seconds = mid["read_seconds"] + mid["copy_seconds"]
            t_first = time.perf_counter()
            step = 0
            while True:
                active = self._accept(
                    tokens, outs, stops, params, detoks, matchers, on_text, on_token
                )
                step += 1
                if not active:
                    break
                logits = self.runner.forward(tokens[:, None], next_pos.clone(), kv, key_keep)
                next_pos += 1
                tokens = sampler.sample(logits).cpu()
            # The decode clock stops here: tear-down (unpinning KV, deleting the disk KV
            # directory) is not decoding and would understate tok/s.
            metrics.decode_seconds = time.perf_counter() - t_first
        finally:
            self._release(kv, disk)
        self._finish(outs, detoks, matchers, on_text)
        self.runner.prefetcher.collect_timings()
        metrics.generated_tokens = sum(len(o.token_ids) for o in outs)
        _fill_io(metrics, _delta(self.stats.snapshot(), before), self.runner.plan)
        if self.device.type == "cuda":
            metrics.peak_gpu_memory = torch.cuda.max_memory_reserved(self.device)
        reasons = {o.finish_reason for o in outs}
        metrics.finish_reason = reasons.pop() if len(reasons) == 1 else "mixed"
        metrics.energy_joules = energy.stop()
        return outs, metrics

    def _prefill(self, ids, positions, kv, key_keep) -> torch.Tensor:
        """Logits of the prompt's last position: one forward, or with ``plan.prefill_segment``
        one forward per segment of that many tokens (KV appended, positions continuing; only
        the last computes the head)."""
        seg, width = self.runner.plan.prefill_segment, ids.shape[1]
        if not seg or width <= seg:
            return self.runner.forward(ids, positions, kv, key_keep)
        for a in range(0, width - seg, seg):
            self.runner.forward(ids[:, a : a + seg], positions[:, a : a + seg], kv, key_keep,
                                head=_no_head)  # fmt: skip
        a = (width - 1) // seg * seg
        return self.runner.forward(ids[:, a:], positions[:, a:], kv, key_keep)

    def _new_kv(self, batch: int, capacity: int, kv_dir: str | None, spans=None):
        """KV caches for a request, with a run directory (checked for space) if any is on disk;
        ``spans`` (per sequence, slot spans marked full) go to the routed layers' routers."""
        if kv_dir is None:
            need = self.runner.ram_kv_bytes(batch, capacity)
            if need:
                import psutil

                from ollm.errors import OllmError
                from ollm.sizes import format_size

                avail = psutil.virtual_memory().available
                if need > 0.9 * avail:
                    raise OllmError(
                        f"this request needs {format_size(need)} of pinned RAM for its KV cache but "
                        f"{format_size(avail)} is available; use kv_cache='disk' (--kv-cache disk), "
                        "a shorter context or a smaller batch"
                    )
        disk = None
        if kv_dir is not None or any(p.kv_tier == KvTier.DISK for p in self.runner.plan.layers):
            from ollm.kv.disk import KVDirectory

            disk = KVDirectory(kv_dir or self.kv_dir or ".")
        try:
            if disk is not None:
                disk.check(
                    self.runner.disk_kv_bytes(batch, capacity, all_layers=kv_dir is not None)
                )
            kv = self.runner.new_kv(batch, capacity, disk, all_disk=kv_dir is not None)
            if spans is not None:
                from ollm.kv.routed import force_spans

                force_spans(kv, spans)
            return kv, disk
        except BaseException:
            if disk is not None:
                disk.close()
            raise

    @staticmethod
    def _release(kv: list, disk) -> None:
        for cache in kv:
            cache.close()
        if disk is not None:
            disk.close()

    def _accept(self, tokens, outs, stops, params, detoks, matchers, on_text, on_token) -> bool:
        """Record one sampled token per sequence; return whether any sequence is still running."""
        active = False
        for r, out in enumerate(outs):
            if out.finish_reason is not None:
                continue
            tok = int(tokens[r])
            if tok in stops:
                out.finish_reason = "stop"
                continue
            out.token_ids.append(tok)
            if on_token is not None:
                on_token(r, tok)
            if detoks is not None:
                piece, stopped = matchers[r].feed(detoks[r].push(tok))
                self._emit(r, out, piece, on_text)
                if stopped:
                    out.finish_reason = "stop"
                    out.stopped_by_string = True
                    continue
            if len(out.token_ids) >= params.max_new_tokens:
                out.finish_reason = "length"
                continue
            active = True
        return active

    def _finish(self, outs, detoks, matchers, on_text) -> None:
        if detoks is None:
            return
        for r, out in enumerate(outs):
            if out.stopped_by_string:
                continue
            piece, stopped = matchers[r].feed(detoks[r].flush())
            self._emit(r, out, piece + ("" if stopped else matchers[r].flush()), on_text)

    @staticmethod
    def _emit(r: int, out: SequenceOutput, piece: str, on_text: TextCallback | None) -> None:
        if piece:
            out.text += piece
            if on_text is not None:
                on_text(r, piece)

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """log p(token[t] | tokens[<t]) for t >= 1 (teacher forcing), float32 [len-1]."""
        if len(token_ids) < 2:
            raise RequestError("score needs at least two tokens")
        targets = torch.tensor(token_ids[1:], dtype=torch.long)
        return self._teacher_forced(
            token_ids, lambda h, a: self._score_head(h, targets[a : a + h.shape[1]])
        )

    def final_hidden(self, token_ids: list[int]) -> torch.Tensor:
        """Final-layer hidden states [1, T, H] of a teacher-forced pass over ``token_ids`` (on the
        last layer's device; in host RAM when prefilled in segments): a caller applies
        ``runner.logits`` to a few positions at a time."""
        seg = self.runner.plan.prefill_segment
        if not seg or len(token_ids) <= seg:
            return self._teacher_forced(token_ids, lambda h, a: h)
        return self._teacher_forced(token_ids, lambda h, a: h.cpu())

    def _teacher_forced(self, token_ids: list[int], head) -> torch.Tensor:
        """``head(h, start)`` of the final hidden states of a pass over ``token_ids`` in a
        fresh KV, concatenated along the positions: one forward, or one per prefill segment
        (``plan.prefill_segment``; ``start`` its first position)."""
        ids = torch.tensor([token_ids], dtype=torch.long)
        pos = torch.arange(len(token_ids))[None]
        n, seg = len(token_ids), self.runner.plan.prefill_segment or len(token_ids)
        kv, disk = self._new_kv(1, n, None)
        try:
            parts = [
                self.runner.forward(
                    ids[:, a : a + seg],
                    pos[:, a : a + seg],
                    kv,
                    None,
                    head=lambda h, a=a: head(h, a),
                )  # fmt: skip
                for a in range(0, n, seg)
            ]
            return (
                parts[0]
                if len(parts) == 1
                else torch.cat(parts, dim=-1 if parts[0].dim() == 1 else 1)
            )
        finally:
            self._release(kv, disk)

    def _score_head(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Log-probs of ``targets`` from the final hidden states ``h`` [1, T, H], a few positions
        at a time: a [T, vocab] float32 tensor would be GiBs for a long text and a big vocab."""
        rows = max(1, SCORE_LOGITS_BYTES // (4 * self.runner.spec.vocab_size))
        out = []
        n = len(targets)  # the last position predicts past the text: not needed
        for c0 in range(0, n, rows):
            c1 = min(n, c0 + rows)
            logits = self.runner.logits(h[:, c0:c1])[0]  # float32 [rows, V]
            tgt = targets[c0:c1, None].to(logits.device)
            # log_softmax gathered at the target, without a second [rows, V] tensor.
            logp = logits.gather(-1, tgt)[:, 0] - torch.logsumexp(logits, dim=-1)
            out.append(logp.cpu())
        return torch.cat(out)


def _no_head(h: torch.Tensor) -> None:
    """A segment before the last: its final hidden states are not needed."""
    return None


def _slot_spans(params: SamplingParams, prompts: list[list[int]], width: int):
    """Per sequence, the KV slots of the prompt spans ``params.full_attention`` marks (left
    padding shifts a shorter prompt's slots), or None without spans."""
    if not params.full_attention:
        return None
    from ollm.layers.segments import resolve_spans

    out = []
    for p in prompts:
        pad = width - len(p)
        out.append([(pad + a, pad + e) for a, e in resolve_spans(params.full_attention, len(p))])
    return out


def _delta(now: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """Counter increments since ``before`` (IOStats snapshots)."""
    return {k: now[k] - before[k] for k in now}


def _fill_io(metrics: GenerationMetrics, d: dict[str, float], plan=None) -> None:
    """Copy a request's I/O counter increments into its metrics (and ``plan``'s KV codecs,
    chosen by ``--kv-codec auto``)."""
    choice = getattr(plan, "kv_codecs", None)
    metrics.kv_codecs = choice.summary() if choice is not None else None
    metrics.bytes_read_disk = int(d["bytes_disk"])
    metrics.bytes_copied_h2d = int(d["bytes_h2d"])
    metrics.io_wait_host_seconds = d["host_wait_seconds"]
    metrics.io_stall_gpu_seconds = d["gpu_stall_seconds"]
    metrics.read_seconds = d["read_seconds"]
    metrics.copy_seconds = d["copy_seconds"]
    metrics.cpu_path_seconds = d["cpu_seconds"]
    if d.get("kv_total_tokens"):  # attention routing counted its decode reads
        metrics.kv_read_fraction = d["kv_read_tokens"] / d["kv_total_tokens"]
    routed = d.get("expert_hits", 0) + d.get("expert_misses", 0)
    if routed:  # the expert cache served this request's sparse layers
        metrics.expert_hit_rate = d["expert_hits"] / routed
        metrics.expert_cpu = int(d["expert_cpu"])
