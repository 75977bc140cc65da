"""Placement: from memory budgets, decide where each layer's weights live and where it runs.

Tiers: ``gpu`` (resident in GPU memory), ``cpu`` (resident in RAM, pinned when a GPU streams
from it), ``disk`` (read from the layer store on every pass). The execution device is a per-layer
field, so a later cost model can compute RAM-resident layers on the CPU instead of copying them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from ollm.errors import BudgetError, OllmError
from ollm.planning.accounting import PAGE_TOKENS, KVFormat, device_kv_bytes, kv_pool_blocks
from ollm.planning.batch_step import batch_engine_runs, batch_rows
from ollm.planning.decode_resident import plan_decode_resident
from ollm.planning.decode_split import decode_splits
from ollm.planning.device_fit import below_minimum, fetch_buffers, kv_offload
from ollm.planning.mlp_cpu import mlp_cpu_rows, plan_mlp_cpu
from ollm.planning.promote import promote_freed
from ollm.planning.residual import check_mode, plan_auto, with_cost
from ollm.planning.routed_kv import choose_routed_kv_off, routed_rows
from ollm.planning.sizing import PlanSizes
from ollm.sizes import format_size
from ollm.tiers import KvTier, Phase, Tier

if TYPE_CHECKING:
    from ollm.planning.experts import ExpertPlan
    from ollm.planning.kv_choice import KvCodecChoice

OFFLOAD_MODES = ("auto", "cpu", "disk")


@dataclass(frozen=True)
class LayerPlacement:
    """Where one decoder layer's weights live and which device computes it.

    ``decode_device`` (hybrid decode) overrides ``exec_device`` for forwards of few tokens: a layer
    whose weights sit in RAM is then computed by the CPU instead of being copied to the GPU.
    """

    tier: Tier
    exec_device: str
    decode_device: str | None = None
    kv_tier: KvTier = KvTier.DEVICE  # on kv_device, in pinned RAM (CPU) or in KV files (DISK)
    kv_fetch: bool = False  # pinned-RAM KV copied back to the GPU (prefetched) for decode
    kv_device_tokens: int = 0  # offloaded KV: its first slots (whole blocks) stay on the device
    # Streamed in prefill, held on the GPU while decode runs (planning/decode_resident.py).
    decode_resident: bool = False
    mlp_cpu: bool = False  # decode copies its attention only; the CPU runs its MLP (mlp_cpu.py)

    def __post_init__(self) -> None:  # strings given (tests, ``replace``) become the enums
        object.__setattr__(self, "tier", Tier(self.tier))
        object.__setattr__(self, "kv_tier", KvTier(self.kv_tier))

    def device_for(self, phase: Phase) -> str:
        if phase == Phase.DECODE and self.decode_device:
            return self.decode_device
        return self.exec_device

    @property
    def kv_device(self) -> str:
        """The KV cache lives where decode computes the layer."""
        return self.decode_device or self.exec_device


@dataclass(frozen=True)
class PlacementPlan:
    """The whole model's placement and the GPU/RAM memory it reserves, by purpose."""

    device: str
    layers: tuple[LayerPlacement, ...]
    embed_device: str
    head_device: str
    ring_slots: int  # device buffers that streamed layers rotate through
    staging_slots: int  # pinned host buffers for disk reads (GPU device only)
    layer_bytes: int
    mlp_chunk_tokens: int
    budget: int | None
    reserved: dict[str, int] = field(default_factory=dict)
    cpu_max_tokens: int = 0  # forwards of at most this many tokens use decode devices
    prefill_chunk_tokens: int = 0  # rows per prefill chunk (0 = whole prompt at once)
    predicted: dict[str, float] = field(default_factory=dict)  # cost-model figures, if measured
    kv_block_tokens: int = 256  # token slots per KV block, the unit KV is split between tiers in
    kv_pools: dict[str, int] = field(default_factory=dict)  # paged KV: blocks per KV group
    kv_page_tokens: int = 16  # token slots per block of the paged pools (engine v2)
    shared_prefix: int = 0  # prompt tokens the pools hold once for all sequences (Workload.shared)
    experts: ExpertPlan | None = None  # MoE experts placed one by one (planning/experts.py)
    kv_read: tuple[float, ...] = ()  # per layer: share of its KV a routed decode step reads
    kv_codecs: KvCodecChoice | None = None  # ``--kv-codec auto``: each KV tier's codec and why
    # Decode's reservations (decode-size activations, decode-resident layers; empty: as
    # ``reserved``) and the largest forward that runs with the decode-resident layers held.
    decode_reserved: dict[str, int] = field(default_factory=dict)
    decode_rows: int = 0
    residual_ram: bool = False  # the prompt's hidden states in pinned RAM during prefill
    prefill_segment: int = 0  # prompts prefilled in forwards of this many tokens (0: one)
    # For the batch engine (batch_step.py): a step's query tokens, logits rows, activations.
    step_tokens: int = 0
    logit_rows: int = 0
    batch_parts: dict[str, int] = field(default_factory=dict)

    def phase(self, tokens: int) -> Phase:
        """DECODE (hybrid devices) for small forwards, else PREFILL (everything on the GPU)."""
        limit = max(self.cpu_max_tokens, self.decode_rows)
        return Phase.DECODE if tokens <= limit else Phase.PREFILL

    def streamed_for(self, phase: Phase) -> list[int]:
        """Layers whose weights are copied to the GPU on every pass in ``phase``."""
        return [
            i
            for i, p in enumerate(self.layers)
            if _moves(LayerPlacement(p.tier, p.device_for(phase)), self.device)
            and not (phase == Phase.DECODE and p.decode_resident)
        ]

    @property
    def decode_resident(self) -> list[int]:
        """Layers streamed in prefill and held on the GPU while decode runs."""
        return [i for i, p in enumerate(self.layers) if p.decode_resident]

    @property
    def streamed(self) -> list[int]:
        """Layers whose weights move to their execution device on every prefill pass, in order."""
        return self.streamed_for(Phase.PREFILL)

    @property
    def cpu_layers(self) -> list[int]:
        return [
            i
            for i, p in enumerate(self.layers)
            if p.decode_device == "cpu" and self.device != "cpu"
        ]

    def count(self, tier: Tier) -> int:
        return sum(1 for p in self.layers if p.tier == tier)

    @property
    def peak_device_bytes(self) -> int:
        """The larger of the prefill's and decode's reservations."""
        return max(sum(self.reserved.values()), sum(self.decode_reserved.values()))

    def describe(self) -> list[tuple[str, str]]:
        """(label, value) rows for ``ollm info`` and logs."""
        chunk = f"{c} tokens" if (c := self.prefill_chunk_tokens) else "whole prompt"
        rows = [
            ("device", self.device),
            ("budget", format_size(self.budget) if self.budget else "unlimited"),
            (
                "layers",
                f"{self.count(Tier.GPU)} on GPU, {self.count(Tier.CPU)} in RAM, "
                f"{self.count(Tier.DISK)} on disk",
            ),
            ("layer size", format_size(self.layer_bytes)),
            ("ring slots / staging", f"{self.ring_slots} / {self.staging_slots}"),
            ("embeddings / head", f"{self.embed_device} / {self.head_device}"),
            ("mlp chunk", f"{self.mlp_chunk_tokens} tokens"),
            (
                "KV in pinned RAM / on disk",
                f"{sum(p.kv_tier == KvTier.CPU for p in self.layers)} / "
                f"{sum(p.kv_tier == KvTier.DISK for p in self.layers)} layers",
            ),
            ("prefill chunk", chunk),
        ]
        split = [(i, p.kv_device_tokens) for i, p in enumerate(self.layers) if p.kv_device_tokens]
        for i, slots in split:
            rows.append(
                (
                    f"KV of layer {i} split",
                    f"first {slots} slots ({slots // self.kv_block_tokens} blocks of "
                    f"{self.kv_block_tokens}) on {self.device}, the rest offloaded",
                )
            )
        fetched = [i for i, p in enumerate(self.layers) if p.kv_fetch]
        if self.residual_ram:
            rows.append(("prefill residual stream", "in pinned RAM, chunks moved per layer"))
        if self.prefill_segment:
            rows.append(("prefill segments", f"{self.prefill_segment} tokens per forward"))
        if self.kv_codecs is not None:
            rows += self.kv_codecs.describe()
        rows += routed_rows(self.kv_read, self.layers) + batch_rows(self) + mlp_cpu_rows(self)
        if fetched:
            rows.append(("KV fetched to the GPU in decode", f"{len(fetched)} layers: {fetched}"))
        if self.decode_resident:
            rows.append(
                (
                    "decode-resident layers",
                    f"{len(self.decode_resident)} streamed in prefill, held on the GPU in decode "
                    f"(forwards of <= {self.decode_rows} tokens): {self.decode_resident}",
                )
            )
        if self.cpu_layers:
            rows.append(
                (
                    "hybrid decode",
                    f"{len(self.cpu_layers)} RAM layers computed by the CPU "
                    f"(forwards of <= {self.cpu_max_tokens} tokens): {self.cpu_layers}",
                )
            )
        if self.experts is not None:
            rows += self.experts.describe()
        for key, value in self.predicted.items():
            rows.append((f"predicted: {key}", f"{value:.2f}"))
        rows += [(f"reserved: {k}", format_size(v)) for k, v in self.reserved.items()]
        if self.decode_reserved:
            rows.append(("reserved in decode", format_size(sum(self.decode_reserved.values()))))
        rows.append(("reserved: total", format_size(self.peak_device_bytes)))
        return rows


