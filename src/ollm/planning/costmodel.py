"""A cost model measured on this machine: how fast weights move (PCIe, disk) and how fast each
processor consumes them, alone and while the other path runs. It predicts a decode step's time for
a placement and chooses which RAM-resident layers the CPU computes so both paths finish together.

Rates are measured once per machine (a few seconds) and cached as JSON in the cache directory.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
LAYER_OVERHEAD_S = 150e-6  # per-layer launch / Python cost on the critical path (measured order)
# A decode layer on the GPU as the timeline shows it (launch-bound at batch 1: 0.8-1.2 ms on the
# H200 host, 2026-11-27), and the hand-over of a layer's query to the CPU and back.
GPU_DECODE_LAYER_S = 1.0e-3
CPU_HANDOFF_S = 0.3e-3
RATES_VERSION = 2  # bump when MachineRates gains a measurement (cached files are re-measured)


@dataclass(frozen=True)
class MachineRates:
    """Bytes/s and FLOP/s of this machine's paths; ``*_shared`` while the other path is busy."""

    pcie: float  # pinned host->GPU copy, alone
    pcie_shared: float  # pinned host->GPU copy while the CPU computes
    cpu_mem: float  # weight bytes/s a CPU GEMV consumes (best thread count), alone
    cpu_mem_shared: float  # the same while host->GPU copies run
    cpu_threads: int  # thread count that gave cpu_mem
    cpu_flops: float  # CPU matmul rate (when many tokens make it compute-bound)
    gpu_mem: float  # GPU weight-read rate of a GEMV from device memory
    gpu_flops: float  # GPU matmul rate
    cpu_attn: float = 0.0  # KV bytes/s of one decode query's attention on the CPU (0: unknown)

    # Sharing the memory bus cannot speed either path up: a measured shared rate above the rate
    # alone is noise (seen: CPU 33 vs 26 GB/s on one host, whose decode ran at 27).
    @property
    def cpu_mem_busy(self) -> float:
        """CPU weight rate while host->GPU copies run."""
        return min(self.cpu_mem_shared, self.cpu_mem)

    @property
    def pcie_busy(self) -> float:
        """Host->GPU copy rate while the CPU computes."""
        return min(self.pcie_shared, self.pcie)

    def cpu_layer_s(self, nbytes: int, params: int, tokens: int, shared: bool) -> float:
        mem = self.cpu_mem_busy if shared else self.cpu_mem
        return max(nbytes / mem, 2 * params * tokens / self.cpu_flops)

    def gpu_layer_s(self, nbytes: int, params: int, tokens: int) -> float:
        return max(nbytes / self.gpu_mem, 2 * params * tokens / self.gpu_flops) + LAYER_OVERHEAD_S

    def copy_s(self, nbytes: int, shared: bool) -> float:
        return nbytes / (self.pcie_busy if shared else self.pcie)


@dataclass(frozen=True)
class StepPrediction:
    """Predicted decode step: the critical path and each path's busy time (seconds)."""

    seconds: float
    copy_s: float
    cpu_s: float
    gpu_s: float

    @property
    def tokens_per_second(self) -> float:
        return 1.0 / self.seconds if self.seconds > 0 else 0.0


def predict_step(
    rates: MachineRates,
    resident: int,
    streamed: int,
    cpu: int,
    layer_bytes: int,
    layer_params: int,
    head_bytes: int,
    tokens: int = 1,
) -> StepPrediction:
    """One forward of ``tokens`` tokens: the copy engine streams ``streamed`` layers while the
    compute chain runs resident and streamed layers on the GPU and ``cpu`` layers on the CPU.
    With streamed and CPU layers interleaved, step = max(copies, compute chain)."""
    shared = cpu > 0 and streamed > 0
    copy = streamed * rates.copy_s(layer_bytes, shared)
    cpu_s = cpu * (rates.cpu_layer_s(layer_bytes, layer_params, tokens, shared) + LAYER_OVERHEAD_S)
    gpu_layer = rates.gpu_layer_s(layer_bytes, layer_params, tokens)
    head = head_bytes / rates.gpu_mem
    chain = cpu_s + (resident + streamed) * gpu_layer + head
    seconds = max(copy, chain)  # the copy engine runs beside the compute chain
    return StepPrediction(seconds, copy, cpu_s, (resident + streamed) * gpu_layer + head)


