"""Calibration of the cost model: measures this machine's rates (``planning.costmodel
.MachineRates``: PCIe, CPU and GPU weight and FLOP rates, alone and while the other path runs)
by running real copies, GEMVs and decoder layers, and caches them as JSON in the cache
directory. The engine measures; planning holds the pure model that uses the numbers.

Rates are measured once per machine (a few seconds).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ollm.kv.cache import LayerKVCache
from ollm.layers.attention import AttentionMask, attend
from ollm.layers.rope import rope_cos_sin
from ollm.models.decoder import decoder_block
from ollm.planning.costmodel import (
    CPU_FLOPS_ROWS,
    CPU_FLOPS_TOKENS,
    RATES_VERSION,
    MachineRates,
)

log = logging.getLogger(__name__)


def _time(fn, reps: int) -> float:
    """Seconds of one ``fn()`` after a warm-up: the median of ``reps`` timed calls, so that a
    call the OS preempted (a loaded machine) does not set a rate that is cached for good."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _layer_workload(spec, context: int, dtype: torch.dtype):
    """One decoder layer of ``spec`` with random weights and a KV cache of ``context`` tokens on
    the CPU; returns (run one decode step, weight bytes)."""
    h, d, i = spec.hidden_size, spec.head_dim, spec.intermediate_size
    qd, kvd = spec.num_heads * d, spec.num_kv_heads * d
    shapes = {
        "self_attn.q_proj.weight": (qd * (2 if spec.attn_output_gate else 1), h),
        "self_attn.k_proj.weight": (kvd, h),
        "self_attn.v_proj.weight": (kvd, h),
        "self_attn.o_proj.weight": (h, qd),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }
    w = {n: torch.empty(shape, dtype=dtype).normal_(0, 0.02) for n, shape in shapes.items()}
    for n, dim in [
        ("input_layernorm.weight", h),
        ("post_attention_layernorm.weight", h),
        ("pre_feedforward_layernorm.weight", h),
        ("post_feedforward_layernorm.weight", h),
        ("self_attn.q_norm.weight", d),
        ("self_attn.k_norm.weight", d),
        ("self_attn.sinks", spec.num_heads),  # gpt-oss; a MoE is timed as its dense equivalent
    ]:
        w[n] = torch.ones(dim, dtype=dtype)
    kv = LayerKVCache(1, spec.num_kv_heads, d, context + 1, dtype, "cpu")
    kv.k.normal_()
    kv.v.normal_()
    x = torch.randn(1, 1, h, dtype=dtype)
    cos, sin = rope_cos_sin(spec.layers[-1].rope, torch.tensor([[context]]), dtype)
    mask = AttentionMask(context, 1, context + 1)

    def step() -> None:
        kv.length = context
        decoder_block(spec, x, w, kv, cos, sin, mask)

    return step, sum(t.numel() * t.element_size() for n, t in w.items() if n in shapes)


def _attention_workload(spec, context: int, dtype: torch.dtype):
    """One decode query's attention over ``context`` tokens of KV in RAM, as decode runs it on
    the CPU for a pinned-RAM KV layer; returns (run it, KV bytes read, the KV [2, 1, KVH, T, D])."""
    kv = torch.empty(2, 1, spec.num_kv_heads, context, spec.head_dim, dtype=dtype).normal_()
    q = torch.randn(1, spec.num_heads, 1, spec.head_dim, dtype=dtype)
    mask = AttentionMask(context - 1, 1, context)

    def step() -> None:
        attend(q, kv[0], kv[1], mask, spec.head_dim**-0.5)

    return step, kv.numel() * kv.element_size(), kv


BATCH_ATTN_BYTES = 512 << 20  # K+V the batched attention rate rotates over (beyond the LLC)
BATCH_ATTN_MAX_SEQS = 64