def _moves(p: LayerPlacement, device: str) -> bool:
    """Whether the layer's weights are copied to its execution device on every pass: on an
    accelerator unless resident there; on the host CPU only when they come from disk."""
    if p.exec_device != "cpu":
        return p.tier != Tier.GPU
    return p.tier == Tier.DISK


@dataclass(frozen=True)
class Workload:
    """The largest request the plan must hold: batch, tokens in the cache, tokens per forward."""

    batch: int = 1
    context: int = 4096
    prefill_tokens: int = 4096
    # Leading tokens every sequence's prompt shares (a system prompt, a document asked several
    # questions): the batch engine's pools hold their KV once (prefix sharing), so the plan
    # counts it once (``accounting.kv_pool_blocks``) and a step's prompts once
    # (``batch_step.step_tokens``).
    shared: int = 0


# From this many sequences the batch engine's plan computes no layer on the CPU (unless
# ``cpu_layers`` asks): at batch 16 on the H200 host the cost model priced 10-12 CPU layers at
# a 0.16 s step; the engine measured 0.25-0.30 s with them in three of three calls and kept
# streaming them instead (``StepMode``), on a plan that had given their room to KV, not to
# resident layers. Without CPU layers the same budget keeps 12 layers resident and the KV in
# RAM, attended where it sits (docs/benchmarks.md, seventh session).
BATCH_NO_CPU_LAYERS = 8


