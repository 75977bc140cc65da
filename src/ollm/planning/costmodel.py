"""A cost model of this machine: how fast weights move (PCIe, disk) and how fast each processor
consumes them, alone and while the other path runs. It predicts a decode step's time for a
placement and chooses which RAM-resident layers the CPU computes so both paths finish together.

Pure: the rates are measured by the engine (``engine/calibrate.py``, once per machine, a few
seconds, cached as JSON in the cache directory) and handed in.
"""

from __future__ import annotations

from dataclasses import dataclass

LAYER_OVERHEAD_S = 150e-6  # per-layer launch / Python cost on the critical path (measured order)
# A decode layer on the GPU as the timeline shows it (launch-bound at batch 1: 0.8-1.2 ms on the
# H200 host, 2026-11-27), and the hand-over of a layer's query to the CPU and back.
GPU_DECODE_LAYER_S = 1.0e-3
CPU_HANDOFF_S = 0.3e-3
# The batch engine's decode layer as its timeline shows it: host-bound at 2.1-2.5 ms (16 rows,
# paged KV on the device; H200 host, 2026-12-02, docs/runs/2026-12-02/s10/call3_profile_prefix),
# after ~3.5 ms of host work at each step's start (update, schedule, layout, embed), which
# follows the sampling sync. A ring full of the next step's first streamed layers waits through
# both, so resident layers placed first leave the copy engine idle where spread ones do not.
ENGINE_DECODE_LAYER_S = 2.3e-3
ENGINE_STEP_START_S = 3.5e-3
RATES_VERSION = 5  # bump when MachineRates gains a measurement (cached files are re-measured)
# Query rows of the CPU matmul rates: ``cpu_flops`` (a prefill-like forward) and
# ``cpu_flops_rows`` (a batched decode step's few rows, where the CPU runs far below its
# many-row rate and, at 16 rows, is already slower than its one-row weight read).
CPU_FLOPS_TOKENS = 256
CPU_FLOPS_ROWS = 16


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
    # KV bytes/s of a routed decode read on the CPU (gather the chosen pages, attend them split
    # between threads: kv/page_read); 0: unknown, cpu_attn stands in.
    cpu_routed: float = 0.0
    # CPU matmul FLOP/s of a layer's weight at CPU_FLOPS_ROWS query rows (0: unknown, cpu_flops
    # stands in), and KV bytes/s the CPU gathers from paged KV blocks into one contiguous
    # buffer before a batch's decode attention (``kv/packed``; 0: unknown, not counted).
    cpu_flops_rows: float = 0.0
    cpu_gather: float = 0.0
    # KV bytes/s of a batch's decode attention on the CPU over strided views of a head-major
    # pool in RAM, in place (``kv/strided.py``: no gather), measured with
    # ``cpu_attn_batch_seqs`` sequences over pools larger than the caches (0: unknown, the
    # one-query rate and the gather stand in).
    cpu_attn_batch: float = 0.0
    cpu_attn_batch_seqs: int = 0

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

    def cpu_matmul_flops(self, tokens: int) -> float:
        """The CPU's matmul FLOP/s at ``tokens`` query rows: the few-row rate up to
        CPU_FLOPS_ROWS, the many-row one from CPU_FLOPS_TOKENS, linear between them."""
        lo = min(self.cpu_flops_rows or self.cpu_flops, self.cpu_flops)
        if tokens <= CPU_FLOPS_ROWS:
            return lo
        f = min(1.0, (tokens - CPU_FLOPS_ROWS) / (CPU_FLOPS_TOKENS - CPU_FLOPS_ROWS))
        return lo + f * (self.cpu_flops - lo)

    def cpu_layer_s(self, nbytes: int, params: int, tokens: int, shared: bool) -> float:
        """A layer's weights on the CPU for ``tokens`` rows: weight-read-bound for few rows,
        compute-bound (at that row count's matmul rate) for more."""
        mem = self.cpu_mem_busy if shared else self.cpu_mem
        return max(nbytes / mem, 2 * params * tokens / self.cpu_matmul_flops(tokens))

    def cpu_attn_rate(self, seqs: int = 1) -> float:
        """KV bytes/s of the CPU's decode attention of ``seqs`` sequences read where they sit:
        one query's ``cpu_attn``; from ``cpu_attn_batch_seqs`` sequences the batched rate
        (their KV heads occupy every thread); linear between (fewer work items than threads).
        ``cpu_attn`` when the batched rate is unknown."""
        if seqs < 2 or not self.cpu_attn_batch:
            return self.cpu_attn
        full = max(2, self.cpu_attn_batch_seqs)
        if seqs >= full or not self.cpu_attn:
            return self.cpu_attn_batch
        return self.cpu_attn + (seqs - 1) / (full - 1) * (self.cpu_attn_batch - self.cpu_attn)

    def cpu_kv_s(self, kv_bytes: int, seqs: int = 1, in_place: bool = True) -> float:
        """CPU decode attention over ``kv_bytes`` of ``seqs`` sequences' paged KV; 0 when the
        rate is unknown. A batch attended in place (``in_place``: strided views of a head-major
        host pool, ``kv/strided.py``) at the batched rate (``cpu_attn_rate``); otherwise, or
        without a batched rate, the gather into one buffer (``cpu_gather``) then the attention
        at one query's rate (``cpu_attn``, measured on contiguous KV)."""
        if not self.cpu_attn:
            return 0.0
        if seqs >= 2 and in_place and self.cpu_attn_batch:
            return kv_bytes / self.cpu_attn_rate(seqs)
        return kv_bytes / self.cpu_attn + (kv_bytes / self.cpu_gather if self.cpu_gather else 0.0)

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
    start_s: float = 0.0,
) -> float:
    """Seconds per decode step of the streaming pipeline, simulated layer by layer.

    ``chain_s[i]``: layer i's time on the compute chain (GPU kernels, or a CPU attention that
    stops it); ``copy_s[i]``: its weight copy (0 = resident); ``fetch_s[i]``: the copy of its KV
    queued right behind the weights (0 = none). The copy engine runs the copies in layer order;
    a layer's weights wait for its ring slot (freed when the streamed layer ``slots`` earlier is
    done), its KV for a fetch buffer (freed by the fetched layer ``buffers`` earlier); a layer
    computes once its copies are done and the previous layer is. With a ring of 2-3 slots the
    copy engine is at most 1-2 layers ahead, so a long CPU stall is covered only by the next
    layers' copies: step = max(copies, chain) holds only when the stalls are short. ``start_s``:
    host time on the chain before each step's first layer (``decode_chain``)."""
    n = len(chain_s)
    fetch_s = fetch_s or [0.0] * n
    engine = prev = 0.0
    weights_done: list[float] = []  # compute finish of streamed layers, in stream order
    kv_done: list[float] = []  # compute finish of fetched layers, in order
    ends = []
    for _ in range(3):  # the middle step is in steady state (the next one's copies overlap it)
        prev += start_s
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