def batch_attention_seqs(kv_heads: int, threads: int) -> int:
    """Sequences of the batched attention measurement: enough that its (sequence, KV head) work
    items are at least four times the threads (every thread busy; the last, partial round of
    items leaves at most a fifth of the threads' time idle), at least 2, capped."""
    return min(BATCH_ATTN_MAX_SEQS, max(2, -(-4 * threads // max(1, kv_heads))))


def _batch_attention_workload(
    spec, context: int, dtype: torch.dtype, seqs: int, nbytes: int = BATCH_ATTN_BYTES,
    block_tokens: int = 16,
):  # fmt: skip
    """A decode batch of ``seqs`` sequences of ``context`` tokens attended by the CPU as the
    batch engine attends a head-major pool in RAM (``kv/packed._attend_decodes``' strided path):
    each layer's pool ``[2, kv_heads, blocks, block_tokens, D]`` holds the sequences on slabs
    (``kv/slabs.py``), seen as ``[B, kv_heads, S, D]`` by ``kv/strided.run_view``, attended by
    ``attend`` with the batch's dense key mask. The step goes over as many layers' pools as
    make ``nbytes`` (a step reads each layer's KV once: larger than the caches, or the rate is
    the cache's); returns (run it, KV bytes read)."""
    from ollm.kv.strided import StridedRun, run_view

    kvh, hd = spec.num_kv_heads, spec.head_dim
    nb = -(-context // block_tokens)
    per_layer = 2 * kvh * seqs * nb * block_tokens * hd * torch.finfo(dtype).bits // 8
    n_layers = max(1, min(64, -(-nbytes // per_layer)))
    pools = torch.empty(n_layers, 2, kvh, seqs * nb, block_tokens, hd, dtype=dtype)
    pools.fill_(0.01)  # the values do not change the work; a fill touches every page fast
    run = StridedRun(0, nb, seqs, tuple(range(seqs)), True)
    views = [run_view(pools[i], run, nb) for i in range(n_layers)]
    s = nb * block_tokens
    keep = (torch.arange(s) < context).expand(seqs, s)[:, None, None]  # [B, 1, 1, S]
    mask = AttentionMask(s - 1, 1, s, keep[:, 0, 0])
    q = torch.randn(seqs, spec.num_heads, 1, hd, dtype=dtype)
    scale = hd**-0.5

    def step() -> None:
        for k, v in views:
            attend(q, k, v, mask, scale, keep)

    return step, n_layers * per_layer


def cpu_attn_batch_rate(
    spec, context: int, dtype: torch.dtype = torch.bfloat16, seqs: int | None = None,
    nbytes: int = BATCH_ATTN_BYTES, reps: int = 3,
) -> tuple[float, int]:  # fmt: skip
    """(KV bytes/s, sequences) of a batch's decode attention over strided views of head-major
    pools on the CPU (``_batch_attention_workload``; ``seqs`` default
    ``batch_attention_seqs`` for the threads torch uses now); what ``MachineRates
    .cpu_attn_batch`` holds."""
    seqs = seqs or batch_attention_seqs(spec.num_kv_heads, torch.get_num_threads())
    step, kv_bytes = _batch_attention_workload(spec, context, dtype, seqs, nbytes)
    return kv_bytes / _time(step, reps), seqs


def _routed_workload(kv: torch.Tensor, spec, dtype: torch.dtype, page: int = 64):
    """One routed decode read over ``kv`` [2, 1, KVH, T, D] in RAM as a ``Router`` runs it on
    the CPU (``kv/page_read``): the sinks, the 256-token window and 1/8 of the ``page``-token
    pages between them, gathered for every KV head into one buffer, then attended split
    between threads; returns (run it, KV bytes read)."""
    from ollm.kv.page_read import PageBuffers, StepSlots, attend_read, gather_tier

    t, kvh = kv.shape[3], spec.num_kv_heads
    lo = page
    hi = max(lo, (t - 256) // page * page)
    step = StepSlots(lo, hi, t, page)
    n = (hi - lo) // page
    ids = None
    if n:
        chosen = torch.arange(max(1, n // 8)) * 8 + lo // page  # every eighth page
        ids = chosen.expand(1, kvh, chosen.numel()).contiguous()
    q = torch.randn(1, spec.num_heads, 1, spec.head_dim, dtype=dtype)
    heads, bufs, scale = tuple(range(kvh)), PageBuffers(), spec.head_dim**-0.5
    kb = gather_tier(kv[0], kv[1], 0, step, heads, ids, bufs)[0]

    def read() -> None:
        kb, vb, valid, _ = gather_tier(kv[0], kv[1], 0, step, heads, ids, bufs)
        attend_read(q, kb, vb, valid, scale)

    return read, 2 * kb.numel() * kb.element_size()


def _cpu_matmul_rate(w: torch.Tensor, rows: int, reps: int) -> float:
    """FLOP/s of ``rows`` query rows times the weight ``w`` [out, in] on the CPU."""
    a = torch.randn(rows, w.shape[1], dtype=w.dtype)
    return 2 * rows * w.numel() / _time(lambda: torch.nn.functional.linear(a, w), reps)


def cpu_gather_rate(
    spec=None, dtype: torch.dtype = torch.bfloat16, block_tokens: int = 16, nbytes: int = 64 << 20
) -> float:
    """KV bytes/s of the CPU's gather of paged KV before a batch's decode attention, as
    ``kv/packed`` runs it: rows (block, KV head) of block_tokens x head_dim, in scattered
    order, copied by one ``index_select`` into a kept buffer (the threads torch uses now)."""
    kvh, hd = (spec.num_kv_heads, spec.head_dim) if spec is not None else (8, 128)
    row = block_tokens * hd
    blocks = max(1, nbytes // (kvh * row * torch.finfo(dtype).bits // 8))
    src = torch.empty(2 * blocks * kvh, row, dtype=dtype).normal_()  # a pool half gathered
    ids = torch.randperm(2 * blocks, generator=torch.Generator().manual_seed(0))[:blocks]
    rows = (ids.view(-1, 1) * kvh + torch.arange(kvh)).reshape(-1)
    n = rows.numel()
    out = torch.empty(n, row, dtype=dtype)
    return (
        n * row * out.element_size() / _time(lambda: torch.index_select(src, 0, rows, out=out), 4)
    )


@dataclass
class _Probe:
    """What the measurements share: the CPU workload (a decoder layer of the model, or one MLP
    matrix of an 8B model: large enough to leave the caches), a pinned host buffer, its device
    copy and the copy stream."""

    device: torch.device
    dtype: torch.dtype
    w_cpu: torch.Tensor
    x_cpu: torch.Tensor
    layer_step: object  # a decoder layer's decode step, or None for the plain GEMV
    nbytes: int  # weight bytes one CPU step reads
    host: torch.Tensor
    dst: torch.Tensor
    copy_stream: torch.cuda.Stream

    @classmethod
    def make(cls, device: str, dtype: torch.dtype, spec, context: int) -> _Probe:
        dev = torch.device(device)
        h, inter = 4096, 14336
        w_cpu = torch.randn(inter, h, dtype=torch.float32).to(dtype)
        x_cpu = torch.randn(1, h, dtype=dtype)
        if spec is not None:
            layer_step, nbytes = _layer_workload(spec, context, dtype)
        else:
            layer_step, nbytes = None, w_cpu.numel() * w_cpu.element_size()
        host = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty_like(host, device=dev)
        stream = torch.cuda.Stream(dev)
        return cls(dev, dtype, w_cpu, x_cpu, layer_step, nbytes, host, dst, stream)

    def copy_once(self) -> None:
        with torch.cuda.stream(self.copy_stream):
            self.dst.copy_(self.host, non_blocking=True)
        self.copy_stream.synchronize()

    def gemv(self) -> None:
        if self.layer_step is not None:
            self.layer_step()
        else:
            torch.nn.functional.linear(self.x_cpu, self.w_cpu)

    def shared_rates(self, pcie: float) -> tuple[float, float]:
        """CPU GEMV and PCIe rates while both run (they share the host's memory bandwidth):
        a queue of async copies on the copy stream, GEMVs on this thread until it drains."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        n_copies = max(4, int(pcie * 0.15 / self.host.numel()))  # ~150 ms of copies
        with torch.cuda.stream(self.copy_stream):
            start.record(self.copy_stream)
            for _ in range(n_copies):
                self.dst.copy_(self.host, non_blocking=True)
            end.record(self.copy_stream)
        t, reps = time.perf_counter(), 0
        while not end.query():
            self.gemv()
            reps += 1
        cpu_t = time.perf_counter() - t
        end.synchronize()
        copy_t = start.elapsed_time(end) / 1e3
        return reps * self.nbytes / cpu_t if reps else 0.0, n_copies * self.host.numel() / copy_t


def _best_threads(probe: _Probe, pcie: float) -> tuple[int, float, float, float]:
    """The CPU thread count that moves the most bytes through both paths together (more CPU
    threads can slow the copy engine's reads of host memory): (threads, CPU rate alone, CPU
    rate shared, PCIe rate shared)."""
    cores = os.cpu_count() or 1
    best = None
    for n in sorted({max(1, cores // 4), max(1, cores // 2), max(1, cores - 2), max(1, cores - 1)}):
        torch.set_num_threads(n)
        alone = probe.nbytes / _time(probe.gemv, 6)
        cpu_shared, pcie_shared = probe.shared_rates(pcie)
        if best is None or cpu_shared + pcie_shared > best[0]:
            best = (cpu_shared + pcie_shared, n, alone, cpu_shared, pcie_shared)
    assert best is not None
    return best[1:]


def _gpu_rates(probe: _Probe) -> tuple[float, float]:
    """GPU weight-read rate of a GEMV from device memory and GPU matmul rate."""
    dev = probe.device
    w_gpu = probe.w_cpu.to(dev)
    x_gpu = probe.x_cpu.to(dev)
    inter, h = w_gpu.shape

    def gpu_gemv() -> None:
        torch.nn.functional.linear(x_gpu, w_gpu)
        torch.cuda.synchronize(dev)

    gpu_mem = probe.nbytes / _time(gpu_gemv, 20)
    a_gpu = torch.randn(4096, h, dtype=probe.dtype, device=dev)

    def mm() -> None:
        torch.nn.functional.linear(a_gpu, w_gpu)
        torch.cuda.synchronize(dev)

    return gpu_mem, 2 * 4096 * h * inter / _time(mm, 5)


def measure_rates(
    device: str, dtype: torch.dtype = torch.bfloat16, spec=None, context: int = 4096
) -> MachineRates:
    """Measure PCIe, the CPU's decode rate (per thread count, alone and beside copies) and GPU
    rates (~5 s). With ``spec``, the CPU rate is that of a real decoder layer of the model at
    ``context`` tokens (GEMVs, attention, norms), which is what hybrid decode runs; and the
    CPU's decode attention at ``context`` tokens: one query's, a routed read's, and a batch's
    over strided views of head-major pools (``cpu_attn_batch_rate``, ~0.1 s)."""
    probe = _Probe.make(device, dtype, spec, context)
    pcie = probe.host.numel() / _time(probe.copy_once, 8)
    threads0 = torch.get_num_threads()
    threads, cpu_mem, cpu_shared, pcie_shared = _best_threads(probe, pcie)
    torch.set_num_threads(threads)
    inter, h = probe.w_cpu.shape
    cpu_flops, cpu_flops_rows = (
        _cpu_matmul_rate(probe.w_cpu, n, 3) for n in (CPU_FLOPS_TOKENS, CPU_FLOPS_ROWS)
    )
    cpu_gather = cpu_gather_rate(spec, dtype)
    gpu_mem, gpu_flops = _gpu_rates(probe)
    cpu_attn = cpu_routed = cpu_attn_batch = 0.0
    batch_seqs = 0
    if spec is not None:
        torch.set_num_threads(threads)
        attn_step, kv_bytes, kv = _attention_workload(spec, context, dtype)
        cpu_attn = kv_bytes / _time(attn_step, 4)
        routed_step, read_bytes = _routed_workload(kv, spec, dtype)  # over the same KV
        cpu_routed = read_bytes / _time(routed_step, 4)
        del kv
        cpu_attn_batch, batch_seqs = cpu_attn_batch_rate(spec, context, dtype)
    torch.set_num_threads(threads0)
    return MachineRates(
        pcie, pcie_shared, cpu_mem, cpu_shared, threads, cpu_flops, gpu_mem, gpu_flops, cpu_attn,
        cpu_routed, cpu_flops_rows, cpu_gather, cpu_attn_batch, batch_seqs,
    )  # fmt: skip


def cached_rates(
    device: str,
    cache_dir: Path,
    dtype: torch.dtype = torch.bfloat16,
    spec=None,
    context: int = 4096,
) -> MachineRates:
    """Rates for this machine (and model shape, when ``spec`` is given) from the cache, measured
    now if missing."""
    name = torch.cuda.get_device_name(torch.device(device)).replace(" ", "_")
    key = f"v{RATES_VERSION}-{platform.node()}-{os.cpu_count()}-{name}-{str(dtype).removeprefix('torch.')}"
    if spec is not None:
        bucket = 1 << max(0, context - 1).bit_length()  # contexts within 2x share a measurement
        key += f"-{spec.hidden_size}x{spec.intermediate_size}x{spec.num_heads}x{spec.num_kv_heads}x{spec.head_dim}-{bucket}"
        context = bucket
    path = Path(cache_dir) / "machine" / f"{key}.json"
    if path.is_file():
        try:
            return MachineRates(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError):
            log.warning("ignoring unreadable machine rates cache %s", path)
    rates = measure_rates(device, dtype, spec, context)
    # Hand the probes' freed device pages back (once): left reserved, they are a hole the
    # weights loaded next do not fit in, and reserved memory is what a GPU budget must hold.
    torch.cuda.empty_cache()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(asdict(rates), indent=1))
    os.replace(tmp, path)
    log.info("measured machine rates: %s", rates)
    return rates


CPU_ATTN_MAX_TOKENS = 32768  # the CPU attention rate is measured at most at this many tokens


def cpu_attention_rate(spec, context: int, dtype: torch.dtype, cache_dir: Path) -> float:
    """Exact KV bytes/s of one decode query's attention on the CPU at ``context`` tokens' bucket
    (at most ``CPU_ATTN_MAX_TOKENS``; ``_attention_workload``, the threads torch uses now):
    a CPU machine's one rate ``--kv-codec auto`` reads (``MachineRates`` needs a GPU). Cached
    as JSON beside the machine rates; a few hundred ms the first time."""
    bucket = min(1 << max(0, context - 1).bit_length(), CPU_ATTN_MAX_TOKENS)
    dt = str(dtype).removeprefix("torch.")
    shape = f"{spec.num_heads}x{spec.num_kv_heads}x{spec.head_dim}"
    key = f"cpu-attn-v2-{platform.node()}-{os.cpu_count()}-{torch.get_num_threads()}-{dt}-{shape}-{bucket}"
    path = Path(cache_dir) / "machine" / f"{key}.json"
    if path.is_file():
        try:
            return float(json.loads(path.read_text())["cpu_attn"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("ignoring unreadable CPU attention rate %s", path)
    step, nbytes, _ = _attention_workload(spec, bucket, dtype)
    rate = nbytes / _time(step, 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"cpu_attn": rate, "tokens": bucket}))
    os.replace(tmp, path)
    log.info("measured CPU decode attention: %.2f GB/s of KV at %d tokens", rate / 1e9, bucket)
    return rate
