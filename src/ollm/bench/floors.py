"""Physical floors of a benchmark case: the least time each phase can take on this machine.

For every phase the floor is the largest of these terms (each a lower bound on its own, since the
engine overlaps them):

* ``io_s``: the bytes that must move, over the measured link: every layer streamed in that phase
  (``plan.streamed_for(phase)``) crosses host->GPU at the pinned rate, a disk-tier layer at
  ``min(h2d, disk)``; on the CPU device a disk-tier layer is read at the disk rate. The warm-disk
  (page cache) rate is used; ``io_cold_s`` is the same with the cold rate. In decode, the KV the
  ``KVFetcher`` copies back to the GPU (layers marked ``kv_fetch``: their host part, the context
  minus ``kv_device_tokens``) crosses the same link, so its bytes are added.
* ``compute_s``: FLOPs over the measured matmul rate: ``2 * layer_params * layers * tokens``, the
  head for one token per step, and attention (``4 * heads * head_dim * keys`` per query and layer,
  causal in prefill, clipped to the sliding window where a layer has one).
* ``memory_s``: weights read once per step from the memory of the device computing them
  (device-memory copy traffic rate on a GPU; on the CPU the faster of the RAM read and copy
  probes: weights in RAM or the page cache are read at least once per prefill and per step).
* ``cpu_path_s`` (hybrid decode only): the layers the CPU computes, read at the RAM rate.
* ``experts_s`` (experts placed one by one, not resident): the experts a token misses in a cache
  of that size at best under uniform routing (every uncached expert once in prefill) crossing
  host->GPU, the CPU reading its share at the RAM rate where it may compute RAM misses.
* ``kv_s`` (KV cache off the device only): in decode, the host part of the KV of layers whose
  cache sits in pinned RAM and is not fetched is read by the CPU at the RAM rate, on disk at the
  disk rate; in prefill, the prompt's KV of those layers moves there (PCIe at the pinned rate for
  RAM; the disk rate for disk).

Decode floors are per token (one step at the full context); prefill floors are for the prompt.

A floor divides by rates measured once, before the cases (the CPU matmul rate also after each
CPU case; the higher is used). A measurement below its floor (ratio < 1) means a rate was
measured lower than the case achieved: the machine's load changed between probe and case (other
processes on shared cores), or the engine's access pattern beat the probe's (several reader
threads on the page cache). ``NOTE_BELOW_FLOOR`` is the sentence the report prints then.
"""

from __future__ import annotations

from ollm.bench.probes import matmul_flops
from ollm.tiers import KvTier, Phase, Tier

__all__ = ["compute_floors", "layer_link_rate", "NOTE_BELOW_FLOOR"]

NOTE_BELOW_FLOOR = (
    "below its floor: a rate was measured lower than this case achieved (machine load changed "
    "between probe and case, or the engine's access pattern beat the probe's)"
)


def _rate(probes: dict[str, object], key: str) -> float | None:
    v = probes.get(key)
    return float(v) * 1e9 if v else None  # type: ignore[arg-type]


def layer_link_rate(
    tier: Tier, on_gpu: bool, probes: dict[str, object], cold: bool = False
) -> float | None:
    """Bytes/s at which a streamed layer of ``tier`` reaches its execution device (None: unknown)."""
    disk = _rate(probes, "disk_cold_GBps" if cold else "disk_warm_GBps")
    if not on_gpu:
        return disk if tier == Tier.DISK else None
    h2d = _rate(probes, "h2d_pinned_GBps")
    if tier == Tier.DISK:
        return min(h2d, disk) if (h2d and disk) else None
    return h2d


def _io_seconds(plan, store, layers: list[int], probes, cold: bool) -> float | None:
    on_gpu = plan.device.startswith("cuda")
    total = 0.0
    for i in layers:
        rate = layer_link_rate(plan.layers[i].tier, on_gpu, probes, cold)
        if rate is None:
            return None
        total += store.layer_nbytes(i) / rate
    return total


def _attention_flops(spec, queries: int, context: int, causal: bool) -> float:
    """FLOPs of QK^T and PV for ``queries`` new tokens whose last sees ``context`` keys."""
    per_key = 4 * spec.num_heads * spec.head_dim  # 2 for the scores, 2 for the weighted values
    flops = 0.0
    for layer in spec.layers:
        if getattr(layer, "linear", False):  # the delta rule: decay, read, write, query the state
            lin = spec.linear_attn
            flops += queries * 8 * lin.num_v_heads * lin.k_dim * lin.v_dim
            continue
        if causal:
            first = context - queries  # keys before the first query
            keys = queries * first + queries * (queries + 1) / 2
            if layer.window:
                keys = min(keys, queries * layer.window)
        else:
            keys = queries * min(context, layer.window or context)
        flops += per_key * keys
    return flops