def _cpu_layers(engine: bool, hybrid: str, cpu_layers: int | None, work: Workload) -> int | None:
    """The CPU-computed layer count asked of the cost model: 0 for a batch engine's plan from
    ``BATCH_NO_CPU_LAYERS`` sequences with the count left to it, else ``cpu_layers``."""
    if engine and hybrid == "auto" and cpu_layers is None and work.batch >= BATCH_NO_CPU_LAYERS:
        return 0
    return cpu_layers


def plan_placement(
    spec,
    store,
    device: str,
    gpu_memory: int | None,
    cpu_memory: int | None,
    offload: str = "auto",
    work: Workload | None = None,
    dtype_bytes: int = 2,
    rates=None,
    hybrid: str = "auto",
    cpu_layers: int | None = None,
    chunk_tokens: int | None = None,
    kv_cache: str = "auto",
    kv_fetch_buffers: int = 2,
    kv_block_tokens: int = 256,
    kv_format: KVFormat | None = None,
    summary_bytes: int = 0,
    kv_read: tuple[float, ...] | None = None,
    decode_resident: bool = False,
    prefill_residual: str = "auto",
    batch_engine: bool | None = None,
    mlp_cpu: bool = False,
) -> PlacementPlan:
    """Choose tiers for every layer under the budgets; raise BudgetError with the minimum.

    Order: sizes of what the device must hold besides weights (``PlanSizes``); KV that does not
    fit beside the minimum weights goes to RAM or disk layer by layer; too small a budget first
    retries smaller prefill chunks, then names the minimum; the first layers stay resident; the
    rest stream through a ring, from pinned RAM or disk; then the cost model's decode splits.
    ``kv_format``: full-attention KV compressed (``kv/compressed.py``), counted at its stored
    size, no fetch buffers when every layer is. ``summary_bytes``: routing's key summaries;
    ``kv_read``: per layer, the share of its KV a routed decode step reads (``routed_kv``);
    ``decode_resident``, ``mlp_cpu``: see ``_finish``; ``prefill_residual``: the prompt's hidden
    states on the device ("gpu"), in pinned RAM ("ram"), or there if the device plan is refused
    ("auto"); ``batch_engine``: sized for the batch engine's steps (None: if it runs it)."""
    _check_modes(offload, prefill_residual)
    work, on_gpu = work or Workload(), device.startswith("cuda")
    budget = gpu_memory if on_gpu else cpu_memory
    engine = batch_engine_runs(spec, work, kv_format) if batch_engine is None else batch_engine

    def again(chunk: int | None, fetch_buffers: int, mode: str = prefill_residual):
        return plan_placement(spec, store, device, gpu_memory, cpu_memory, offload, work,
            dtype_bytes, rates, hybrid, cpu_layers, chunk, kv_cache, fetch_buffers, kv_block_tokens,
            kv_format, summary_bytes, kv_read, decode_resident, mode, engine, mlp_cpu)  # fmt: skip

    if prefill_residual == "auto":
        return plan_auto(partial(again, chunk_tokens, kv_fetch_buffers), work, on_gpu, budget)
    kv_fetch_buffers = 0 if engine else fetch_buffers(spec, kv_format, kv_read, kv_fetch_buffers)
    sz = PlanSizes.of(spec, store, work, dtype_bytes, device, gpu_memory, cpu_memory,
                      chunk_tokens, kv_format, prefill_residual == "ram", engine, rates)  # fmt: skip
    fixed = sz.fixed(on_gpu, summary_bytes)
    slots = 2 if spec.num_layers > 1 else 1
    off = kv_offload(sz, fixed, budget, slots, kv_fetch_buffers, rates, on_gpu, kv_cache)
    if off is None:  # no room for the fetch buffers: plan again without them
        return again(chunk_tokens, 0)
    kv_off, extra = off
    smaller = below_minimum(again, sz, fixed, slots, budget, work, chunk_tokens,
                            kv_fetch_buffers, on_gpu)  # fmt: skip
    if smaller is not None:
        return smaller
    layout = partial(_layout, spec, store, device, budget, offload, cpu_memory, kv_cache, sz,
                     work, kv_block_tokens, slots)  # fmt: skip
    splits = partial(decode_splits, spec, store, sz=sz, rates=rates if on_gpu else None, work=work,
                     hybrid=hybrid, cpu_layers=_cpu_layers(engine, hybrid, cpu_layers, work),
                     kv_read=kv_read, simulate=sz.engine)  # fmt: skip
    finish = partial(_finish, spec, store, device, work, sz, budget, kv_fetch_buffers,
                     kv_block_tokens, kv_read, offload, rates if on_gpu else None,
                     decode_resident)  # fmt: skip
    cost_kv = kv_read or sz.engine  # routed KV, or a batch's, may leave the device for weights
    if on_gpu and rates is not None and budget is not None and kv_cache != "disk" and cost_kv:
        room = budget - slots * sz.layer  # (no fetch buffers, no scratch beyond batch 1's)
        # chosen without MLPs on the CPU, which then mark layers of it (planning/mlp_cpu.py)
        kv_off, fixed, layout = choose_routed_kv_off(layout, splits, sz, fixed, kv_off, extra,
                                                     room, partial(finish, False))  # fmt: skip
    laid = layout(kv_off, fixed)
    split = splits(laid[0], laid[1], ring=laid[2], fetch=kv_off and kv_fetch_buffers)
    if split is None:  # no KV worth fetching: plan again without the fetch buffers
        return again(chunk_tokens, 0)
    return with_cost(finish(mlp_cpu, fixed, laid, split), sz, rates, spec.num_layers)