def decode_chain(engine: bool) -> tuple[float, float]:
    """(a GPU decode layer's time on the chain, host time before a step's first layer) for the
    batch engine (``engine``) or the single-sequence runner."""
    return (ENGINE_DECODE_LAYER_S, ENGINE_STEP_START_S) if engine else (GPU_DECODE_LAYER_S, 0.0)


def interleave(indices: list[int], k: int) -> set[int]:
    """Pick ``k`` of ``indices`` spread evenly, so each CPU layer sits between streamed ones and
    the copy engine loads the next streamed layer while the CPU computes."""
    n = len(indices)
    if k <= 0:
        return set()
    if k >= n:
        return set(indices)
    return {indices[int((j + 0.5) * n / k)] for j in range(k)}


def hybrid_step_pays(
    rates: MachineRates | None,
    n_cpu: int,
    n_streamed: int,
    layer_bytes: int,
    dtype_bytes: int,
    tokens: int,
    kv_bytes: int,
    seqs: int | None = None,
    in_place: bool = True,
) -> bool:
    """Whether a pass of ``tokens`` query rows, whose CPU-computed layers each attend
    ``kv_bytes`` of KV on the CPU, is faster with the plan's ``n_cpu`` CPU layers (the CPU's
    chain, run while the link streams the rest) than with all ``n_streamed`` layers streamed.
    The planner chose the CPU layers for one sequence; a batch step's attention over many
    sequences' KV, and the matmuls of many rows (compute-bound on the CPU), can make them the
    slower path (True when the rates are unknown). ``seqs`` (default ``tokens``: a decode
    step's row per sequence) and ``in_place``: see ``cpu_step_layer_s``."""
    if rates is None or not rates.cpu_attn or not n_cpu:
        return True
    return n_cpu * cpu_step_layer_s(
        rates, layer_bytes, dtype_bytes, tokens, kv_bytes, seqs, in_place
    ) < n_streamed * rates.copy_s(layer_bytes, shared=True)


def cpu_step_layer_s(
    rates: MachineRates,
    layer_bytes: int,
    dtype_bytes: int,
    tokens: int,
    kv_bytes: int,
    seqs: int | None = None,
    in_place: bool = True,
) -> float:
    """One CPU-computed layer of a pass of ``tokens`` rows beside the link's copies: max(weight
    read, matmuls at that row count) plus the attention over ``kv_bytes`` of ``seqs`` sequences
    (default ``tokens``): read in place at the batched rate when ``in_place``, else gathered
    first (``MachineRates.cpu_kv_s``)."""
    cpu = rates.cpu_layer_s(layer_bytes, layer_bytes // dtype_bytes, tokens, shared=True)
    return cpu + rates.cpu_kv_s(kv_bytes, tokens if seqs is None else seqs, in_place)
