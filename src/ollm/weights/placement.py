"""Placement: from memory budgets, decide where each layer's weights live and where it runs.

Tiers: ``gpu`` (resident in GPU memory), ``cpu`` (resident in RAM, pinned when a GPU streams
from it), ``disk`` (read from the layer store on every pass). The execution device is a per-layer
field, so a later cost model can compute RAM-resident layers on the CPU instead of copying them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ollm.errors import BudgetError, OllmError
from ollm.sizes import format_size
from ollm.weights.accounting import (
    PAGE_TOKENS,
    activation_bytes,
    device_kv_bytes,
    kv_layer_bytes,
    kv_pool_blocks,
    kv_scratch_bytes,
)

OFFLOAD_MODES = ("auto", "cpu", "disk")
MIB = 1 << 20
MIN_CHUNK = 256  # fewest rows per prefill chunk the planner chooses


@dataclass(frozen=True)
class LayerPlacement:
    """Where one decoder layer's weights live and which device computes it.

    ``decode_device`` (hybrid decode) overrides ``exec_device`` for forwards of few tokens: a layer
    whose weights sit in RAM is then computed by the CPU instead of being copied to the GPU.
    """

    tier: str
    exec_device: str
    decode_device: str | None = None
    kv_tier: str = "device"  # "device": on kv_device; "cpu": pinned RAM; "disk": KV files
    kv_fetch: bool = False  # pinned-RAM KV copied back to the GPU (prefetched) for decode
    kv_device_tokens: int = 0  # offloaded KV: its first slots (whole blocks) stay on the device

    def device_for(self, phase: str) -> str:
        return self.decode_device if phase == "decode" and self.decode_device else self.exec_device

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

    def phase(self, tokens: int) -> str:
        """'decode' (hybrid devices) for small forwards, else 'prefill' (everything on the GPU)."""
        return "decode" if tokens <= self.cpu_max_tokens else "prefill"

    def streamed_for(self, phase: str) -> list[int]:
        """Layers whose weights are copied to the GPU on every pass in ``phase``."""
        return [
            i
            for i, p in enumerate(self.layers)
            if _moves(LayerPlacement(p.tier, p.device_for(phase)), self.device)
        ]

    @property
    def streamed(self) -> list[int]:
        """Layers whose weights move to their execution device on every prefill pass, in order."""
        return self.streamed_for("prefill")

    @property
    def cpu_layers(self) -> list[int]:
        return [
            i
            for i, p in enumerate(self.layers)
            if p.decode_device == "cpu" and self.device != "cpu"
        ]

    def count(self, tier: str) -> int:
        return sum(1 for p in self.layers if p.tier == tier)

    @property
    def peak_device_bytes(self) -> int:
        return sum(self.reserved.values())

    def describe(self) -> list[tuple[str, str]]:
        """(label, value) rows for ``ollm info`` and logs."""
        rows = [
            ("device", self.device),
            ("budget", format_size(self.budget) if self.budget else "unlimited"),
            (
                "layers",
                f"{self.count('gpu')} on GPU, {self.count('cpu')} in RAM, {self.count('disk')} on disk",
            ),
            ("layer size", format_size(self.layer_bytes)),
            ("ring slots / staging", f"{self.ring_slots} / {self.staging_slots}"),
            ("embeddings / head", f"{self.embed_device} / {self.head_device}"),
            ("mlp chunk", f"{self.mlp_chunk_tokens} tokens"),
            (
                "KV in pinned RAM / on disk",
                f"{sum(p.kv_tier == 'cpu' for p in self.layers)} / "
                f"{sum(p.kv_tier == 'disk' for p in self.layers)} layers",
            ),
            (
                "prefill chunk",
                f"{self.prefill_chunk_tokens} tokens"
                if self.prefill_chunk_tokens
                else "whole prompt",
            ),
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
        if fetched:
            rows.append(("KV fetched to the GPU in decode", f"{len(fetched)} layers: {fetched}"))
        if self.cpu_layers:
            rows.append(
                (
                    "hybrid decode",
                    f"{len(self.cpu_layers)} RAM layers computed by the CPU "
                    f"(forwards of <= {self.cpu_max_tokens} tokens): {self.cpu_layers}",
                )
            )
        for key, value in self.predicted.items():
            rows.append((f"predicted: {key}", f"{value:.2f}"))
        rows += [(f"reserved: {k}", format_size(v)) for k, v in self.reserved.items()]
        rows.append(("reserved: total", format_size(self.peak_device_bytes)))
        return rows


def _moves(p: LayerPlacement, device: str) -> bool:
    """Whether the layer's weights are copied to its execution device on every pass: on an
    accelerator unless resident there; on the host CPU only when they come from disk."""
    if p.exec_device != "cpu":
        return p.tier != "gpu"
    return p.tier == "disk"


@dataclass(frozen=True)
class Workload:
    """The largest request the plan must hold: batch, tokens in the cache, tokens per forward."""

    batch: int = 1
    context: int = 4096
    prefill_tokens: int = 4096


def prefill_chunk(spec, work: Workload, dtype_bytes: int, budget: int | None) -> int:
    """Rows per prefill chunk: the whole prompt when its temporaries take at most 1/8 of the
    budget, else the largest power of two that does (at least 256)."""
    h, kvd = spec.hidden_size, spec.num_kv_heads * spec.head_dim
    qd = spec.num_heads * spec.head_dim
    per_row = work.batch * dtype_bytes * (3 * h + 2 * qd + 2 * kvd)
    share = (budget or 1 << 40) // 8
    if per_row * work.prefill_tokens <= share:
        return 0
    rows = max(MIN_CHUNK, share // per_row)
    return 1 << (rows.bit_length() - 1)


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
) -> PlacementPlan:
    """Choose tiers for every layer under the budgets; raise BudgetError with the minimum."""
    if offload not in OFFLOAD_MODES:
        raise OllmError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, not {offload!r}")
    work = work or Workload()
    n = spec.num_layers
    layer = store.max_layer_nbytes
    gfile = store.files["globals.bin"].tensors
    embed = gfile["embed_tokens.weight"].nbytes
    head = gfile["lm_head.weight"].nbytes if "lm_head.weight" in gfile else 0
    norm = gfile["norm.weight"].nbytes
    t = work.batch * work.prefill_tokens
    # MLP row chunks: keep its three intermediates under ~256 MiB or 1/16 of the budget.
    mlp_cap = max(32 * MIB, min(256 * MIB, (gpu_memory or cpu_memory or 1 << 40) // 16))
    mlp_chunk = max(16, min(t, mlp_cap // (spec.intermediate_size * dtype_bytes * 3)))
    if device.startswith("cuda"):
        chunk = chunk_tokens or prefill_chunk(spec, work, dtype_bytes, gpu_memory)
    else:  # activations share RAM with the weights: chunked even without a budget
        from ollm.weights.host_memory import cpu_prefill_chunk

        chunk = chunk_tokens or cpu_prefill_chunk(
            spec, work, dtype_bytes, mlp_chunk, cpu_memory, MIN_CHUNK
        )
    on_gpu = device.startswith("cuda")
    act = activation_bytes(spec, work, dtype_bytes, mlp_chunk, chunk or work.prefill_tokens, on_gpu)
    per_token = 2 * work.batch * spec.num_kv_heads * spec.head_dim * dtype_bytes
    layer_kv = kv_layer_bytes(spec, work, dtype_bytes, chunk or work.context)
    kv = sum(layer_kv)
    scratch = kv_scratch_bytes(spec, work, dtype_bytes)
    budget = gpu_memory if on_gpu else cpu_memory

    def without_fetch() -> PlacementPlan:  # the same plan without KV fetch buffers
        return plan_placement(
            spec, store, device, gpu_memory, cpu_memory, offload, work, dtype_bytes,
            rates, hybrid, cpu_layers, chunk_tokens, kv_cache, kv_fetch_buffers=0,
            kv_block_tokens=kv_block_tokens,
        )  # fmt: skip

    # Head (and the tied embedding) stays on the execution device; an untied embedding table is
    # only gathered from, so it stays in RAM on a GPU machine.
    head_resident = head if head else embed
    fixed = {"globals": head_resident + norm, "kv cache": kv, "activations": act}
    if not on_gpu:
        fixed["globals"] = embed + head + norm
    slots = 2 if n > 1 else 1
    kv_off = 0
    if budget is not None and (on_gpu or kv_cache == "disk"):
        # KV that cannot sit beside the minimum weights goes to pinned RAM (or disk), layer by
        # layer (the last ones first); the prefill scratch holds one layer's KV on the device.
        # With the cost model, decode may copy some offloaded layers' KV back to the GPU: that
        # takes ``kv_fetch_buffers`` more buffers (re-planned without them if unused). Scratch
        # and fetch buffers are allocated at full capacity, even for a sliding-window layer.
        extra = kv_fetch_buffers if rates is not None else 0
        while kv_off < n and sum(fixed.values()) + slots * layer > budget:
            kv_off += 1
            fixed["kv cache"] = sum(layer_kv[: n - kv_off]) + scratch * (1 + extra)
        if extra and sum(fixed.values()) + slots * layer > budget:  # no room for them
            return without_fetch()
    fixed_total = sum(fixed.values())
    minimum = fixed_total + slots * layer
    if budget is None:
        n_res = n
    else:
        if budget < minimum and chunk_tokens is None and (chunk or work.prefill_tokens) > MIN_CHUNK:
            # The chunk was sized from the budget; smaller chunks need fewer activations, so
            # try them (halving, down to MIN_CHUNK rows) before refusing: the minimum named is
            # then the smallest any chunk allows.
            rows = chunk or work.prefill_tokens
            while True:
                rows = max(MIN_CHUNK, rows // 2)
                try:
                    return plan_placement(
                        spec, store, device, gpu_memory, cpu_memory, offload, work, dtype_bytes,
                        rates, hybrid, cpu_layers, rows, kv_cache, kv_fetch_buffers,
                        kv_block_tokens,
                    )  # fmt: skip
                except BudgetError:
                    if rows == MIN_CHUNK:
                        raise
        if budget < minimum:
            what = "gpu_memory" if on_gpu else "cpu_memory"
            raise BudgetError(
                f"{what} {format_size(budget)} is too small for this model and request: at least "
                f"{format_size(minimum)} is needed ({format_size(layer)} per layer x {slots} "
                f"stream buffers, {format_size(fixed['kv cache'])} KV cache on the device (of "
                f"{format_size(kv)}), {format_size(act)} activations, "
                f"{format_size(fixed['globals'])} embeddings/head)"
            )
        if budget - fixed_total >= n * layer:
            n_res = n
        else:
            n_res = min(n - 1, (budget - fixed_total - slots * layer) // layer)
    if offload == "disk":
        n_res = 0  # every layer read from the layer store on each pass, as upstream oLLM does
    ring = 0
    if n_res < n:
        ring = min(slots, n - n_res)
        spare = None if budget is None else budget - fixed_total - n_res * layer - ring * layer
        # A third ring slot lets the copy engine run two layers ahead when it fits.
        if n - n_res > 2 and (spare is None or spare >= layer):
            ring += 1
    exec_dev = device
    layers: list[LayerPlacement] = []
    if on_gpu:
        host_budget = cpu_memory
        host_used = embed if head else 0  # an untied embedding table stays in RAM
        for i in range(n):
            if i < n_res:
                layers.append(LayerPlacement("gpu", exec_dev))
                continue
            size = store.layer_nbytes(i)
            fits = host_budget is None or host_used + size <= host_budget
            if offload == "disk" or (offload == "auto" and not fits):
                layers.append(LayerPlacement("disk", exec_dev))
            else:
                if offload == "cpu" and not fits:
                    raise BudgetError(
                        f"offload='cpu' needs {format_size(host_used + size * (n - i))} more of pinned RAM "
                        f"than cpu_memory {format_size(host_budget or 0)} allows; use offload='auto' or 'disk'"
                    )
                layers.append(LayerPlacement("cpu", exec_dev))
                host_used += size
    else:
        layers = [LayerPlacement("cpu" if i < n_res else "disk", exec_dev) for i in range(n)]
    streamed = [p for p in layers if _moves(p, device)]
    staging = min(3, sum(1 for p in streamed if p.tier == "disk")) if on_gpu else 0
    if not streamed:
        ring = 0
    if kv_cache == "disk" and not on_gpu and budget is None:
        kv_off = n  # on a CPU machine without a budget "disk" means: no KV in RAM at all
    if kv_off:
        from dataclasses import replace as _replace

        tier = "disk" if kv_cache == "disk" else "cpu"
        layers = [_replace(p, kv_tier=tier) if i >= n - kv_off else p for i, p in enumerate(layers)]
        if budget is not None and not spec.layers[n - kv_off].window:
            # The budget left over holds the first blocks of the first offloaded layer's KV.
            resident = sum(
                store.layer_nbytes(i) for i, p in enumerate(layers) if not _moves(p, device)
            )
            spare = budget - sum(fixed.values()) - resident - ring * layer
            block = per_token * kv_block_tokens
            keep = min(max(0, spare) // block, (work.context - 1) // kv_block_tokens)
            if keep:
                b = n - kv_off
                layers[b] = _replace(layers[b], kv_device_tokens=keep * kv_block_tokens)
                fixed["kv cache"] += keep * block
    cpu_max_tokens, predicted = 0, {}
    if on_gpu and rates is not None:
        layers, cpu_max_tokens, predicted = _hybrid(
            spec, layers, n_res, layer, head_resident, rates, work, hybrid, cpu_layers, ring
        )
    if on_gpu and rates is not None and kv_off and kv_fetch_buffers:
        layers, fetched, step = _kv_fetch(store, layers, rates, work, per_token, predicted, ring)
        if not fetched:  # nothing worth fetching: plan again without the fetch buffers
            return without_fetch()
        predicted["decode s (KV split)"] = step
    reserved = dict(fixed)
    reserved["kv cache"] = device_kv_bytes(layers, layer_kv, scratch, kv_fetch_buffers, per_token)
    reserved["resident layers"] = sum(
        store.layer_nbytes(i) for i, p in enumerate(layers) if not _moves(p, device)
    )
    reserved["stream buffers"] = ring * layer
    # Paged pools (engine v2): batch x context in blocks; steps of one chunk with sliding windows.
    windowed = any(sl.window for sl in spec.layers)
    step = chunk if windowed and chunk else work.batch * work.context
    return PlacementPlan(
        device=device,
        layers=tuple(layers),
        embed_device=device if (not on_gpu or not head) else "cpu",
        head_device=device,
        ring_slots=ring,
        staging_slots=staging,
        layer_bytes=layer,
        mlp_chunk_tokens=mlp_chunk,
        budget=budget,
        reserved=reserved,
        cpu_max_tokens=cpu_max_tokens,
        predicted=predicted,
        prefill_chunk_tokens=chunk,
        kv_block_tokens=kv_block_tokens,
        kv_pools=kv_pool_blocks(spec, work, PAGE_TOKENS, step),
        kv_page_tokens=PAGE_TOKENS,
    )


def _kv_fetch(store, layers, rates, work, per_token, predicted, ring):
    """Which pinned-RAM KV layers decode attends on the GPU from a prefetched copy (the rest
    attend on the CPU where the KV sits): a fetched layer adds its KV to the copy engine's queue
    (right behind its weights), a CPU one stops the compute chain while the CPU reads it. The
    count and positions (spread by ``interleave``) minimise the step simulated layer by layer
    with the ring's depth (``costmodel.pipeline_step``): a CPU stall is covered only by the copies
    of the next layer or two. ``per_token``: KV bytes per token position of one layer."""
    from dataclasses import replace

    from ollm.weights.costmodel import CPU_HANDOFF_S, GPU_DECODE_LAYER_S, interleave, pipeline_step

    cands = [i for i, p in enumerate(layers) if p.kv_tier == "cpu" and p.decode_device != "cpu"]
    shared = rates.pcie_busy
    if rates.cpu_attn:  # measured: one query over a KV in RAM; slower beside the copies
        cpu_rate = rates.cpu_attn * rates.cpu_mem_busy / rates.cpu_mem
    else:
        # cpu_mem is weight bytes per second of a whole decoder layer measured with a KV cache
        # of the context's power-of-two bucket (costmodel.cached_rates): the bytes it really
        # moves per second include that KV.
        bucket = 1 << max(0, work.context - 1).bit_length()
        lb = store.max_layer_nbytes
        cpu_rate = rates.cpu_mem_busy * (lb + per_token // work.batch * bucket) / lb
    n_cpu = sum(p.decode_device == "cpu" for p in layers)
    cpu_layer = predicted.get("hybrid cpu s", 0.0) / max(1, n_cpu)
    copy, base, cpu_kv, host_kv = [], [], [], []
    for i, p in enumerate(layers):
        on_cpu = p.decode_device == "cpu"
        copy.append(0.0 if p.tier == "gpu" or on_cpu else store.layer_nbytes(i) / shared)
        base.append(cpu_layer if on_cpu else GPU_DECODE_LAYER_S)
        host_kv.append(
            0 if p.kv_tier == "device" else per_token * (work.context - p.kv_device_tokens)
        )
        # A layer whose KV the CPU reads stops the chain: query over, attention, output back.
        cpu_kv.append(host_kv[i] / cpu_rate + CPU_HANDOFF_S if host_kv[i] and not on_cpu else 0.0)

    def step(x: int) -> float:
        chosen = interleave(cands, x)
        chain = [base[i] + (0.0 if i in chosen else cpu_kv[i]) for i in range(len(layers))]
        fetch = [host_kv[i] / shared if i in chosen else 0.0 for i in range(len(layers))]
        return pipeline_step(chain, copy, max(1, ring), fetch)

    x = min(range(len(cands) + 1), key=lambda k: (round(step(k), 6), k))
    chosen = interleave(cands, x)
    layers = [replace(p, kv_fetch=True) if i in chosen else p for i, p in enumerate(layers)]
    return layers, len(chosen), step(x)


def _hybrid(spec, layers, n_res, layer_bytes, head_bytes, rates, work, hybrid, forced, ring):
    """Choose which pinned-RAM layers the CPU computes in decode (cost model or ``forced``):
    the count (spread by ``interleave``) whose decode step, simulated layer by layer with the
    ring's depth (``costmodel.pipeline_step``), is shortest."""
    from dataclasses import replace

    from ollm.weights.costmodel import (
        CPU_HANDOFF_S,
        GPU_DECODE_LAYER_S,
        LAYER_OVERHEAD_S,
        interleave,
        pipeline_step,
        predict_step,
    )

    params = spec.layer_param_count()
    cands = [i for i, p in enumerate(layers) if p.tier == "cpu"]
    n_stream = sum(1 for p in layers if p.tier != "gpu")
    stream_only = predict_step(
        rates, n_res, n_stream, 0, layer_bytes, params, head_bytes, work.batch
    )
    predicted = {"stream-only tok/s": stream_only.tokens_per_second}
    if hybrid == "off" or not cands:
        return layers, 0, predicted
    gpu_layer = max(GPU_DECODE_LAYER_S, rates.gpu_layer_s(layer_bytes, params, work.batch))
    cpu_layer = rates.cpu_layer_s(layer_bytes, params, work.batch, True)
    cpu_layer += LAYER_OVERHEAD_S + CPU_HANDOFF_S

    def simulate(k: int) -> float:
        chosen = interleave(cands, k)
        chain = [cpu_layer if i in chosen else gpu_layer for i in range(len(layers))]
        copy = [
            0.0 if i in chosen or p.tier == "gpu" else rates.copy_s(layer_bytes, k > 0)
            for i, p in enumerate(layers)
        ]
        return pipeline_step(chain, copy, max(1, ring)) + head_bytes / rates.gpu_mem

    if forced is not None:
        k = min(forced, len(cands))
    else:
        k = min(range(len(cands) + 1), key=lambda x: (round(simulate(x), 6), x))
    if k == 0:
        return layers, 0, predicted
    pred = predict_step(rates, n_res, n_stream - k, k, layer_bytes, params, head_bytes, work.batch)
    chosen = interleave(cands, k)
    # The KV of a CPU-decoded layer lives in pinned RAM as an OffloadedKVCache: prefill (on the
    # GPU) writes it through the shared scratch with asynchronous per-head copies, decode attends
    # on the CPU where it sits. A layer whose KV the planner already sent to disk keeps that tier.
    layers = [
        replace(p, decode_device="cpu", kv_tier="cpu" if p.kv_tier == "device" else p.kv_tier)
        if i in chosen
        else p
        for i, p in enumerate(layers)
    ]
    # Largest forward the CPU still computes faster than the copy engine streams the layer.
    switch = int(rates.cpu_flops * layer_bytes / (rates.pcie * 2 * params))
    predicted.update(
        {
            "hybrid tok/s": 1.0 / simulate(k),
            "hybrid copy s": pred.copy_s,
            "hybrid cpu s": pred.cpu_s,
        }
    )
    return layers, max(1, switch), predicted