def _check_modes(offload: str, prefill_residual: str) -> None:
    """A one-line error for an unknown ``offload`` or ``prefill_residual``."""
    if offload not in OFFLOAD_MODES:
        raise OllmError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, not {offload!r}")
    check_mode(prefill_residual)


def _finish(spec, store, device, work, sz, budget, kv_fetch_buffers, kv_block_tokens, kv_read,
            offload, rates, decode_resident, mlp_cpu, fixed, laid, split) -> PlacementPlan:  # fmt: skip
    """The plan of a layout (``laid``: ``_layout``'s result) and its decode ``split``: assembled,
    with what the hybrid choice freed made resident, then decode-resident layers in what
    prefill-only activations leave (``decode_resident``; False: only decode's reservations),
    then MLPs on the CPU in decode (``mlp_cpu``)."""
    _, _, ring, staging = laid
    plan = _assemble(spec, store, device, work, sz, split, fixed, ring, staging, budget,
                     kv_fetch_buffers, kv_block_tokens, kv_read)  # fmt: skip
    plan = promote_freed(plan, store, offload)  # what decode choices freed: resident layers
    plan = plan_decode_resident(plan, spec, store, sz, rates, work, offload, kv_read,
                                decode_resident)  # fmt: skip
    return plan_mlp_cpu(plan, spec, store, sz, rates, work, kv_read) if mlp_cpu else plan


