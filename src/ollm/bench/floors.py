"""Physical floors of a benchmark case: the least time each phase can take on this machine.

For every phase the floor is the largest of these terms (each a lower bound on its own, since the
engine overlaps them):

* ``io_s``: the bytes that must move, over the measured link: every layer streamed in that phase
  (``plan.streamed_for(phase)``) crosses host->GPU at the pinned rate, a disk-tier layer at
  ``min(h2d, disk)``; on the CPU device a disk-tier layer is read at the disk rate. The warm-disk
  (page cache) rate is used; ``io_cold_s`` is the same with the cold rate.
* ``compute_s``: FLOPs over the measured matmul rate: ``2 * layer_params * layers * tokens``, the
  head for one token per step, and attention (``4 * heads * head_dim * keys`` per query and layer,
  causal in prefill, clipped to the sliding window where a layer has one).
* ``memory_s``: weights read once per step from the memory of the device computing them
  (device-memory copy traffic rate on a GPU, RAM on the CPU).
* ``cpu_path_s`` (hybrid decode only): the layers the CPU computes, read at the RAM rate.
* ``kv_s`` (KV cache off the device only): in decode, the KV of layers whose cache sits in
  pinned RAM is read at the RAM rate, on disk at the disk rate; in prefill, the prompt's KV of
  those layers moves there (PCIe at the pinned rate for RAM; the disk rate for disk).

Decode floors are per token (one step at the full context); prefill floors are for the prompt.
"""

from __future__ import annotations

from ollm.bench.probes import matmul_flops

__all__ = ["compute_floors", "layer_link_rate"]


def _rate(probes: dict[str, object], key: str) -> float | None:
    v = probes.get(key)
    return float(v) * 1e9 if v else None  # type: ignore[arg-type]


def layer_link_rate(
    tier: str, on_gpu: bool, probes: dict[str, object], cold: bool = False
) -> float | None:
    """Bytes/s at which a streamed layer of ``tier`` reaches its execution device (None: unknown)."""
    disk = _rate(probes, "disk_cold_GBps" if cold else "disk_warm_GBps")
    if not on_gpu:
        return disk if tier == "disk" else None
    h2d = _rate(probes, "h2d_pinned_GBps")
    if tier == "disk":
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
        if causal:
            first = context - queries  # keys before the first query
            keys = queries * first + queries * (queries + 1) / 2
            if layer.window:
                keys = min(keys, queries * layer.window)
        else:
            keys = queries * min(context, layer.window or context)
        flops += per_key * keys
    return flops


def _kv_bytes(spec, store, layers: list[int], tokens: int) -> int:
    """KV bytes of ``tokens`` positions in ``layers`` (clipped to each layer's window)."""
    per_token = 2 * spec.num_kv_heads * spec.head_dim * store.dtype.itemsize
    return sum(per_token * min(tokens, spec.layers[i].window or tokens) for i in layers)


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


def compute_floors(
    spec, store, plan, probes: dict[str, object], prompt_tokens: int, batch: int = 1
) -> dict[str, object]:
    """Prefill and per-token decode floors of a case (see the module docstring).

    ``spec``, ``store`` and ``plan`` are an LLM's ``spec``, ``store`` and ``plan``; ``probes`` is
    ``measure_bandwidth``'s dict from the same machine.
    """
    on_gpu = plan.device.startswith("cuda")
    flops_rate = matmul_flops(probes)
    mem_rate = _rate(probes, "gpu_mem_GBps" if on_gpu else "ram_GBps")
    ram_rate = _rate(probes, "ram_GBps")
    n = spec.num_layers
    layer_params = spec.layer_param_count()
    head_params = spec.vocab_size * spec.hidden_size
    head_bytes = _head_bytes(store)
    cpu_layers = list(plan.cpu_layers)
    kv_ram = [i for i, p in enumerate(plan.layers) if getattr(p, "kv_tier", "device") == "cpu"]
    kv_disk = [i for i, p in enumerate(plan.layers) if getattr(p, "kv_tier", "device") == "disk"]
    h2d = _rate(probes, "h2d_pinned_GBps")
    disk = _rate(probes, "disk_warm_GBps")

    def kv_seconds(tokens: int, ram: float | None) -> float | None:
        """Moving ``tokens`` positions of off-device KV: RAM layers at ``ram``, disk at disk."""
        parts = [(kv_ram, ram), (kv_disk, disk)]
        if any(layers and not rate for layers, rate in parts):
            return None
        return sum(
            _kv_bytes(spec, store, layers, tokens) / rate for layers, rate in parts if layers
        )

    def compute(tokens: int, context: int, causal: bool) -> float | None:
        if not flops_rate:
            return None
        flops = 2 * layer_params * n * tokens * batch + 2 * head_params * batch
        flops += batch * _attention_flops(spec, tokens, context, causal)
        return flops / flops_rate

    def memory(exclude: list[int]) -> float | None:
        if not mem_rate:
            return None
        nbytes = sum(store.layer_nbytes(i) for i in range(n) if i not in exclude)
        return (nbytes + head_bytes) / mem_rate

    streamed_prefill = plan.streamed_for("prefill")
    streamed_decode = plan.streamed_for("decode")
    context = prompt_tokens  # the decode floor is per token at the prompt's depth
    prefill_terms = {
        "io_s": _io_seconds(plan, store, streamed_prefill, probes, cold=False),
        "compute_s": compute(prompt_tokens, prompt_tokens, causal=True),
        "memory_s": memory([]),
    }
    if kv_ram or kv_disk:
        prefill_terms["kv_s"] = kv_seconds(prompt_tokens, h2d)
    prefill = _phase(prefill_terms)
    prefill["io_cold_s"] = _io_seconds(plan, store, streamed_prefill, probes, cold=True)
    decode_terms = {
        "io_s": _io_seconds(plan, store, streamed_decode, probes, cold=False),
        "compute_s": compute(1, context + 1, causal=False),
        "memory_s": memory(cpu_layers),
    }
    if cpu_layers:
        cpu_bytes = sum(store.layer_nbytes(i) for i in cpu_layers)
        decode_terms["cpu_path_s"] = cpu_bytes / ram_rate if ram_rate else None
    if kv_ram or kv_disk:
        decode_terms["kv_s"] = kv_seconds(context + 1, ram_rate)
    decode = _phase(decode_terms)
    decode["io_cold_s"] = _io_seconds(plan, store, streamed_decode, probes, cold=True)
    return {
        "prefill": prefill,
        "decode": decode,
        "kv_ram_layers": len(kv_ram),
        "kv_disk_layers": len(kv_disk),
        "streamed_layers_prefill": len(streamed_prefill),
        "streamed_layers_decode": len(streamed_decode),
        "streamed_bytes_prefill": sum(store.layer_nbytes(i) for i in streamed_prefill),
        "streamed_bytes_decode": sum(store.layer_nbytes(i) for i in streamed_decode),
        "params": layer_params * n + head_params,
    }


def ratio(measured: float | None, floor: float | None) -> float | None:
    """measured / floor, or None when either is unknown or zero."""
    if not measured or not floor:
        return None
    return measured / floor