def _kv_bytes(spec, store, layers: list[int], tokens: int, plan=None, fmt=None) -> int:
    """KV bytes of ``tokens`` positions in ``layers`` (clipped to each layer's window); with
    ``plan``, only the host part (the first ``kv_device_tokens`` slots stay on the device); a
    full-attention layer under ``fmt`` (a ``KVFormat``: compressed KV) at its stored size; a
    linear-attention layer its recurrent state, whatever ``tokens``."""
    elem = store.dtype.itemsize
    per_token = 2 * spec.num_kv_heads * spec.head_dim * elem
    total = 0
    for i in layers:
        if getattr(spec.layers[i], "linear", False):  # a fixed-size state: read once per step
            total += spec.linear_attn.state_bytes(1, elem)
            continue
        if fmt is not None and spec.layers[i].window is None:
            total += fmt.layer_bytes(1, spec.num_kv_heads, spec.head_dim, elem, tokens)
            continue
        n = min(tokens, spec.layers[i].window or tokens)
        if plan is not None:
            n = max(0, n - getattr(plan.layers[i], "kv_device_tokens", 0))
        total += per_token * n
    return total


def _head_bytes(store) -> int:
    g = store.files["globals.bin"].tensors
    return (g["lm_head.weight"] if "lm_head.weight" in g else g["embed_tokens.weight"]).nbytes


def _phase(terms: dict[str, float | None]) -> dict[str, object]:
    known = {k: v for k, v in terms.items() if v is not None}
    out: dict[str, object] = dict(terms)
    if known:
        bound = max(known, key=lambda k: known[k])  # type: ignore[arg-type, return-value]
        out["floor_s"] = known[bound]
        out["bound"] = bound.removesuffix("_s")
    else:
        out["floor_s"] = None
        out["bound"] = None
    return out


def _compute_s(spec, flops_rate, tokens: int, ctx: int, causal: bool, batch: int):
    """FLOPs of ``tokens`` new tokens per sequence (layers, head for one token, attention)."""
    if not flops_rate:
        return None
    # A mixture of experts runs top_k experts per token: its FLOPs come from the active weights.
    flops = 2 * spec.layer_param_count(active=True) * spec.num_layers * tokens * batch
    flops += 2 * spec.vocab_size * spec.hidden_size * batch
    flops += batch * _attention_flops(spec, tokens, ctx, causal)
    return flops / flops_rate


def _memory_s(store, num_layers: int, exclude: list[int], mem_rate) -> float | None:
    """Weights (but ``exclude``) and the head read once from the computing device's memory."""
    if not mem_rate:
        return None
    nbytes = sum(store.layer_nbytes(i) for i in range(num_layers) if i not in exclude)
    return (nbytes + _head_bytes(store)) / mem_rate


def _kv_s(spec, store, parts, tokens: int, plan=None, fmt=None) -> float | None:
    """Moving ``tokens`` positions of KV of each ``(layers, rate)`` part (host part only with
    ``plan``, stored bytes under ``fmt``); None when a part with layers has no measured rate."""
    if any(layers and not rate for layers, rate in parts):
        return None
    return sum(
        _kv_bytes(spec, store, layers, tokens, plan, fmt) / rate for layers, rate in parts if layers
    )


def _experts_s(spec, e, probes, ram_rate: float | None, batch: int | None) -> float | None:
    """Experts one by one (``plan.experts``, not resident): in decode (``batch`` tokens) each
    token's ``top_k`` experts per sparse layer miss a cache of ``cache_slots`` at best with
    probability 1 - slots / experts under uniform routing; in prefill (``batch`` None) every
    expert not cached crosses once. Those bytes cross host->GPU (disk experts at min(h2d, disk));
    where the CPU may compute RAM misses it reads its share at the RAM rate at the same time."""
    h2d, disk = _rate(probes, "h2d_pinned_GBps"), _rate(probes, "disk_warm_GBps")
    if not h2d:
        return None
    miss = max(0.0, 1 - e.cache_slots / e.total)
    n = e.total * miss if batch is None else len(e.layers) * spec.moe.top_k * batch * miss
    on_disk = e.tier_counts()[Tier.DISK] / e.total
    link = 1 / ((1 - on_disk) / h2d + on_disk / min(h2d, disk or h2d))  # bytes/s, harmonic
    cpu = ram_rate if (e.cpu_compute != "off" and ram_rate and batch is not None) else 0.0
    return n * e.expert_bytes / (link + cpu * (1 - on_disk))


def _kv_layers(spec, plan, on_gpu: bool, kv_format) -> tuple[list[int], list[int], list[int]]:
    """Layers whose KV decode fetches to the GPU, those whose KV lives in RAM, and on disk."""
    tiers = [getattr(p, "kv_tier", KvTier.DEVICE) for p in plan.layers]
    fetched = [i for i, p in enumerate(plan.layers) if on_gpu and getattr(p, "kv_fetch", False)]
    kv_ram = [i for i, t in enumerate(tiers) if t == KvTier.CPU]
    if kv_format is not None and on_gpu:  # compressed RAM KV crosses to the GPU encoded
        gpu_decoded = [i for i in kv_ram if plan.layers[i].decode_device != "cpu"]
        fetched = sorted(set(fetched) | {i for i in gpu_decoded if not spec.layers[i].window})
    kv_disk = [i for i, t in enumerate(tiers) if t == KvTier.DISK]
    return fetched, kv_ram, kv_disk