def _layout(spec, store, device, budget, offload, cpu_memory, kv_cache, sz: PlanSizes, work,
            kv_block_tokens, slots, kv_off, fixed, spread=False):  # fmt: skip
    """Tiers with the last ``kv_off`` layers' KV off the device and ``fixed`` reserved: the
    first layers (or ``spread`` ones) resident in what is left, the rest streamed; leftover to
    device blocks of the first offloaded layer (``fixed["kv cache"]`` grows by them). Returns
    (layers, resident count, ring slots, staging slots)."""
    n, on_gpu = spec.num_layers, device.startswith("cuda")
    if kv_cache == "disk" and not on_gpu and budget is None:
        kv_off = n  # on a CPU machine without a budget "disk" means: no KV in RAM at all
    fixed_total = sum(fixed.values())
    n_res = _resident_count(n, budget, fixed_total, slots, sz.layer, offload)
    ring = _ring_slots(n, n_res, slots, budget, fixed_total, sz.layer)
    layers = _tiers(store, n, n_res, on_gpu, offload, cpu_memory, sz, device, spread)
    streamed = [p for p in layers if _moves(p, device)]
    staging = min(3, sum(1 for p in streamed if p.tier == Tier.DISK)) if on_gpu else 0
    if not streamed:
        ring = 0
    layers = _offloaded_kv(spec, store, layers, kv_off, kv_cache, budget, fixed, ring, sz,
                           work, device, kv_block_tokens)  # fmt: skip
    return layers, n_res, ring, staging


def _assemble(spec, store, device, work, sz, split, fixed, ring, staging, budget,
              kv_fetch_buffers, kv_block_tokens, kv_read) -> PlacementPlan:  # fmt: skip
    """The plan, with what it reserves on the device counted from its final layers (device KV
    after the hybrid and fetch choices, resident layers, ring slots); ``split``: (layers,
    cpu_max_tokens, predicted) of ``decode_split.decode_splits``."""
    layers, cpu_max_tokens, predicted = split
    on_gpu = device.startswith("cuda")
    reserved = dict(fixed)
    reserved["kv cache"] = device_kv_bytes(
        layers, sz.layer_kv, sz.scratch, kv_fetch_buffers, sz.per_token
    )
    reserved["resident layers"] = sum(
        store.layer_nbytes(i) for i, p in enumerate(layers) if not _moves(p, device)
    )
    reserved["stream buffers"] = ring * sz.layer
    # Paged pools (engine v2): batch x context in blocks; steps of one chunk with sliding windows.
    windowed = any(sl.window for sl in spec.layers)
    step = sz.chunk if windowed and sz.chunk else work.batch * work.context
    return PlacementPlan(
        device=device,
        layers=tuple(layers),
        embed_device=device if (not on_gpu or not sz.head) else "cpu",
        head_device=device,
        ring_slots=ring,
        staging_slots=staging,
        layer_bytes=sz.layer,
        mlp_chunk_tokens=sz.mlp_chunk,
        budget=budget,
        reserved=reserved,
        cpu_max_tokens=cpu_max_tokens,
        predicted=predicted,
        prefill_chunk_tokens=sz.chunk,
        kv_block_tokens=kv_block_tokens,
        kv_pools=sz.kv_pools or kv_pool_blocks(spec, work, PAGE_TOKENS, step),
        kv_page_tokens=PAGE_TOKENS,
        shared_prefix=work.shared,
        kv_read=tuple(kv_read or ()),
        step_tokens=sz.step_tokens,
        logit_rows=sz.logit_rows,
        batch_parts=dict(sz.engine_parts),
    )