def choose_cpu_layers(
    rates: MachineRates,
    resident: int,
    candidates: int,
    layer_bytes: int,
    layer_params: int,
    head_bytes: int,
    tokens: int = 1,
) -> tuple[int, StepPrediction]:
    """How many of ``candidates`` RAM-resident layers the CPU should compute (the rest stream)."""
    best = None
    for k in range(candidates + 1):
        p = predict_step(
            rates, resident, candidates - k, k, layer_bytes, layer_params, head_bytes, tokens
        )
        if best is None or p.seconds < best[1].seconds - 1e-9:
            best = (k, p)
    assert best is not None
    return best


def pipeline_step(
    chain_s: list[float],
    copy_s: list[float],
    slots: int,
    fetch_s: list[float] | None = None,
    buffers: int = 2,
) -> float:
    """Seconds per decode step of the streaming pipeline, simulated layer by layer.

    ``chain_s[i]``: layer i's time on the compute chain (GPU kernels, or a CPU attention that
    stops it); ``copy_s[i]``: its weight copy (0 = resident); ``fetch_s[i]``: the copy of its KV
    queued right behind the weights (0 = none). The copy engine runs the copies in layer order;
    a layer's weights wait for its ring slot (freed when the streamed layer ``slots`` earlier is
    done), its KV for a fetch buffer (freed by the fetched layer ``buffers`` earlier); a layer
    computes once its copies are done and the previous layer is. With a ring of 2-3 slots the
    copy engine is at most 1-2 layers ahead, so a long CPU stall is covered only by the next
    layers' copies: step = max(copies, chain) holds only when the stalls are short."""
    n = len(chain_s)
    fetch_s = fetch_s or [0.0] * n
    engine = prev = 0.0
    weights_done: list[float] = []  # compute finish of streamed layers, in stream order
    kv_done: list[float] = []  # compute finish of fetched layers, in order
    ends = []
    for _ in range(3):  # the middle step is in steady state (the next one's copies overlap it)
        for i in range(n):
            ready = 0.0
            if copy_s[i]:
                start = max(engine, weights_done[-slots] if len(weights_done) >= slots else 0.0)
                engine = ready = start + copy_s[i]
            if fetch_s[i]:
                start = max(engine, kv_done[-buffers] if len(kv_done) >= buffers else 0.0)
                engine = ready = start + fetch_s[i]
            prev = max(prev, ready) + chain_s[i]
            if copy_s[i]:
                weights_done.append(prev)
            if fetch_s[i]:
                kv_done.append(prev)
        ends.append(prev)
    return ends[2] - ends[1]


def interleave(indices: list[int], k: int) -> set[int]:
    """Pick ``k`` of ``indices`` spread evenly, so each CPU layer sits between streamed ones and
    the copy engine loads the next streamed layer while the CPU computes."""
    n = len(indices)
    if k <= 0:
        return set()
    if k >= n:
        return set(indices)
    return {indices[int((j + 0.5) * n / k)] for j in range(k)}