def compute_floors(
    spec,
    store,
    plan,
    probes: dict[str, object],
    prompt_tokens: int,
    batch: int = 1,
    kv_format=None,
) -> dict[str, object]:
    """Prefill and per-token decode floors of a case (see the module docstring).

    ``spec``, ``store`` and ``plan`` are an LLM's ``spec``, ``store`` and ``plan``; ``probes`` is
    ``measure_bandwidth``'s dict from the same machine. ``kv_format`` (``KVFormat``, compressed
    KV): KV terms count stored bytes, and a RAM-homed compressed layer decoded on the GPU copies
    its encoded KV each step (counted as fetched).
    """
    on_gpu = plan.device.startswith("cuda")
    flops_rate = matmul_flops(probes)
    ram_rate = max(_rate(probes, "ram_GBps") or 0, _rate(probes, "ram_read_GBps") or 0) or None
    mem_rate = _rate(probes, "gpu_mem_GBps") if on_gpu else ram_rate
    n = spec.num_layers
    cpu_layers = list(plan.cpu_layers)
    fetched, kv_ram, kv_disk = _kv_layers(spec, plan, on_gpu, kv_format)
    h2d = _rate(probes, "h2d_pinned_GBps")
    disk = _rate(probes, "disk_warm_GBps")
    context = prompt_tokens  # the decode floor is per token at the prompt's depth
    streamed_prefill = plan.streamed_for(Phase.PREFILL)
    streamed_decode = plan.streamed_for(Phase.DECODE)
    fetched_bytes = batch * _kv_bytes(spec, store, fetched, context + 1, plan, kv_format)

    prefill_terms = {
        "io_s": _io_seconds(plan, store, streamed_prefill, probes, cold=False),
        "compute_s": _compute_s(spec, flops_rate, prompt_tokens, prompt_tokens, True, batch),
        "memory_s": _memory_s(store, n, [], mem_rate),
    }
    if kv_ram or kv_disk:  # the prompt's host-part KV: to RAM over PCIe, to disk at its rate
        parts = [(kv_ram, h2d), (kv_disk, disk)]
        prefill_terms["kv_s"] = _kv_s(spec, store, parts, context, plan, kv_format)
    experts = getattr(plan, "experts", None)  # experts one by one: the misses cross too
    experts = experts if experts is not None and not experts.resident else None
    if experts is not None:
        prefill_terms["experts_s"] = _experts_s(spec, experts, probes, ram_rate, None)
    prefill = _phase(prefill_terms)
    prefill["io_cold_s"] = _io_seconds(plan, store, streamed_prefill, probes, cold=True)

    def decode_io(cold: bool) -> float | None:
        weights = _io_seconds(plan, store, streamed_decode, probes, cold)
        if weights is None or (fetched_bytes and not h2d):
            return None
        return weights + (fetched_bytes / h2d if fetched_bytes else 0.0)  # one copy engine

    decode_terms = {
        "io_s": decode_io(cold=False),
        "compute_s": _compute_s(spec, flops_rate, 1, context + 1, False, batch),
        "memory_s": _memory_s(store, n, cpu_layers, mem_rate),
    }
    if experts is not None:
        decode_terms["experts_s"] = _experts_s(spec, experts, probes, ram_rate, batch)
    if cpu_layers:
        cpu_bytes = sum(store.layer_nbytes(i) for i in cpu_layers)
        decode_terms["cpu_path_s"] = cpu_bytes / ram_rate if ram_rate else None
    on_cpu_kv = [i for i in kv_ram if i not in fetched]  # the CPU reads it where it sits
    if on_cpu_kv or kv_disk:
        parts = [(on_cpu_kv, ram_rate), (kv_disk, disk)]
        decode_terms["kv_s"] = _kv_s(spec, store, parts, context + 1, plan, kv_format)
    decode = _phase(decode_terms)
    decode["io_cold_s"] = decode_io(cold=True)
    return {
        "prefill": prefill,
        "decode": decode,
        "kv_ram_layers": len(kv_ram),
        "kv_disk_layers": len(kv_disk),
        "kv_fetched_layers": len(fetched),
        "kv_fetched_bytes_decode": fetched_bytes,
        "streamed_layers_prefill": len(streamed_prefill),
        "streamed_layers_decode": len(streamed_decode),
        "streamed_bytes_prefill": sum(store.layer_nbytes(i) for i in streamed_prefill),
        "streamed_bytes_decode": sum(store.layer_nbytes(i) for i in streamed_decode),
        "params": spec.layer_param_count() * n + spec.vocab_size * spec.hidden_size,
    }


def ratio(measured: float | None, floor: float | None) -> float | None:
    """measured / floor, or None when either is unknown or zero."""
    if not measured or not floor:
        return None
    return measured / floor