def _resident_count(n, budget, fixed_total, slots, layer, offload) -> int:
    """Layers that stay resident: all when they fit beside the reservations, else as many as
    leave room for the ring's slots; none with ``offload="disk"`` (every layer read from the
    layer store on each pass, as upstream oLLM does)."""
    if offload == "disk":
        return 0
    if budget is None or budget - fixed_total >= n * layer:
        return n
    return min(n - 1, (budget - fixed_total - slots * layer) // layer)


def _ring_slots(n, n_res, slots, budget, fixed_total, layer) -> int:
    """Ring buffers for streamed layers; a third lets the copy engine run two layers ahead."""
    if n_res >= n:
        return 0
    ring = min(slots, n - n_res)
    spare = None if budget is None else budget - fixed_total - n_res * layer - ring * layer
    if n - n_res > 2 and (spare is None or spare >= layer):
        ring += 1
    return ring


def _tiers(store, n, n_res, on_gpu, offload, cpu_memory, sz: PlanSizes, device, spread=False):
    """The first ``n_res`` layers resident (``spread``: ``n_res`` spread between streamed ones,
    so the copy engine keeps loading while they compute); on a GPU the rest in pinned RAM while
    ``cpu_memory`` allows (``auto``), all in RAM (``cpu``) or all from disk (``disk``); on the
    CPU, the rest from disk."""
    from ollm.planning.costmodel import interleave

    resident = interleave(list(range(n)), n_res) if spread else set(range(n_res))
    if not on_gpu:
        return [LayerPlacement(Tier.CPU if i in resident else Tier.DISK, device) for i in range(n)]
    layers: list[LayerPlacement] = []
    host_used = sz.embed if sz.head else 0  # an untied embedding table stays in RAM
    for i in range(n):
        if i in resident:
            layers.append(LayerPlacement(Tier.GPU, device))
            continue
        size = store.layer_nbytes(i)
        fits = cpu_memory is None or host_used + size <= cpu_memory
        if offload == "disk" or (offload == "auto" and not fits):
            layers.append(LayerPlacement(Tier.DISK, device))
            continue
        if offload == "cpu" and not fits:
            raise BudgetError(
                f"offload='cpu' needs {format_size(host_used + size * (n - i))} more of pinned "
                f"RAM than cpu_memory {format_size(cpu_memory or 0)} allows; use "
                "offload='auto' or 'disk'"
            )
        layers.append(LayerPlacement(Tier.CPU, device))
        host_used += size
    return layers


def _offloaded_kv(spec, store, layers, kv_off, kv_cache, budget, fixed, ring, sz: PlanSizes, work,
                  device, kv_block_tokens):  # fmt: skip
    """Mark the last ``kv_off`` layers' KV as in RAM (or on disk); the budget left over holds
    the first whole blocks of the first offloaded layer's KV (``kv_device_tokens``), counted in
    ``fixed["kv cache"]``. Without ``kv_off`` the layers as they are."""
    from dataclasses import replace

    if not kv_off:
        return layers
    n = len(layers)
    tier = KvTier.DISK if kv_cache == "disk" else KvTier.CPU
    layers = [replace(p, kv_tier=tier) if i >= n - kv_off else p for i, p in enumerate(layers)]
    first = spec.layers[n - kv_off]
    no_blocks = first.window or getattr(first, "linear", False) or sz.compressed or sz.engine
    if budget is None or no_blocks:  # a window, a recurrent state, compressed KV, paged pools
        return layers
    resident = sum(store.layer_nbytes(i) for i, p in enumerate(layers) if not _moves(p, device))
    spare = budget - sum(fixed.values()) - resident - ring * sz.layer
    block = sz.per_token * kv_block_tokens
    keep = min(max(0, spare) // block, (work.context - 1) // kv_block_tokens)
    if keep:
        b = n - kv_off
        layers[b] = replace(layers[b], kv_device_tokens=keep * kv_block_tokens)
        fixed["kv cache"] += keep * block
    return layers