# -- measurement ----------------------------------------------------------------------------------
def _time(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def _layer_workload(spec, context: int, dtype: torch.dtype):
    """One decoder layer of ``spec`` with random weights and a KV cache of ``context`` tokens on
    the CPU; returns (run one decode step, weight bytes)."""
    from ollm.kv.cache import LayerKVCache
    from ollm.layers.attention import AttentionMask
    from ollm.layers.rope import rope_cos_sin
    from ollm.models.decoder import decoder_block

    h, d, i = spec.hidden_size, spec.head_dim, spec.intermediate_size
    qd, kvd = spec.num_heads * d, spec.num_kv_heads * d
    shapes = {
        "self_attn.q_proj.weight": (qd, h),
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


def measure_rates(
    device: str, dtype: torch.dtype = torch.bfloat16, spec=None, context: int = 4096
) -> MachineRates:
    """Measure PCIe, the CPU's decode rate (per thread count, alone and beside copies) and GPU
    rates (~5 s). With ``spec``, the CPU rate is that of a real decoder layer of the model at
    ``context`` tokens (GEMVs, attention, norms), which is what hybrid decode runs."""
    dev = torch.device(device)
    h, inter = 4096, 14336  # one MLP matrix of an 8B model: large enough to leave the caches
    w_cpu = torch.randn(inter, h, dtype=torch.float32).to(dtype)
    x_cpu = torch.randn(1, h, dtype=dtype)
    if spec is not None:
        layer_step, layer_bytes = _layer_workload(spec, context, dtype)
    else:
        layer_step, layer_bytes = None, w_cpu.numel() * w_cpu.element_size()
    nbytes = layer_bytes
    host = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(host, device=dev)
    copy_stream = torch.cuda.Stream(dev)

    def copy_once() -> None:
        with torch.cuda.stream(copy_stream):
            dst.copy_(host, non_blocking=True)
        copy_stream.synchronize()

    pcie = host.numel() / _time(copy_once, 8)
    threads0 = torch.get_num_threads()
    cores = os.cpu_count() or 1

    def gemv() -> None:
        if layer_step is not None:
            layer_step()
        else:
            torch.nn.functional.linear(x_cpu, w_cpu)

    def shared_rates() -> tuple[float, float]:
        """CPU GEMV and PCIe rates while both run (they share the host's memory bandwidth):
        a queue of async copies on the copy stream, GEMVs on this thread until it drains."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        n_copies = max(4, int(pcie * 0.15 / host.numel()))  # ~150 ms of copies
        with torch.cuda.stream(copy_stream):
            start.record(copy_stream)
            for _ in range(n_copies):
                dst.copy_(host, non_blocking=True)
            end.record(copy_stream)
        t, reps = time.perf_counter(), 0
        while not end.query():
            gemv()
            reps += 1
        cpu_t = time.perf_counter() - t
        end.synchronize()
        copy_t = start.elapsed_time(end) / 1e3
        return reps * nbytes / cpu_t if reps else 0.0, n_copies * host.numel() / copy_t

    # Threads: the count that moves the most bytes through both paths together, since more CPU
    # threads can slow the copy engine's reads of host memory.
    best = None
    for n in sorted({max(1, cores // 4), max(1, cores // 2), max(1, cores - 2), max(1, cores - 1)}):
        torch.set_num_threads(n)
        alone = nbytes / _time(gemv, 6)
        cpu_shared, pcie_shared = shared_rates()
        if best is None or cpu_shared + pcie_shared > best[0]:
            best = (cpu_shared + pcie_shared, n, alone, cpu_shared, pcie_shared)
    _, threads, cpu_mem, cpu_shared, pcie_shared = best
    torch.set_num_threads(threads)
    a = torch.randn(256, h, dtype=dtype)
    cpu_flops = 2 * 256 * h * inter / _time(lambda: torch.nn.functional.linear(a, w_cpu), 3)
    w_gpu = w_cpu.to(dev)
    x_gpu = x_cpu.to(dev)

    def gpu_gemv() -> None:
        torch.nn.functional.linear(x_gpu, w_gpu)
        torch.cuda.synchronize(dev)

    gpu_mem = nbytes / _time(gpu_gemv, 20)
    a_gpu = torch.randn(4096, h, dtype=dtype, device=dev)

    def mm() -> None:
        torch.nn.functional.linear(a_gpu, w_gpu)
        torch.cuda.synchronize(dev)

    gpu_flops = 2 * 4096 * h * inter / _time(mm, 5)
    cpu_attn = 0.0
    if spec is not None:
        torch.set_num_threads(threads)
        attn_step, kv_bytes = _attention_workload(spec, context, dtype)
        cpu_attn = kv_bytes / _time(attn_step, 4)
    torch.set_num_threads(threads0)
    return MachineRates(
        pcie, pcie_shared, cpu_mem, cpu_shared, threads, cpu_flops, gpu_mem, gpu_flops, cpu_attn
    )


def _attention_workload(spec, context: int, dtype: torch.dtype):
    """One decode query's attention over ``context`` tokens of KV in RAM, as decode runs it on
    the CPU for a pinned-RAM KV layer; returns (run it, KV bytes read)."""
    from ollm.layers.attention import AttentionMask, attend

    kv = torch.empty(2, 1, spec.num_kv_heads, context, spec.head_dim, dtype=dtype).normal_()
    q = torch.randn(1, spec.num_heads, 1, spec.head_dim, dtype=dtype)
    mask = AttentionMask(context - 1, 1, context)

    def step() -> None:
        attend(q, kv[0], kv[1], mask, spec.head_dim**-0.5)

    return step, kv.numel() * kv.element_size()


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
